"""The two ways every attack is called.

The parts' form, which the attacks compose with (Restarts, AutoAttack, the trainers):

    x_adv = attack(model_fn, x, y, seed)      # model_fn: images -> logits; one batch

and, for an attack made with a model, the form torchattacks' users know:

    x_adv = PGD(model, eps=8 / 255, steps=20)(x, y)        # numpy arrays, any size

where the model is any Keras model (inference mode; a split-BN network through its adv
branch, or branch=... given to the attack call) or any callable images -> logits, the
seed a plain int, the images attacked in batches, and every batch checked to stay in
the threat model.
"""

import tensorflow as tf


def as_seed(seed):
    """A [2] int64 stateless seed from an int, a pair or a [2] tensor."""
    seed = tf.cast(tf.convert_to_tensor(seed), tf.int64)
    if seed.shape.rank == 0:
        return tf.stack([seed, tf.constant(0, tf.int64)])
    return seed


def model_function(model, branch="adv"):
    """images -> logits in inference mode: a network with split BN (its `branch`), any
    Keras model, or any callable (returned as it is)."""
    import keras
    if hasattr(model, "default_taps"):  # a SplitBNNetwork, or a model of the same contract
        return lambda z: model(z, training=False, branch=branch)
    if isinstance(model, keras.Model):
        return lambda z: model(z, training=False)
    if callable(model):
        return model
    raise TypeError(f"cannot attack a {type(model).__name__}: give a Keras model or a "
                    "callable images -> logits")


class Attack:
    """Base of the attacks: __call__ dispatches on its first argument, a model function
    (the parts' form, perturb) or images (the bound form, attack_model)."""

    model = None  # a dataclass field of each attack overrides it

    def __call__(self, *args, **kwargs):
        if args and callable(args[0]):
            return self.perturb(*args, **kwargs)
        return self.attack_model(*args, **kwargs)

    def perturb(self, model_fn, x, y, seed):
        raise NotImplementedError

    def attack_model(self, x, y, seed=0, batch_size=256, branch="adv"):
        """Adversarial examples (numpy) of x for the model this attack was made with."""
        if self.model is None:
            raise ValueError(f"{type(self).__name__} was made without a model: call it as "
                             f"attack(model_fn, x, y, seed), or make it with one, e.g. "
                             f"{type(self).__name__}(model, eps=8 / 255)")
        from keras_arat.attacks.autoattack import run_attack
        x_adv, _ = run_attack(self, model_function(self.model, branch), x, y, batch_size,
                              int(seed))
        return x_adv
