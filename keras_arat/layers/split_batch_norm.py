"""Split BatchNorm: one BN per input distribution (clean / adversarial)."""

import contextlib
import threading

import keras
import tensorflow as tf

BRANCHES = ("clean", "adv")
# Pseudo-branch of a joint call: the batch is [clean half; adv half], each half is
# normalised by its own branch, exactly as two separate calls (clean first) would.
BOTH = "both"

# PyTorch's BatchNorm2d defaults, in Keras terms: torch momentum 0.1 is keras 0.9.
TORCH_MOMENTUM = 0.9
TORCH_EPSILON = 1e-5
# keras.layers.BatchNormalization's own settings: what a split layer passes to each branch
# and what to_split_bn carries over from a user's layer.
BN_SETTINGS = ("axis", "momentum", "epsilon", "center", "scale", "beta_initializer",
               "gamma_initializer", "moving_mean_initializer", "moving_variance_initializer",
               "beta_regularizer", "gamma_regularizer", "beta_constraint", "gamma_constraint",
               "synchronized", "renorm", "renorm_clipping", "renorm_momentum")

# The branch of the SplitBatchNormalization calls that do not name one: set by
# branch_scope around a call of a whole graph (a functional model cannot pass a Python
# argument to its layers). Thread-local, because tf.distribute traces each replica in a
# thread of its own; Python-level, so each branch traces a graph of its own.
_ACTIVE = threading.local()


@contextlib.contextmanager
def branch_scope(branch):
    """Within the block, split-BN layers called without `branch` use this one."""
    if branch not in BRANCHES + (BOTH,):
        raise ValueError(f"branch must be one of {BRANCHES + (BOTH,)}, got {branch!r}")
    previous = getattr(_ACTIVE, "branch", None)
    _ACTIVE.branch = branch
    try:
        yield
    finally:
        _ACTIVE.branch = previous


def active_branch(default="adv"):
    """The branch of the innermost branch_scope, or `default` outside any."""
    return getattr(_ACTIVE, "branch", None) or default


def _replicas():
    """Replicas of the strategy whose replica context this runs in (1 outside any)."""
    ctx = tf.distribute.get_replica_context()
    return 1 if ctx is None else ctx.num_replicas_in_sync


@keras.saving.register_keras_serializable(package="keras_arat")
class TorchBatchNormalization(keras.layers.BatchNormalization):
    """keras.layers.BatchNormalization with PyTorch's moving variance, synchronized by the
    strategy it runs under.

    Both frameworks normalise a training batch with its biased variance, but PyTorch
    averages the unbiased one, var * n / (n - 1), into running_var (n values per channel,
    over all replicas when synchronized). Keras averages the biased one, so its moving
    variance drifts (n - 1) / n low: 0.8% for a batch-128 BatchNorm1d such as ARAT's
    predictors.

    synchronized: None (the default here) reduces the batch statistics across replicas
    whenever a tf.distribute strategy runs more than one, so N devices train as one
    device on the global batch; True always (as Keras'); False never (per-replica
    statistics). The weights and everything else are Keras' own.
    """

    def __init__(self, synchronized=None, **kwargs):
        super().__init__(synchronized=synchronized, **kwargs)

    def synchronizes(self):
        """Whether this call's batch statistics are reduced across replicas."""
        return self.synchronized is True or (self.synchronized is None and _replicas() > 1)

    def _moments(self, inputs, mask):
        """Batch mean and (biased) variance. Synchronized across replicas, in two passes
        as tf.nn.moments does on one device (mean, then the mean squared deviation from
        it) instead of Keras' E[x^2] - E[x]^2, which cancels catastrophically in float32
        when a channel's mean is large against its spread."""
        ctx = tf.distribute.get_replica_context()
        if mask is not None or not self.synchronizes() or _replicas() == 1:
            return super()._moments(inputs, mask)
        axes = self._reduction_axes
        total = ctx.all_reduce(tf.distribute.ReduceOp.SUM, self._count(inputs))
        mean = ctx.all_reduce(tf.distribute.ReduceOp.SUM,
                              tf.reduce_sum(inputs, axes, keepdims=True)) / total
        squares = tf.reduce_sum(tf.math.squared_difference(inputs, tf.stop_gradient(mean)),
                                axes, keepdims=True)
        variance = ctx.all_reduce(tf.distribute.ReduceOp.SUM, squares) / total
        return tf.squeeze(mean, axes), tf.squeeze(variance, axes)

    def _count(self, inputs):
        """Values per channel in this replica's batch."""
        return tf.cast(tf.reduce_prod(tf.gather(tf.shape(inputs), self._reduction_axes)),
                       inputs.dtype)

    def call(self, inputs, training=None, mask=None):
        if not (training and self.trainable) or mask is not None or self.renorm:
            return super().call(inputs, training=training, mask=mask)
        inputs = keras.ops.cast(inputs, keras.backend.result_type(inputs.dtype, "float32"))
        mean, variance = self._moments(inputs, None)
        n = self._count(inputs)
        if self.synchronizes() and _replicas() > 1:
            n = tf.distribute.get_replica_context().all_reduce(tf.distribute.ReduceOp.SUM, n)
        unbiased = variance * (n / tf.maximum(n - 1.0, 1.0))
        m = self.momentum
        self.moving_mean.assign(
            keras.ops.cast(self.moving_mean, inputs.dtype) * m + mean * (1.0 - m))
        self.moving_variance.assign(
            keras.ops.cast(self.moving_variance, inputs.dtype) * m + unbiased * (1.0 - m))
        outputs = keras.ops.batch_normalization(
            inputs, mean, variance, axis=self.axis,
            offset=keras.ops.cast(self.beta, inputs.dtype) if self.center else None,
            scale=keras.ops.cast(self.gamma, inputs.dtype) if self.scale else None,
            epsilon=self.epsilon)
        return keras.ops.cast(outputs, self.compute_dtype)


@keras.saving.register_keras_serializable(package="keras_arat")
class SplitBatchNormalization(keras.layers.Layer):
    """BatchNormalization with a `clean` and an `adv` branch.

    Each branch has its own gamma, beta and moving mean/variance; the branch is
    picked per call with a Python string (the `branch` argument, or else the innermost
    `branch_scope`, or else "adv"), so each branch traces its own graph and only the
    used branch's statistics move. `branch="both"` takes a batch whose
    first half is clean and second half adversarial and normalises each half with
    its own branch, so a network runs both halves through every other layer as one
    batch (what ARAT's train step does). With `split=False` the layer is a
    plain BatchNormalization that accepts (and ignores) the `branch` argument,
    which is how single-BN baselines and ablations share the model code.
    """

    def __init__(self, split=True, momentum=TORCH_MOMENTUM, epsilon=TORCH_EPSILON,
                 axis=-1, synchronized=None, center=True, scale=True, **kwargs):
        settings = {k: kwargs.pop(k) for k in BN_SETTINGS if k in kwargs}
        super().__init__(**kwargs)
        self.split = bool(split)
        # Every branch is a BatchNormalization with these settings (Keras' own arguments);
        # synchronized=None: across replicas whenever a strategy runs several.
        self.settings = {"axis": axis, "momentum": momentum, "epsilon": epsilon,
                         "center": bool(center), "scale": bool(scale),
                         "synchronized": synchronized, **settings}
        names = BRANCHES if self.split else ("shared",)
        self.bns = {name: TorchBatchNormalization(name=name, dtype=self.dtype_policy,
                                                  **self.settings)
                    for name in names}
        # Attribute assignment makes Keras track the sublayers and their weights.
        for name, bn in self.bns.items():
            setattr(self, f"bn_{name}", bn)

    def __getattr__(self, name):
        # axis, momentum, epsilon, center, scale, synchronized, ...: the branches' settings
        if name in BN_SETTINGS and "settings" in self.__dict__:
            return self.__dict__["settings"][name]
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    def branch_layer(self, branch):
        """The BatchNormalization serving `branch` ('clean' or 'adv')."""
        if branch not in BRANCHES:
            raise ValueError(f"branch must be one of {BRANCHES}, got {branch!r}")
        return self.bns[branch] if self.split else self.bns["shared"]

    def build(self, input_shape):
        for bn in self.bns.values():
            bn.build(input_shape)

    def call(self, inputs, training=None, branch=None, mask=None):
        branch = branch or active_branch()
        if branch == BOTH:
            # Clean half first: a shared (split=False) BN then moves its statistics in
            # the same order as a clean call followed by an adversarial one.
            clean, adv = keras.ops.split(inputs, 2, axis=0)
            masks = (None, None) if mask is None else keras.ops.split(mask, 2, axis=0)
            return keras.ops.concatenate(
                [self.branch_layer("clean")(clean, training=training, mask=masks[0]),
                 self.branch_layer("adv")(adv, training=training, mask=masks[1])], axis=0)
        return self.branch_layer(branch)(inputs, training=training, mask=mask)

    def compute_output_shape(self, input_shape):
        return input_shape

    @classmethod
    def from_batch_norm(cls, bn, split=True, name=None, **overrides):
        """An unbuilt split layer to stand in for keras BatchNormalization `bn`, each
        branch with every setting of bn's (momentum, epsilon, center, scale, initializers,
        regularizers, constraints, renorm, dtype policy) except those in `overrides`
        (an override of None keeps bn's). bn's synchronized=True stays; its False, Keras'
        default, becomes None (across replicas whenever a strategy runs several) unless
        synchronized=False is given. Once built, `copy_from(bn)` puts bn's weights and
        statistics into every branch."""
        if not isinstance(bn, keras.layers.BatchNormalization):
            raise TypeError(f"{bn.name} is a {type(bn).__name__}, not a BatchNormalization")
        unknown = sorted(set(overrides) - set(BN_SETTINGS))
        if unknown:
            raise TypeError(f"unknown BatchNormalization settings {unknown}; known: "
                            f"{list(BN_SETTINGS)}")
        config = bn.get_config()
        settings = {k: config[k] for k in BN_SETTINGS if k in config}
        settings["synchronized"] = True if config.get("synchronized") else None
        settings.update({k: v for k, v in overrides.items() if v is not None})
        if overrides.get("synchronized") is False:
            settings["synchronized"] = False
        axis = settings.pop("axis")
        if isinstance(axis, (list, tuple)):
            if len(axis) != 1:
                raise ValueError(f"{bn.name} normalises over several axes {axis}")
            axis = axis[0]
        return cls(split=split, axis=axis, name=name or bn.name, dtype=bn.dtype_policy,
                   trainable=bn.trainable, **settings)

    def copy_from(self, bn):
        """Every branch takes the weights and moving statistics of BatchNormalization bn."""
        for sub in self.bns.values():
            sub.set_weights(bn.get_weights())

    def get_config(self):
        branch = next(iter(self.bns.values())).get_config()  # settings, serialized
        return {**super().get_config(), "split": self.split,
                **{k: branch[k] for k in BN_SETTINGS if k in branch}}

