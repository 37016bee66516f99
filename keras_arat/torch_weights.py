"""PyTorch ResNet-18 / WRN state_dicts (official AR-AT, PGD-AT, TRADES) as keras_arat runs:
reading them, mapping every key to a Keras weight, and writing the run folder.
`python -m keras_arat.convert_torch` is the command line over convert().

FILE is a state_dict as torch.save writes it (.pt, needs torch), or the same tensors as
.safetensors or .npz (no torch needed). Split-BN state_dicts (the official train_ARAT.py's
`...bn1.clean.weight`, `...bn1.adv.weight`, ...) become a split-BN network; plain ones
(`...bn1.weight`, `shortcut.0/1`) a single-BN one. `module.` (DataParallel) and `model.`
(the official feature-extractor wrapper) prefixes are dropped; `num_batches_tracked` is
ignored. Every other key must be used and every Keras weight set, or nothing is written.

The run folder gets config.json and checkpoints/epoch-NNNN in keras_arat's own format, so
keras_arat.evaluate and export take it as they take a training run. ARAT's predictor heads
are not in the state_dict (the official code pickles them as whole modules,
`_pred_<layer>.pt`, which cannot be read without its source; inference does not use
them): the checkpoint holds freshly initialised ones.
"""

import hashlib
import os
import shutil
import tempfile

import numpy as np

from keras_arat import files
from keras_arat.errors import UsageError

MODELS = ("resnet18", "wrn")
PREFIXES = ("module.", "model.")
BRANCHES = ("clean", "adv")
BN_KEYS = (("weight", "gamma"), ("bias", "beta"), ("running_mean", "moving_mean"),
           ("running_var", "moving_variance"))


class ConversionError(UsageError):
    """The checkpoint cannot be converted: one line saying why."""


# ---------------------------------------------------------------------------- reading

def read_state_dict(path):
    """{key: float32 / int64 numpy array} from a .pt, .safetensors or .npz file."""
    if not os.path.isfile(path):
        raise ConversionError(f"--checkpoint={path} is not a file")
    ext = os.path.splitext(path)[1].lower()
    if ext in (".pt", ".pth", ".bin"):
        return _read_torch(path)
    if ext == ".safetensors":
        try:
            from safetensors.numpy import load_file
            state = load_file(path)
        except Exception as e:  # noqa: BLE001  header / dtype errors of a foreign file
            raise ConversionError(f"cannot read {path} as safetensors: {_one_line(e)}") from None
    elif ext == ".npz":
        try:
            with np.load(path, allow_pickle=False) as f:
                state = {k: f[k] for k in f.files}
        except Exception as e:  # noqa: BLE001
            raise ConversionError(f"cannot read {path} as .npz: {_one_line(e)}") from None
    else:
        raise ConversionError(f"{path}: unknown checkpoint type {ext or '(none)'}; pass a "
                              ".pt, .safetensors or .npz file")
    return state


def _read_torch(path):
    try:
        import torch
    except ImportError:
        raise ConversionError(f"{path} is a PyTorch pickle: install torch (pip install torch) "
                              "to read it, or pass the state_dict as .safetensors or .npz")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001  pickled modules, damaged files
        raise ConversionError(f"cannot read {path} as a state_dict (torch.load with "
                              f"weights_only=True): {_one_line(e)[:200]}") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ConversionError(f"{path} does not hold a state_dict (a dict of tensors)")
    return {k: v.detach().cpu().float().numpy() if v.is_floating_point() else v.numpy()
            for k, v in obj.items()}


def strip_prefixes(state):
    """Drop the `module.` / `model.` prefixes every key shares (repeatedly)."""
    changed = True
    while changed and state:
        changed = False
        for prefix in PREFIXES:
            if all(k.startswith(prefix) for k in state):
                state = {k[len(prefix):]: v for k, v in state.items()}
                changed = True
    return state


def is_split_bn(state):
    return any(f".{b}." in f".{k}" for k in state for b in BRANCHES)


def infer_wrn_shape(state):
    """(depth, width) of a WRN state_dict: blocks per stage and the first stage's width."""
    blocks = {k.split(".")[2] for k in state if k.startswith("block1.layer.")}
    key = "block1.layer.0.conv1.weight"
    if not blocks or key not in state:
        raise ConversionError("this is not a WRN state_dict (no block1.layer.0.conv1.weight)")
    width = int(state[key].shape[0]) // 16
    return 6 * len(blocks) + 4, width


# ---------------------------------------------------------------------------- mapping

def _bn_entries(layer, prefix, split):
    """(torch key, keras variable, layout) of a SplitBatchNormalization's weights."""
    entries = []
    branches = BRANCHES if split else ("shared",)
    for branch in branches:
        bn = layer.bns[branch]
        base = f"{prefix}.{branch}" if split else prefix
        for torch_name, keras_name in BN_KEYS:
            entries.append((f"{base}.{torch_name}", getattr(bn, keras_name), "vector"))
    return entries


def _conv(layer, key):
    return [(key, layer.kernel, "conv")]


def _dense(layer, prefix):
    return [(f"{prefix}.weight", layer.kernel, "linear"), (f"{prefix}.bias", layer.bias, "vector")]


def _blocks(graph, prefix):
    """Residual block names ("layer1_0", ...) of a functional family, in graph order."""
    seen = []
    for layer in graph.layers:
        block = layer.name.split(".")[0]
        if "." in layer.name and block.startswith(prefix) and block not in seen:
            seen.append(block)
    return seen


def weight_map(network):
    """[(torch state_dict key, keras variable, layout)] for every weight of `network`.

    layout: "conv" (OIHW <-> HWIO), "linear" (out,in <-> in,out) or "vector". The keys
    are those of the official AR-AT models (split BN) or of the plain PyTorch ResNet-18 /
    WRN (single BN) that PGD-AT and TRADES checkpoints use. Keras layers are found by the
    names the functional families give them ("layer1_0.conv1" for torch's "layer1.0.conv1").
    """
    from keras_arat.models import ResNet18, WideResNet
    split, graph = network.split_bn, network.graph
    layer = graph.get_layer
    names = {l.name for l in graph.layers}
    entries = _conv(layer("conv1"), "conv1.weight")
    if isinstance(network, ResNet18):
        entries += _bn_entries(layer("bn1"), "bn1", split)
        for block in _blocks(graph, "layer"):
            name = block.replace("_", ".")  # layer1_0 -> layer1.0
            entries += _conv(layer(f"{block}.conv1"), f"{name}.conv1.weight")
            entries += _bn_entries(layer(f"{block}.bn1"), f"{name}.bn1", split)
            entries += _conv(layer(f"{block}.conv2"), f"{name}.conv2.weight")
            entries += _bn_entries(layer(f"{block}.bn2"), f"{name}.bn2", split)
            if f"{block}.shortcut_conv" in names:
                conv, bn = ((f"{name}.shortcut.weight", f"{name}.shortcut_bn") if split else
                            (f"{name}.shortcut.0.weight", f"{name}.shortcut.1"))
                entries += _conv(layer(f"{block}.shortcut_conv"), conv)
                entries += _bn_entries(layer(f"{block}.shortcut_bn"), bn, split)
        entries += _dense(layer("linear"), "linear")
    elif isinstance(network, WideResNet):
        for block in _blocks(graph, "block"):
            stage, index = block.split("_")
            base = f"{stage}.layer.{index}"  # block1_0 -> block1.layer.0
            entries += _bn_entries(layer(f"{block}.bn1"), f"{base}.bn1", split)
            entries += _conv(layer(f"{block}.conv1"), f"{base}.conv1.weight")
            entries += _bn_entries(layer(f"{block}.bn2"), f"{base}.bn2", split)
            entries += _conv(layer(f"{block}.conv2"), f"{base}.conv2.weight")
            if f"{block}.shortcut_conv" in names:
                entries += _conv(layer(f"{block}.shortcut_conv"), f"{base}.convShortcut.weight")
        entries += _bn_entries(layer("bn"), "bn1", split)
        entries += _dense(layer("fc"), "fc")
    else:
        raise ConversionError(f"no PyTorch mapping for {type(network).__name__}")
    return entries


def predictor_map(predictor, prefix="predictor_x"):
    """The official AlignLoss predictor (Linear, BatchNorm1d, ReLU, Linear) <-> Predictor."""
    entries = [(f"{prefix}.0.weight", predictor.hidden.kernel, "linear")]
    for torch_name, keras_name in BN_KEYS:
        entries.append((f"{prefix}.1.{torch_name}", getattr(predictor.bn, keras_name), "vector"))
    return entries + _dense(predictor.out, f"{prefix}.3")


def to_keras(value, layout):
    if layout == "conv":
        return np.transpose(value, (2, 3, 1, 0))
    if layout == "linear":
        return np.transpose(value)
    return value


def to_torch(value, layout):
    if layout == "conv":
        return np.transpose(value, (3, 2, 0, 1))
    return to_keras(value, layout)


def assign(entries, state, what="checkpoint"):
    """Set every variable of `entries` from `state`; strict both ways, one-line errors."""
    used = {key for key, _, _ in entries}
    unused = sorted(k for k in state if k not in used and not k.endswith("num_batches_tracked"))
    missing = [key for key, _, _ in entries if key not in state]
    if missing or unused:
        parts = []
        if missing:
            parts.append(f"{len(missing)} weight(s) missing from the {what}: "
                         + _some(missing))
        if unused:
            parts.append(f"{len(unused)} key(s) of the {what} not used: " + _some(unused))
        raise ConversionError("; ".join(parts))
    for key, variable, layout in entries:
        value = to_keras(np.asarray(state[key]), layout)
        if tuple(value.shape) != tuple(variable.shape):
            raise ConversionError(f"{key}: shape {tuple(np.asarray(state[key]).shape)} does "
                                  f"not fit the Keras weight {variable.path} "
                                  f"{tuple(variable.shape)}")
        variable.assign(value.astype(variable.dtype))


def _some(keys, n=6):
    return ", ".join(keys[:n]) + (f" and {len(keys) - n} more" if len(keys) > n else "")


def build_network(state, model, num_classes=None, input_shape=(32, 32, 3)):
    """A keras_arat network holding `state`'s weights (prefixes already stripped).

    Returns (network, info) with info = {"split_bn", "num_classes", "wrn_depth", "wrn_width"}.
    """
    from keras_arat.models import build_model
    if model not in MODELS:
        raise ConversionError(f"unknown --model={model}; choose from {list(MODELS)}")
    head = "linear.weight" if model == "resnet18" else "fc.weight"
    if head not in state:
        other = "wrn" if model == "resnet18" else "resnet18"
        hint = f" (is it a {other}?)" if ("fc.weight" if model == "resnet18"
                                         else "linear.weight") in state else ""
        raise ConversionError(f"no {head} in the checkpoint: not a {model} state_dict{hint}")
    found = int(state[head].shape[0])
    if num_classes is not None and num_classes != found:
        raise ConversionError(f"--num_classes={num_classes} but the checkpoint's {head} has "
                              f"{found} outputs")
    info = {"split_bn": is_split_bn(state), "num_classes": found}
    kwargs = {}
    if model == "wrn":
        info["wrn_depth"], info["wrn_width"] = infer_wrn_shape(state)
        kwargs = {"depth": info["wrn_depth"], "width": info["wrn_width"]}
    try:
        network = build_model(model, num_classes=found, split_bn=info["split_bn"],
                              input_shape=tuple(input_shape), **kwargs)
    except ValueError as e:
        raise ConversionError(str(e)) from None
    assign(weight_map(network), state)
    return network, info


# ---------------------------------------------------------------------------- workdir

def run_config(model, info, dataset, method, workdir, epochs):
    """config.json of the converted run: every setting at keras_arat.train's default
    (RunConfig's defaults are its flags', tests/test_config.py), plus the architecture found
    in the checkpoint and what it was converted from."""
    from keras_arat import config
    try:
        config.check_model(model)
    except UsageError as e:
        raise ConversionError(_one_line(e)) from None
    if method not in config.METHODS:
        raise ConversionError(f"unknown method {method!r}; choose from {list(config.METHODS)}")
    if epochs < 1:
        raise ConversionError(f"--epochs must be >= 1, got {epochs}")
    shape = {"wrn_depth": info["wrn_depth"], "wrn_width": info["wrn_width"]} \
        if model == "wrn" else {}
    # As the training flags resolve them: the baselines are single-BN networks.
    return config.RunConfig(
        dataset=dataset, model=model, method=method,
        split_bn=bool(info["split_bn"]) and method == "arat",
        predictor=config.uses_predictor(config.RunConfig.default("invariance")),
        workdir=os.path.abspath(workdir), epochs=epochs,
        # Read by keras_arat.runs.load_run when the data set is not on this machine.
        num_classes=info["num_classes"], image_shape=(32, 32, 3), **shape)


def convert(checkpoint, model, workdir, num_classes=None, dataset="cifar10", method=None,
            epochs=100, overwrite=False, log=print):
    """Write the run folder `workdir` from `checkpoint`; returns its RunConfig."""
    from keras_arat import runs
    from keras_arat.training.checkpoint import CheckpointManager
    workdir = os.path.abspath(workdir)
    if os.path.lexists(workdir) and not overwrite:
        raise ConversionError(f"{workdir} exists; pass --overwrite to replace it")
    state = strip_prefixes(read_state_dict(checkpoint))
    network, info = build_network(state, model, num_classes)
    method = method or ("arat" if info["split_bn"] else "pgd_at")
    if info["split_bn"] != (method == "arat"):
        raise ConversionError(f"a {'split' if info['split_bn'] else 'single'}-BN checkpoint "
                              f"cannot be a --method={method} run (split BN is ARAT's)")
    cfg = run_config(model, info, dataset, method, workdir, epochs)
    with open(checkpoint, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    cfg = cfg.replace(converted_from={
        "checkpoint": os.path.abspath(checkpoint), "sha256": digest,
        "layout": "split_bn" if info["split_bn"] else "single_bn",
        "tensors": len([k for k in state if not k.endswith("num_batches_tracked")]),
        "predictors": "freshly initialised (not in a state_dict)" if method == "arat" else None})
    trainer = runs.build_trainer(cfg, network, (32, 32, 3))

    os.makedirs(os.path.dirname(workdir), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(workdir)}.convert-",
                           dir=os.path.dirname(workdir))
    try:
        files.write_json(os.path.join(tmp, "config.json"), cfg.to_dict(), sort_keys=True)
        manager = CheckpointManager(os.path.join(tmp, "checkpoints"),
                                    **runs.checkpoint_objects(trainer))
        manager.save(epochs, {"converted_from": cfg.converted_from})
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private
        if os.path.lexists(workdir):
            shutil.rmtree(workdir)
        os.rename(tmp, workdir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"wrote {workdir}: {model} ({cfg.converted_from['layout']}, "
        f"{info['num_classes']} classes), {cfg.converted_from['tensors']} tensors from "
        f"{checkpoint}")
    return cfg


def _one_line(e):
    return " ".join(str(e).split())
