"""A training run as objects: its network, trainer, data and checkpoints, built from a
RunConfig, and a trained run rebuilt from its folder.

train.py, evaluate.py and export/ all go through here, so a run is rebuilt from its
config.json exactly as it was trained. The flags live in train_flags.py, the validated
settings in config.py, the results file in results.py.
"""

import dataclasses
import os
import re

from keras_arat.config import DEFAULT_BETA, RunConfig, read_config
from keras_arat.errors import UsageError


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
    return load_dataset(cfg.dataset, data_dir=cfg.data_dir, download=cfg.download,
                        n_train=cfg.n_train, n_test=cfg.n_test, flip=cfg.flip_images)


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




# Names that lived here before train_flags.py, config.py and results.py took them over.
_MOVED = {"train_flags": ("CONFIGS_DIR", "resolve_flagfiles", "parse_flags",
                          "define_train_flags", "train_flag_values"),
          "config": ("METHODS", "RESUMABLE_CHANGES", "parse_fraction", "check_model",
                     "config_from_flags", "cpu_has_bfloat16", "precision_policy"),
          "results": ("update_results", "merge_results")}


def __getattr__(name):
    """runs.X for a name that moved: a DeprecationWarning naming its module, then X."""
    import importlib
    import warnings
    for module, names in _MOVED.items():
        if name in names:
            warnings.warn(f"keras_arat.runs.{name} moved to keras_arat.{module}.{name}",
                          DeprecationWarning, stacklevel=2)
            return getattr(importlib.import_module(f"keras_arat.{module}"), name)
    raise AttributeError(f"module 'keras_arat.runs' has no attribute {name!r}")
