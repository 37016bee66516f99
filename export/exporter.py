"""Export as a library: fold a BN branch, write SavedModel / ONNX / .keras, prove they agree
with the network, and move the result into place only when every check passed.

    from keras_arat.export.exporter import export_model, export_run
    report = export_model(network, "exports/net", x=x_test, y=y_test, eps=8 / 255)
    report = export_run(workdir="runs/quickstart", out="exports/quickstart")

keras_arat.export_model is export_model; python -m export (export.cli) is export_run
behind flags.
"""

import dataclasses
import os
import re
import shutil
import tempfile
import time

from keras_arat import files as files_io
from keras_arat.errors import UsageError

FORMATS = ("saved_model", "onnx", "keras")
DEFAULT_ATOL = 1e-4
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")


class ExportCheckError(RuntimeError):
    """The exported artefacts do not reproduce the trained model: exit status 1."""


@dataclasses.dataclass(frozen=True)
class ExportRequest:
    """What export_run exports and how (python -m export's flags)."""
    workdir: str = None
    out: str = None
    branch: str = "adv"
    name: str = None
    formats: tuple = FORMATS
    checkpoint: str = None
    keras_model: str = None
    dataset: str = None
    eps: str = None
    overwrite: bool = False
    opset: int = 17
    atol: float = DEFAULT_ATOL
    n_examples: int = 1000
    pgd_examples: int = None
    batch_size: int = 256
    seed: int = 0


def export_run(log=print, **request):
    """Export a training run's checkpoint (or a .keras network) as ExportRequest(**request)
    describes: the request checked before TensorFlow loads, then export_model on the
    network and test images it names. Returns the report; raises UsageError (a request
    that cannot be met) or ExportCheckError (a check failed)."""
    from . import sources
    request = ExportRequest(**request)
    out = check_request(request)
    network, x, y, eps, source = sources.load_source(request)
    return export_model(network, out, x=x, y=y, eps=eps, branch=request.branch,
                        name=request.name or sources.default_name(request),
                        formats=request.formats, overwrite=request.overwrite,
                        atol=request.atol, opset=request.opset,
                        batch_size=request.batch_size, seed=request.seed,
                        pgd_examples=request.pgd_examples, source=source, log=log)


def check_request(a):
    """The absolute output folder, once every part of the request is checked (paths and
    files before TensorFlow loads); a UsageError names the first problem."""
    if not a.workdir and not a.keras_model:
        raise UsageError("--workdir (or --keras_model) is required")
    if not a.out:
        raise UsageError("--out is required")
    if a.branch not in ("adv", "clean"):
        raise UsageError(f"unknown --branch={a.branch}; choose adv or clean")
    unknown = [x for x in a.formats if x not in FORMATS]
    if unknown or not a.formats:
        raise UsageError(f"unknown --formats {unknown}; choose from {list(FORMATS)}")
    if a.name is not None and not NAME_RE.match(a.name):
        raise UsageError(f"--name={a.name} must be letters, digits, '_', '.', '-'")
    if a.checkpoint and a.keras_model:
        raise UsageError("give --checkpoint or --keras_model, not both")
    if a.checkpoint and not a.workdir:
        raise UsageError("--checkpoint needs --workdir (the run's config.json)")
    if not 7 <= a.opset <= 21:
        raise UsageError(f"--opset={a.opset} is outside 7..21")
    if not a.atol > 0:
        raise UsageError("--atol must be > 0")
    if a.n_examples < 1 or a.batch_size < 1:
        raise UsageError("--n_examples and --batch_size must be >= 1")
    out = check_out(a.out, a.overwrite)
    _check_sources(a, out)
    return out


def _check_sources(a, out):
    from keras_arat import preflight
    for flag, source in (("workdir", a.workdir), ("keras_model", a.keras_model)):
        # --overwrite replaces --out whole: never when that would delete what is exported.
        if source and is_within(os.path.abspath(source), out):
            raise UsageError(f"--out={out} holds --{flag}={source}: the export would "
                             "replace it; give another --out")
    if a.workdir:
        preflight.check_run(a.workdir)
    if a.keras_model:
        preflight.check_keras_file(a.keras_model)
    if a.dataset:
        preflight.check_test_images(a.dataset)


def check_out(out, overwrite):
    """The absolute output folder; an existing one needs overwrite. Missing parent folders
    are created when the export is written (the folder itself appears only complete)."""
    from keras_arat import preflight
    out = os.path.abspath(out)
    if os.path.lexists(out) and not overwrite:
        raise UsageError(f"{out} exists; pass --overwrite to replace it")
    preflight.check_new_folder(out, "out")
    return out


def is_within(path, folder):
    """Whether `path` is `folder` or lies under it (symbolic links resolved)."""
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return os.path.commonpath([path, folder]) == folder


def make_parents(path):
    """Create the missing folders above `path`; returns them, outermost first."""
    made, parent = [], os.path.dirname(path)
    while not os.path.isdir(parent):
        made.insert(0, parent)
        parent = os.path.dirname(parent)
    for folder in made:
        os.mkdir(folder)
    return made


def export_model(network, out, x=None, y=None, eps=None, branch="adv", name="model",
                 formats=FORMATS, overwrite=False, atol=DEFAULT_ATOL, opset=17,
                 batch_size=256, seed=0, pgd_examples=None, source=None, log=print):
    """Fold `branch` of `network` (a SplitBNNetwork or any functional/Sequential Keras
    model) and write `formats` into `out` through a temporary folder renamed into place
    only when every check passes: OUT/saved_model/NAME/1 (TF Serving layout),
    OUT/model.onnx, OUT/model.keras and OUT/export_report.json. The checks run on images x
    (float32 NHWC in [0, 1]; 100 random ones when None): the logits of every format
    against the network's within `atol`, with labels y each format's accuracy, with eps
    also PGD-20 before and after folding (on the first pgd_examples; 0 skips it).
    Returns the report; raises ExportCheckError when a check fails."""
    from keras_arat.progress import log as progress

    from . import fold
    started = time.time()
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise UsageError(f"unknown formats {unknown}; choose from {list(FORMATS)}")
    out = check_out(out, overwrite)
    input_shape = fold.network_input_shape(network)
    x, y, source = _check_images(x, y, input_shape, seed, dict(source or {}))
    kind = "test images" if source["parity_data"].get("kind") == "dataset" else "images"
    progress(f"export: folding the {branch} branch, then {', '.join(formats)} with parity "
             f"checks on {len(x)} {kind}")
    folded = fold.fold_network(network, branch, input_shape)
    log(f"folded {type(network).__name__} ({branch} branch): {len(folded.layers)} layers")
    made = make_parents(out)  # removed again if the export fails
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.export-",
                           dir=os.path.dirname(out))
    try:
        logits, files, onnx_info = _write_formats(network, folded, branch, x, tmp, name,
                                                  formats, input_shape, opset, batch_size)
        report = _report(network, folded, branch, name, logits, x, y, eps, atol, seed,
                         batch_size, pgd_examples, source, onnx_info, formats, files, log)
        report["seconds"] = round(time.time() - started, 1)
        files_io.write_json(os.path.join(tmp, "export_report.json"), report)
        _raise_unless_passed(report, out)
        _move_into_place(tmp, out, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for folder in reversed(made):
            if not os.listdir(folder):
                os.rmdir(folder)
        raise
    log("max abs logit difference vs the split-BN model: "
        + ", ".join(f"{k} {v:.2e}" for k, v in report["max_abs_logit_diff_vs_original"].items())
        + f" (atol {atol:g})")
    log(f"wrote {out}: " + ", ".join(report["files"]))
    return report


def _check_images(x, y, input_shape, seed, source):
    """(x, y, source) for the checks: 100 random images in [0, 1] when x is None (no
    labels), and source["parity_data"] saying which images they are."""
    import numpy as np

    from keras_arat.deployed import check_image_shape
    if x is None:
        x = np.random.default_rng(seed).random((100, *input_shape), dtype=np.float32)
        y = None
        source.setdefault("parity_data", {"kind": "random_uniform", "range": [0.0, 1.0],
                                          "seed": seed})
    source.setdefault("parity_data", {"kind": "given", "n_examples": len(x),
                                      "labels": y is not None})
    x = np.asarray(x, np.float32)
    check_image_shape(x.shape, input_shape, "the network")
    return x, y, source


def _write_formats(network, folded, branch, x, tmp, name, formats, input_shape, opset,
                   batch_size):
    """Write each format into tmp and read it back: ({format: logits on x} with the
    network's as "original", the files written, the ONNX graph's description)."""
    import keras
    import tensorflow as tf

    from keras_arat.attacks.base import model_function
    from keras_arat.deployed import OnnxRunner, SavedModelRunner
    from keras_arat.progress import log as progress

    from . import convert
    original = tf.function(model_function(network, branch))
    logits = {"original": batched(original, x, batch_size),
              "folded_keras": batched(tf.function(lambda z: folded(z, training=False)), x,
                                      batch_size)}
    files, onnx_info, sm_path = [], None, None
    if "saved_model" in formats:
        progress("export: writing and checking the SavedModel")
        sm_path = convert.saved_model_dir(tmp, name)
        convert.save_saved_model(folded, sm_path, input_shape)
        logits["saved_model"] = batched(SavedModelRunner(sm_path).predict, x, batch_size)
        files.append(os.path.relpath(sm_path, tmp) + "/")
    if "onnx" in formats:
        progress("export: converting to ONNX and checking it with onnxruntime")
        onnx_path = os.path.join(tmp, "model.onnx")
        proto = (convert.onnx_from_saved_model(sm_path, onnx_path, input_shape, opset)
                 if sm_path else convert.onnx_from_keras(folded, onnx_path, input_shape, opset))
        problems = convert.check_onnx(onnx_path)
        if problems:
            raise ExportCheckError("model.onnx: " + "; ".join(problems))
        logits["onnxruntime"] = batched(OnnxRunner(onnx_path), x, batch_size)
        onnx_info = {"opset": opset, "checker": "passed", "input": convert.INPUT_NAME,
                     "output": convert.OUTPUT_NAME, "batch": "dynamic",
                     "op_types": convert.op_types(proto)}
        files.append("model.onnx")
    if "keras" in formats:
        progress("export: writing and checking model.keras")
        keras_path = os.path.join(tmp, "model.keras")
        folded.save(keras_path)
        reloaded = keras.saving.load_model(keras_path, compile=False)
        logits["keras_file"] = batched(tf.function(lambda z: reloaded(z, training=False)),
                                       x, batch_size)
        files.append("model.keras")
    return logits, files, onnx_info


def _report(network, folded, branch, name, logits, x, y, eps, atol, seed, batch_size,
            pgd_examples, source, onnx_info, formats, files, log):
    """export_report.json's content: the parity figures, each format's accuracy and,
    with labels and eps, PGD-20 accuracy before and after folding."""
    import numpy as np

    from . import convert, fold
    ref = logits["original"]
    exports = [k for k in logits if k != "original"]
    diffs = {k: float(np.max(np.abs(logits[k] - ref))) for k in exports}
    pairs = {f"{a}_vs_{b}": float(np.max(np.abs(logits[a] - logits[b])))
             for i, a in enumerate(exports) for b in exports[i + 1:]}
    if y is None and source["parity_data"]["kind"] == "random_uniform":
        log("checks on random images in [0,1]: "
            + source["parity_data"].get("why", "no test images were given"))
    worst = max(list(diffs.values()) + list(pairs.values()))
    return {
        "branch": branch, "name": name, "passed": worst <= atol,
        "tolerance_abs_logits": atol,
        "max_abs_logit_diff_vs_original": diffs,
        "max_abs_logit_diff_between_exports": pairs,
        "max_abs_logit": float(np.max(np.abs(ref))), "n_examples": int(len(x)),
        "parity_data": source.get("parity_data"),
        # Random images have no labels: no accuracy, no PGD-20 accuracy.
        "accuracy": None if y is None else {k: accuracy(v, y) for k, v in logits.items()},
        "argmax_agreement_with_original": {
            k: float(np.mean(np.argmax(logits[k], -1) == np.argmax(ref, -1)))
            for k in exports},
        "pgd20_accuracy": _pgd_check(network, folded, branch, x, y, eps, seed, batch_size,
                                     pgd_examples, log),
        "source": source,
        "network": {"class": type(network).__name__, "input_shape": list(x.shape[1:]),
                    "num_classes": int(ref.shape[-1]), "folded_layers": len(folded.layers),
                    "folded_params": int(folded.count_params())},
        "signature": {"name": convert.SIGNATURE, "input": fold.INPUT_NAME,
                      "input_dtype": "float32", "input_range": [0.0, 1.0],
                      "output": fold.OUTPUT_NAME},
        "onnx": onnx_info, "formats": list(formats),
        "files": files + ["export_report.json"], "versions": versions(),
    }


def _pgd_check(network, folded, branch, x, y, eps, seed, batch_size, pgd_examples, log):
    """PGD-20 accuracy of the network and of the folded model on the first pgd_examples
    (all by default), or None without labels or eps."""
    from keras_arat.attacks.base import model_function
    n_pgd = len(x) if pgd_examples is None else min(pgd_examples, len(x))
    if y is None or eps is None or n_pgd <= 0:
        return None
    pgd = {"eps": eps, "step_size": eps / 4, "steps": 20, "seed": seed, "n_examples": n_pgd}
    for key, model_fn in (("original", model_function(network, branch)),
                          ("folded_keras", lambda z: folded(z, training=False))):
        pgd[key] = pgd20_accuracy(model_fn, x[:n_pgd], y[:n_pgd], eps, batch_size, seed,
                                  desc=f"PGD-20, {key}")
    log(f"PGD-20 accuracy: original {pgd['original']:.4f}, "
        f"folded {pgd['folded_keras']:.4f}")
    return pgd


def _raise_unless_passed(report, out):
    if report["passed"]:
        return
    which = max(list(report["max_abs_logit_diff_vs_original"].items())
                + list(report["max_abs_logit_diff_between_exports"].items()),
                key=lambda kv: kv[1])
    raise ExportCheckError(f"logits differ by {which[1]:.3g} ({which[0]}), above "
                           f"--atol={report['tolerance_abs_logits']:g}; nothing written to "
                           f"{out}")


def _move_into_place(tmp, out, overwrite):
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private
    backup = None
    if os.path.lexists(out):
        if not overwrite:
            raise UsageError(f"{out} appeared during the export; pass --overwrite")
        backup = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.old-",
                                  dir=os.path.dirname(out))
        os.rename(out, os.path.join(backup, "old"))
    os.rename(tmp, out)
    if backup:
        shutil.rmtree(backup, ignore_errors=True)


def pgd20_accuracy(model_fn, x, y, eps, batch_size, seed, desc=None):
    """Accuracy under PGD-20 (L-inf, step eps/4, uniform start seeded [seed, batch]), the
    protocol of keras_arat.evaluation, through its attack runner (budget-checked batches).
    desc: show progress lines under that name."""
    from keras_arat.attacks.autoattack import run_attack
    from keras_arat.evaluation import make_attack
    _, correct = run_attack(make_attack("pgd20", eps), model_fn, x, y, batch_size, seed,
                            progress=desc is not None, desc=desc)
    return float(correct.mean())


def batched(fn, x, batch_size):
    import numpy as np
    return np.concatenate([np.asarray(fn(x[i:i + batch_size]))
                           for i in range(0, len(x), batch_size)])


def accuracy(logits, y):
    import numpy as np
    return float(np.mean(np.argmax(logits, -1) == np.asarray(y).astype(np.int64)))


def versions():
    import importlib.metadata as md
    found = {}
    for pkg in ("tensorflow", "keras", "tf2onnx", "onnx", "onnxruntime"):
        try:
            found[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            found[pkg] = None
    return found
