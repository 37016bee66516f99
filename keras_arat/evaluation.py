"""Evaluation as a library: accuracies under attack, their records and RobustBench entries.

    from keras_arat.evaluation import evaluate_model
    evaluate_model(model, x, y, eps=8 / 255, attacks=["clean", "pgd20", "autoattack"])

Attacks: clean; pgd20 (PGD-20 on cross-entropy, step eps/4, random start); cw (PGD-20 on
the CW margin: CW-L-inf); apgd-ce, apgd-t, fab-t, square (AutoAttack's stages alone);
autoattack (the "standard" version: APGD-CE, APGD-T, FAB-T, Square in sequence, each on
the points the earlier stages left); pgd20-leak (PGD-20 as the official AR-AT code runs
it: its ball is centred on x + U(-eps, eps), so its points may lie 2 eps from x). Each
figure is its attack alone: an example counts as robust if it is classified correctly
clean and the attack fails on it. When two or more attacks at eps ran, "worst_case" is
the figure over all of them (robust only if every one failed); pgd20-leak, labelled
with its 2-eps ball, never enters it.

Every adversarial batch behind a figure is checked to lie within eps (pgd20-leak: 2 eps)
of its clean image (atol 1e-6) and in [0, 1]; a violation is an error, never a number.

Records (record_evaluation, write_outputs): OUT/evals/<setting>.json, one file per
checkpoint (or deployed model), branch, norm, eps and number of test images, each figure
with its settings, the attacks it is the worst case over, its time and date and, for
AutoAttack, the per-stage breakdown; OUT/tensorboard scalars; robustbench.json
(RobustBench's model_info format) when AutoAttack ran on the adv branch. The command line
is keras_arat.evaluate.
"""

import dataclasses
import os
import time

import numpy as np
import tensorflow as tf

from keras_arat import files, records
from keras_arat.attacks import (APGD, PGD, AutoAttack, FABTargeted, Restarts, Square,
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
