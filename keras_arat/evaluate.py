"""Evaluate a trained run or a deployed model: clean, PGD-20, CW and AutoAttack accuracy.

A training run (a checkpoint of it), through either BN branch:

    python -m keras_arat.evaluate --workdir=RUN [--checkpoint=latest|best|swa|epoch-N]
        [--branch=adv|clean|both]
        [--attacks=clean,pgd20,cw,autoattack] [--n_examples=N] [--batch_size=B]

A deployed model, whose serving signature takes "images" (float32 [N,H,W,C] in [0,1])
and returns "logits":

    python -m keras_arat.evaluate --saved_model=DIR [--workdir=RUN | --dataset=digits] ...
    python -m keras_arat.evaluate --onnx=FILE [--workdir=RUN | --dataset=digits] ...

With --saved_model or --onnx the model is the exported one (its branch is whatever was
exported; --branch is ignored); --workdir then only supplies the test data, the eps
and the place results go, otherwise --dataset (digits by default) and --eps (8/255 by
default) do.
ONNX models are run with onnxruntime and have no gradients: only Square (and clean)
can run; gradient attacks are skipped with a printed note.

Attacks (--attacks, comma list): clean; pgd20 (PGD-20 on cross-entropy, step eps/4,
random start); cw (PGD-20 on the CW margin: CW-L-inf); apgd-ce, apgd-t, fab-t, square
(AutoAttack's stages alone); autoattack (the "standard" version: APGD-CE, APGD-T,
FAB-T, Square in sequence, each on the points the earlier stages left); pgd20-leak
(PGD-20 as the official AR-AT code runs it: its ball is centred on x + U(-eps, eps), so
its points may lie 2 eps from x). Each figure is its attack alone: an example counts as
robust if it is classified correctly clean and the attack fails on it. When two or more
attacks at eps ran, "worst_case" is the figure over all of them (robust only if every
one failed); pgd20-leak, labelled with its 2-eps ball, never enters it.
--restarts=R runs pgd20 and cw R times.

Which checkpoint: --checkpoint=latest (default), best (written by --keep_best), swa, a
name such as epoch-0003, or a folder.

Files written into --output_dir (default: --workdir; nothing without either):
  evals/<setting>.json    one file per evaluation setting: checkpoint (or deployed model),
                          branch, norm, eps and number of test images name it; inside, the
                          figure of every attack with its settings (steps, step size,
                          restarts, seed), the attacks it is the worst case over (clean and
                          itself, or for worst_case every attack at eps that ran), its time,
                          when it was measured and, for AutoAttack, the per-stage breakdown.
                          A figure is only ever replaced by the same measurement repeated.
  tensorboard/            the same figures as scalars evaluate/<branch>/<attack>/<eps, n>
  robustbench.json        the figures in RobustBench's model_info format (percent strings,
                          eps "8/255", ...) when AutoAttack ran on the adv branch
                          (robustbench_<saved_model|onnx>.json for a deployed model)
RUN/results.json holds training's own final evaluation and is never changed here. The
printed JSON holds only what this call computed, with its labels.

Every adversarial batch behind a figure is checked to lie within eps (pgd20-leak: 2 eps)
of its clean image (atol 1e-6) and in [0, 1]; a violation is an error, never a number.

Refusals (exit status 2, one line on stderr): inputs outside [0,1], a model that outputs
probabilities instead of logits, bad flags. A warning is printed and recorded when
Square (gradient-free) breaks points the gradient attacks could not (gradient masking).
"""

import dataclasses
import json
import os
import sys
import time

if __name__ == "__main__":  # bad paths fail before TensorFlow loads (4-6 s); it loads quietly
    from keras_arat import preflight, quiet
    quiet.import_tensorflow(preflight.exit_on_error(preflight.evaluate_argv, sys.argv[1:]))

import numpy as np
import tensorflow as tf
from absl import app, flags

from keras_arat import files, records
from keras_arat.attacks import (APGD, PGD, AutoAttack, BudgetError, EvaluationError,
                                FABTargeted, NonFiniteOutputError, Restarts, Square,
                                check_agreement, check_inputs, check_logits, core,
                                run_attack)
from keras_arat.attacks.autoattack import masking_warning, predict_labels
from keras_arat.attacks.base import model_function

ATTACKS = ("clean", "pgd20", "pgd20-leak", "cw", "apgd-ce", "apgd-t", "fab-t", "square",
           "autoattack")
GRADIENT_ATTACKS = ("pgd20", "pgd20-leak", "cw", "apgd-ce", "apgd-t", "fab-t")
# Attacks whose points may leave the eps-ball, by the radius they may reach (in eps): their
# figures are labelled with it and never enter a figure at eps (the worst case).
BEYOND_EPS = {"pgd20-leak": 2.0}
# The figure that combines the others: per example, robust only if every attack at eps
# that ran failed on it.
WORST_CASE = "worst_case"


def make_attack(name, eps, norm="linf", restarts=1):
    """The evaluation protocol's attacks (AutoAttack's stages use the reference settings).
    pgd20-leak: PGD-20 as the official AR-AT evaluation runs it (PGD.noise_leak: its ball
    is centred on x + U(-eps, eps), so its points may lie 2 eps from x)."""
    if name in ("pgd20", "pgd20-leak"):
        attack = PGD(eps=eps, step_size=eps / 4, steps=20, loss=core.cross_entropy, norm=norm,
                     noise_leak=name == "pgd20-leak")
    elif name == "cw":
        attack = PGD(eps=eps, step_size=eps / 4, steps=20, loss=core.cw_margin, norm=norm)
    elif name == "apgd-ce":
        return APGD(eps=eps, norm=norm, loss="ce", n_iter=100)
    elif name == "apgd-t":
        return APGD(eps=eps, norm=norm, loss="dlr-targeted", n_iter=100, n_target_classes=9)
    elif name == "fab-t":
        return FABTargeted(eps=eps, norm=norm, n_iter=100, n_target_classes=9)
    elif name == "square":
        return Square(eps=eps, norm=norm, n_queries=5000, p_init=0.8)
    else:
        raise ValueError(f"unknown attack {name!r}; choose from {ATTACKS}")
    return Restarts(attack, restarts) if restarts > 1 else attack


def with_leak(attacks, reference_noise_leak):
    """`attacks` with pgd20-leak after pgd20 (or at the end) when reference_noise_leak is
    on and it is not there yet: the official code's PGD-20 beside the one at eps."""
    attacks = list(attacks)
    if not reference_noise_leak or "pgd20-leak" in attacks:
        return attacks
    at = attacks.index("pgd20") + 1 if "pgd20" in attacks else len(attacks)
    return attacks[:at] + ["pgd20-leak"] + attacks[at:]


def evaluate_model_fn(model_fn, x, y, eps, attacks=("clean", "pgd20"), batch_size=256, seed=0,
                      norm="linf", gradients=True, restarts=1, progress=False, log=None,
                      autoattack=None, query_fn=None):
    """Accuracies of one model (images -> logits) under each attack, and the details.

    Each attack's figure is that attack alone: an example counts as robust if it is
    classified correctly clean and the attack fails on it (AutoAttack is its own four
    stages, nothing else). When two or more attacks at eps ran, WORST_CASE is the figure
    over all of them (robust only if every one failed), and details["worst_case_over"]
    names them; pgd20-leak (a 2-eps ball) never enters it.

    Returns (accs, details): accs = {attack: acc, f"{attack}_time_s": s}; details holds
    the per-example masks, the AutoAttack breakdown, the warnings and notes. Raises
    EvaluationError (a ValueError) for inputs outside [0,1] or probability outputs.
    autoattack: an AutoAttack to use instead of the standard one.
    query_fn: a faster forward-only runtime of the same model that Square queries (see
    AutoAttack.run); checked to agree with model_fn, which gives every verdict.
    """
    log = log or (lambda msg: None)
    x = np.asarray(x, np.float32)
    y = np.asarray(y).astype(np.int64)
    check_inputs(x)
    check_logits(model_fn, x)
    accs, details = {}, {"masks": {}, "warnings": [], "notes": []}
    if query_fn is not None:
        diff = check_agreement(model_fn, query_fn, x)
        details["notes"].append(f"square queried {getattr(query_fn, 'source', 'a query model')}"
                                f" (logits within {diff:.2g} of the model's on the first "
                                f"{min(64, len(x))} images); the verdicts are the model's")
    start = time.time()
    clean = predict_labels(model_fn, x, batch_size) == y
    clean_time = round(time.time() - start, 3)
    for name in _runnable(attacks, gradients, details, log):
        start = time.time()
        if name == "clean":
            mask, elapsed = clean, clean_time
        elif name == "autoattack":
            aa = autoattack or AutoAttack(eps=eps, norm=norm)
            result = aa.run(model_fn, x, y, batch_size, seed, progress=progress, check=True,
                            log=log, query_fn=query_fn)
            mask = result.robust
            details["autoattack"] = result.breakdown()
            details["warnings"] += result.warnings
        else:
            _, mask = run_attack(make_attack(name, eps, norm, restarts), model_fn, x, y,
                                 batch_size, seed, progress=progress, desc=name,
                                 query_fn=query_fn if name == "square" else None)
            mask = mask & clean
        accs[name] = float(mask.mean()) if len(mask) else 0.0
        accs[f"{name}_time_s"] = elapsed if name == "clean" else round(time.time() - start, 3)
        details["masks"][name] = mask
    _add_worst_case(accs, details)
    _square_masking_warning(details, len(x))
    for w in details["warnings"]:
        log(f"WARNING: {w}")
    return accs, details


def _runnable(attacks, gradients, details, log):
    """The attacks to run, in order: all of them for a model with gradients; for one
    without (ONNX), clean and Square only (autoattack becomes its gradient-free stage),
    each skip noted in details["notes"] and the log."""
    out = []
    for name in attacks:
        if name not in ATTACKS:
            raise ValueError(f"unknown attack {name!r}; choose from {ATTACKS}")
        if not gradients and name in GRADIENT_ATTACKS + ("autoattack",):
            note = (f"{name}: skipped, this model has no gradients (ONNX); only Square "
                    f"(gradient-free) runs, an upper bound on robust accuracy")
            if name == "autoattack":
                note = ("autoattack: this model has no gradients (ONNX), so only its "
                        "gradient-free stage runs: Square, 5,000 queries (an upper bound "
                        "on robust accuracy, not AutoAttack)")
                name = "square"
            details["notes"].append(note)
            log(f"note: {note}")
            if name != "square":
                continue
        if name not in out:
            out.append(name)
    return out


def _add_worst_case(accs, details):
    """WORST_CASE over the attacks at eps that ran (clean and 2-eps figures aside), when
    there are at least two of them."""
    over = [a for a in details["masks"] if a != "clean" and a not in BEYOND_EPS]
    if len(over) < 2:
        return
    mask = np.logical_and.reduce([details["masks"][a] for a in over])
    accs[WORST_CASE] = float(mask.mean()) if len(mask) else 0.0
    accs[f"{WORST_CASE}_time_s"] = round(sum(accs[f"{a}_time_s"] for a in over), 3)
    details["masks"][WORST_CASE] = mask
    details["worst_case_over"] = ["clean"] + over


def _square_masking_warning(details, n):
    """Square (gradient-free) alone breaking points that every gradient attack at eps
    failed on: a sign of gradient masking (AutoAttack's own stages warn inside it)."""
    masks = details["masks"]
    gradient = [a for a in masks if a in GRADIENT_ATTACKS + ("autoattack",)
                and a not in BEYOND_EPS]
    if "square" not in masks or not gradient:
        return
    survived = np.logical_and.reduce([masks[a] for a in gradient])
    warning = masking_warning("square", int(np.sum(survived & ~masks["square"])), n)
    if warning:
        details["warnings"].append(warning)


def evaluate_network(network, x, y, eps, branches=("adv",), attacks=("clean", "pgd20"),
                     batch_size=256, seed=0, details=None, norm="linf", progress=False,
                     log=None, restarts=1, query=None):
    """{branch: {attack: accuracy, f"{attack}_time_s": seconds}}; x float32 in [0,1].

    details, if a dict, receives {branch: evaluate_model_fn's details}. query: a function
    model_fn -> query_fn (see evaluate_model_fn), called per branch.
    """
    results = {}
    for branch in branches:
        def model_fn(z, branch=branch):
            return network(z, training=False, branch=branch)
        accs, extra = evaluate_model_fn(model_fn, x, y, eps, attacks, batch_size, seed, norm,
                                        restarts=restarts, progress=progress, log=log,
                                        query_fn=query(model_fn) if query else None)
        results[branch] = accs
        if details is not None:
            details[branch] = extra
    return results


def as_model_fn(model, branch="adv"):
    """images -> logits in inference mode: a network with split BN (its `branch`), any
    Keras model, or any callable (returned as it is)."""
    return model_function(model, branch)


def evaluate_model(model, x, y, eps, attacks=("clean", "pgd20"), branch="adv",
                   batch_size=256, seed=0, norm="linf"):
    """Accuracy of `model` on float32 images x in [0, 1] with labels y under each attack.

    Each figure is that attack alone on the points classified correctly clean
    (autoattack: the standard version's four stages, nothing else); with two or more
    attacks at eps, "worst_case" is the figure over all of them and "worst_case_over"
    names them. attacks: from ATTACKS ("clean", "pgd20", "pgd20-leak", "cw", "apgd-ce",
    "apgd-t", "fab-t", "square", "autoattack"); model: see as_model_fn. Returns
    {"accuracy": {attack: acc}, "time_s": {attack: s}, "autoattack": per-stage breakdown
    (when run), "worst_case_over": [...] (when computed), "warnings": [...]}.
    """
    accs, details = evaluate_model_fn(as_model_fn(model, branch), x, y, eps, attacks,
                                      batch_size, seed, norm)
    out = {"accuracy": {a: v for a, v in accs.items() if not a.endswith("_time_s")},
           "time_s": {a[:-7]: v for a, v in accs.items() if a.endswith("_time_s")},
           "warnings": details["warnings"], "eps": eps, "norm": norm, "n_examples": len(x)}
    for key in ("autoattack", "worst_case_over"):
        if key in details:
            out[key] = details[key]
    return out


# ------------------------------------------------------------------------------ files

def attack_settings(name, eps, norm="linf", restarts=1, seed=0, over=None):
    """What an attack of this module computes, as recorded beside its figure; `over`: the
    attacks a WORST_CASE figure combines."""
    if name == "clean":
        return {}
    common = {"eps": eps, "norm": norm, "seed": seed}
    if name == WORST_CASE:
        return {**common, "over": list(over or ())}
    if name in ("pgd20", "pgd20-leak", "cw"):
        settings = {**common, "steps": 20, "step_size": eps / 4, "random_start": "uniform",
                    "loss": "cw_margin" if name == "cw" else "cross_entropy",
                    "restarts": restarts}
        if name != "cw":  # the official code's in-place random start, or not
            settings["reference_noise_leak"] = name == "pgd20-leak"
        if name in BEYOND_EPS:
            settings["ball_radius"] = BEYOND_EPS[name] * eps
            settings["ball_center"] = ("x + U(-eps, eps), not clipped: the official AR-AT "
                                       "code's in-place random start")
        return settings
    if name == "autoattack":
        aa = AutoAttack(eps=eps, norm=norm)
        return {**common, "version": "standard",
                "stages": [getattr(a, "name", type(a).__name__.lower()) for a in aa.attacks],
                "n_iter": aa.n_iter, "n_target_classes": aa.n_target_classes,
                "square_queries": aa.n_queries, "square_p_init": aa.p_init}
    attack = make_attack(name, eps, norm)
    fields = {f.name: getattr(attack, f.name) for f in dataclasses.fields(attack)}
    fields = {k: v for k, v in fields.items()
              if isinstance(v, (int, float, str, bool)) and k not in ("eps", "norm")}
    return {**common, **fields}


def worst_case_over(name, details):
    """The attacks a figure is the worst case over: clean and the attack itself, or, for
    WORST_CASE, clean and every attack at eps that ran."""
    if name == WORST_CASE:
        return list(details["worst_case_over"])
    return ["clean"] if name == "clean" else ["clean", name]


def record_evaluation(out_dir, label, accs, details, restarts, seed, epoch=0):
    """Add one branch's figures to OUT/evals/<setting>.json and OUT/tensorboard.

    label: {"source", "branch", "eps", "norm", "n_examples", ...} says what was evaluated
    and on which images; it names the file, so figures of another eps, image count,
    branch or checkpoint never land in the same place. Within a file, a figure replaces
    an earlier one only if it was measured with the same settings (the same measurement
    again); anything else is added beside it. Returns (path, the entries written).
    """
    os.makedirs(os.path.join(out_dir, "evals"), exist_ok=True)
    path = records.record_path(out_dir, label["source"], label["branch"], label["norm"],
                               label["eps"], label["n_examples"])
    record = files.read_json(path) or {**label, "results": []}
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    written = []
    for name in [a for a in accs if not a.endswith("_time_s")]:  # in the order they ran
        entry = {"attack": name, "acc": accs[name], "time_s": accs.get(f"{name}_time_s"),
                 "settings": attack_settings(name, label["eps"], label["norm"], restarts, seed,
                                             details.get("worst_case_over")),
                 "worst_case_over": worst_case_over(name, details), "evaluated_at": now}
        if name == "autoattack" and "autoattack" in details:
            entry["breakdown"] = details["autoattack"]
        same = ("attack", "settings", "worst_case_over")
        record["results"] = [r for r in record["results"]
                             if any(r.get(k) != entry[k] for k in same)] + [entry]
        written.append(entry)
    record["warnings"] = sorted(set(record.get("warnings", [])) | set(details["warnings"]))
    record["notes"] = sorted(set(record.get("notes", [])) | set(details.get("notes", [])))
    files.write_json(path, record)
    writer = tf.summary.create_file_writer(os.path.join(out_dir, "tensorboard"))
    with writer.as_default():
        for entry in written:
            tag = (f"evaluate/{label['branch']}/{entry['attack']}/{label['norm']}_eps="
                   f"{label['eps']:.4g}_n={label['n_examples']}")
            tf.summary.scalar(tag, entry["acc"], step=epoch)
    writer.flush()
    return path, written


def robustbench_entry(accs, details, eps, n_examples, model, method, dataset, norm="linf",
                      evaluated=None):
    """The evaluation as a RobustBench model_info entry (keras_arat.robustbench); `model`
    is the architecture's name, `evaluated` the checkpoint or file the figures are of (in
    the footnote). Clean accuracy is AutoAttack's own when clean did not run as an attack
    of its own."""
    from keras_arat import robustbench
    breakdown = details.get("autoattack", {})
    clean = accs["clean"] if "clean" in accs else breakdown.get("clean_acc")
    footnote = (f"keras_arat (TensorFlow) AutoAttack, standard version (APGD-CE, APGD-T, "
                f"FAB-T, Square with 5,000 queries), {norm} eps {eps:.6g}, on the first "
                f"{n_examples} test images; an example counts as robust if it is classified "
                f"correctly and none of the four stages breaks it (no other attack enters "
                f"this figure).")
    if evaluated:
        footnote += f" Evaluated: {evaluated}."
    if details.get("warnings"):
        footnote += " Warnings: " + " ".join(details["warnings"])
    return robustbench.model_info(clean, accs["autoattack"], eps, model, dataset, method,
                                  unreliable=bool(details.get("warnings")), footnote=footnote)


def write_outputs(out_dir, label, evaluation, details, restarts, seed, epoch, robustbench):
    """Record every branch's figures; return what this call computed, with its labels.

    robustbench: (model, method, dataset, file name) for the RobustBench-style entry
    written when AutoAttack ran on the adv branch (or the deployed model).
    """
    printed = []
    for branch, accs in evaluation.items():
        path, written = record_evaluation(out_dir, {**label, "branch": branch}, accs,
                                          details[branch], restarts, seed, epoch)
        printed.append({**label, "branch": branch, "record": os.path.relpath(path, out_dir),
                        "accuracy": {e["attack"]: e["acc"] for e in written},
                        "time_s": {e["attack"]: e["time_s"] for e in written},
                        "warnings": details[branch]["warnings"],
                        "notes": details[branch].get("notes", [])})
        if branch in ("adv", "deployed") and "autoattack" in accs:
            model, method, dataset, name = robustbench
            evaluated = label.get("model_file") or os.path.join(label.get("workdir", ""),
                                                                label.get("checkpoint", ""))
            files.write_json(os.path.join(out_dir, name), robustbench_entry(
                accs, details[branch], label["eps"], label["n_examples"], model, method,
                dataset, label["norm"], f"{evaluated} ({branch} branch)"
                if branch == "adv" else evaluated))
    return {"output_dir": os.path.abspath(out_dir), "evaluated": printed}


# -------------------------------------------------------------------------------- CLI

FLAGS = flags.FLAGS


def define_flags():
    flags.DEFINE_string("workdir", None, "Training run folder (config.json, checkpoints/). "
                        "With --saved_model/--onnx: only the data, eps and output place.")
    flags.DEFINE_string("checkpoint", "latest", "Which checkpoint of --workdir: latest, best "
                        "(--keep_best), swa, a name such as epoch-0003, or a folder.")
    flags.DEFINE_string("saved_model", None, "Evaluate this SavedModel (serving_default: "
                        "images float32 [N,H,W,C] in [0,1] -> logits) instead of a checkpoint.")
    flags.DEFINE_string("onnx", None, "Evaluate this ONNX model with onnxruntime (no "
                        "gradients: clean and Square only).")
    flags.DEFINE_string("query_onnx", "auto", "The ONNX model Square (forward passes only) "
                        "queries with onnxruntime, checked to agree with the model, which "
                        "gives every verdict. auto: with --saved_model the model.onnx export "
                        "wrote beside it, if its export_report.json passed (a checkpoint: "
                        "none); convert: convert the model (each branch of a checkpoint) in "
                        "memory with tf2onnx; none: query the model itself; or a file (with "
                        "--saved_model).")
    flags.DEFINE_string("dataset", None, "Test images instead of the run's (with "
                        "--saved_model/--onnx and no --workdir: digits by default): a data "
                        "set name (digits, cifar10, cifar100, svhn_cropped, mnist), an .npz "
                        "holding x_test and y_test (npz:PATH), or a folder with one "
                        "sub-folder of images per class (folder:PATH or the folder's path).")
    flags.DEFINE_string("input_name", None, "The serving signature's (or ONNX model's) "
                        "image input, when it has several (default: its only input).")
    flags.DEFINE_string("data_dir", None, "tfds data directory (with --dataset).")
    flags.DEFINE_string("eps", None, "Budget in [0,1] pixel units (default: the run's eps; "
                        "8/255 without --workdir).")
    flags.DEFINE_enum("norm", "linf", ["linf", "l2"], "Threat model.")
    flags.DEFINE_string("output_dir", None, "Where the figures are recorded (evals/, "
                        "tensorboard/, robustbench*.json); default: --workdir. Without "
                        "either, nothing is written.")
    flags.DEFINE_enum("branch", "adv", ["adv", "clean", "both"], "BN branch to evaluate.")
    flags.DEFINE_list("attacks", ["clean", "pgd20"], f"Comma list from {list(ATTACKS)}.")
    flags.DEFINE_integer("n_examples", None, "First N test examples (default: all).")
    flags.DEFINE_integer("batch_size", 256, "Evaluation batch size.")
    flags.DEFINE_integer("restarts", 1, "Random restarts of pgd20 and cw (worst case kept).")
    flags.DEFINE_integer("seed", 0, "Seed of the attacks' randomness.")
    flags.DEFINE_bool("progress", True, "Progress of every attack on stderr: done/total, "
                      "elapsed time, ETA (in a log, a line every KERAS_ARAT_PROGRESS_SECONDS, "
                      "default 10).")
    flags.DEFINE_bool("reference_noise_leak", None, "Also run pgd20-leak: PGD-20 with the "
                      "official AR-AT code's in-place random start (its ball is centred on "
                      "x + U(-eps, eps), so its points may lie 2 eps from x; labelled so, and "
                      "never part of a figure at eps). Default: as the run was trained (its "
                      "config.json), off for deployed models.")
    flags.DEFINE_bool("verbose", False, "Show TensorFlow's start-up and C++ log lines "
                      "(hidden by default; also KERAS_ARAT_VERBOSE=1).")


def _log(msg):
    print(msg, file=sys.stderr, flush=True)


def _check_flags(runs):
    unknown = [a for a in FLAGS.attacks if a not in ATTACKS]
    if unknown:
        raise runs.UsageError(f"unknown attack(s) {unknown}; choose from {list(ATTACKS)}")
    if FLAGS.n_examples is not None and FLAGS.n_examples < 1:
        raise runs.UsageError("--n_examples must be >= 1")
    if FLAGS.batch_size < 1 or FLAGS.restarts < 1:
        raise runs.UsageError("--batch_size and --restarts must be >= 1")
    if FLAGS.saved_model and FLAGS.onnx:
        raise runs.UsageError("give --saved_model or --onnx, not both")
    if not (FLAGS.workdir or FLAGS.saved_model or FLAGS.onnx):
        raise runs.UsageError("--workdir is required (or --saved_model/--onnx)")
    if FLAGS.query_onnx not in ("auto", "none"):
        if FLAGS.onnx:
            raise runs.UsageError("--query_onnx applies to --saved_model and --workdir only")
        if not FLAGS.saved_model and FLAGS.query_onnx != "convert":
            raise runs.UsageError(f"--query_onnx={FLAGS.query_onnx}: a checkpoint takes auto, "
                                  "convert or none (a file would be one branch's)")


def _test_images(default_spec, default_n=None, default_data_dir=None):
    """(x float32 [0,1], y, the images' description) from --dataset (a data set name, an
    .npz with x_test/y_test, or a folder of class sub-folders), else `default_spec` (read
    from --data_dir, else the run's `default_data_dir`)."""
    from keras_arat.data import load_test_images
    spec = FLAGS.dataset or default_spec
    data_dir = FLAGS.data_dir or (None if FLAGS.dataset else default_data_dir)
    x, y, about = load_test_images(spec, FLAGS.n_examples or default_n, data_dir)
    return x.astype("float32") / 255.0, y, {**about, "spec": spec}


def _deployed(runs):
    from keras_arat.deployed import OnnxRunner, SavedModelRunner, check_image_shape
    kind, source = ("saved_model", FLAGS.saved_model) if FLAGS.saved_model else \
        ("onnx", FLAGS.onnx)
    if not os.path.exists(source):
        raise runs.UsageError(f"{source} not found")
    cfg = runs.read_config(FLAGS.workdir) if FLAGS.workdir else runs.RunConfig(
        dataset="digits", eps=8 / 255)
    eps = runs.parse_fraction(FLAGS.eps, "eps") if FLAGS.eps else cfg.eps
    query_fn = None
    if kind == "saved_model":
        runner = SavedModelRunner(source, FLAGS.input_name)
        model_fn = runner
        query_fn = _query_model(source, runner, runner.input_shape)
    else:
        runner = OnnxRunner(source, input_name=FLAGS.input_name)
        model_fn = runner.as_tf()
    x, y, about = _test_images(cfg.dataset, default_data_dir=cfg.data_dir)
    check_image_shape(x.shape, runner.input_shape, f"{source}")
    attacks = with_leak(FLAGS.attacks, bool(FLAGS.reference_noise_leak))
    _log(f"evaluating {source} on the first {len(x)} test images of {about['spec']}, eps "
         f"{eps:.4g} ({FLAGS.norm}): {', '.join(attacks)}")
    if kind == "onnx":
        _log("note: ONNX model: onnxruntime gives no gradients, so only clean accuracy and "
             "Square (gradient-free, 5,000 queries) run; the result is an upper bound on "
             "robust accuracy")
    accs, details = evaluate_model_fn(model_fn, x, y, eps, attacks, FLAGS.batch_size,
                                      FLAGS.seed, FLAGS.norm, gradients=(kind != "onnx"),
                                      restarts=FLAGS.restarts, progress=FLAGS.progress,
                                      log=_log, query_fn=query_fn)
    name = model_name(source)
    label = {"source": f"{kind}-{name}-{records.slug(about['spec'])}",
             "model_file": os.path.abspath(source), "kind": kind, "dataset": about["spec"],
             "input_name": runner.input_name,
             "test_images": f"the first {len(x)} of the test split of {about['spec']}",
             "eps": eps, "norm": FLAGS.norm, "n_examples": len(x)}
    return label, {"deployed": accs}, {"deployed": details}, 0, (name, "deployed",
                                                                   about["spec"],
                                                                   f"robustbench_{kind}.json")


def _query_model(saved_model, model_fn, input_shape, what="SavedModel"):
    """The onnxruntime model Square queries (--query_onnx), or None: for --saved_model, or
    for a checkpoint's branch (saved_model None: auto means none there)."""
    from keras_arat.deployed import query_runner
    if not {"square", "autoattack"} & set(FLAGS.attacks):
        return None
    onnx_model, queried = query_runner(FLAGS.query_onnx, saved_model, model_fn, input_shape)
    if onnx_model is None:
        return None
    _log(f"Square queries {queried} with onnxruntime (its logits are checked against the "
         f"{what}'s; every verdict is the {what}'s)")
    query_fn = onnx_model.as_tf()
    query_fn.source = queried
    return query_fn


def model_name(path):
    """A deployed model's name for its records: TF Serving's NAME/VERSION folder and
    export's OUT/model.onnx are named by their folders ("quickstart-v1", "quickstart"),
    not by "1" or "model.onnx"."""
    path = os.path.abspath(path)
    stem = os.path.splitext(os.path.basename(path))[0]
    parent = os.path.basename(os.path.dirname(path))
    if stem.isdigit():
        return f"{parent}-v{stem}"
    return parent if stem == "model" and parent else stem


def _checkpoint(runs):
    from keras_arat.deployed import check_image_shape
    run = runs.load_run(FLAGS.workdir, FLAGS.checkpoint)
    if FLAGS.dataset:  # other images than the run's own test set
        x, y, about = _test_images(None)
        check_image_shape(x.shape, run.network.graph.inputs[0].shape[1:], "the network")
    else:
        x, y = run.test_arrays(FLAGS.n_examples)
        about = {"spec": run.config.dataset}
    eps = runs.parse_fraction(FLAGS.eps, "eps") if FLAGS.eps else run.config.eps
    branches = ("adv", "clean") if FLAGS.branch == "both" else (FLAGS.branch,)
    attacks = with_leak(FLAGS.attacks, _leak(run.config))
    _log(f"evaluating {os.path.relpath(run.checkpoint, FLAGS.workdir)} of {FLAGS.workdir} "
         f"({' and '.join(branches)} branch) on the first {len(x)} test images, eps {eps:.4g} "
         f"({FLAGS.norm}): {', '.join(attacks)}")
    details = {}
    evaluation = evaluate_network(run.network, x, y, eps, branches, attacks,
                                  FLAGS.batch_size, FLAGS.seed, details, FLAGS.norm,
                                  FLAGS.progress, _log, FLAGS.restarts,
                                  query=lambda f: _query_model(None, f, x.shape[1:], "network"))
    cfg = run.config
    checkpoint = os.path.basename(run.checkpoint.rstrip("/"))
    source = checkpoint if not FLAGS.dataset else f"{checkpoint}-{records.slug(about['spec'])}"
    label = {"source": source, "workdir": os.path.abspath(FLAGS.workdir),
             "checkpoint": os.path.relpath(run.checkpoint, FLAGS.workdir), "epoch": run.epoch,
             "dataset": about["spec"], "model": cfg.model, "method": cfg.method,
             "test_images": f"the first {len(x)} of the test split of {about['spec']}",
             "eps": eps, "norm": FLAGS.norm, "n_examples": len(x)}
    from keras_arat import robustbench
    return label, evaluation, details, run.epoch, (robustbench.architecture(cfg), cfg.method,
                                                   cfg.dataset, "robustbench.json")


def _leak(config):
    """Whether pgd20-leak runs beside pgd20: --reference_noise_leak, or else whether the run
    trained with the official code's in-place random start."""
    if FLAGS.reference_noise_leak is not None:
        return bool(FLAGS.reference_noise_leak)
    return bool(config.reference_noise_leak)


def main(argv):
    from keras_arat import runs  # heavy imports after flag parsing
    del argv  # runs.parse_flags refused any positional argument
    try:
        _check_flags(runs)
        label, evaluation, details, epoch, robustbench = (
            _deployed(runs) if FLAGS.saved_model or FLAGS.onnx else _checkpoint(runs))
        out_dir = FLAGS.output_dir or FLAGS.workdir
        if out_dir:
            printed = write_outputs(out_dir, label, evaluation, details, FLAGS.restarts,
                                    FLAGS.seed, epoch, robustbench)
        else:
            printed = {"output_dir": None, "evaluated": [
                {**label, "branch": b, "accuracy": {a: v for a, v in accs.items()
                                                    if not a.endswith("_time_s")},
                 "warnings": details[b]["warnings"]} for b, accs in evaluation.items()]}
    except (runs.UsageError, EvaluationError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(exit_status(e))
    print(json.dumps(printed, indent=1))


def exit_status(error):
    """2 for a request that cannot be met as asked (flags, inputs, a model that outputs
    probabilities), 1 for a model or an attack that failed (as keras_arat.train exits)."""
    return 1 if isinstance(error, (NonFiniteOutputError, BudgetError)) else 2


def run_main():
    define_flags()
    from keras_arat import runs
    app.run(main, flags_parser=runs.parse_flags)


if __name__ == "__main__":
    run_main()
