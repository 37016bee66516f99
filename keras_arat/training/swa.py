"""ARAT+SWA: an equal-weight running average of the weights, then BN re-estimation.

From a start epoch, every N optimisation steps the network's trainable weights are
added to a running mean (Izmailov et al., 2018). The averaged weights never saw their
own BN statistics, so before evaluation each branch's moving statistics are reset and
re-estimated by one pass over the training set in training mode, as a cumulative
(equal-weight) average over batches, like PyTorch's bn_update: the adv branch on PGD
examples (as the official code's bn_update_adv), the clean branch on the clean images
(the official code reports no clean-branch figure for SWA; keras_arat does, so its
statistics must belong to the averaged weights too).
"""

import keras
import numpy as np
import tensorflow as tf

from keras_arat.layers.split_batch_norm import SplitBatchNormalization


class SWAState(tf.Module):
    """The running average and its count; checkpointed with the training state."""

    def __init__(self, variables, name="swa"):
        super().__init__(name=name)
        self.count = tf.Variable(0, dtype=tf.int64, trainable=False, name="count")
        self.averages = [tf.Variable(tf.zeros(v.shape, v.dtype), trainable=False,
                                     name=f"avg_{i}") for i, v in enumerate(variables)]

    def update(self, variables):
        n = tf.cast(self.count, tf.float32)
        for avg, v in zip(self.averages, variables):
            avg.assign(avg + (tf.convert_to_tensor(v) - avg) / (n + 1.0))
        self.count.assign_add(1)

    def copy_to(self, variables):
        for avg, v in zip(self.averages, variables):
            v.assign(avg)


class SWACallback(keras.callbacks.Callback):
    """Adds the network's weights to `state` every `every_steps` steps from `start_epoch`."""

    def __init__(self, state, network, start_epoch, every_steps):
        super().__init__()
        self.state, self.network = state, network
        self.start_epoch, self.every_steps = int(start_epoch), int(every_steps)
        self.epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch + 1  # 1-based, as the schedule is written

    def on_train_batch_end(self, batch, logs=None):
        if self.epoch < self.start_epoch:
            return
        step = int(self.model.optimizer.iterations.numpy())
        if step % self.every_steps == 0:
            self.state.update(self.network.trainable_variables)


def branch_batch_norms(network, branch):
    """The keras BatchNormalization layers serving `branch`, in graph order (a
    SplitBNNetwork's functional graph lists its layers from input to output)."""
    model = getattr(network, "graph", network)
    return [layer.branch_layer(branch) for layer in model._flatten_layers()  # noqa: SLF001
            if isinstance(layer, SplitBatchNormalization)]


def reestimate_bn(network, batches, attack, branch="adv", seed=0):
    """Reset `branch`'s moving statistics and re-estimate them on `batches`.

    For each batch (x, y): with an attack, attack examples are made against `branch` in
    training mode and one training-mode forward of those examples gives the batch
    statistics; with attack=None the forward is of x itself (the clean branch). The
    moving statistics become the equal-weight mean over all batches (the attack's own
    forwards do not count). Other branches are untouched. Returns the number of batches.
    """
    bns = branch_batch_norms(network, branch)
    stats = [v for bn in bns for v in (bn.moving_mean, bn.moving_variance)]
    momenta = [bn.momentum for bn in bns]
    # With momentum 0 a training-mode forward leaves exactly its batch statistics in the
    # moving variables; the functions below are traced with it, and it is put back after.
    for bn in bns:
        bn.momentum = 0.0
    try:
        attack_fn = None if attack is None else tf.function(
            lambda x, y, batch_seed: attack(
                lambda z: network(z, training=True, branch=branch), x, y, batch_seed),
            autograph=False)  # tensor code already: no source conversion
        forward = tf.function(lambda x: network(x, training=True, branch=branch))
        means = [np.zeros(v.shape, np.float64) for v in stats]
        k = 0
        for x, y in batches:
            forward(x if attack_fn is None else
                    attack_fn(x, y, tf.constant([seed, k], tf.int64)))
            k += 1
            for i, v in enumerate(stats):
                means[i] += (v.numpy().astype(np.float64) - means[i]) / k
    finally:
        for bn, m in zip(bns, momenta):
            bn.momentum = m
    # Statistics left by the attack's forwards are replaced by the equal-weight means;
    # with no batch at all the branch is reset to mean 0 / variance 1.
    for i, v in enumerate(stats):
        v.assign(means[i].astype(np.float32) if k else
                 (np.ones if i % 2 else np.zeros)(v.shape, np.float32))
    return k


def reestimate_branches(network, batches, attack, split=True, seed=0):
    """Both branches of the averaged weights (one BN, split=False: that one, as adv).

    batches: a function returning a fresh iterable of (x, y) training batches (one
    pass each). Returns {branch: number of batches}."""
    counts = {"adv": reestimate_bn(network, batches(), attack, "adv", seed)}
    if split:
        counts["clean"] = reestimate_bn(network, batches(), None, "clean", seed)
    return counts
