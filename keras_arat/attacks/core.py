"""Attack parts: threat-model projections, random starts, step rules, losses.

Every attack in this package is composed from these pieces, so PGD, APGD, FAB and
Square agree on what "inside the ball" means. Tensors are NHWC images in [0, 1].
Randomness is stateless: a [2] int seed in, the same noise out.
"""

import tensorflow as tf

NORMS = ("linf", "l2")


def _per_example_l2(t):
    return tf.sqrt(tf.reduce_sum(tf.square(t), axis=tf.range(1, tf.rank(t)), keepdims=True))


def project(x_adv, x, eps, norm="linf"):
    """Nearest point of the eps-ball around x intersected with the [0,1] box.

    L-inf: clip to the ball, then to [0,1] (exact for a box-in-box). L2: rescale
    the perturbation onto the ball, then clip to [0,1].
    """
    delta = x_adv - x
    if norm == "linf":
        delta = tf.clip_by_value(delta, -eps, eps)
    elif norm == "l2":
        norms = _per_example_l2(delta)
        delta = delta * tf.minimum(1.0, eps / tf.maximum(norms, 1e-12))
    else:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    return tf.clip_by_value(x + delta, 0.0, 1.0)


def _batch_noise(sample, shape, seed):
    """`sample(shape, seed)` for this batch, the same per example however it is split.

    Under a multi-replica tf.distribute strategy each replica holds a contiguous slice
    of the global batch: it draws the noise of the whole global batch and keeps its own
    slice, so N replicas start the attack exactly where one device would.
    """
    ctx = tf.distribute.get_replica_context()
    replicas = tf.distribute.get_strategy().num_replicas_in_sync
    if ctx is None or replicas == 1:
        return sample(shape, seed)
    local = shape[0]
    full = sample(tf.concat([[local * replicas], shape[1:]], 0), seed)
    start = tf.cast(ctx.replica_id_in_sync_group, tf.int32) * local
    return full[start:start + local]


def uniform_noise(x, eps, seed):
    """U(-eps, eps) noise of x's shape: the L-inf random start, before clipping."""
    return _batch_noise(lambda s, sd: tf.random.stateless_uniform(
        s, seed=sd, minval=-eps, maxval=eps, dtype=x.dtype), tf.shape(x), seed)


def random_start(x, eps, seed, norm="linf", kind="uniform", scale=None):
    """A random point near x: uniform in the ball, or Gaussian with std `scale`.

    `kind="normal"` is TRADES' start (x + 0.001 * N(0, 1)); it is clipped to [0,1]
    and, like TRADES, not projected to the ball.
    """
    shape = tf.shape(x)
    if kind == "normal":
        noise = scale * _batch_noise(
            lambda s, sd: tf.random.stateless_normal(s, seed=sd, dtype=x.dtype), shape, seed)
        return tf.clip_by_value(x + noise, 0.0, 1.0)
    if kind != "uniform":
        raise ValueError(f"random start kind must be 'uniform' or 'normal', got {kind!r}")
    if norm == "linf":
        noise = uniform_noise(x, eps, seed)
    else:
        # Uniform in the L2 ball: Gaussian direction, radius eps * U^(1/d).
        seeds = tf.random.experimental.stateless_split(seed, 2)
        direction = _batch_noise(
            lambda s, sd: tf.random.stateless_normal(s, seed=sd, dtype=x.dtype), shape, seeds[0])
        direction /= tf.maximum(_per_example_l2(direction), 1e-12)
        d = tf.cast(tf.reduce_prod(shape[1:]), x.dtype)
        batch_shape = tf.concat([shape[:1], tf.ones([tf.rank(x) - 1], tf.int32)], 0)
        u = _batch_noise(lambda s, sd: tf.random.stateless_uniform(s, seed=sd, dtype=x.dtype),
                         batch_shape, seeds[1])
        noise = direction * eps * tf.pow(u, 1.0 / d)
    return tf.clip_by_value(x + noise, 0.0, 1.0)


def ascent_step(x_adv, grad, step_size, norm="linf"):
    """One steepest-ascent step of length step_size in the norm's geometry."""
    if norm == "linf":
        return x_adv + step_size * tf.sign(grad)
    if norm == "l2":
        return x_adv + step_size * grad / tf.maximum(_per_example_l2(grad), 1e-12)
    raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")


# Losses: per-example, (logits, target) -> [N]. The attack maximises their sum. Each is
# computed on float32 logits (float64 ones stay float64), whatever the model computes in:
# a float16 model's softmax rounds a confident prediction's other classes to 0, and 1e9
# (the margins' mask) is inf in float16.

def wide(logits):
    """logits as float32 (float64 kept): the dtype of every attack loss and margin."""
    logits = tf.convert_to_tensor(logits)
    return logits if logits.dtype == tf.float64 else tf.cast(logits, tf.float32)


def cross_entropy(logits, labels):
    return tf.nn.sparse_softmax_cross_entropy_with_logits(
        labels=tf.cast(labels, tf.int32), logits=wide(logits))


def cw_margin(logits, labels):
    """Carlini-Wagner margin: best other logit minus the true logit."""
    logits = wide(logits)
    num_classes = tf.shape(logits)[-1]
    onehot = tf.one_hot(tf.cast(labels, tf.int32), num_classes, dtype=logits.dtype)
    true_logit = tf.reduce_sum(onehot * logits, axis=-1)
    other = tf.reduce_max(logits - 1e9 * onehot, axis=-1)
    return other - true_logit


def kl_to_target(logits, target_probs):
    """KL(target || softmax(logits)): TRADES' inner maximisation objective."""
    log_p = tf.nn.log_softmax(wide(logits), axis=-1)
    target_probs = tf.cast(target_probs, log_p.dtype)
    safe_target = tf.maximum(target_probs, 1e-12)
    return tf.reduce_sum(target_probs * (tf.math.log(safe_target) - log_p), axis=-1)


LOSSES = {"ce": cross_entropy, "cw": cw_margin, "kl": kl_to_target}


# Additions for APGD, FAB and Square (AutoAttack's parts).

def lp_norm(t, norm="linf"):
    """Per-example norm of a batch of perturbations: [N]."""
    flat = tf.reshape(t, [tf.shape(t)[0], -1])
    if norm == "linf":
        return tf.reduce_max(tf.abs(flat), axis=1)
    if norm == "l2":
        return tf.sqrt(tf.reduce_sum(tf.square(flat), axis=1))
    raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")


def normalize(t, norm="linf"):
    """t divided by its per-example norm (plus 1e-12), as AutoAttack does."""
    n = lp_norm(t, norm)
    return t / (tf.reshape(n, [-1] + [1] * (len(t.shape) - 1)) + 1e-12)


def true_margin(logits, labels):
    """True logit minus the best other logit (> 0: correctly classified); -cw_margin."""
    return -cw_margin(logits, labels)


def dlr(logits, labels):
    """Difference of Logits Ratio (Croce & Hein 2020), untargeted, to maximise:

    -(z_y - max_{i != y} z_i) / (z_pi1 - z_pi3 + 1e-12), pi the logits sorted decreasingly.
    Invariant to shifts and rescaling of the logits.
    """
    logits = wide(logits)
    top = tf.math.top_k(logits, k=3).values
    scale = top[:, 0] - top[:, 2] + 1e-12
    return cw_margin(logits, labels) / scale


def targeted_dlr(logits, labels, target_labels):
    """Targeted DLR, to maximise: -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2 + 1e-12)."""
    logits = wide(logits)
    num_classes = tf.shape(logits)[-1]
    z_y = tf.reduce_sum(tf.one_hot(tf.cast(labels, tf.int32), num_classes,
                                   dtype=logits.dtype) * logits, axis=-1)
    z_t = tf.reduce_sum(tf.one_hot(tf.cast(target_labels, tf.int32), num_classes,
                                   dtype=logits.dtype) * logits, axis=-1)
    top = tf.math.top_k(logits, k=4).values
    scale = top[:, 0] - 0.5 * (top[:, 2] + top[:, 3]) + 1e-12
    return -(z_y - z_t) / scale


def loss_and_gradient(model_fn, loss_fn, x):
    """(logits, loss [N], gradient): the per-example loss_fn(logits) at x and the gradient
    of its sum with respect to x, each example's row of it in its exact direction and at an
    arbitrary positive scale (what sign and normalised steps use).

    The loss's gradient reaches the logits in float32 (loss_fn sees wide logits); each
    example's row is multiplied by the power of two that brings its largest entry into
    [1, 2) before it flows back through the model. A float16 model's backward pass then
    neither underflows (a confident prediction's cross-entropy gradient is ~1e-20, zero in
    float16: its points would not move) nor overflows, and in float32 a power of two is an
    exact factor, so the direction is the unscaled gradient's bit for bit. A model with no
    gradient path gives zeros.
    """
    with tf.GradientTape() as tape:
        tape.watch(x)
        logits = model_fn(x)
    logits32 = wide(logits)
    with tf.GradientTape() as inner:
        inner.watch(logits32)
        loss = loss_fn(logits32)
        total = tf.reduce_sum(loss)
    upstream = inner.gradient(total, logits32)
    if upstream is None:
        return logits, tf.stop_gradient(loss), tf.zeros_like(x)
    top = tf.reduce_max(tf.abs(upstream), axis=-1, keepdims=True)
    exponent = tf.where(top > 0, -tf.floor(tf.math.log(top) / tf.math.log(
        tf.constant(2.0, top.dtype))), tf.zeros_like(top))
    scale = tf.pow(tf.constant(2.0, top.dtype), tf.clip_by_value(exponent, -100.0, 100.0))
    grad = tape.gradient(logits, x, output_gradients=tf.cast(upstream * scale, logits.dtype))
    if grad is None:
        grad = tf.zeros_like(x)
    return logits, tf.stop_gradient(loss), tf.stop_gradient(grad)


def target_count(logits, wanted):
    """min(wanted, classes - 1): how many target classes a targeted attack takes, with the
    class count read from the logits (their static shape, else at run time)."""
    classes = logits.shape[-1]
    if classes is None:
        return tf.minimum(tf.constant(wanted, tf.int32), tf.shape(logits)[-1] - 1)
    return min(wanted, classes - 1)


def bcast(v, like):
    """A per-example vector [N] shaped to broadcast against a batch like `like`."""
    return tf.reshape(v, [-1] + [1] * (len(like.shape) - 1))


def fold_seed(seed, *values):
    """A new [2] int64 seed derived from `seed` and integers (restart, target, batch...)."""
    seed = tf.cast(seed, tf.int64)
    for v in values:
        seed = tf.random.experimental.stateless_fold_in(seed, tf.cast(v, tf.int64))
    return seed


def is_correct(logits, labels):
    return tf.equal(tf.argmax(logits, -1, output_type=tf.int64), tf.cast(labels, tf.int64))


LOSSES["dlr"] = dlr
