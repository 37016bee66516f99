"""RunConfig: every setting of one training run, typed and frozen, read once.

keras_arat.train builds it from its flags (config_from_flags, below), writes it to
RUN/config.json before the first step, and everything after (the trainer, the data, the
evaluation, export, the grid runner) reads the run back as a RunConfig
(read_config, below), never as a loose dict. A config.json written before a setting
existed reads with that setting at its default.
"""

import dataclasses
import json
import os
import sys
from typing import Optional, Tuple

from keras_arat.errors import UsageError

METHODS = ("arat", "pgd_at", "trades", "mart", "standard")
# The model families keras_arat.models.build_model makes (checked there against its table).
MODEL_NAMES = ("small_cnn", "resnet18", "wrn", "wrn34_10", "wrn10_1", "preact_resnet18")
# The regularisation weight of TRADES and MART when --beta is not given (their papers').
DEFAULT_BETA = {"trades": 6.0, "mart": 5.0}
# Settings that may differ when a run is resumed; every other key must match.
RESUMABLE_CHANGES = {"workdir", "resume", "overwrite", "verbose", "epochs", "eval_examples",
                     "eval_batch_size", "jit_compile", "nan_policy", "deterministic",
                     "strategy", "cpu_devices", "joint_pass", "tensorboard_every_steps"}


@dataclasses.dataclass(frozen=True)
class RunConfig:
    # data
    dataset: str = "digits"
    data_dir: Optional[str] = None
    download: bool = False
    n_train: Optional[int] = None
    n_test: Optional[int] = None
    crop_padding: int = 4
    flip: str = "auto"
    # model
    model: str = "small_cnn"
    wrn_depth: int = 34
    wrn_width: int = 10
    cnn_width: int = 32
    cnn_stem_stride: int = 1
    split_bn: bool = True
    # method
    method: str = "arat"
    invariance_weight: Optional[float] = None
    invariance: str = "asymmetric"
    predictor: bool = True  # resolved by config_from_flags (config.uses_predictor)
    beta: Optional[float] = None
    align_layers: Tuple[str, ...] = ()
    a_prev_examples: int = 1000
    joint_pass: bool = False
    reference_noise_leak: bool = False
    # training attack
    eps: float = 8 / 255
    step_size: float = 2 / 255
    attack_steps: int = 10
    attack_bn: str = "default"
    eps_warmup_epochs: float = 0.0
    # optimisation
    epochs: int = 100
    batch_size: int = 128
    lr_values: Tuple[float, ...] = (0.02, 0.1, 0.01, 0.001)
    lr_boundaries: Tuple[int, ...] = (1, 76, 91)
    momentum: float = 0.9
    weight_decay: float = 5e-4
    swa: bool = False
    swa_start_epoch: int = 76
    swa_every_steps: int = 500
    seed: int = 0
    # evaluation
    eval_examples: Optional[int] = None
    eval_batch_size: int = 256
    eval_every_epochs: int = 0
    eval_examples_during_training: int = 1000
    eval_during_training_on: str = "test"
    keep_best: str = "none"
    # the run's folder and how it runs
    workdir: Optional[str] = None
    resume: bool = True
    overwrite: bool = False
    jit_compile: bool = False
    mixed_precision: str = "off"
    strategy: str = "default"
    cpu_devices: int = 0
    nan_policy: str = "stop"
    deterministic: bool = False
    verbose: str = "auto"
    tensorboard_every_steps: int = 10
    # a run converted from PyTorch weights (keras_arat.convert_torch): what the network
    # is without its data set, and where the weights came from
    num_classes: Optional[int] = None
    image_shape: Optional[Tuple[int, ...]] = None
    converted_from: Optional[dict] = None

    @classmethod
    def names(cls):
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def default(cls, name):
        return next(f.default for f in dataclasses.fields(cls) if f.name == name)

    @classmethod
    def from_dict(cls, values):
        """A RunConfig from config.json's dict: missing settings at their defaults, lists
        as tuples; keys that are not settings (an older version's) are ignored."""
        known = set(cls.names())
        values = {k: (tuple(v) if isinstance(v, list) else v)
                  for k, v in values.items() if k in known}
        return cls(**values)

    def to_dict(self):
        """config.json's content: every setting, tuples as lists."""
        return {k: (list(v) if isinstance(v, tuple) else v)
                for k, v in dataclasses.asdict(self).items()}

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)

    @property
    def flip_images(self):
        """--flip as the data pipeline takes it: None (the data set's own default) for
        "auto", else whether to flip."""
        return None if self.flip == "auto" else self.flip == "true"


def uses_predictor(invariance, predictor=None):
    """Whether ARAT's invariance loss runs the adversarial features through predictors.

    predictor=None is the official code's choice for the kind: its asymmetric loss
    ("x->y") has one, its symmetric loss ("x<->y") none (loss.py ignores the predictor
    there). predictor=True with "symmetric" is a variant the official code does not have
    (the predictor on the adversarial side, no stop-gradient)."""
    if invariance == "none":
        return False
    return invariance == "asymmetric" if predictor is None else bool(predictor)


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


def _positive(cfg, name):
    if cfg[name] is not None and cfg[name] < 1:
        raise UsageError(f"--{name} must be >= 1, got {cfg[name]}")


def check_model(name):
    """--model names a model family."""
    if name not in MODEL_NAMES:
        raise UsageError(f"unknown --model={name}; choose from {list(MODEL_NAMES)}")


def config_from_flags(flag_values, names, model=True):
    """The validated RunConfig of the flags in `names` (keras_arat.train's); model=False
    leaves out check_model."""
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
