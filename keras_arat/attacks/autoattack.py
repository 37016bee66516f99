"""AutoAttack (Croce & Hein, ICML 2020) in TensorFlow, and the batched attack runner.

    from keras_arat.attacks import AutoAttack
    result = AutoAttack(eps=8 / 255).run(model_fn, x, y, batch_size=250, seed=0)
    result.robust_accuracy, result.stages, result.warnings, result.x_adv

"standard": APGD-CE (100 iterations, 1 run), APGD-T (9 target classes, 1 run each),
FAB-T (9 target classes, 100 iterations), Square (5,000 queries, p_init 0.8), each on
the points every earlier stage failed to break; the worst case per example is kept.
`model_fn` is any callable images -> logits (a Keras network with its branch fixed, a
SavedModel signature, an ONNX session wrapped with tf.numpy_function). The per-batch
attacks are compiled with tf.function.

Guard rails (errors are ValueError subclasses): inputs outside [0,1] (InputRangeError),
a model whose outputs are probabilities rather than logits (ProbabilityOutputError).
Warnings: Square (gradient-free) breaking points the gradient attacks could not (a sign
of gradient masking, as in the reference's check), and zero input gradients.
"""

import dataclasses
import time

import numpy as np
import tensorflow as tf

from keras_arat.attacks import core
from keras_arat.attacks.apgd import APGD
from keras_arat.attacks.base import Attack, as_seed, model_function
from keras_arat.attacks.fab import FABTargeted
from keras_arat.attacks.square import Square

GRADIENT_FREE = ("square",)
SQUARE_WARNING_FRACTION = 0.002  # the reference's threshold (0.2% of the points)


class EvaluationError(ValueError):
    """A model or data set that cannot be evaluated as asked (one-line message)."""


class InputRangeError(EvaluationError):
    pass


class ProbabilityOutputError(EvaluationError):
    pass


class NonFiniteOutputError(EvaluationError):
    """The model's outputs are NaN or Inf: broken weights, not a bad request."""


class BudgetError(EvaluationError):
    """An attack returned a point outside its threat model: a bug, never a figure."""


# float32 rounding of the projection overshoots eps by ~3e-8; anything past this is a bug.
BUDGET_ATOL = 1e-6
# A query model (another runtime of the same weights) must match the model's logits to
# this fraction of their scale (float32 runtimes differ by ~1e-7 of it).
QUERY_RTOL = 1e-4


def threat_model(attack):
    """(eps, norm) of an attack, looking through wrappers such as Restarts.

    With noise_leak (the official AR-AT PGD: the ball is centred on the randomly started
    image, itself up to eps from the clean one) the points can lie 2 eps from the clean
    image, and that is the bound such a figure is checked against."""
    while not hasattr(attack, "eps") and hasattr(attack, "attack"):
        attack = attack.attack
    eps = float(attack.eps) * (2.0 if getattr(attack, "noise_leak", False) else 1.0)
    return eps, getattr(attack, "norm", "linf")


def masking_warning(name, n_free, n):
    """The warning when gradient-free attack `name` broke `n_free` of `n` points that the
    gradient attacks failed on (more than the reference's 0.2%), else None."""
    if n_free <= SQUARE_WARNING_FRACTION * n:
        return None
    return (f"gradient masking suspected: {name} (gradient-free) broke {n_free} of {n} "
            f"points the gradient attacks failed on ({n_free / n:.2%} of robust accuracy); "
            "this evaluation may overestimate robustness")


def check_adversarial(x_adv, x, eps, norm="linf", name="attack"):
    """Refuse adversarial examples outside the eps-ball around x or outside [0, 1].

    Cheap (one pass over the batch), so it runs on every batch behind a reported figure.
    """
    x_adv = np.asarray(x_adv, np.float32)
    x = np.asarray(x, np.float32)
    if x_adv.shape != x.shape:
        raise BudgetError(f"{name} returned shape {list(x_adv.shape)} for inputs of shape "
                          f"{list(x.shape)}")
    if not np.all(np.isfinite(x_adv)):
        raise BudgetError(f"{name} returned non-finite pixels")
    lo, hi = float(np.min(x_adv, initial=0.0)), float(np.max(x_adv, initial=1.0))
    if lo < -BUDGET_ATOL or hi > 1.0 + BUDGET_ATOL:
        raise BudgetError(f"{name} returned pixels in [{lo:.6g}, {hi:.6g}], outside [0, 1]")
    delta = (x_adv - x).reshape(len(x), -1)
    if not len(delta):
        return
    size = (np.max(np.abs(delta), axis=1) if norm == "linf"
            else np.sqrt(np.sum(np.square(delta.astype(np.float64)), axis=1)))
    worst = int(np.argmax(size))
    if size[worst] > eps + BUDGET_ATOL:
        raise BudgetError(f"{name} moved example {worst} by {size[worst]:.6g} in {norm}, "
                          f"more than eps {eps:.6g} (+{BUDGET_ATOL:g}): its figure would be "
                          f"meaningless")


def check_inputs(x):
    """Refuse images outside [0, 1] (attacks clip to that box)."""
    lo, hi = float(np.min(x)), float(np.max(x))
    if lo < 0.0 or hi > 1.0:
        raise InputRangeError(f"inputs must be float images in [0,1], got values in "
                              f"[{lo:.4g}, {hi:.4g}]")


def check_logits(model_fn, x, tol=1e-3):
    """Refuse a model whose outputs look like probabilities (non-negative rows summing to 1)."""
    out = np.asarray(model_fn(tf.convert_to_tensor(x[:64], tf.float32)))
    if out.ndim != 2:
        raise EvaluationError(f"the model must return logits of shape [N, classes], "
                              f"got shape {list(out.shape)}")
    bad = int(np.sum(~np.all(np.isfinite(out), axis=1)))
    if bad:
        raise NonFiniteOutputError(f"the model outputs non-finite logits (NaN or Inf) for "
                                   f"{bad} of the first {len(out)} images: its weights are "
                                   "broken, so no accuracy can be reported")
    if np.all(out >= -tol) and np.all(np.abs(out.sum(axis=1) - 1.0) <= tol):
        raise ProbabilityOutputError("the model outputs probabilities (non-negative rows "
                                     "summing to 1), not logits: remove the final softmax")
    return out.shape[1]


def check_agreement(model_fn, query_fn, x, rtol=QUERY_RTOL):
    """Refuse a query model that does not compute what model_fn computes: on the first 64
    images their logits must agree within rtol x max(1, largest |logit|). Returns the
    largest difference."""
    x = tf.convert_to_tensor(x[:64], tf.float32)
    want = np.asarray(model_fn(x), np.float32)
    got = np.asarray(query_fn(x), np.float32)
    if got.shape != want.shape:
        raise EvaluationError(f"the query model returns logits of shape {list(got.shape)}, "
                              f"the model {list(want.shape)}: not the same model")
    diff = float(np.max(np.abs(got - want), initial=0.0))
    tol = rtol * max(1.0, float(np.max(np.abs(want), initial=0.0)))
    if not diff <= tol:
        raise EvaluationError(f"the query model does not compute the model's logits: they "
                              f"differ by up to {diff:.3g} on the first {len(want)} images "
                              f"(allowed {tol:.3g})")
    return diff


def zero_gradient_fraction(model_fn, x, y):
    """Fraction of examples whose cross-entropy input gradient is exactly zero."""
    x = tf.convert_to_tensor(x[:64], tf.float32)
    _, _, grad = core.loss_and_gradient(
        model_fn, lambda logits: core.cross_entropy(logits, y[:64]), x)
    return float(np.mean(np.abs(grad.numpy()).reshape(len(x), -1).sum(1) == 0))


@dataclasses.dataclass(frozen=True)
class Restarts(Attack):
    """Run `attack` n times (seeds folded with the restart index); per example, keep the
    first misclassified result, else the last run's point. Works for any attack."""

    attack: object
    n: int

    @property
    def name(self):
        return f"{getattr(self.attack, 'name', 'attack')}x{self.n}"

    @property
    def model(self):
        return getattr(self.attack, "model", None)

    def perturb(self, model_fn, x, y, seed):
        x = tf.convert_to_tensor(x)
        y = tf.cast(y, tf.int64)
        seed = as_seed(seed)
        best = None
        broken = tf.zeros(tf.shape(y), tf.bool)
        for r in range(self.n):
            x_adv = self.attack(model_fn, x, y, core.fold_seed(seed, 1000 + r))
            wrong = tf.logical_not(core.is_correct(model_fn(x_adv), y))
            keep_new = tf.logical_not(broken)
            best = x_adv if best is None else tf.where(
                tf.reshape(keep_new, [-1] + [1] * (len(x.shape) - 1)), x_adv, best)
            broken = tf.logical_or(broken, wrong)
        return tf.stop_gradient(best)


def _Progress(total, desc, enabled):
    """Lines with done/total, elapsed time and ETA on stderr (keras_arat.progress)."""
    from keras_arat.progress import Progress
    return Progress(total, desc, "images", enabled=enabled)


def compile_attack(attack, model_fn, image_shape=None):
    """tf.function (x, y, seed) -> x_adv for one batch.

    Given the image shape, traced once for any batch size (so the last, smaller batch of
    a data set does not trace the attack a second time); otherwise once per batch shape.
    The attacks are tensor code (tf.while_loop, tf.cond), so autograph is off: converting
    their source took most of the tracing (5 of 6 s for APGD on the quickstart model).
    """
    fn = lambda xb, yb, sb: attack(model_fn, xb, yb, sb)  # noqa: E731
    if image_shape is None:
        return tf.function(fn, reduce_retracing=True, autograph=False)
    return tf.function(fn, autograph=False, input_signature=[
        tf.TensorSpec([None, *image_shape], tf.float32), tf.TensorSpec([None], tf.int64),
        tf.TensorSpec([2], tf.int64)])


def predict_labels(model_fn, x, batch_size):
    out = []
    for start in range(0, len(x), batch_size):
        logits = model_fn(tf.convert_to_tensor(x[start:start + batch_size], tf.float32))
        out.append(np.argmax(np.asarray(logits), axis=1))
    return np.concatenate(out) if out else np.zeros([0], np.int64)


def run_attack(attack, model_fn, x, y, batch_size=256, seed=0, only=None, progress=False,
               desc=None, compiled=None, eager=False, query_fn=None):
    """Attack x (numpy, [0,1]) in batches; returns (x_adv, still_correct [N] bool).

    only: bool mask of the examples to attack (default all); the others are returned
    unchanged and counted as they are classified at x. Batch i uses seed (seed, i).
    eager=True skips tf.function (faster for a few cheap iterations: no tracing).
    query_fn: the model the attack queries, if not model_fn (a faster runtime of the same
    model for a gradient-free attack); the verdicts are model_fn's all the same. If it
    has a `host` attribute (numpy -> numpy logits, as OnnxRunner.as_tf() gives) and the
    attack can run on the host (Square, L-inf), the attack's loop runs in numpy on it.
    """
    x = np.asarray(x, np.float32)
    y = np.asarray(y).astype(np.int64)
    x_adv = x.copy()
    idx = np.arange(len(x)) if only is None else np.flatnonzero(only)
    queried = query_fn or model_fn
    host = getattr(query_fn, "host", None)
    if compiled is None and host is not None and getattr(attack, "runs_on_host", False):
        # A host runtime (onnxruntime) is queried from a numpy loop: see Square.host_call.
        compiled = lambda xb, yb, sb: attack.host_call(host, xb, yb, sb)  # noqa: E731
    fn = compiled or (compile_attack(attack, queried, x.shape[1:]) if not eager else
                      (lambda xb, yb, sb: attack(queried, xb, yb, sb)))
    name = desc or getattr(attack, "name", "attack")
    eps, norm = threat_model(attack)
    bar = _Progress(len(idx), name, progress)
    for b, start in enumerate(range(0, len(idx), batch_size)):
        sel = idx[start:start + batch_size]
        xb = np.asarray(fn(tf.constant(x[sel]), tf.constant(y[sel]),
                           tf.constant([seed, b], tf.int64)))
        check_adversarial(xb, x[sel], eps, norm, name)
        x_adv[sel] = xb
        bar.update(len(sel))
    bar.close()
    correct = predict_labels(model_fn, x_adv, batch_size) == y
    return x_adv, correct


def standard_attacks(eps, norm="linf", n_iter=100, n_queries=5000, n_target_classes=9,
                     p_init=0.8):
    """AutoAttack 'standard' version: the reference's settings for L-inf and L2."""
    return [APGD(eps=eps, norm=norm, loss="ce", n_iter=n_iter, n_restarts=1),
            APGD(eps=eps, norm=norm, loss="dlr-targeted", n_iter=n_iter, n_restarts=1,
                 n_target_classes=n_target_classes),
            FABTargeted(eps=eps, norm=norm, n_iter=n_iter, n_target_classes=n_target_classes,
                        n_restarts=1),
            Square(eps=eps, norm=norm, n_queries=n_queries, p_init=p_init, n_restarts=1)]


@dataclasses.dataclass
class AutoAttackResult:
    x_adv: np.ndarray
    robust: np.ndarray  # bool [N]: survived every stage
    clean_correct: np.ndarray
    stages: list  # [{"attack", "robust_acc", "n_broken", "time_s"}], the first is "clean"
    warnings: list
    eps: float
    norm: str

    @property
    def robust_accuracy(self):
        return float(self.robust.mean()) if len(self.robust) else 0.0

    @property
    def clean_accuracy(self):
        return float(self.clean_correct.mean()) if len(self.clean_correct) else 0.0

    def breakdown(self):
        return {"eps": self.eps, "norm": self.norm, "n_examples": int(len(self.robust)),
                "clean_acc": self.clean_accuracy, "robust_acc": self.robust_accuracy,
                "stages": self.stages, "warnings": self.warnings}


@dataclasses.dataclass(kw_only=True)
class AutoAttack:
    """Sequential ensemble; attacks=None means the 'standard' version.

    run(model_fn, x, y, ...) attacks, stage by stage, only the examples still classified
    correctly (and, with initial_robust, only those earlier attacks failed on too, so the
    result is the worst case over all of them). Made with a model,

        x_adv, robust = AutoAttack(model, eps=8 / 255)(x, y)

    attacks any Keras model or images -> logits callable (keras_arat.attacks.base) and
    returns the adversarial images and the per-example verdicts (True: still correct).
    """

    model: object = dataclasses.field(default=None, kw_only=False, compare=False, repr=False)
    eps: float
    norm: str = "linf"
    attacks: list = None
    n_iter: int = 100
    n_queries: int = 5000
    n_target_classes: int = 9
    p_init: float = 0.8

    def __post_init__(self):
        if self.norm not in core.NORMS:
            raise ValueError(f"norm must be one of {core.NORMS}, got {self.norm!r}")
        if self.attacks is None:
            self.attacks = standard_attacks(self.eps, self.norm, self.n_iter, self.n_queries,
                                            self.n_target_classes, self.p_init)

    def __call__(self, x, y, seed=0, batch_size=250, branch="adv", **run_options):
        """(x_adv, robust) of the model this AutoAttack was made with (see run)."""
        if self.model is None:
            raise ValueError("AutoAttack was made without a model: use run(model_fn, x, y) "
                             "or AutoAttack(model, eps=...)(x, y)")
        result = self.run(model_function(self.model, branch), x, y, batch_size, int(seed),
                          **run_options)
        return result.x_adv, result.robust

    def run(self, model_fn, x, y, batch_size=250, seed=0, initial_robust=None,
            initial_stages=(), progress=False, check=True, log=None, query_fn=None):
        """query_fn: a forward-only runtime of the same model (e.g. onnxruntime through
        keras_arat.deployed.OnnxRunner.as_tf()) that the gradient-free stage (Square, all
        forward passes) queries instead of model_fn. It is checked to agree with model_fn
        (check_agreement), and every verdict is still model_fn's."""
        x = np.asarray(x, np.float32)
        y = np.asarray(y).astype(np.int64)
        warnings = []
        if check:
            check_inputs(x)
            check_logits(model_fn, x)
        if query_fn is not None:
            check_agreement(model_fn, query_fn, x)
        x_adv = x.copy()
        start = time.time()
        clean_correct = predict_labels(model_fn, x, batch_size) == y
        robust = clean_correct.copy()
        stages = [{"attack": "clean", "robust_acc": float(robust.mean()), "n_broken": 0,
                   "time_s": round(time.time() - start, 3)}]
        for name, mask in initial_stages:
            broken = robust & ~mask
            robust &= mask
            stages.append({"attack": name, "robust_acc": float(robust.mean()),
                           "n_broken": int(broken.sum()), "time_s": 0.0, "before_autoattack":
                           True})
        if initial_robust is not None:
            robust &= np.asarray(initial_robust, bool)
        gradient_failures = None
        for i, attack in enumerate(self.attacks):
            name = getattr(attack, "name", type(attack).__name__.lower())
            if name in GRADIENT_FREE and gradient_failures is None:
                gradient_failures = robust.copy()
            t0 = time.time()
            if robust.any():
                adv_i, still = run_attack(
                    attack, model_fn, x, y, batch_size, seed=seed * 7919 + i, only=robust,
                    progress=progress, desc=name,
                    query_fn=query_fn if name in GRADIENT_FREE else None)
                broken = robust & ~still
                x_adv[broken] = adv_i[broken]
                robust &= ~broken
            else:
                broken = np.zeros_like(robust)
            stage = {"attack": name, "robust_acc": float(robust.mean()),
                     "n_broken": int(broken.sum()), "time_s": round(time.time() - t0, 3)}
            stages.append(stage)
            if log:
                # The accuracies are in the result; the log says what happened.
                log(f"{name}: broke {stage['n_broken']}, {int(robust.sum())} of {len(x)} left "
                    f"({stage['time_s']:.1f} s)")
            if name in GRADIENT_FREE and i > 0:
                warning = masking_warning(name, int(broken.sum()), len(x))
                if warning:
                    warnings.append(warning)
        check_adversarial(x_adv, x, float(self.eps), self.norm, "AutoAttack")
        if check and any(getattr(a, "name", "") not in GRADIENT_FREE for a in self.attacks):
            zero = zero_gradient_fraction(model_fn, x, y)
            if zero > 0:
                warnings.append(f"{zero:.0%} of the first 64 points have an exactly zero input "
                                f"gradient: gradient attacks cannot work on them")
        return AutoAttackResult(x_adv=x_adv, robust=robust, clean_correct=clean_correct,
                                stages=stages, warnings=warnings, eps=float(self.eps),
                                norm=self.norm)
