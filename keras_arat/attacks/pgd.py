"""Projected gradient descent, composed from the parts in core.py."""

import dataclasses
from typing import Callable

import tensorflow as tf

from keras_arat.attacks import core
from keras_arat.attacks.base import Attack, as_seed


@dataclasses.dataclass(frozen=True, kw_only=True)
class PGD(Attack):
    """Iterated ascent on `loss` with projection after every step (Madry et al.).

        PGD(eps=8 / 255, steps=20)(model_fn, x, y, seed)   # one batch, the parts' form
        PGD(model, eps=8 / 255, steps=20)(x, y)            # any Keras model (base.py)

    Attributes:
      model: the model of the bound form (optional).
      eps, step_size, steps: budget in pixel units ([0,1] images); step_size defaults to
        eps / 4, steps to 10.
      loss: per-example loss (logits, target) -> [N]; the attack maximises it.
      norm: "linf" or "l2".
      init: "uniform" (in the ball), "normal" (x + init_scale * N(0,1)) or "none".
      noise_leak: the official AR-AT attack's in-place random start (L-inf, uniform):
        its noise is added to the clean batch itself, so the search starts at
        x + U(-eps, eps), not clipped, and every projection is centred on that noisy
        image (a ball of radius 2 eps around x). Off by default: the threat model is
        the eps-ball around x.
    """

    model: object = dataclasses.field(default=None, kw_only=False, compare=False, repr=False)
    eps: float
    step_size: float = None
    steps: int = 10
    loss: Callable = core.cross_entropy
    norm: str = "linf"
    init: str = "uniform"
    init_scale: float = 0.001
    noise_leak: bool = False

    def __post_init__(self):
        if self.step_size is None:
            object.__setattr__(self, "step_size", self.eps / 4)
        if self.norm not in core.NORMS:
            raise ValueError(f"norm must be one of {core.NORMS}, got {self.norm!r}")
        if self.init not in ("uniform", "normal", "none"):
            raise ValueError(f"init must be uniform, normal or none, got {self.init!r}")
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.noise_leak and (self.norm, self.init) != ("linf", "uniform"):
            raise ValueError("noise_leak reproduces the official L-inf PGD with a uniform "
                             f"start; got norm={self.norm!r}, init={self.init!r}")

    def perturb(self, model_fn, x, target, seed, start=None, return_center=False):
        """Adversarial examples for `model_fn` (inputs -> logits).

        model_fn fixes the BN branch and mode, e.g. lambda z: net(z, training=True,
        branch="adv"); `target` is what `loss` compares logits with (labels, or
        clean probabilities for TRADES); `seed` is a [2] int tensor.
        start: the first iterate, used as given (not clipped), instead of the seeded
        random start. return_center: also return the centre of the ball the iterates
        were projected onto (x, or with noise_leak the noisy start).
        The result is detached from the graph: no gradient flows back through it.
        """
        x = tf.convert_to_tensor(x)
        seed = as_seed(seed)
        if start is not None:
            x_adv = tf.convert_to_tensor(start, x.dtype)
        elif self.noise_leak:
            x_adv = x + core.uniform_noise(x, self.eps, seed)
        elif self.init == "none":
            x_adv = x
        else:
            x_adv = core.random_start(x, self.eps, seed, norm=self.norm, kind=self.init,
                                      scale=self.init_scale)
        center = x_adv if self.noise_leak else x

        def body(i, x_adv):
            _, _, grad = core.loss_and_gradient(
                model_fn, lambda logits: self.loss(logits, target), x_adv)
            x_adv = core.ascent_step(x_adv, grad, self.step_size, self.norm)
            return i + 1, core.project(x_adv, center, self.eps, self.norm)

        if tf.distribute.get_strategy().num_replicas_in_sync > 1:
            # Synchronized BN all-reduces inside the model, which a while loop cannot
            # hold under a multi-replica strategy: unroll the steps there.
            for i in range(self.steps):
                _, x_adv = body(i, x_adv)
        else:
            _, x_adv = tf.while_loop(lambda i, _: i < self.steps, body,
                                     (tf.constant(0), x_adv))
        x_adv = tf.stop_gradient(x_adv)
        return (x_adv, tf.stop_gradient(center)) if return_center else x_adv
