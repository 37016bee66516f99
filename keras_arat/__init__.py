"""keras_arat: adversarially robust image classifiers in TensorFlow/Keras.

The public API (imported on first use, so `python -m keras_arat.train` checks its flags
before TensorFlow loads):

Split BN and your own model
    SplitBatchNormalization, SplitBNNetwork, to_split_bn, build_model
Trainers (keras.Model subclasses: compile, then fit)
    ARATModel, PGDATModel, TRADESModel, MARTModel, StandardModel, TorchSGD,
    EpochPiecewiseConstant
Attacks (attack(model_fn, x, y, seed) -> x_adv)
    PGD, APGD, FABTargeted, Square, AutoAttack
Evaluation
    evaluate_model (clean, PGD-20, CW, AutoAttack accuracy of a network or any
    images -> logits callable)
BN folding and export
    fold_bn (a plain Keras model with one branch's BN folded away),
    export_model (SavedModel in TF Serving layout, ONNX and .keras, parity-checked)

    import keras_arat
    net = keras_arat.to_split_bn(my_model)
    trainer = keras_arat.ARATModel(net, eps=8 / 255, step_size=2 / 255)
    trainer.compile(optimizer=keras_arat.TorchSGD(0.1))
    trainer.fit(x_train, y_train, epochs=10)
"""

import importlib
import importlib.util
import os
import sys


def _checkout_export():
    """In a checkout, the repository's top-level export/ folder is this package's `export`
    subpackage, as a wheel installs it (pyproject.toml's package-dir): the export code is
    imported by one name, keras_arat.export, installed or not."""
    here = os.path.dirname(os.path.abspath(__file__))
    folder = os.path.join(os.path.dirname(here), "export")
    if os.path.isdir(os.path.join(here, "export")) or "keras_arat.export" in sys.modules \
            or not os.path.isfile(os.path.join(folder, "__init__.py")):
        return
    spec = importlib.util.spec_from_file_location(
        "keras_arat.export", os.path.join(folder, "__init__.py"),
        submodule_search_locations=[folder])
    module = importlib.util.module_from_spec(spec)
    sys.modules["keras_arat.export"] = module
    spec.loader.exec_module(module)


_checkout_export()

_API = {
    "SplitBatchNormalization": "keras_arat.layers.split_batch_norm",
    "SplitBNNetwork": "keras_arat.network",
    "to_split_bn": "keras_arat.network",
    "build_model": "keras_arat.models",
    "ARATModel": "keras_arat.training",
    "PGDATModel": "keras_arat.training",
    "TRADESModel": "keras_arat.training",
    "MARTModel": "keras_arat.training",
    "StandardModel": "keras_arat.training",
    "TorchSGD": "keras_arat.training",
    "EpochPiecewiseConstant": "keras_arat.training",
    "PGD": "keras_arat.attacks",
    "APGD": "keras_arat.attacks",
    "FABTargeted": "keras_arat.attacks",
    "Square": "keras_arat.attacks",
    "AutoAttack": "keras_arat.attacks",
    "evaluate_model": "keras_arat.evaluation",
    "fold_bn": "keras_arat.export.fold",
    "export_model": "keras_arat.export.exporter",
}
__all__ = sorted(_API)  # noqa: PLE0605 - the public names are _API's keys


def __getattr__(name):
    if name not in _API:
        raise AttributeError(f"module 'keras_arat' has no attribute {name!r}")
    value = getattr(importlib.import_module(_API[name]), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))


try:
    from importlib.metadata import PackageNotFoundError, version
    __version__ = version("keras-arat")
except PackageNotFoundError:  # a checkout that was not installed
    __version__ = "unknown (not installed)"
