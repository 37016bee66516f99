"""ARAT: split BN + asymmetric, predictor-based invariance loss (Waseda et al., ICLR 2025)."""

import dataclasses

import keras
import numpy as np
import tensorflow as tf

from keras_arat.config import uses_predictor
from keras_arat.layers.split_batch_norm import (TORCH_EPSILON, TORCH_MOMENTUM,
                                               TorchBatchNormalization)
from keras_arat.layers.torch_init import torch_bias_initializer, torch_kernel_initializer
from keras_arat.training.callbacks import APrevCallback
from keras_arat.training.trainers import (AdversarialTrainer, accuracy, cosine, mean_ce,
                                          pooled_feature, weighted_mean)

INVARIANCE_KINDS = ("asymmetric", "symmetric", "none")


@keras.saving.register_keras_serializable(package="keras_arat")
class Predictor(keras.layers.Layer):
    """SimSiam-style predictor h: Dense(d/4, no bias) -> BN -> ReLU -> Dense(d), each
    initialised as the official code's torch.nn layers are (Linear: U(-1/sqrt(fan_in),
    1/sqrt(fan_in)) for weights and bias; BatchNorm1d: gamma 1, beta 0)."""

    def __init__(self, dim, **kwargs):
        super().__init__(**kwargs)
        self.dim = int(dim)
        hidden = max(self.dim // 4, 1)
        self.hidden = keras.layers.Dense(hidden, use_bias=False, name="fc1",
                                         kernel_initializer=torch_kernel_initializer())
        self.bn = TorchBatchNormalization(momentum=TORCH_MOMENTUM, epsilon=TORCH_EPSILON,
                                          name="bn")  # synchronized by the strategy
        self.out = keras.layers.Dense(self.dim, name="fc2",
                                      kernel_initializer=torch_kernel_initializer(),
                                      bias_initializer=torch_bias_initializer(hidden))

    def build(self, input_shape):
        self.hidden.build(input_shape)
        self.bn.build((input_shape[0], self.hidden.units))
        self.out.build((input_shape[0], self.hidden.units))

    def call(self, z, training=None):
        return self.out(tf.nn.relu(self.bn(self.hidden(z), training=training)))

    def get_config(self):
        return {**super().get_config(), "dim": self.dim}



@keras.saving.register_keras_serializable(package="keras_arat")
class ARATModel(AdversarialTrainer):
    """ARAT (Waseda et al., ICLR 2025): split BN + asymmetric invariance loss.

    loss = a * CE(f_adv(x'), y) + (1 - a) * CE(f_clean(x), y)
           + sum_l gamma / L * (1 - cos(h_l(z'_l), stop_gradient(z_l)))

    `a` (a_prev) is the clean branch's inference accuracy on training images,
    set at each epoch start by APrevCallback and saved with the model state. `fit` adds
    that callback itself when it is not given one, on `a_prev_examples` images drawn from
    fit's own training data (or on `a_prev_data=(x, y)`), so a plain
    `model.fit(x, y, epochs=...)` trains ARAT as the paper does.
    """

    log_names = ("ce_adv", "ce_clean", "invariance", "a_prev", "train_acc", "train_acc_clean")

    def __init__(self, network, taps=None, invariance_weight=None, invariance="asymmetric",
                 predictor=None, input_shape=None, joint_pass=False, a_prev_examples=1000,
                 reference_noise_leak=False, **kwargs):
        super().__init__(network, **kwargs)
        self.a_prev_examples = int(a_prev_examples)
        if input_shape is None:  # a SplitBNNetwork knows its own
            input_shape = tuple(network.graph.inputs[0].shape[1:])
        # reference_noise_leak: the official code's attack adds its random start to the
        # clean batch in place, so the clean branch sees x + U(-eps, eps) (not clipped)
        # and the attack's ball is centred there. Off by default: clean x stays clean.
        self.reference_noise_leak = bool(reference_noise_leak)
        if self.reference_noise_leak:
            self.attack = dataclasses.replace(self.attack, noise_leak=True)
        # joint_pass: one forward/backward pass over [x; x_adv] (branch="both") instead of
        # two; equal up to float rounding (tests/test_arat.py), not faster on the CPUs
        # measured (BENCHMARKS.md). Off by default: the documented quickstart figures
        # come from two passes, and rounding alone moves its PGD-20 accuracy.
        self.joint_pass = bool(joint_pass)
        if invariance not in INVARIANCE_KINDS:
            raise ValueError(f"invariance must be one of {INVARIANCE_KINDS}, got {invariance!r}")
        self.taps = tuple(taps) if taps else tuple(network.default_taps)
        unknown = [t for t in self.taps if t not in network.tap_names]
        if unknown:
            raise ValueError(f"unknown tapped layers {unknown}; this model has "
                             f"{list(network.tap_names)}")
        self.invariance_weight = float(network.default_invariance_weight
                                       if invariance_weight is None else invariance_weight)
        self.invariance = invariance
        self.use_predictor = uses_predictor(invariance, predictor)
        _, feats = network(tf.zeros((1, *input_shape)), training=False,
                           return_features=self.taps)
        self.feature_dims = {t: int(pooled_feature(feats[t]).shape[-1]) for t in self.taps}
        self.predictors = []
        if self.use_predictor:
            for i, t in enumerate(self.taps):
                p = Predictor(self.feature_dims[t], name=f"predictor_{i}")
                p.build((None, self.feature_dims[t]))
                self.predictors.append(p)
        self.a_prev = self.add_weight(shape=(), initializer="zeros", trainable=False,
                                      name="a_prev")

    def get_config(self):
        return {**super().get_config(), "taps": list(self.taps),
                "invariance_weight": self.invariance_weight, "invariance": self.invariance,
                "predictor": self.use_predictor, "joint_pass": self.joint_pass,
                "a_prev_examples": self.a_prev_examples,
                "reference_noise_leak": self.reference_noise_leak}

    def fit(self, x=None, y=None, *args, a_prev_data=None, callbacks=None, **kwargs):
        """keras.Model.fit, with a_prev kept up to date: an APrevCallback is added when
        `callbacks` hold none, on `a_prev_data=(x, y)` (fixed), or else, as the official
        code, on a new sample of the training data at each epoch start: whole batches
        until at least `a_prev_examples` images, of a new random order of numpy arrays
        (fit's batch_size), or of a new pass over a tf.data.Dataset of (images, labels)
        (whose own shuffling and augmentation then apply)."""
        callbacks = list(callbacks or [])
        if not any(isinstance(c, APrevCallback) for c in callbacks):
            if a_prev_data is not None:
                callbacks.insert(0, APrevCallback(*a_prev_data))
            else:
                callbacks.insert(0, APrevCallback(sample=a_prev_sampler(
                    x, y, self.a_prev_examples, self.seed, kwargs.get("batch_size") or 32)))
        return super().fit(x, y, *args, callbacks=callbacks, **kwargs)

    def invariance_loss(self, feats_clean, feats_adv, sample_weight=None):
        """gamma / L * sum_l (1 - mean cos(h_l(z'_l), z_l)); clean side detached if
        asymmetric; each example's term weighted by its sample weight (weighted_mean)."""
        total = 0.0
        for i, tap in enumerate(self.taps):
            z_adv = pooled_feature(feats_adv[tap])
            z_clean = pooled_feature(feats_clean[tap])
            if self.invariance == "asymmetric":
                z_clean = tf.stop_gradient(z_clean)
            if self.use_predictor:
                z_adv = self.predictors[i](z_adv, training=True)
            total += weighted_mean(1.0 - cosine(z_adv, z_clean), sample_weight)
        return self.invariance_weight / len(self.taps) * total

    def clean_and_adv_pass(self, x, x_adv):
        """(logits, features) of x through the clean branch and of x_adv through adv."""
        if not self.joint_pass:
            return (self.network(x, training=True, branch="clean", return_features=self.taps),
                    self.network(x_adv, training=True, branch="adv",
                                 return_features=self.taps))
        logits, feats = self.network(tf.concat([x, x_adv], axis=0), training=True,
                                     branch="both", return_features=self.taps)
        halves = {name: tf.split(t, 2, axis=0) for name, t in feats.items()}
        logits_c, logits_a = tf.split(logits, 2, axis=0)
        return ((logits_c, {name: h[0] for name, h in halves.items()}),
                (logits_a, {name: h[1] for name, h in halves.items()}))

    def losses_for(self, x, y, sample_weight=None):
        if self.reference_noise_leak:
            x_adv, x = self.adversarial(x, y, branch="adv", return_center=True)
        else:
            x_adv = self.adversarial(x, y, branch="adv")
        (logits_c, feats_c), (logits_a, feats_a) = self.clean_and_adv_pass(x, x_adv)
        ce_adv, ce_clean = mean_ce(logits_a, y, sample_weight), mean_ce(logits_c, y, sample_weight)
        a = tf.cast(self.a_prev, ce_adv.dtype)
        loss = a * ce_adv + (1.0 - a) * ce_clean
        inv = tf.zeros((), ce_adv.dtype)
        if self.invariance != "none":
            inv = self.invariance_loss(feats_c, feats_a, sample_weight)
            loss += inv
        return loss, {"ce_adv": ce_adv, "ce_clean": ce_clean, "invariance": inv, "a_prev": a,
                      "train_acc": accuracy(logits_a, y, sample_weight),
                      "train_acc_clean": accuracy(logits_c, y, sample_weight)}


def a_prev_sampler(x, y, n, seed, batch_size):
    """epoch -> (images, labels) for a_prev from fit's training data: whole batches until
    at least n images, of a new permutation of arrays (seeded by (seed, epoch)), or of a
    new pass over a tf.data.Dataset of (images, labels) batches."""
    if isinstance(x, tf.data.Dataset):
        def from_dataset(epoch):
            xs, ys, count = [], [], 0
            for batch in x:
                if not isinstance(batch, (tuple, list)) or len(batch) < 2:
                    raise ValueError("ARAT's fit needs a dataset of (images, labels) batches "
                                     "to measure a_prev, or a_prev_data=(x, y)")
                xs.append(np.asarray(batch[0]))
                ys.append(np.asarray(batch[1]))
                count += len(xs[-1])
                if count >= n:
                    break
            return np.concatenate(xs), np.concatenate(ys)
        return from_dataset
    if x is None or y is None:
        raise ValueError("ARAT's fit needs (x, y) arrays or a tf.data.Dataset to measure "
                         "a_prev on, or a_prev_data=(x, y)")
    x, y = np.asarray(x), np.asarray(y)
    count = min(len(x), -(-n // batch_size) * batch_size)

    def from_arrays(epoch):
        idx = np.random.default_rng([seed, epoch]).permutation(len(x))[:count]
        return x[idx], y[idx]
    return from_arrays
