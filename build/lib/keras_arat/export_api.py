"""fold_bn and export_model: the export package's work as two library calls.

The export code lives in the repository's top-level export/ folder, which a wheel installs
as keras_arat.export (see pyproject.toml); in a checkout it is the package `export`.
"""

import importlib


def _export_module(name):
    try:
        return importlib.import_module(f"keras_arat.export.{name}")
    except ModuleNotFoundError as e:
        if not e.name or not e.name.startswith("keras_arat.export"):
            raise
        return importlib.import_module(f"export.{name}")  # a checkout, not installed


def fold_bn(network, branch="adv", input_shape=None):
    """A plain functional Keras model computing network(x, training=False, branch=branch)
    with every BatchNormalization folded into the layer before it (or into a per-channel
    scale-and-shift where no Conv/Dense precedes it). Works for a SplitBNNetwork and for
    any functional or Sequential model."""
    return _export_module("fold").fold_network(network, branch, input_shape)


def export_model(network, out, x=None, y=None, eps=None, branch="adv", name="model",
                 formats=("saved_model", "onnx", "keras"), overwrite=False, **options):
    """Fold `branch`, write OUT/saved_model/NAME/1 (TF Serving layout), OUT/model.onnx and
    OUT/model.keras, prove they agree with the network on `x` (random images in [0, 1]
    when None) within 1e-4, and return the report (also OUT/export_report.json).

    With labels `y` the report holds each format's accuracy, and with `eps` also PGD-20
    accuracy before and after folding. options: atol, opset, batch_size, seed,
    pgd_examples, log (a print-like callable).
    """
    return _export_module("cli").export_network(
        network, out, x=x, y=y, eps=eps, branch=branch, name=name, formats=list(formats),
        overwrite=overwrite, **options)
