"""python -m export: fold a trained run's BN branch and write SavedModel / ONNX / .keras.

    python -m export --workdir=RUN --out=OUT [--branch=adv|clean] [--name=NAME]
        [--formats=saved_model,onnx,keras] [--checkpoint=PATH] [--keras_model=FILE.keras]
        [--overwrite] [--opset=17] [--atol=1e-4] [--n_examples=1000] [--pgd_examples=N]

Everything is written into a temporary folder next to OUT and renamed to OUT only after
every check passed, so OUT is either complete or absent. Exit status: 0 success,
1 a check failed (parity above --atol, ONNX contract), 2 bad usage (one line on stderr).
"""

import os
import re
import shutil
import sys
import tempfile
import time

from keras_arat import files as files_io
from keras_arat.errors import UsageError

FORMATS = ("saved_model", "onnx", "keras")
DEFAULT_ATOL = 1e-4
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")


class ExportCheckError(RuntimeError):
    """The exported artefacts do not reproduce the trained model: exit status 1."""


def define_flags(flags):
    f = flags
    f.DEFINE_string("workdir", None, "Training run folder (config.json, checkpoints/).")
    f.DEFINE_string("out", None, "Output folder (must not exist unless --overwrite).")
    f.DEFINE_string("branch", "adv", "BN branch to fold: adv or clean.")
    f.DEFINE_string("name", None, "Model name for TF Serving (default: the run folder's "
                    "or .keras file's base name).")
    f.DEFINE_list("formats", list(FORMATS), f"Comma list from {FORMATS}.")
    f.DEFINE_string("checkpoint", None, "Which checkpoint of --workdir: latest (default), "
                    "best (--keep_best), swa, a name such as epoch-0003, or a folder.")
    f.DEFINE_string("keras_model", None, "Export this .keras network instead of a "
                    "checkpoint (--workdir, if given, still supplies test data and eps).")
    f.DEFINE_string("dataset", None, "Images for the checks instead of the run's test set "
                    "(digits without --workdir). A run whose data set is not on this machine "
                    "(e.g. one from keras_arat.convert_torch) is checked on random images in "
                    "[0,1] unless this is given; export_report.json's parity_data says which.")
    f.DEFINE_string("eps", None, "PGD budget when there is no --workdir (e.g. 8/255).")
    f.DEFINE_bool("overwrite", False, "Replace an existing --out.")
    f.DEFINE_integer("opset", 17, "ONNX opset.")
    f.DEFINE_float("atol", DEFAULT_ATOL, "Largest allowed absolute logit difference.")
    f.DEFINE_integer("n_examples", 1000, "Test images for the parity and accuracy checks.")
    f.DEFINE_integer("pgd_examples", None, "Test images for PGD-20 (default: --n_examples; "
                     "0 skips the attack).")
    f.DEFINE_integer("batch_size", 256, "Batch size of the checks.")
    f.DEFINE_integer("seed", 0, "Seed of PGD's random start (same for both models).")
    f.DEFINE_bool("verbose", False, "Show TensorFlow's start-up and C++ log lines "
                  "(hidden by default; also KERAS_ARAT_VERBOSE=1).")


def default_args(**overrides):
    """The flags' defaults as a namespace, for calling `export()` from Python."""
    import types
    args = dict(workdir=None, out=None, branch="adv", name=None, formats=list(FORMATS),
                checkpoint=None, keras_model=None, dataset=None, eps=None,
                overwrite=False, opset=17, atol=DEFAULT_ATOL, n_examples=1000,
                pgd_examples=None, batch_size=256, seed=0, verbose=False)
    unknown = set(overrides) - set(args)
    if unknown:
        raise TypeError(f"unknown export arguments {sorted(unknown)}")
    args.update(overrides)
    return types.SimpleNamespace(**args)


def _check_args(a):
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
    out = check_out(a.out, a.overwrite)  # before TensorFlow loads, as are the next two
    for flag, source in (("workdir", a.workdir), ("keras_model", a.keras_model)):
        # --overwrite replaces --out whole: never when that would delete what is exported.
        if source and is_within(os.path.abspath(source), out):
            raise UsageError(f"--out={out} holds --{flag}={source}: the export would "
                             "replace it; give another --out")
    from keras_arat import preflight
    if a.workdir:
        preflight.check_run(a.workdir)
    if a.keras_model:
        preflight.check_keras_file(a.keras_model)
    if a.dataset:
        preflight.check_test_images(a.dataset)
    return out


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


def _default_name(a):
    base = os.path.basename(os.path.abspath(a.keras_model or a.workdir).rstrip("/"))
    if a.keras_model:
        base = os.path.splitext(base)[0]
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", base).lstrip("._-")
    return name or "model"


def load_source(a):
    """(network, x_test, y_test, eps, source-info dict) from the flags.

    y_test is None when the images are random (source["parity_data"] says which)."""
    from keras_arat import runs
    if a.workdir and not os.path.isdir(a.workdir):
        raise UsageError(f"--workdir={a.workdir} is not a folder")
    source = {}
    if a.keras_model:
        network = load_keras_network(a.keras_model)
        source["keras_model"] = os.path.abspath(a.keras_model)
        if a.workdir:  # the run's eps, and its test images unless --dataset is given
            cfg = runs.read_config(a.workdir)
            eps = cfg.eps
            if a.dataset:
                x, y, source["parity_data"] = test_images(a.dataset, a.n_examples)
            else:
                data = runs.load_data(cfg)
                x, y = data.x_test.astype("float32") / 255.0, data.y_test
                source["parity_data"] = {"kind": "dataset", "dataset": cfg.dataset,
                                         "split": "test"}
            source["workdir"] = os.path.abspath(a.workdir)
        else:
            if not a.eps:
                raise UsageError("--keras_model without --workdir needs --eps")
            eps = runs.parse_fraction(a.eps, "eps")
            x, y, source["parity_data"] = test_images(a.dataset or "digits", a.n_examples)
    else:
        run = runs.load_run(a.workdir, a.checkpoint)
        network, eps = run.network, run.config.eps
        check_checkpoint_holds_network(network, run.checkpoint)
        x, y, source["parity_data"] = parity_images(a, run)
        source.update(workdir=os.path.abspath(a.workdir), epoch=run.epoch,
                      checkpoint=os.path.abspath(run.checkpoint),
                      model=run.config.model, method=run.config.method,
                      dataset=run.config.dataset)
    y = None if y is None else y[:a.n_examples]
    return network, x[:a.n_examples], y, float(eps), source


def test_images(spec, n):
    """(x float32 in [0, 1], y, description) of the first n test images of `spec`: a data
    set name, an .npz holding x_test/y_test, or a folder of class folders."""
    from keras_arat.data import load_test_images
    x, y, _ = load_test_images(spec, n, None)
    return x.astype("float32") / 255.0, y, {"kind": "dataset", "dataset": spec,
                                            "split": "test"}


def parity_images(a, run):
    """(x, y, description) for the checks of a run: --dataset's test images when given,
    else the run's, else (its data set is not on this machine) random images in [0,1],
    which have no labels (y None)."""
    import numpy as np

    if a.dataset:
        return test_images(a.dataset, a.n_examples)
    if run.data is not None:
        x, y = run.test_arrays()
        return x, y, {"kind": "dataset", "dataset": run.config.dataset, "split": "test"}
    shape = (a.n_examples, *run.config.image_shape)
    x = np.random.default_rng(a.seed).random(shape, dtype=np.float32)
    return x, None, {"kind": "random_uniform", "range": [0.0, 1.0], "seed": a.seed,
                     "why": f"{run.data_error} (pass --dataset to check on real images)"}


def check_checkpoint_holds_network(network, checkpoint):
    """Refuse a checkpoint that cannot have restored every network variable.

    load_run restores with expect_partial(), so a checkpoint lacking the network's
    variables would silently leave them at their initial values and the export would
    faithfully fold an untrained model. Count the saved tensors outside the optimizer
    slots: there must be at least one per network variable (BN moving statistics
    included, which no optimizer slot holds).
    """
    import tensorflow as tf
    try:
        names = [n for n, _ in tf.train.list_variables(os.path.join(checkpoint, "ckpt"))]
    except Exception as e:  # NotFoundError / DataLossError
        raise UsageError(f"cannot read checkpoint {checkpoint}: {_one_line(e)[:200]}") \
            from None
    saved = [n for n in names if not n.startswith("optimizer/")
             and n != "_CHECKPOINTABLE_OBJECT_GRAPH"]
    needed = len(network.weights)
    if len(saved) < needed:
        raise UsageError(
            f"checkpoint {checkpoint} holds {len(saved)} non-optimizer tensors for a "
            f"network of {needed} variables: its weights / BN statistics were not saved, "
            f"so it cannot be exported faithfully (export a .keras file with --keras_model)")


def load_keras_network(path):
    import keras

    import importlib
    # Importing these registers the network classes and the predictor heads with Keras.
    for module in ("keras_arat.models", "keras_arat.training.arat"):
        importlib.import_module(module)
    if not os.path.isfile(path):
        raise UsageError(f"--keras_model={path} is not a file")
    try:
        model = keras.saving.load_model(path, compile=False)
    except Exception as e:  # keras raises ValueError / TypeError / zipfile errors
        raise UsageError(f"cannot load {path}: {str(e).strip().splitlines()[0][:200]}") \
            from None
    return model


def pgd20_accuracy(model_fn, x, y, eps, batch_size, seed, desc=None):
    """Accuracy under PGD-20 (L-inf, step eps/4, uniform start seeded [seed, batch]), the
    protocol of keras_arat.evaluate, through its attack runner (budget-checked batches).
    desc: show progress lines under that name."""
    from keras_arat.attacks.autoattack import run_attack
    from keras_arat.evaluate import make_attack
    _, correct = run_attack(make_attack("pgd20", eps), model_fn, x, y, batch_size, seed,
                            progress=desc is not None, desc=desc)
    return float(correct.mean())


def _batched(fn, x, batch_size):
    import numpy as np
    return np.concatenate([np.asarray(fn(x[i:i + batch_size]))
                           for i in range(0, len(x), batch_size)])


def _accuracy(logits, y):
    import numpy as np
    return float(np.mean(np.argmax(logits, -1) == np.asarray(y).astype(np.int64)))


def export(a, log=print):
    """Run the export the flags describe; returns the report dict. Raises UsageError /
    ExportCheckError."""
    out = _check_args(a)
    from keras_arat import quiet
    quiet.import_tensorflow(getattr(a, "verbose", False))
    network, x, y, eps, source = load_source(a)
    return export_network(network, out, x=x, y=y, eps=eps, branch=a.branch,
                          name=a.name or _default_name(a), formats=a.formats,
                          overwrite=a.overwrite, atol=a.atol, opset=a.opset,
                          batch_size=a.batch_size, seed=a.seed, pgd_examples=a.pgd_examples,
                          source=source, log=log)


def export_network(network, out, x=None, y=None, eps=None, branch="adv", name="model",
                   formats=FORMATS, overwrite=False, atol=DEFAULT_ATOL, opset=17,
                   batch_size=256, seed=0, pgd_examples=None, source=None, log=print):
    """Fold `branch` of `network` (a SplitBNNetwork or any functional/Sequential Keras
    model) and write `formats` into `out` through a temporary folder renamed into place
    only when every check passes. The checks run on images x (float32 NHWC in [0, 1];
    100 random ones when None): logits of every format against the network's within
    `atol`, and with labels y each format's accuracy, with eps also PGD-20 before and
    after folding (on the first pgd_examples; 0 skips it). Returns the report."""
    import keras
    import numpy as np
    import tensorflow as tf

    from keras_arat.deployed import OnnxRunner, SavedModelRunner, check_image_shape
    from keras_arat.evaluate import as_model_fn
    from keras_arat.progress import log as progress

    from . import convert, fold

    started = time.time()
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise UsageError(f"unknown formats {unknown}; choose from {list(FORMATS)}")
    out = check_out(out, overwrite)
    input_shape = fold.network_input_shape(network)
    source = dict(source or {})
    if x is None:
        x = np.random.default_rng(seed).random((100, *input_shape), dtype=np.float32)
        y = None
        source.setdefault("parity_data", {"kind": "random_uniform", "range": [0.0, 1.0],
                                          "seed": seed})
    source.setdefault("parity_data", {"kind": "given", "n_examples": len(x),
                                      "labels": y is not None})
    x = np.asarray(x, np.float32)
    check_image_shape(x.shape, input_shape, "the network")
    kind = "test images" if source.get("parity_data", {}).get("kind") == "dataset" else "images"
    progress(f"export: folding the {branch} branch, then {', '.join(formats)} with parity "
             f"checks on {len(x)} {kind}")
    folded = fold.fold_network(network, branch, input_shape)
    log(f"folded {type(network).__name__} ({branch} branch): {len(folded.layers)} layers")

    original = as_model_fn(network, branch)
    original_fn = tf.function(lambda z: original(z))
    folded_fn = tf.function(lambda z: folded(z, training=False))
    logits = {"original": _batched(original_fn, x, batch_size),
              "folded_keras": _batched(folded_fn, x, batch_size)}

    parent = os.path.dirname(out)
    made = make_parents(out)  # removed again if the export fails
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.export-", dir=parent)
    try:
        files = []
        sm_path = None
        if "saved_model" in formats:
            progress("export: writing and checking the SavedModel")
            sm_path = convert.saved_model_dir(tmp, name)
            convert.save_saved_model(folded, sm_path, input_shape)
            logits["saved_model"] = _batched(SavedModelRunner(sm_path).predict, x,
                                             batch_size)
            files.append(os.path.relpath(sm_path, tmp) + "/")
        onnx_info = None
        if "onnx" in formats:
            progress("export: converting to ONNX and checking it with onnxruntime")
            onnx_path = os.path.join(tmp, "model.onnx")
            if sm_path:
                proto = convert.onnx_from_saved_model(sm_path, onnx_path, input_shape, opset)
            else:
                proto = convert.onnx_from_keras(folded, onnx_path, input_shape, opset)
            problems = convert.check_onnx(onnx_path)
            if problems:
                raise ExportCheckError("model.onnx: " + "; ".join(problems))
            logits["onnxruntime"] = _batched(OnnxRunner(onnx_path), x, batch_size)
            onnx_info = {"opset": opset, "checker": "passed", "input": fold.INPUT_NAME,
                         "output": fold.OUTPUT_NAME, "batch": "dynamic",
                         "op_types": convert.op_types(proto)}
            files.append("model.onnx")
        if "keras" in formats:
            progress("export: writing and checking model.keras")
            keras_path = os.path.join(tmp, "model.keras")
            folded.save(keras_path)
            reloaded = keras.saving.load_model(keras_path, compile=False)
            logits["keras_file"] = _batched(
                tf.function(lambda z: reloaded(z, training=False)), x, batch_size)
            files.append("model.keras")

        ref = logits["original"]
        diffs = {k: float(np.max(np.abs(v - ref))) for k, v in logits.items()
                 if k != "original"}
        pairs = {}
        keys = [k for k in logits if k != "original"]
        for i, k1 in enumerate(keys):
            for k2 in keys[i + 1:]:
                pairs[f"{k1}_vs_{k2}"] = float(np.max(np.abs(logits[k1] - logits[k2])))
        # Random images have no labels: no accuracy, no PGD-20 accuracy.
        accuracy = None if y is None else {k: _accuracy(v, y) for k, v in logits.items()}
        agreement = {k: float(np.mean(np.argmax(v, -1) == np.argmax(ref, -1)))
                     for k, v in logits.items() if k != "original"}

        n_pgd = len(x) if pgd_examples is None else min(pgd_examples, len(x))
        if y is None or eps is None:
            n_pgd = 0
            if y is None and source["parity_data"]["kind"] == "random_uniform":
                log("checks on random images in [0,1]: "
                    + source["parity_data"].get("why", "no test images were given"))
        pgd = None
        if n_pgd > 0:
            pgd = {"eps": eps, "step_size": eps / 4, "steps": 20, "seed": seed,
                   "n_examples": n_pgd}
            for key, model_fn in (
                    ("original", original),
                    ("folded_keras", lambda z: folded(z, training=False))):
                pgd[key] = pgd20_accuracy(model_fn, x[:n_pgd], y[:n_pgd], eps,
                                          batch_size, seed, desc=f"PGD-20, {key}")
            log(f"PGD-20 accuracy: original {pgd['original']:.4f}, "
                f"folded {pgd['folded_keras']:.4f}")

        worst = max(list(diffs.values()) + list(pairs.values()))
        report = {
            "branch": branch,
            "name": name,
            "passed": worst <= atol,
            "tolerance_abs_logits": atol,
            "max_abs_logit_diff_vs_original": diffs,
            "max_abs_logit_diff_between_exports": pairs,
            "max_abs_logit": float(np.max(np.abs(ref))),
            "n_examples": int(len(x)),
            "parity_data": source.get("parity_data"),
            "accuracy": accuracy,
            "argmax_agreement_with_original": agreement,
            "pgd20_accuracy": pgd,
            "source": source,
            "network": {"class": type(network).__name__, "input_shape": list(input_shape),
                        "num_classes": int(ref.shape[-1]),
                        "folded_layers": len(folded.layers),
                        "folded_params": int(folded.count_params())},
            "signature": {"name": convert.SIGNATURE, "input": fold.INPUT_NAME,
                          "input_dtype": "float32", "input_range": [0.0, 1.0],
                          "output": fold.OUTPUT_NAME},
            "onnx": onnx_info,
            "formats": list(formats),
            "files": files + ["export_report.json"],
            "versions": _versions(),
            "seconds": round(time.time() - started, 1),
        }
        files_io.write_json(os.path.join(tmp, "export_report.json"), report)
        if not report["passed"]:
            which = max(list(diffs.items()) + list(pairs.items()), key=lambda kv: kv[1])
            raise ExportCheckError(f"logits differ by {which[1]:.3g} ({which[0]}), above "
                                   f"--atol={atol:g}; nothing written to {out}")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private
        _move_into_place(tmp, out, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for folder in reversed(made):
            if not os.listdir(folder):
                os.rmdir(folder)
        raise
    log("max abs logit difference vs the split-BN model: "
        + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items()) + f" (atol {atol:g})")
    log(f"wrote {out}: " + ", ".join(report["files"]))
    return report


def _move_into_place(tmp, out, overwrite):
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


def _versions():
    import importlib.metadata as md
    found = {}
    for pkg in ("tensorflow", "keras", "tf2onnx", "onnx", "onnxruntime"):
        try:
            found[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            found[pkg] = None
    return found


def main(argv=None):
    from absl import app, flags
    define_flags(flags)

    def run(args):
        import logging as pylogging

        from absl import logging
        logging.set_verbosity(logging.WARNING)
        pylogging.getLogger("tf2onnx").setLevel(pylogging.WARNING)
        try:
            export(flags.FLAGS)
        except UsageError as e:
            _fail(f"error: {_one_line(e)}", 2)
        except ExportCheckError as e:
            _fail(f"error: export check failed: {_one_line(e)}", 1)
        except Exception as e:  # anything else still ends in one line, nothing written
            if os.environ.get("EXPORT_DEBUG"):
                raise
            _fail(f"error: export failed: {type(e).__name__}: {_one_line(e)[:300]} "
                  f"(EXPORT_DEBUG=1 for the traceback)", 1)

    from keras_arat import runs as train_runs
    app.run(run, argv=argv, flags_parser=train_runs.parse_flags)


def _fail(line, status):
    from absl import logging
    # A half-restored checkpoint logs pages of warnings when it is garbage collected.
    logging.set_verbosity(logging.FATAL)
    print(line, file=sys.stderr)
    sys.exit(status)


def _one_line(e):
    return " ".join(str(e).split())
