"""The trainer base class: a keras.Model wrapping a classifier with a custom train_step.

The wrapped `network` follows the keras_arat.models contract:
network(x, training=..., branch="clean"|"adv"|"both", return_features=False|True|names)
(keras_arat.network.SplitBNNetwork: every built-in family, and any user model after
keras_arat.to_split_bn).
"""

import dataclasses

import keras
import tensorflow as tf

from keras_arat.attacks import PGD, Restarts, core


def weighted_mean(values, sample_weight=None):
    """The batch mean of per-example values, each times its sample weight: the sum of
    w * value over the batch size, as Keras' losses reduce (sum_over_batch_size), so a
    weight of k counts an example k times."""
    values = tf.cast(values, loss_dtype(values))
    if sample_weight is None:
        return tf.reduce_mean(values)
    weights = tf.cast(tf.reshape(sample_weight, [-1]), values.dtype)
    return tf.reduce_sum(values * weights) / tf.cast(tf.size(values), values.dtype)


def mean_ce(logits, y, sample_weight=None):
    return weighted_mean(core.cross_entropy(logits, y), sample_weight)


def correct(logits, y):
    """[N] float32: 1 where the prediction is the label."""
    return tf.cast(tf.equal(tf.argmax(logits, -1), tf.cast(tf.reshape(y, [-1]), tf.int64)),
                   tf.float32)


def accuracy(logits, y, sample_weight=None):
    """Accuracy on the batch, each example counted by its weight (as Keras' metrics)."""
    hits = correct(logits, y)
    if sample_weight is None:
        return tf.reduce_mean(hits)
    weights = tf.cast(tf.reshape(sample_weight, [-1]), tf.float32)
    return tf.math.divide_no_nan(tf.reduce_sum(hits * weights), tf.reduce_sum(weights))


def in_multi_worker_mode():
    """True inside a MultiWorkerMirroredStrategy whose cluster has more than one worker."""
    strategy = tf.distribute.get_strategy()
    return (isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)
            and strategy.extended._in_multi_worker_mode())  # noqa: SLF001


def multi_worker_logs(logs):
    """A step's logs as Keras 3.15 can average them across workers: under a multi-worker
    strategy it reduces them with strategy.reduce("MEAN", v, axis=0), which needs a
    leading axis."""
    if in_multi_worker_mode():
        return {name: tf.reshape(v, [1]) for name, v in logs.items()}
    return logs


def has_split_bn(network):
    """Whether the network has a split BatchNormalization (two branches) anywhere."""
    from keras_arat.layers.split_batch_norm import SplitBatchNormalization
    model = getattr(network, "graph", network)
    return any(isinstance(layer, SplitBatchNormalization) and layer.split
               for layer in model._flatten_layers())  # noqa: SLF001


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


def cosine(a, b):
    """[N] cosine similarity of each example's two vectors."""
    a = tf.math.l2_normalize(tf.cast(a, loss_dtype(a)), axis=-1, epsilon=1e-12)
    b = tf.math.l2_normalize(tf.cast(b, a.dtype), axis=-1, epsilon=1e-12)
    return tf.reduce_sum(a * b, axis=-1)


def mean_cosine(a, b):
    return tf.reduce_mean(cosine(a, b))


class AdversarialTrainer(keras.Model):
    """Shared machinery: the PGD attack, seeding, loss trackers, inference calls, and what
    Keras' evaluate() and fit(validation_data=...) report.

    Subclasses implement `losses_for(x, y, sample_weight=None)` returning (total_loss,
    {name: scalar}). Every logged figure goes through a keras.metrics.Mean, so `fit`
    reports the epoch mean of each (a raw tensor named "loss" would be shadowed by Keras'
    own loss tracker).

    Validation (test_step: evaluate(), fit's validation_data): the figures of VAL_NAMES
    (clean_acc_clean_branch only for a network with split BN), in inference mode, the
    training figures, a_prev and every BN statistic untouched. The attack is PGD on
    cross-entropy at the training attack's full eps (never a warm-up's) with
    val_attack_steps steps of val_step_size (default: the training attack's step size)
    and val_restarts random restarts (worst case kept).
    """

    uses_attack = True
    # BN mode of the network while attacking: ARAT and PGD-AT attack in training mode
    # (batch statistics), TRADES and MART in inference mode, as their reference code.
    attack_training = True

    NAN_POLICIES = ("stop", "skip_batch")
    # The figures `losses_for` logs besides "loss"; their trackers are made up front
    # (a tf.distribute replica may not add state while training).
    log_names = ("train_acc",)
    # What a validation (test_step) reports: "loss" is the cross-entropy of the adv branch
    # on the validation PGD examples, "clean_acc" its accuracy on the clean images,
    # "pgd_acc" the fraction classified correctly both clean and under the PGD,
    # "clean_acc_clean_branch" the clean branch's clean accuracy.
    VAL_NAMES = ("loss", "clean_acc", "pgd_acc", "clean_acc_clean_branch")
    # The validation attack's seeds: (seed + this, optimiser step).
    VAL_SEED_OFFSET = 1_000_003

    ATTACK_BN_MODES = ("default", "train", "inference")

    def __init__(self, network, eps=8 / 255, step_size=2 / 255, attack_steps=10, seed=0,
                 nan_policy="stop", eps_warmup_steps=0, attack_bn="default",
                 val_attack_steps=10, val_step_size=None, val_restarts=1, **kwargs):
        super().__init__(**kwargs)
        if attack_bn not in self.ATTACK_BN_MODES:
            raise ValueError(f"attack_bn must be one of {self.ATTACK_BN_MODES}, got "
                             f"{attack_bn!r}")
        self.attack_bn = attack_bn
        if attack_bn != "default":  # the method's reference choice unless told otherwise
            self.attack_training = attack_bn == "train"
        if nan_policy not in self.NAN_POLICIES:
            raise ValueError(f"nan_policy must be one of {self.NAN_POLICIES}, got {nan_policy!r}")
        if eps_warmup_steps < 0:
            raise ValueError(f"eps_warmup_steps must be >= 0, got {eps_warmup_steps}")
        if val_attack_steps < 1 or val_restarts < 1:
            raise ValueError("val_attack_steps and val_restarts must be >= 1")
        self.network = network
        self.attack = self.build_attack(eps, step_size, attack_steps)
        # The training attack's eps and step size grow linearly with the optimiser step,
        # from 0 at step 0 to their full values at step eps_warmup_steps (0: no warm-up).
        self.eps_warmup_steps = int(eps_warmup_steps)
        self.seed = int(seed)
        self.nan_policy = nan_policy
        self.val_attack_steps, self.val_restarts = int(val_attack_steps), int(val_restarts)
        self.val_step_size = None if val_step_size is None else float(val_step_size)
        names = ("loss",) + tuple(self.log_names) + (("attack_eps",) if self.uses_attack else ())
        self.trackers = {name: keras.metrics.Mean(name=name) for name in names}
        if nan_policy == "skip_batch":
            self.skipped = keras.metrics.Sum(name="skipped_batches")
        self.split_bn = has_split_bn(network)
        self.val_trackers = {name: keras.metrics.Mean(name=name) for name in self.VAL_NAMES
                             if self.split_bn or name != "clean_acc_clean_branch"}
        self._evaluating = False
        # Built with its network: saving writes every weight, and a loaded trainer's
        # optimizer is built (and its state restored) when it is compiled from the file.
        self.built = True

    def get_config(self):
        """Everything __init__ takes, the network serialized: a trainer saves as .keras."""
        return {**super().get_config(),
                "network": keras.saving.serialize_keras_object(self.network),
                "eps": float(self.attack.eps), "step_size": float(self.attack.step_size),
                "attack_steps": int(self.attack.steps), "seed": self.seed,
                "nan_policy": self.nan_policy, "eps_warmup_steps": self.eps_warmup_steps,
                "attack_bn": self.attack_bn, "val_attack_steps": self.val_attack_steps,
                "val_step_size": self.val_step_size, "val_restarts": self.val_restarts}

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["network"] = keras.saving.deserialize_keras_object(config["network"])
        return cls(**config)

    def build_attack(self, eps, step_size, steps):
        """The training attack: PGD on cross-entropy from a uniform random start."""
        return PGD(eps=eps, step_size=step_size, steps=steps)

    def validation_attack(self):
        """PGD on cross-entropy at the training attack's full eps (see the class doc)."""
        attack = PGD(eps=self.attack.eps, norm=self.attack.norm,
                     step_size=self.val_step_size or self.attack.step_size,
                     steps=self.val_attack_steps)
        return Restarts(attack, self.val_restarts) if self.val_restarts > 1 else attack

    def track(self, values, weight=None):
        for name, value in values.items():
            self.trackers[name].update_state(value, sample_weight=weight)
        logs = {name: t.result() for name, t in self.trackers.items()}
        if self.nan_policy == "skip_batch":
            logs["skipped_batches"] = self.skipped.result()
        return multi_worker_logs(logs)

    @property
    def metrics(self):
        """The training figures, or during evaluate() (fit's validation included) the
        validation ones: Keras resets and reports exactly these, so an evaluation never
        resets or mixes into the training figures."""
        if self._evaluating:
            return list(self.val_trackers.values())
        extra = [self.skipped] if self.nan_policy == "skip_batch" else []
        return list(self.trackers.values()) + extra

    def evaluate(self, *args, **kwargs):
        self._evaluating = True
        try:
            return super().evaluate(*args, **kwargs)
        finally:
            self._evaluating = False

    def test_step(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        y = tf.reshape(tf.cast(y, tf.int64), [-1])

        def deployed(z):
            return self.network(z, training=False, branch="adv")
        seed = tf.stack([tf.constant(self.seed + self.VAL_SEED_OFFSET, tf.int64),
                         tf.cast(self.optimizer.iterations, tf.int64)])
        x_adv = self.validation_attack()(deployed, x, y, seed)
        clean_hits, adv_logits = correct(deployed(x), y), deployed(x_adv)
        values = {"loss": core.cross_entropy(adv_logits, y), "clean_acc": clean_hits,
                  "pgd_acc": clean_hits * correct(adv_logits, y)}
        if self.split_bn:
            values["clean_acc_clean_branch"] = correct(
                self.network(x, training=False, branch="clean"), y)
        for name, value in values.items():
            self.val_trackers[name].update_state(value, sample_weight=sample_weight)
        return multi_worker_logs({name: t.result() for name, t in self.val_trackers.items()})

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

    def losses_for(self, x, y, sample_weight=None):
        """(total loss, {figure: scalar}) of one batch; sample_weight [N] weights every
        per-example term of the loss (weighted_mean) and the accuracies."""
        raise NotImplementedError

    def train_step(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        with tf.GradientTape() as tape:
            loss, logs = self.losses_for(x, y, sample_weight)
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
