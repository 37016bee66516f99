"""RunConfig: every setting of one training run, typed and frozen, read once.

keras_arat.train builds it from its flags (runs.config_from_flags), writes it to
RUN/config.json before the first step, and everything after (the trainer, the data, the
evaluation, export, the grid runner) reads the run back as a RunConfig
(runs.read_config), never as a loose dict. A config.json written before a setting
existed reads with that setting at its default.
"""

import dataclasses
from typing import Optional, Tuple


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


def uses_predictor(invariance, predictor=None):
    """Whether ARAT's invariance loss runs the adversarial features through predictors.

    predictor=None is the official code's choice for the kind: its asymmetric loss
    ("x->y") has one, its symmetric loss ("x<->y") none (loss.py ignores the predictor
    there). predictor=True with "symmetric" is a variant the official code does not have
    (the predictor on the adversarial side, no stop-gradient)."""
    if invariance == "none":
        return False
    return invariance == "asymmetric" if predictor is None else bool(predictor)
