"""A training run as data: flags -> validated config -> objects, and back from a workdir.

train.py, evaluate.py and export/ all go through here, so a run is rebuilt from its
config.json exactly as it was trained.
"""

import dataclasses
import json
import os
import re
import sys
import time

from keras_arat import files
from keras_arat.config import RunConfig, uses_predictor
from keras_arat.errors import UsageError  # noqa: F401 - runs.UsageError for callers

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
# The flagfiles: installed as keras_arat/configs (pyproject.toml maps configs/ there); in a
# checkout or an editable install, the repository's configs/ beside the package.
CONFIGS_DIR = next((d for d in (os.path.join(_PACKAGE_DIR, "configs"),
                                os.path.join(os.path.dirname(_PACKAGE_DIR), "configs"))
                    if os.path.isdir(d)), os.path.join(os.path.dirname(_PACKAGE_DIR), "configs"))
METHODS = ("arat", "pgd_at", "trades", "mart", "standard")
# The regularisation weight of TRADES and MART when --beta is not given (their papers').
DEFAULT_BETA = {"trades": 6.0, "mart": 5.0}
# Settings that may differ when a run is resumed; every other key must match.
RESUMABLE_CHANGES = {"workdir", "resume", "overwrite", "verbose", "epochs", "eval_examples",
                     "eval_batch_size", "jit_compile", "nan_policy", "deterministic",
                     "strategy", "cpu_devices", "joint_pass", "tensorboard_every_steps"}




def parse_fraction(text, name):
    """'8/255' or '0.03' -> float in (0, 1]."""
    try:
        if "/" in str(text):
            num, den = str(text).split("/")
            value = float(num) / float(den)
        else:
            value = float(text)
    except (ValueError, ZeroDivisionError):
        raise UsageError(f"--{name}={text} is not a number (use e.g. 0.03 or 8/255)") from None
    if not 0.0 < value <= 1.0:
        raise UsageError(f"--{name}={text} must be in (0, 1] (pixel units of [0,1] images)")
    return value


def resolve_flagfiles(argv):
    """Let `--flagfile=cifar.flags` find configs/cifar.flags; fail early if absent."""
    out = []
    for arg in argv:
        if arg.startswith("--flagfile="):
            path = arg.split("=", 1)[1]
            if not os.path.exists(path):
                candidate = os.path.join(CONFIGS_DIR, os.path.basename(path))
                if os.path.exists(candidate):
                    path = candidate
                else:
                    print(f"error: flagfile {path} not found (looked in the current "
                          f"directory and in {CONFIGS_DIR})", file=sys.stderr)
                    sys.exit(2)
            arg = f"--flagfile={path}"
        out.append(arg)
    return out


def parse_flags(argv):
    """absl's flag parsing with one `error:` line (exit 2) instead of its two FATAL lines;
    the commands take flags only, so a positional argument is such an error too."""
    from absl import flags
    try:
        rest = flags.FLAGS(argv)
    except SystemExit as e:  # absl exits 1 after printing --help: asked for, not an error
        help_flags = {"--help", "-h", "-?", "--helpshort", "--helpfull", "--helpxml"}
        sys.exit(0 if e.code == 1 and help_flags & set(argv) else e.code)
    except flags.Error as e:
        files = [a.split("=", 1)[1] for a in argv if a.startswith("--flagfile=")]
        where = f" (flags from {', '.join(files)} and the command line)" if files else ""
        print(f"error: {e}{where}", file=sys.stderr)
        sys.exit(2)
    if len(rest) > 1:
        print(f"error: unexpected arguments {rest[1:]} (flags are --name=value)",
              file=sys.stderr)
        sys.exit(2)
    return rest


def cpu_has_bfloat16():
    """True when this (Linux) CPU advertises bfloat16 instructions (AVX512_BF16 or AMX)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def precision_policy(cfg):
    """The Keras dtype policy --mixed_precision names, or None for float32.

    auto: mixed_float16 on a GPU, float32 on a CPU. TensorFlow 2.21's CPU kernels ran
    the small CNN's PGD-AT step 4.8x slower in mixed_bfloat16 than in float32 on a CPU
    with AVX512_BF16 and AMX (BENCHMARKS.md), so bfloat16 is only used when asked for.
    """
    choice = cfg.mixed_precision
    if choice == "off":
        return None
    if choice != "auto":
        if choice == "bfloat16" and not cpu_has_bfloat16():
            import tensorflow as tf
            if not tf.config.list_physical_devices("GPU"):
                print("warning: this CPU has no bfloat16 instructions (AVX512_BF16 / AMX): "
                      "mixed_bfloat16 is emulated and slow", file=sys.stderr, flush=True)
        return f"mixed_{choice}"
    import tensorflow as tf
    if tf.config.list_physical_devices("GPU"):
        return "mixed_float16"
    print("mixed precision: auto keeps float32 on a CPU (mixed_bfloat16 measured slower; "
          "--mixed_precision=bfloat16 forces it)", flush=True)
    return None


def define_train_flags(flags):
    f = flags
    f.DEFINE_string("dataset", "digits", "digits (embedded), cifar10, cifar100, svhn_cropped, "
                    "mnist, or npz:/path/file.npz")
    f.DEFINE_string("data_dir", None, "tfds data directory.")
    f.DEFINE_bool("download", False, "Let tfds download and prepare an absent data set.")
    f.DEFINE_integer("n_train", None, "Use only the first N training images.")
    f.DEFINE_integer("n_test", None, "Use only the first N test images.")
    f.DEFINE_string("model", "small_cnn", "small_cnn, resnet18, preact_resnet18, wrn.")
    f.DEFINE_integer("wrn_depth", 34, "WRN depth (model=wrn).")
    f.DEFINE_integer("wrn_width", 10, "WRN widen factor (model=wrn).")
    f.DEFINE_integer("cnn_width", 32, "Channels of the small CNN's first conv.")
    f.DEFINE_integer("cnn_stem_stride", 1, "Stride of the small CNN's first conv: 2 halves "
                     "the resolution of every later layer (about 3x less compute).")
    f.DEFINE_enum("method", "arat", list(METHODS), "Training method.")
    f.DEFINE_integer("epochs", 100, "Number of epochs.")
    f.DEFINE_integer("batch_size", 128, "Global batch size.")
    f.DEFINE_list("lr_values", ["0.02", "0.1", "0.01", "0.001"], "Learning rate per segment.")
    f.DEFINE_list("lr_boundaries", ["1", "76", "91"],
                  "Epoch counts after which the next lr value starts.")
    f.DEFINE_float("momentum", 0.9, "SGD momentum.")
    f.DEFINE_float("weight_decay", 5e-4, "Coupled (PyTorch-style) L2 weight decay.")
    f.DEFINE_string("eps", "8/255", "L-inf budget, in [0,1] pixel units (e.g. 8/255).")
    f.DEFINE_string("step_size", "2/255", "PGD step size.")
    f.DEFINE_integer("attack_steps", 10, "PGD steps during training.")
    f.DEFINE_enum("attack_bn", "default", ["default", "train", "inference"], "BN mode of "
                  "the network while the training attack runs: default is each method's "
                  "reference choice (ARAT and PGD-AT: train, batch statistics; TRADES and "
                  "MART: inference, moving statistics).")
    f.DEFINE_float("eps_warmup_epochs", 0.0, "Grow the training attack's eps and step size "
                   "linearly per optimiser step from 0 to --eps/--step_size over this many "
                   "epochs (fractions allowed; 0: full eps from the first step). Evaluation "
                   "always uses the full eps.")
    f.DEFINE_float("invariance_weight", None, "ARAT gamma (default: the model's).")
    f.DEFINE_enum("invariance", "asymmetric", ["asymmetric", "symmetric", "none"],
                  "ARAT invariance loss.")
    f.DEFINE_bool("predictor", None, "ARAT predictor heads on the adversarial features. "
                  "Default: as the official code, with --invariance=asymmetric, not with "
                  "symmetric (--predictor with symmetric is a variant of keras_arat's, not "
                  "in the official code).")
    f.DEFINE_float("beta", None, "TRADES / MART regularisation weight (default 6 / 5).")
    f.DEFINE_bool("split_bn", True, "Split BN (ARAT only; baselines use one BN).")
    f.DEFINE_list("align_layers", [], "Tapped layers for the invariance loss "
                  "(default: the model's).")
    f.DEFINE_integer("a_prev_examples", 1000, "ARAT's a_prev is measured at each epoch "
                     "start on whole augmented training batches of a new shuffle until at "
                     "least this many images (the official code's 1,000: 1,024 at batch "
                     "128).")
    f.DEFINE_bool("swa", False, "ARAT+SWA: average weights from --swa_start_epoch, evaluate "
                  "the average after adv-branch BN re-estimation.")
    f.DEFINE_integer("swa_start_epoch", 76, "First (1-based) epoch whose steps are averaged.")
    f.DEFINE_integer("swa_every_steps", 500, "Add the weights to the average every N steps.")
    f.DEFINE_integer("crop_padding", 4, "Random-crop padding (0 disables).")
    f.DEFINE_enum("flip", "auto", ["auto", "true", "false"], "Horizontal flips "
                  "(auto: on for CIFAR, off for digits).")
    f.DEFINE_integer("seed", 0, "Random seed.")
    f.DEFINE_string("workdir", None, "Run folder.")
    f.DEFINE_bool("resume", True, "Continue from the workdir's last complete checkpoint.")
    f.DEFINE_bool("overwrite", False, "Start afresh in a workdir holding another run.")
    f.DEFINE_integer("eval_examples", None, "Test images for the final evaluation "
                     "(default: all).")
    f.DEFINE_integer("eval_batch_size", 256, "Batch size of the final evaluation.")
    f.DEFINE_integer("eval_every_epochs", 0, "Clean and PGD-20 accuracy (adv branch, full "
                     "eps) on a fixed subset every N epochs and after the last, to "
                     "metrics.jsonl and TensorBoard (test/); 0: off.")
    f.DEFINE_integer("eval_examples_during_training", 1000, "Images of that subset.")
    f.DEFINE_enum("eval_during_training_on", "test", ["test", "holdout"], "The subset: the "
                  "first N test images (as the reference code), or the last N training "
                  "images, held out of training.")
    f.DEFINE_enum("keep_best", "none", ["none", "pgd20", "clean"], "Also keep the checkpoint "
                  "with the best accuracy of the evaluations during training "
                  "(checkpoints/best-N; evaluate and export take --checkpoint=best).")
    f.DEFINE_bool("jit_compile", False, "XLA-compile the train step.")
    f.DEFINE_enum("mixed_precision", "off", ["off", "auto", "bfloat16", "float16"],
                  "Mixed-precision training (float32 weights, attacks' eps arithmetic and "
                  "logits): auto picks mixed_float16 on a GPU and float32 on a CPU; "
                  "bfloat16 forces mixed_bfloat16 (slower than float32 on the CPUs measured).")
    f.DEFINE_bool("reference_noise_leak", False, "ARAT: reproduce the official AR-AT "
                  "attack's in-place random start (the clean branch sees x + U(-eps, eps) "
                  "and the attack's ball is centred there, 2 eps wide around x), in training "
                  "and in the final PGD-20; off: clean x stays clean (README).")
    f.DEFINE_bool("joint_pass", False, "ARAT: run the clean and adversarial halves as one "
                  "batch through the split-BN network (the same computation as two passes up to "
                  "float rounding; not faster on the CPUs measured, see BENCHMARKS.md).")
    f.DEFINE_enum("strategy", "default", ["default", "mirrored", "multi_worker"],
                  "tf.distribute strategy: one device; MirroredStrategy (all local GPUs, "
                  "or --cpu_devices logical CPUs); or MultiWorkerMirroredStrategy over the "
                  "cluster in TF_CONFIG (run the same command on every worker; the chief "
                  "writes --workdir, which must be shared for resuming).")
    f.DEFINE_integer("cpu_devices", 0, "Split the CPU into N logical devices (for testing "
                     "multi-device training without GPUs); 0 leaves it alone.")
    f.DEFINE_enum("nan_policy", "stop", ["stop", "skip_batch"], "On a NaN/Inf loss: stop "
                  "(keeping the last good checkpoint) or skip the batch and count it.")
    f.DEFINE_bool("deterministic", False, "TensorFlow op determinism: a resumed run ends "
                  "with the same weights as an uninterrupted one (somewhat slower).")
    f.DEFINE_enum("verbose", "auto", ["auto", "0", "1", "2"], "Keras fit verbosity "
                  "(auto: progress bar on a terminal; otherwise a line per epoch, and "
                  "between them a progress line with ETA every KERAS_ARAT_PROGRESS_SECONDS, "
                  "default 10). TensorFlow's start-up log: KERAS_ARAT_VERBOSE=1.")
    f.DEFINE_integer("tensorboard_every_steps", 10, "Also write the training figures to "
                     "TensorBoard (train_steps/) every N optimiser steps, each the mean over "
                     "those N steps; 0: per epoch only.")


def train_flag_values(argv=None):
    """A fresh absl FlagValues holding keras_arat.train's flags (parsed from argv, a
    command line with the program name first, when given) and their names."""
    from absl import flags
    values = flags.FlagValues()

    class Definer:  # define_train_flags(flags) with every DEFINE_* going into `values`
        def __getattr__(self, name):
            define = getattr(flags, name)
            return lambda *args, **kwargs: define(*args, flag_values=values, **kwargs)

    define_train_flags(Definer())
    if argv is not None:
        values(argv)
    return values, list(values)


def _positive(cfg, name):
    if cfg[name] is not None and cfg[name] < 1:
        raise UsageError(f"--{name} must be >= 1, got {cfg[name]}")


def check_model(name):
    """--model names a model family (imports Keras, so TensorFlow loads here)."""
    from keras_arat.models import MODEL_NAMES
    if name not in MODEL_NAMES:
        raise UsageError(f"unknown --model={name}; choose from {list(MODEL_NAMES)}")


def config_from_flags(flag_values, names, model=True):
    """The validated RunConfig of the flags in `names` (keras_arat.train's); model=False
    leaves out check_model, the one check that needs TensorFlow."""
    cfg = {n: flag_values[n].value for n in names}
    if model:
        check_model(cfg["model"])
    cfg["eps"] = parse_fraction(cfg["eps"], "eps")
    cfg["step_size"] = parse_fraction(cfg["step_size"], "step_size")
    for name in ("epochs", "batch_size", "attack_steps", "n_train", "n_test", "eval_examples",
                 "eval_batch_size", "a_prev_examples", "eval_examples_during_training"):
        _positive(cfg, name)
    try:
        cfg["lr_values"] = [float(v) for v in cfg["lr_values"]]
        cfg["lr_boundaries"] = [int(v) for v in cfg["lr_boundaries"]]
    except ValueError:
        raise UsageError("--lr_values must be numbers and --lr_boundaries integers") from None
    if len(cfg["lr_values"]) != len(cfg["lr_boundaries"]) + 1:
        raise UsageError(f"--lr_values needs one more entry than --lr_boundaries, got "
                         f"{len(cfg['lr_values'])} and {len(cfg['lr_boundaries'])}")
    if cfg["lr_boundaries"] != sorted(cfg["lr_boundaries"]):
        raise UsageError("--lr_boundaries must be increasing")
    if any(v <= 0 for v in cfg["lr_values"]):
        raise UsageError("--lr_values must be positive")
    if cfg["weight_decay"] < 0 or not 0 <= cfg["momentum"] < 1:
        raise UsageError("--weight_decay must be >= 0 and --momentum in [0, 1)")
    if cfg["invariance_weight"] is not None and cfg["invariance_weight"] < 0:
        raise UsageError("--invariance_weight must be >= 0")
    if cfg["beta"] is not None and cfg["beta"] < 0:
        raise UsageError("--beta must be >= 0")
    _positive(cfg, "swa_start_epoch")
    _positive(cfg, "swa_every_steps")
    if cfg["swa"] and cfg["swa_start_epoch"] > cfg["epochs"]:
        raise UsageError(f"--swa_start_epoch={cfg['swa_start_epoch']} is after the last "
                         f"epoch ({cfg['epochs']}): nothing would be averaged")
    if not 0 <= cfg["eps_warmup_epochs"] <= cfg["epochs"]:
        raise UsageError(f"--eps_warmup_epochs must be in [0, --epochs={cfg['epochs']}], got "
                         f"{cfg['eps_warmup_epochs']}")
    if cfg.get("tensorboard_every_steps", 0) < 0:
        raise UsageError("--tensorboard_every_steps must be >= 0 (0: per epoch only)")
    if cfg["eval_every_epochs"] < 0:
        raise UsageError("--eval_every_epochs must be >= 0 (0: no evaluation during training)")
    if cfg["keep_best"] != "none" and not cfg["eval_every_epochs"]:
        raise UsageError(f"--keep_best={cfg['keep_best']} needs --eval_every_epochs=N "
                         "(the evaluations it picks the best from)")
    if cfg["crop_padding"] < 0:
        raise UsageError("--crop_padding must be >= 0")
    if not cfg["workdir"]:
        raise UsageError("--workdir is required (the folder this run writes to)")
    cfg["workdir"] = os.path.abspath(cfg["workdir"])
    if cfg.get("reference_noise_leak") and cfg["method"] != "arat":
        raise UsageError("--reference_noise_leak reproduces the official AR-AT training "
                         "attack: it goes with --method=arat")
    if cfg["method"] != "arat":
        cfg["split_bn"] = False  # the baselines are single-BN networks
    if cfg.get("predictor") is None:  # config.json records the resolved choice
        cfg["predictor"] = uses_predictor(cfg["invariance"])
    unknown = set(cfg) - set(RunConfig.names())
    if unknown:  # a flag the typed configuration does not know: a programming error
        raise TypeError(f"flags missing from RunConfig: {sorted(unknown)}")
    return RunConfig.from_dict(cfg)


def model_kwargs(cfg):
    if cfg.model == "wrn":
        return {"depth": cfg.wrn_depth, "width": cfg.wrn_width}
    if cfg.model == "small_cnn":
        return {"width": cfg.cnn_width, "stem_stride": cfg.cnn_stem_stride}
    return {}


def build_network(cfg, num_classes, input_shape):
    from keras_arat.models import build_model
    try:
        return build_model(cfg.model, num_classes=num_classes, split_bn=cfg.split_bn,
                           input_shape=tuple(input_shape), **model_kwargs(cfg))
    except ValueError as e:
        raise UsageError(str(e)) from None


def build_trainer(cfg, network, input_shape, steps_per_epoch=None):
    """The --method's trainer around `network`; steps_per_epoch sets the eps warm-up's
    length in steps (None: no warm-up, as for evaluating or exporting a run)."""
    from keras_arat.training import TRAINERS
    warmup = cfg.eps_warmup_epochs or 0.0
    warmup_steps = max(1, round(warmup * steps_per_epoch)) if warmup and steps_per_epoch else 0
    common = dict(eps=cfg.eps, step_size=cfg.step_size,
                  attack_steps=cfg.attack_steps, seed=cfg.seed,
                  nan_policy=cfg.nan_policy, eps_warmup_steps=warmup_steps,
                  attack_bn=cfg.attack_bn)
    if cfg.method == "arat":
        try:
            return TRAINERS["arat"](network, taps=cfg.align_layers or None,
                                    invariance_weight=cfg.invariance_weight,
                                    invariance=cfg.invariance, predictor=cfg.predictor,
                                    input_shape=tuple(input_shape),
                                    joint_pass=cfg.joint_pass,
                                    reference_noise_leak=cfg.reference_noise_leak,
                                    **common)
        except ValueError as e:
            raise UsageError(str(e)) from None
    if cfg.method in DEFAULT_BETA:
        beta = cfg.beta
        beta = DEFAULT_BETA[cfg.method] if beta is None else beta
        return TRAINERS[cfg.method](network, beta=beta, **common)
    return TRAINERS[cfg.method](network, **common)


def load_data(cfg):
    from keras_arat.data import load_dataset
    flip = None if cfg.flip == "auto" else cfg.flip == "true"
    return load_dataset(cfg.dataset, data_dir=cfg.data_dir, download=cfg.download,
                        n_train=cfg.n_train, n_test=cfg.n_test, flip=flip)


def checkpoint_objects(trainer, optimizer=None, swa_state=None):
    """What a checkpoint holds: every weight of the trainer by path (network, both BN
    branches' moving statistics, predictors, a_prev), the optimizer, the SWA average.

    Keras 3 layers are not tracked as attributes by tf.train.Checkpoint, so the weights
    are listed explicitly; keyed by path, a checkpoint only loads into the same model.
    """
    def relative(path):  # drop the auto-generated top name ("small_cnn_1/...")
        return path.split("/", 1)[1] if "/" in path else path

    groups = [("network", trainer.network.weights)]
    groups += [(f"predictor{i}", p.weights) for i, p in enumerate(getattr(trainer, "predictors", []))]
    seen = {id(v) for _, vs in groups for v in vs}
    groups.append(("trainer", [v for v in trainer.weights if id(v) not in seen]))
    weights = {}
    for prefix, variables in groups:
        for v in variables:
            key = f"{prefix}.{relative(v.path) if prefix != 'trainer' else v.name}"
            key = key.replace("/", ".")
            if key in weights:
                raise ValueError(f"two weights share the checkpoint key {key}")
            weights[key] = v
    objects = {"weights": weights}
    if optimizer is not None:
        objects["optimizer"] = optimizer
    if swa_state is not None:
        objects["swa"] = swa_state
    return objects


@dataclasses.dataclass
class Run:
    config: RunConfig
    data: object  # None when the data set is not on this machine (see load_run)
    network: object
    trainer: object
    epoch: int
    checkpoint: str = None  # the folder the weights came from (None: still training)
    data_error: str = None  # why data is None (a run loaded without its data set)

    def test_arrays(self, n=None):
        if self.data is None:
            raise UsageError(self.data_error)
        x, y = self.data.x_test, self.data.y_test
        if n is not None:
            x, y = x[:n], y[:n]
        return x.astype("float32") / 255.0, y


def read_config(workdir):
    """The RunConfig of a training run's folder (its config.json)."""
    path = os.path.join(workdir, "config.json")
    try:
        with open(path) as f:
            values = json.load(f)
    except FileNotFoundError:
        raise UsageError(f"{path} not found: is {workdir} a keras_arat training run?") from None
    except ValueError:
        raise UsageError(f"{path} is not valid JSON") from None
    if not isinstance(values, dict):
        raise UsageError(f"{path} does not hold a run's settings")
    try:
        return RunConfig.from_dict(values)
    except TypeError as e:
        raise UsageError(f"{path}: {e}") from None


def resolve_checkpoint(workdir, name=None):
    """(epoch, path) of checkpoint `name` of a run: latest (default), best, swa, epoch-N,
    best-N, swa-N, or a checkpoint folder's path. The folder must be intact."""
    from keras_arat.training import checkpoint as ckpt
    directory = os.path.join(workdir, "checkpoints")
    name = name or "latest"
    if name in ("latest",) + ckpt.KINDS:
        kind = "epoch" if name == "latest" else name
        found = ckpt.CheckpointManager(directory).latest(kind) if kind == "epoch" else next(
            iter(ckpt.folders(directory, kind)), None)
        if found is None:
            what, hint = {"epoch": ("complete", "train first"),
                          "best": ("best", "train with --eval_every_epochs=N and "
                                   "--keep_best=pgd20"),
                          "swa": ("swa", "train with --swa")}[kind]
            raise UsageError(f"no {what} checkpoint in {directory}: {hint}")
        epoch, path = found
    else:
        path = name if os.path.isdir(name) else os.path.join(directory, name)
        match = re.match(r"^(epoch|best|swa)-(\d+)$", os.path.basename(path.rstrip("/")))
        if not os.path.isdir(path) or match is None:
            raise UsageError(f"--checkpoint={name} is not a checkpoint: give latest, best, "
                             f"swa, a name such as epoch-0003, or a checkpoint folder of "
                             f"{workdir}")
        epoch = int(match.group(2))
    problem = ckpt.verify(path)
    if problem is not None:
        raise UsageError(f"checkpoint {path} is damaged ({problem})")
    return epoch, path


def load_run(workdir, checkpoint=None):
    """Rebuild a run's data, network and trainer and restore a checkpoint (default: latest;
    see resolve_checkpoint for the names).

    A run whose config.json records num_classes and image_shape (keras_arat.convert_torch
    writes them) loads without its data set; Run.data is then None and Run.test_arrays
    raises the data set's error.
    """
    from keras_arat.training.checkpoint import CheckpointManager
    cfg = read_config(workdir)
    epoch, checkpoint = resolve_checkpoint(workdir, checkpoint)
    data, data_error = None, None
    try:
        data = load_data(cfg)
        num_classes, image_shape = data.num_classes, data.image_shape
    except UsageError as e:
        if cfg.num_classes is None or cfg.image_shape is None:
            raise
        data_error = str(e)
        num_classes, image_shape = cfg.num_classes, tuple(cfg.image_shape)
    network = build_network(cfg, num_classes, image_shape)
    trainer = build_trainer(cfg, network, image_shape)
    manager = CheckpointManager(os.path.join(workdir, "checkpoints"),
                                **checkpoint_objects(trainer))
    try:
        status = manager.checkpoint.read(os.path.join(checkpoint, "ckpt"))
        status.expect_partial()
        status.assert_existing_objects_matched()
    except Exception as e:  # noqa: BLE001  mismatch, NotFoundError, DataLossError, ...
        raise UsageError(f"cannot restore checkpoint {checkpoint}: "
                         f"{str(e).splitlines()[0][:200]}") from None
    return Run(cfg, data, network, trainer, epoch, checkpoint, data_error)


def update_results(workdir, run, evaluation, n_examples, attacks):
    """Write training's final evaluation into RUN/results.json (RobustBench-like keys).

    evaluation: {branch: {attack: acc, f"{attack}_time_s": s}}. Every adv-branch figure
    lands at the top as f"{attack}_acc" (the clean branch's clean accuracy as
    clean_acc_clean_branch), labelled by the keys beside it: eps, n_examples (the first N
    test images), checkpoint, the attacks' settings, and reference_noise_leak (whether the
    run trained with the official code's in-place random start; such a run also has
    pgd20_leak_acc, the official code's PGD-20, whose settings give its 2-eps ball).
    Only training writes these; keras_arat.evaluate records its own figures elsewhere
    (RUN/evals/).
    """
    cfg = run.config
    adv, clean = evaluation.get("adv", {}), evaluation.get("clean", {})
    results = {"dataset": cfg.dataset, "model": cfg.model, "method": cfg.method,
               "branch": "adv", "eps": cfg.eps, "norm": "linf", "n_examples": n_examples,
               "test_images": f"the first {n_examples} of the test split",
               "epoch": run.epoch, "checkpoint": f"checkpoints/epoch-{run.epoch:04d}",
               "reference_noise_leak": bool(cfg.reference_noise_leak),
               "attacks": attacks}
    for name, value in adv.items():
        if not name.endswith("_time_s"):  # pgd20-leak -> pgd20_leak_acc
            results[f"{name.replace('-', '_')}_acc"] = value
    if "clean" in clean:
        results["clean_acc_clean_branch"] = clean["clean"]
    # Each figure once: the accuracies are above, their times here.
    results["time_s"] = {branch: {name[:-len("_time_s")]: value
                                  for name, value in accs.items() if name.endswith("_time_s")}
                         for branch, accs in evaluation.items()}
    results["evaluated_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    old = files.read_json(os.path.join(workdir, "results.json"), {})
    for key in ("swa", "best"):  # written at other moments of the same run
        if key in old:
            results[key] = old[key]
    files.write_json(os.path.join(workdir, "results.json"), results)
    return results


def merge_results(workdir, entries):
    """Merge top-level `entries` into RUN/results.json as they are (written atomically)."""
    path = os.path.join(workdir, "results.json")
    results = files.read_json(path, {})
    results.update(entries)
    files.write_json(path, results)
    return results
