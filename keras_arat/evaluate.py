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
The figures, records and RobustBench entries are computed by keras_arat.evaluation (the
library); this module is the command line.

Refusals (exit status 2, one line on stderr): inputs outside [0,1], a model that outputs
probabilities instead of logits, bad flags. A warning is printed and recorded when
Square (gradient-free) breaks points the gradient attacks could not (gradient masking).
"""

import json
import os
import sys

from absl import app, flags

from keras_arat import config, errors, records


FLAGS = flags.FLAGS


def define_flags():
    from keras_arat.evaluation import ATTACKS
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
    from keras_arat.evaluation import ATTACKS
    unknown = [a for a in FLAGS.attacks if a not in ATTACKS]
    if unknown:
        raise errors.UsageError(f"unknown attack(s) {unknown}; choose from {list(ATTACKS)}")
    if FLAGS.n_examples is not None and FLAGS.n_examples < 1:
        raise errors.UsageError("--n_examples must be >= 1")
    if FLAGS.batch_size < 1 or FLAGS.restarts < 1:
        raise errors.UsageError("--batch_size and --restarts must be >= 1")
    if FLAGS.saved_model and FLAGS.onnx:
        raise errors.UsageError("give --saved_model or --onnx, not both")
    if not (FLAGS.workdir or FLAGS.saved_model or FLAGS.onnx):
        raise errors.UsageError("--workdir is required (or --saved_model/--onnx)")
    if FLAGS.query_onnx not in ("auto", "none"):
        if FLAGS.onnx:
            raise errors.UsageError("--query_onnx applies to --saved_model and --workdir only")
        if not FLAGS.saved_model and FLAGS.query_onnx != "convert":
            raise errors.UsageError(f"--query_onnx={FLAGS.query_onnx}: a checkpoint takes auto, "
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
    from keras_arat.evaluation import evaluate_model_fn, with_leak
    kind, source = ("saved_model", FLAGS.saved_model) if FLAGS.saved_model else \
        ("onnx", FLAGS.onnx)
    if not os.path.exists(source):
        raise errors.UsageError(f"{source} not found")
    cfg = config.read_config(FLAGS.workdir) if FLAGS.workdir else config.RunConfig(
        dataset="digits", eps=8 / 255)
    eps = config.parse_fraction(FLAGS.eps, "eps") if FLAGS.eps else cfg.eps
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
    from keras_arat.evaluation import evaluate_network, with_leak
    run = runs.load_run(FLAGS.workdir, FLAGS.checkpoint)
    if FLAGS.dataset:  # other images than the run's own test set
        x, y, about = _test_images(None)
        check_image_shape(x.shape, run.network.graph.inputs[0].shape[1:], "the network")
    else:
        x, y = run.test_arrays(FLAGS.n_examples)
        about = {"spec": run.config.dataset}
    eps = config.parse_fraction(FLAGS.eps, "eps") if FLAGS.eps else run.config.eps
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


def _leak(cfg):
    """Whether pgd20-leak runs beside pgd20: --reference_noise_leak, or else whether the run
    trained with the official code's in-place random start."""
    if FLAGS.reference_noise_leak is not None:
        return bool(FLAGS.reference_noise_leak)
    return bool(cfg.reference_noise_leak)


def main(argv):
    from keras_arat import runs  # heavy imports after flag parsing
    from keras_arat.attacks import EvaluationError
    from keras_arat.evaluation import write_outputs
    del argv  # train_flags.parse_flags refused any positional argument
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
    except (errors.UsageError, EvaluationError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(exit_status(e))
    print(json.dumps(printed, indent=1))


def exit_status(error):
    """2 for a request that cannot be met as asked (flags, inputs, a model that outputs
    probabilities), 1 for a model or an attack that failed (as keras_arat.train exits)."""
    from keras_arat.attacks import BudgetError, NonFiniteOutputError
    return 1 if isinstance(error, (NonFiniteOutputError, BudgetError)) else 2


def run_main():
    """python -m keras_arat.evaluate and keras-arat-evaluate: the path and number flags
    checked before TensorFlow loads (4-6 s), TensorFlow loaded quietly, then the rest."""
    from keras_arat import preflight, quiet, train_flags
    quiet.import_tensorflow(preflight.exit_on_error(preflight.evaluate_argv, sys.argv[1:]))
    define_flags()
    app.run(main, flags_parser=train_flags.parse_flags)


# The library's names, as this module offered them before keras_arat.evaluation held
# them (imported on first use, so that the command line starts before TensorFlow).
_LIBRARY = ("ATTACKS", "GRADIENT_ATTACKS", "BEYOND_EPS", "WORST_CASE", "make_attack",
            "with_leak", "evaluate_model_fn", "evaluate_network", "as_model_fn",
            "evaluate_model", "attack_settings", "worst_case_over", "record_evaluation",
            "robustbench_entry", "write_outputs")


def __getattr__(name):
    if name in _LIBRARY:
        from keras_arat import evaluation
        return getattr(evaluation, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if __name__ == "__main__":
    run_main()
