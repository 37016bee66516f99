"""Auto-PGD (Croce & Hein, ICML 2020): APGD-CE, APGD-DLR and targeted APGD-T.

Written from the paper and the reference algorithm (fra31/auto-attack), composed from
core.py's parts. The step size starts at 2 * eps and is halved, per example, at the
checkpoints p_j (first at 22% of the iterations, then gaps shrinking by 3% down to 6%)
when fewer than rho = 75% of the steps since the last checkpoint raised the loss, or when
the step was not reduced at the last checkpoint and the best loss has not improved since.
After a halving the iterate restarts from the best point found. Steps use momentum
alpha = 0.75 (none on the first step).

Everything is tensor code, so an APGD call is traced once in a tf.function: one
tf.while_loop over the (target class, restart) runs around the while_loop of one run.
Each run attacks only the points no earlier run broke (their outcome is settled; the
others' does not depend on them), with the random start it would have in the full batch.
"""

import dataclasses

import tensorflow as tf

from keras_arat.attacks import core
from keras_arat.attacks.base import Attack, as_seed

LOSS_NAMES = ("ce", "dlr", "dlr-targeted")


def apgd_start(x, eps, seed, norm):
    """AutoAttack's random start: a point on the surface of the (L-inf or L2) ball, clipped."""
    if norm == "linf":
        t = tf.random.stateless_uniform(tf.shape(x), seed=seed, minval=-1.0, maxval=1.0,
                                        dtype=x.dtype)
    else:
        t = tf.random.stateless_normal(tf.shape(x), seed=seed, dtype=x.dtype)
    return tf.clip_by_value(x + eps * core.normalize(t, norm), 0.0, 1.0)


def _momentum_step(x_adv, x_adv_old, grad, x, eps, step_size, norm, a):
    """z = P(x_k + eta * s(grad)); x_{k+1} = P(x_k + a (z - x_k) + (1 - a)(x_k - x_{k-1}))."""
    eta = core.bcast(step_size, x)
    z = core.project(core.ascent_step(x_adv, grad, eta, norm), x, eps, norm)
    return core.project(x_adv + a * (z - x_adv) + (1.0 - a) * (x_adv - x_adv_old), x, eps, norm)


def apgd_single_run(model_fn, x, y, loss_fn, eps, norm, n_iter, rho, seed, x_init=None):
    """One APGD run. Returns (x_best, loss_best, x_best_adv, still_correct [N] bool).

    loss_fn(logits) -> [N] is maximised. still_correct is False for the examples that
    some iterate misclassified; x_best_adv holds such an iterate for them.
    """
    n_iter_2 = max(int(0.22 * n_iter), 1)
    n_iter_min = max(int(0.06 * n_iter), 1)
    size_decr = max(int(0.03 * n_iter), 1)
    n = tf.shape(x)[0]
    x_adv = apgd_start(x, eps, seed, norm) if x_init is None else x_init

    def loss_grad(z):
        return core.loss_and_gradient(model_fn, loss_fn, z)

    logits, loss, grad = loss_grad(x_adv)
    correct = core.is_correct(logits, y)
    step_size = tf.fill([n], tf.cast(2.0 * eps, x.dtype))
    state = dict(
        i=tf.constant(0), x_adv=x_adv, x_adv_old=x_adv, grad=grad, grad_best=grad,
        x_best=x_adv, x_best_adv=x_adv, loss_best=loss, correct=correct,
        step_size=step_size, loss_steps=tf.zeros([n_iter, n], x.dtype),
        counter=tf.constant(0), k=tf.constant(n_iter_2),
        loss_best_last_check=loss, reduced_last_check=tf.ones([n], tf.bool))

    def body(s):
        i = s["i"]
        a = tf.where(i > 0, tf.constant(0.75, x.dtype), tf.constant(1.0, x.dtype))
        x_new = _momentum_step(s["x_adv"], s["x_adv_old"], s["grad"], x, eps, s["step_size"],
                               norm, a)
        logits, loss, grad = loss_grad(x_new)
        pred_ok = core.is_correct(logits, y)
        fooled_now = tf.logical_not(pred_ok)
        x_best_adv = tf.where(core.bcast(fooled_now, x), x_new, s["x_best_adv"])
        correct = tf.logical_and(s["correct"], pred_ok)
        loss_steps = tf.tensor_scatter_nd_update(s["loss_steps"], [[i]], loss[None])
        improved = loss > s["loss_best"]
        x_best = tf.where(core.bcast(improved, x), x_new, s["x_best"])
        grad_best = tf.where(core.bcast(improved, x), grad, s["grad_best"])
        loss_best = tf.where(improved, loss, s["loss_best"])
        counter = s["counter"] + 1
        k = s["k"]

        # Checkpoint: count the steps since the last one that raised the loss.
        check = tf.equal(counter, k)
        lags = tf.range(n_iter)
        cur = tf.math.floormod(i - lags, n_iter)
        prev = tf.math.floormod(i - lags - 1, n_iter)
        rises = tf.cast(tf.gather(loss_steps, cur) > tf.gather(loss_steps, prev), x.dtype)
        rises = tf.reduce_sum(rises * tf.cast(lags < k, x.dtype)[:, None], axis=0)
        oscillating = rises <= tf.cast(k, x.dtype) * rho
        stalled = tf.logical_and(tf.logical_not(s["reduced_last_check"]),
                                 s["loss_best_last_check"] >= loss_best)
        halve = tf.logical_and(check, tf.logical_or(oscillating, stalled))
        step_size = tf.where(halve, s["step_size"] / 2.0, s["step_size"])
        x_next = tf.where(core.bcast(halve, x), x_best, x_new)
        grad_next = tf.where(core.bcast(halve, x), grad_best, grad)
        reduced_last_check = tf.where(check, halve, s["reduced_last_check"])
        loss_best_last_check = tf.where(check, loss_best, s["loss_best_last_check"])
        k = tf.where(check, tf.maximum(k - size_decr, n_iter_min), k)
        counter = tf.where(check, 0, counter)
        return [dict(i=i + 1, x_adv=x_next, x_adv_old=s["x_adv"], grad=grad_next,
                     grad_best=grad_best, x_best=x_best, x_best_adv=x_best_adv,
                     loss_best=loss_best, correct=correct, step_size=step_size,
                     loss_steps=loss_steps, counter=counter, k=k,
                     loss_best_last_check=loss_best_last_check,
                     reduced_last_check=reduced_last_check)]

    (s,) = tf.while_loop(lambda s: s["i"] < n_iter, body, [state])
    return (tf.stop_gradient(s["x_best"]), s["loss_best"], tf.stop_gradient(s["x_best_adv"]),
            s["correct"])


@dataclasses.dataclass(frozen=True, kw_only=True)
class APGD(Attack):
    """APGD on cross-entropy ("ce"), DLR ("dlr") or targeted DLR ("dlr-targeted", APGD-T).

    attack(model_fn, x, y, seed) -> x_adv (or APGD(model, eps=...)(x, y), see base.py):
    for examples some run misclassified, the misclassified point; for the others the
    highest-loss point found. Restarts (and, for
    APGD-T, the n_target_classes most likely wrong classes at x, 1 run each by default)
    only change examples still classified correctly.
    """

    model: object = dataclasses.field(default=None, kw_only=False, compare=False, repr=False)
    eps: float
    norm: str = "linf"
    loss: str = "ce"
    n_iter: int = 100
    n_restarts: int = 1
    n_target_classes: int = 9
    rho: float = 0.75

    def __post_init__(self):
        if self.norm not in core.NORMS:
            raise ValueError(f"norm must be one of {core.NORMS}, got {self.norm!r}")
        if self.loss not in LOSS_NAMES:
            raise ValueError(f"loss must be one of {LOSS_NAMES}, got {self.loss!r}")
        if self.n_iter < 1 or self.n_restarts < 1 or self.n_target_classes < 1:
            raise ValueError("n_iter, n_restarts and n_target_classes must be >= 1")

    @property
    def name(self):
        return {"ce": "apgd-ce", "dlr": "apgd-dlr", "dlr-targeted": "apgd-t"}[self.loss]

    def perturb(self, model_fn, x, y, seed):
        x = tf.convert_to_tensor(x)
        y = tf.cast(y, tf.int64)
        seed = as_seed(seed)
        clean_logits = model_fn(x)
        correct = core.is_correct(clean_logits, y)
        n_targets = 1
        if self.loss == "dlr-targeted":
            n_targets = core.target_count(clean_logits, self.n_target_classes)
            targets = tf.cast(tf.math.top_k(clean_logits, k=n_targets + 1).indices[:, 1:],
                              tf.int64)
        else:
            targets = tf.zeros([tf.shape(y)[0], 1], tf.int64)  # unused
        base = core.cross_entropy if self.loss == "ce" else core.dlr

        # One traced loop over the (target, restart) runs, each on the points no earlier
        # run broke: a run's outcome per point does not depend on the other points.
        def run(k, best, best_loss, adv, correct):
            t, r = k // self.n_restarts, k % self.n_restarts
            idx = tf.where(correct)[:, 0]
            ys, target = tf.gather(y, idx), tf.gather(targets[:, t], idx)
            if self.loss == "dlr-targeted":
                loss_fn = lambda logits: core.targeted_dlr(logits, ys, target)  # noqa: E731
            else:
                loss_fn = lambda logits: base(logits, ys)  # noqa: E731
            # The start is drawn for the whole batch, then subset, so every point starts
            # where it would without the subsetting.
            start = apgd_start(x, self.eps, core.fold_seed(seed, t, r), self.norm)
            x_best, loss_best, x_best_adv, still = apgd_single_run(
                model_fn, tf.gather(x, idx), ys, loss_fn, self.eps, self.norm, self.n_iter,
                self.rho, None, x_init=tf.gather(start, idx))
            rows = idx[:, None]
            newly = tf.logical_not(still)
            adv = tf.tensor_scatter_nd_update(adv, tf.boolean_mask(rows, newly),
                                              tf.boolean_mask(x_best_adv, newly))
            better = loss_best > tf.gather(best_loss, idx)
            best = tf.tensor_scatter_nd_update(best, tf.boolean_mask(rows, better),
                                               tf.boolean_mask(x_best, better))
            best_loss = tf.tensor_scatter_nd_update(best_loss, tf.boolean_mask(rows, better),
                                                    tf.boolean_mask(loss_best, better))
            correct = tf.tensor_scatter_nd_update(correct, rows, still)
            return k + 1, best, best_loss, adv, correct

        best_loss = tf.fill(tf.shape(y), tf.constant(-float("inf"), x.dtype))
        _, best, _, adv, correct = tf.while_loop(
            lambda k, *s: tf.logical_and(k < n_targets * self.n_restarts,
                                         tf.reduce_any(s[-1])),
            run, (tf.constant(0), x, best_loss, x, correct))
        return tf.stop_gradient(tf.where(core.bcast(correct, x), best, adv))
