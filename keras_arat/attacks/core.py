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


def random_start(x, eps, seed, norm="linf", kind="uniform", scale=None):
    """A random point near x: uniform in the ball, or Gaussian with std `scale`.

    `kind="normal"` is TRADES' start (x + 0.001 * N(0, 1)); it is clipped to [0,1]
    and, like TRADES, not projected to the ball.
    """
    if kind == "normal":
        noise = scale * tf.random.stateless_normal(tf.shape(x), seed=seed, dtype=x.dtype)
        return tf.clip_by_value(x + noise, 0.0, 1.0)
    if kind != "uniform":
        raise ValueError(f"random start kind must be 'uniform' or 'normal', got {kind!r}")
    if norm == "linf":
        noise = tf.random.stateless_uniform(tf.shape(x), seed=seed, minval=-eps, maxval=eps,
                                            dtype=x.dtype)
    else:
        # Uniform in the L2 ball: Gaussian direction, radius eps * U^(1/d).
        seeds = tf.random.experimental.stateless_split(seed, 2)
        direction = tf.random.stateless_normal(tf.shape(x), seed=seeds[0], dtype=x.dtype)
        direction /= tf.maximum(_per_example_l2(direction), 1e-12)
        d = tf.cast(tf.reduce_prod(tf.shape(x)[1:]), x.dtype)
        batch_shape = tf.concat([tf.shape(x)[:1], tf.ones([tf.rank(x) - 1], tf.int32)], 0)
        u = tf.random.stateless_uniform(batch_shape, seed=seeds[1], dtype=x.dtype)
        noise = direction * eps * tf.pow(u, 1.0 / d)
    return tf.clip_by_value(x + noise, 0.0, 1.0)


def ascent_step(x_adv, grad, step_size, norm="linf"):
    """One steepest-ascent step of length step_size in the norm's geometry."""
    if norm == "linf":
        return x_adv + step_size * tf.sign(grad)
    if norm == "l2":
        return x_adv + step_size * grad / tf.maximum(_per_example_l2(grad), 1e-12)
    raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")


# Losses: per-example, (logits, target) -> [N]. The attack maximises their sum.

def cross_entropy(logits, labels):
    return tf.nn.sparse_softmax_cross_entropy_with_logits(
        labels=tf.cast(labels, tf.int32), logits=logits)


def cw_margin(logits, labels):
    """Carlini-Wagner margin: best other logit minus the true logit."""
    num_classes = tf.shape(logits)[-1]
    onehot = tf.one_hot(tf.cast(labels, tf.int32), num_classes, dtype=logits.dtype)
    true_logit = tf.reduce_sum(onehot * logits, axis=-1)
    other = tf.reduce_max(logits - 1e9 * onehot, axis=-1)
    return other - true_logit


def kl_to_target(logits, target_probs):
    """KL(target || softmax(logits)): TRADES' inner maximisation objective."""
    log_p = tf.nn.log_softmax(logits, axis=-1)
    safe_target = tf.maximum(target_probs, 1e-12)
    return tf.reduce_sum(target_probs * (tf.math.log(safe_target) - log_p), axis=-1)


LOSSES = {"ce": cross_entropy, "cw": cw_margin, "kl": kl_to_target}
