"""Targeted FAB (Croce & Hein, ICML 2020): FAB-T, the minimum-norm attack of AutoAttack.

Written from the paper and the reference algorithm (fra31/auto-attack). Each step
linearises the decision boundary between the true class y and a target class t at the
current iterate x_k, projects both x_k and the original point x_0 onto that hyperplane
(intersected with the [0,1] box, minimal L-inf or L2 norm), and moves to the convex
combination (x_k + eta d_k)(1 - alpha) + (x_0 + eta d_0) alpha with
alpha = min(|d_k| / (|d_k| + |d_0|), alpha_max); alpha_max = 0.1, eta = 1.05. When the
iterate is adversarial it is recorded if closer than the best so far, then pulled back
towards x_0: x_k <- x_0 + beta (x_k - x_0), beta = 0.9. A final search (bisection on
the segment from x_0 to the best adversarial point) shrinks the perturbation further.
The targets are the n_target_classes classes with the highest logits at x_0 after the
predicted one; a point counts as broken only if its perturbation is within eps.

Only one hyperplane per step is needed for the targeted version, so one gradient (of
z_t - z_y) per step; no per-class Jacobian.
"""

import dataclasses

import tensorflow as tf

from keras_arat.attacks import core
from keras_arat.attacks.base import Attack, as_seed



def project_on_hyperplane(t, w, b, norm="linf", max_steps=64):
    """Smallest (L-inf or L2) d with w.(t + d) = b and t + d in [0,1]; t, w: [N, D], b: [N].

    If the box makes the hyperplane unreachable, d goes as far towards it as the box
    allows. Both norms reduce to one problem: move coordinate i by dir_i * g_i *
    min(lam, r_i), lam >= 0, where r_i is where it hits the box; the change of w.t is
    F(lam) = sum_i omega_i min(lam, r_i), piecewise linear, increasing and concave in lam.
    Newton's method from lam = 0 solves F(lam) = c exactly: on a concave function it
    stays below the root, and each step is the closed form (c - sum_{r_i <= lam} omega_i
    r_i) / sum_{r_i > lam} omega_i, so it stops, exact, once no breakpoint r_i lies between
    lam and the root. That takes a handful of passes over the D coordinates, where
    sorting the breakpoints (the textbook way) costs several times more on a CPU.
    """
    c = tf.reduce_sum(w * t, axis=1) - b
    flip = tf.where(c >= 0, 1.0, -1.0)
    w = w * flip[:, None]
    c = c * flip  # now c >= 0 and we need w.d = -c
    active = tf.abs(w) > 1e-12
    slack = tf.where(w < 0, 1.0 - t, t)  # room to move in the descent direction -sign(w)
    abs_w = tf.abs(w)
    if norm == "linf":
        omega, r, gain = abs_w, slack, tf.ones_like(w)
    else:
        omega, r, gain = tf.square(w), slack / tf.where(active, abs_w, 1.0), abs_w
    omega = tf.where(active, omega, 0.0)
    r = tf.where(active, r, 0.0)
    r_max = tf.reduce_max(r, axis=1)
    feasible = tf.reduce_sum(omega * r, axis=1) >= c

    def newton(lam):
        reached = r <= lam[:, None]  # coordinates already at the box
        at_box = tf.reduce_sum(tf.where(reached, omega * r, 0.0), axis=1)
        slope = tf.reduce_sum(tf.where(reached, 0.0, omega), axis=1)
        return tf.maximum((c - at_box) / tf.maximum(slope, 1e-30), lam)

    def body(i, lam, _):
        new = tf.where(feasible, newton(lam), lam)
        return i + 1, new, tf.reduce_any(new > lam)

    _, lam, _ = tf.while_loop(lambda i, _, moved: tf.logical_and(moved, i < max_steps), body,
                              (tf.constant(0), tf.zeros_like(c), tf.constant(True)))
    lam = tf.where(feasible, lam, r_max + 1.0)
    d = -tf.sign(w) * gain * tf.minimum(lam[:, None], r)
    return tf.where(active, d, 0.0)


def fab_start(x, eps, seed, norm):
    """AutoAttack's FAB restart: a random point at half eps from x, clipped to [0,1]."""
    shape = tf.shape(x)
    if norm == "linf":
        t = tf.random.stateless_uniform(shape, seed=seed, minval=-1.0, maxval=1.0)
    else:
        t = tf.random.stateless_normal(shape, seed=seed)
    return tf.clip_by_value(x + 0.5 * eps * core.normalize(t, norm), 0.0, 1.0)


def fab_targeted_run(model_fn, x, y, target, eps, norm, n_iter, alpha_max, eta, beta,
                     x_init=None, final_search_steps=10):
    """One FAB-T run from x (or from x_init, a restart's random start).

    Returns (x_adv, found): found [N] bool marks misclassified points with perturbation
    within eps; x_adv equals x elsewhere.
    """
    n = tf.shape(x)[0]
    shape = tf.shape(x)
    x0 = tf.reshape(x, [n, -1])
    x1 = x if x_init is None else x_init

    def diff_and_grad(z):
        with tf.GradientTape() as tape:
            tape.watch(z)
            logits = core.wide(model_fn(z))  # float32 arithmetic, whatever the model's
            k = tf.shape(logits)[-1]
            df = (tf.reduce_sum(tf.one_hot(target, k, dtype=logits.dtype) * logits, -1)
                  - tf.reduce_sum(tf.one_hot(y, k, dtype=logits.dtype) * logits, -1))
            total = tf.reduce_sum(df)
        grad = tape.gradient(total, z)
        if grad is None:
            grad = tf.zeros_like(z)
        return tf.stop_gradient(df), tf.stop_gradient(grad)

    res = tf.fill([n], tf.constant(1e10, x.dtype))
    adv = x

    def body(i, x1, adv, res):
        df, dg = diff_and_grad(x1)
        w = tf.reshape(dg, [n, -1])
        x1f = tf.reshape(x1, [n, -1])
        b = tf.reduce_sum(w * x1f, axis=1) - df
        d = project_on_hyperplane(tf.concat([x1f, x0], 0), tf.concat([w, w], 0),
                                  tf.concat([b, b], 0), norm)
        d1, d2 = d[:n], d[n:]
        a1 = tf.maximum(core.lp_norm(d1, norm), 1e-8)[:, None]
        a2 = tf.maximum(core.lp_norm(d2, norm), 1e-8)[:, None]
        alpha = tf.clip_by_value(a1 / (a1 + a2), 0.0, alpha_max)
        x1f = tf.clip_by_value((x1f + eta * d1) * (1.0 - alpha) + (x0 + eta * d2) * alpha,
                               0.0, 1.0)
        x1 = tf.reshape(x1f, shape)
        is_adv = tf.logical_not(core.is_correct(model_fn(x1), y))
        dist = core.lp_norm(x1 - x, norm)
        better = tf.logical_and(is_adv, dist < res)
        adv = tf.where(core.bcast(better, x), x1, adv)
        res = tf.where(better, dist, res)
        x1 = tf.where(core.bcast(is_adv, x), x + beta * (x1 - x), x1)
        return i + 1, tf.stop_gradient(x1), tf.stop_gradient(adv), res

    _, _, adv, res = tf.while_loop(lambda i, *_: i < n_iter, body,
                                   (tf.constant(0), x1, adv, res))
    return final_search(model_fn, x, y, adv, res < 1e10, eps, norm, final_search_steps)


def final_search(model_fn, x, y, adv, found, eps, norm, steps=10):
    """FAB's last step on the points found (misclassified at adv): bisection on the
    segment [x, adv] for the closest point still misclassified (a loop, not unrolled: one
    copy of the model in the graph), kept if within eps and misclassified.

    Returns (x_adv, ok): x_adv is x where ok is False. The other points are not queried;
    with none found the model is not called at all (some runtimes' kernels mishandle an
    empty batch: oneDNN's convolution on one AVX-512 CPU returned its input's shape).
    """
    return tf.cond(tf.reduce_any(found),
                   lambda: _search_found(model_fn, x, y, adv, found, eps, norm, steps),
                   lambda: (tf.stop_gradient(x), tf.zeros_like(found)))


def _search_found(model_fn, x, y, adv, found, eps, norm, steps):
    at = tf.where(found)[:, 0]
    xf, yf = tf.gather(x, at), tf.gather(y, at)
    delta = tf.gather(adv, at) - xf

    def bisect(i, lo, hi):
        mid = (lo + hi) / 2.0
        bad = tf.logical_not(core.is_correct(model_fn(xf + core.bcast(mid, xf) * delta), yf))
        return i + 1, tf.where(bad, lo, mid), tf.where(bad, mid, hi)

    m = tf.shape(at)[0]
    _, _, hi = tf.while_loop(lambda i, *_: i < steps, bisect,
                             (tf.constant(0), tf.zeros([m], x.dtype), tf.ones([m], x.dtype)))
    adv_f = xf + core.bcast(hi, xf) * delta
    ok_f = tf.logical_and(core.lp_norm(adv_f - xf, norm) <= eps,
                          tf.logical_not(core.is_correct(model_fn(adv_f), yf)))
    ok = tf.tensor_scatter_nd_update(tf.zeros_like(found), at[:, None], ok_f)
    adv = tf.tensor_scatter_nd_update(x, at[:, None], tf.where(core.bcast(ok_f, xf), adv_f, xf))
    return tf.stop_gradient(adv), ok


@dataclasses.dataclass(frozen=True, kw_only=True)
class FABTargeted(Attack):
    """FAB-T: for each of the n_target_classes most likely wrong classes (n_restarts runs
    each, random start from the second), attack the examples still classified correctly.

    attack(model_fn, x, y, seed) -> x_adv (x itself where no adversarial point within
    eps was found), or FABTargeted(model, eps=...)(x, y) (base.py).
    """

    model: object = dataclasses.field(default=None, kw_only=False, compare=False, repr=False)
    eps: float
    norm: str = "linf"
    n_iter: int = 100
    n_target_classes: int = 9
    n_restarts: int = 1
    alpha_max: float = 0.1
    eta: float = 1.05
    beta: float = 0.9
    final_search_steps: int = 10
    name: str = "fab-t"

    def __post_init__(self):
        if self.norm not in core.NORMS:
            raise ValueError(f"norm must be one of {core.NORMS}, got {self.norm!r}")
        if self.n_iter < 1 or self.n_restarts < 1 or self.n_target_classes < 1:
            raise ValueError("n_iter, n_restarts and n_target_classes must be >= 1")

    def perturb(self, model_fn, x, y, seed):
        x = tf.convert_to_tensor(x)
        y = tf.cast(y, tf.int64)
        seed = as_seed(seed)
        logits = model_fn(x)
        correct = core.is_correct(logits, y)
        n_targets = core.target_count(logits, self.n_target_classes)
        targets = tf.cast(tf.math.top_k(logits, k=n_targets + 1).indices[:, 1:], tf.int64)

        # One traced loop over the (target, restart) runs, each on the points no earlier
        # run broke: a run's outcome per point does not depend on the other points.
        def run(k, adv, correct):
            t, r = k // self.n_restarts, k % self.n_restarts
            idx = tf.where(correct)[:, 0]
            # The restart's noise is drawn for the whole batch, then subset, so every
            # point starts where it would without the subsetting.
            start = tf.cond(r > 0, lambda: fab_start(x, self.eps, core.fold_seed(seed, t, r),
                                                     self.norm), lambda: x)
            x_run, ok = fab_targeted_run(
                model_fn, tf.gather(x, idx), tf.gather(y, idx), tf.gather(targets[:, t], idx),
                self.eps, self.norm, self.n_iter, self.alpha_max, self.eta, self.beta,
                tf.gather(start, idx), self.final_search_steps)
            broken = tf.gather(idx, tf.where(ok)[:, 0])[:, None]
            adv = tf.tensor_scatter_nd_update(adv, broken, tf.boolean_mask(x_run, ok))
            correct = tf.tensor_scatter_nd_update(correct, broken,
                                                  tf.zeros(tf.shape(broken)[:1], tf.bool))
            return k + 1, adv, correct

        _, adv, _ = tf.while_loop(
            lambda k, _, correct: tf.logical_and(k < n_targets * self.n_restarts,
                                                 tf.reduce_any(correct)),
            run, (tf.constant(0), x, correct))
        return tf.stop_gradient(adv)
