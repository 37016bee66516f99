"""The trainer base class: a keras.Model wrapping a classifier with a custom train_step.

The wrapped `network` follows the keras_arat.models contract:
network(x, training=..., branch="clean"|"adv"|"both", return_features=False|True|names)
(keras_arat.network.SplitBNNetwork: every built-in family, and any user model after
keras_arat.to_split_bn).
"""

import dataclasses

import keras
import tensorflow as tf

from keras_arat.attacks import PGD, core


def mean_ce(logits, y):
    return tf.reduce_mean(core.cross_entropy(logits, y))


def accuracy(logits, y):
    return tf.reduce_mean(tf.cast(tf.equal(tf.argmax(logits, -1), tf.cast(y, tf.int64)),
                                  tf.float32))


def in_multi_worker_mode():
    """True inside a MultiWorkerMirroredStrategy whose cluster has more than one worker."""
    strategy = tf.distribute.get_strategy()
    return (isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)
            and strategy.extended._in_multi_worker_mode())  # noqa: SLF001


def loss_dtype(t):
    """float64 for float64 tensors, float32 for every other (mixed-precision halves)."""
    return tf.float64 if t.dtype == tf.float64 else tf.float32


def pooled_feature(t):
    """ARAT's z_l: ReLU, then global average pooling of a spatial map (in float32, or
    float64 for a float64 network)."""
    t = tf.nn.relu(tf.cast(t, loss_dtype(t)))
    if t.shape.rank == 4:
        t = tf.reduce_mean(t, axis=[1, 2])
    return t


def mean_cosine(a, b):
    a = tf.math.l2_normalize(tf.cast(a, loss_dtype(a)), axis=-1, epsilon=1e-12)
    b = tf.math.l2_normalize(tf.cast(b, a.dtype), axis=-1, epsilon=1e-12)
    return tf.reduce_mean(tf.reduce_sum(a * b, axis=-1))


class AdversarialTrainer(keras.Model):
    """Shared machinery: the PGD attack, seeding, loss trackers, inference calls.

    Subclasses implement `losses_for(x, y)` returning (total_loss, {name: scalar}).
    Every logged figure goes through a keras.metrics.Mean, so `fit` reports the
    epoch mean of each (a raw tensor named "loss" would be shadowed by Keras'
    own loss tracker).
    """

    uses_attack = True
    # BN mode of the network while attacking: ARAT and PGD-AT attack in training mode
    # (batch statistics), TRADES and MART in inference mode, as their reference code.
    attack_training = True

    NAN_POLICIES = ("stop", "skip_batch")
    # The figures `losses_for` logs besides "loss"; their trackers are made up front
    # (a tf.distribute replica may not add state while training).
    log_names = ("train_acc",)

    ATTACK_BN_MODES = ("default", "train", "inference")

    def __init__(self, network, eps=8 / 255, step_size=2 / 255, attack_steps=10, seed=0,
                 nan_policy="stop", eps_warmup_steps=0, attack_bn="default", **kwargs):
        super().__init__(**kwargs)
        if attack_bn not in self.ATTACK_BN_MODES:
            raise ValueError(f"attack_bn must be one of {self.ATTACK_BN_MODES}, got "
                             f"{attack_bn!r}")
        if attack_bn != "default":  # the method's reference choice unless told otherwise
            self.attack_training = attack_bn == "train"
        if nan_policy not in self.NAN_POLICIES:
            raise ValueError(f"nan_policy must be one of {self.NAN_POLICIES}, got {nan_policy!r}")
        if eps_warmup_steps < 0:
            raise ValueError(f"eps_warmup_steps must be >= 0, got {eps_warmup_steps}")
        self.network = network
        self.attack = self.build_attack(eps, step_size, attack_steps)
        # The training attack's eps and step size grow linearly with the optimiser step,
        # from 0 at step 0 to their full values at step eps_warmup_steps (0: no warm-up).
        self.eps_warmup_steps = int(eps_warmup_steps)
        self.seed = int(seed)
        self.nan_policy = nan_policy
        names = ("loss",) + tuple(self.log_names) + (("attack_eps",) if self.uses_attack else ())
        self.trackers = {name: keras.metrics.Mean(name=name) for name in names}
        if nan_policy == "skip_batch":
            self.skipped = keras.metrics.Sum(name="skipped_batches")

    def build_attack(self, eps, step_size, steps):
        """The training attack: PGD on cross-entropy from a uniform random start."""
        return PGD(eps=eps, step_size=step_size, steps=steps)

    def track(self, values, weight=None):
        for name, value in values.items():
            self.trackers[name].update_state(value, sample_weight=weight)
        logs = {name: t.result() for name, t in self.trackers.items()}
        if self.nan_policy == "skip_batch":
            logs["skipped_batches"] = self.skipped.result()
        if in_multi_worker_mode():
            # Keras 3.15 averages a step's outputs across workers with
            # strategy.reduce("MEAN", v, axis=0), which needs a leading axis.
            logs = {name: tf.reshape(v, [1]) for name, v in logs.items()}
        return logs

    @property
    def metrics(self):
        extra = [self.skipped] if self.nan_policy == "skip_batch" else []
        return list(self.trackers.values()) + extra

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        """Build state from one replica's batch, never from a cross-replica reduction.

        Keras 3.15's version reduces the first distributed batch to a MEAN before
        building, which fails under MultiWorkerMirroredStrategy ("Attempt to convert a
        value (PerReplica ...) to a Tensor") and is wasted traffic under mirroring.
        Shapes are all the symbolic build needs, and one replica's batch has them.
        """
        if self._distribute_strategy is None or iterator is None:
            return super()._maybe_symbolic_build(iterator=iterator, data_batch=data_batch)
        strategy = self.distribute_strategy
        for _, _, it in iterator:
            data_batch = tf.nest.map_structure(
                lambda v: (strategy.experimental_local_results(v)[0]
                           if isinstance(v, tf.distribute.DistributedValues) else v),
                next(it))
            break
        with strategy.scope():
            self._symbolic_build(data_batch=data_batch)

    def call(self, x, training=False, branch="adv"):
        return self.network(x, training=training, branch=branch)

    def attack_seed(self):
        """A fresh [2] seed per optimisation step: deterministic and resumable."""
        step = tf.cast(self.optimizer.iterations, tf.int64)
        return tf.stack([tf.constant(self.seed, tf.int64), step])

    def warmup_fraction(self):
        """Fraction of the full eps the training attack uses at this step (a tensor).

        Computed from the optimiser's step counter, which checkpoints restore, so a
        resumed run continues the ramp exactly; a tensor, so no step retraces.
        """
        if not self.eps_warmup_steps:
            return tf.constant(1.0)
        step = tf.cast(self.optimizer.iterations, tf.float32)
        return tf.minimum(1.0, step / float(self.eps_warmup_steps))

    def training_attack(self):
        """The attack of this step: self.attack with eps and step size warmed up."""
        if not self.eps_warmup_steps:
            return self.attack
        fraction = self.warmup_fraction()
        return dataclasses.replace(self.attack, eps=self.attack.eps * fraction,
                                   step_size=self.attack.step_size * fraction)

    def adversarial(self, x, target, branch="adv", **attack_kwargs):
        """Attack examples against `branch`, BN in the mode `attack_training` names.
        attack_kwargs go to the attack (PGD's start, return_center)."""
        return self.training_attack()(
            lambda z: self.network(z, training=self.attack_training, branch=branch),
            x, target, self.attack_seed(), **attack_kwargs)

    def losses_for(self, x, y):
        raise NotImplementedError

    def train_step(self, data):
        x, y, _ = keras.utils.unpack_x_y_sample_weight(data)
        with tf.GradientTape() as tape:
            loss, logs = self.losses_for(x, y)
            if self.losses:  # the layers' regularizers (kernel_regularizer=..., ...)
                loss = loss + tf.cast(tf.add_n(self.losses), loss.dtype)
            if self.uses_attack:
                logs["attack_eps"] = self.attack.eps * self.warmup_fraction()
            # Replicas' gradients are summed: scale so they add up to the global mean.
            replicas = tf.distribute.get_strategy().num_replicas_in_sync
            scaled = loss / replicas if replicas > 1 else loss
            # Under mixed_float16 compile wraps the optimizer in a LossScaleOptimizer,
            # whose apply() unscales; for every other optimizer this is the identity.
            scaled = self.optimizer.scale_loss(scaled)
        variables = self.trainable_variables
        grads = tape.gradient(scaled, variables)
        if self.nan_policy == "stop":  # StopOnNonFinite ends the run at the first bad loss
            self.optimizer.apply(grads, variables)
            return self.track({"loss": loss, **logs})
        # skip_batch: a batch with a non-finite loss or gradient changes no weight and
        # no figure (BN statistics of its forward passes have moved all the same).
        finite = tf.reduce_all(tf.stack(
            [tf.reduce_all(tf.math.is_finite(g)) for g in grads if g is not None]
            + [tf.math.is_finite(loss)]))

        def apply():
            self.optimizer.apply(grads, variables)
            return tf.constant(0.0)

        self.skipped.update_state(tf.cond(finite, apply, lambda: tf.constant(1.0)))
        values = {k: tf.where(finite, v, tf.zeros_like(v)) for k, v in {"loss": loss, **logs}.items()}
        return self.track(values, weight=tf.cast(finite, tf.float32))
