"""Where an export's network and check images come from: a training run's checkpoint or a
.keras file, the run's test images, another data set, or random images (library; the
command line is export.cli)."""

import os
import re

from keras_arat.errors import UsageError


def load_source(a):
    """(network, x_test, y_test, eps, source-info dict) from the flags.

    y_test is None when the images are random (source["parity_data"] says which)."""
    from keras_arat import config, runs
    if a.workdir and not os.path.isdir(a.workdir):
        raise UsageError(f"--workdir={a.workdir} is not a folder")
    source = {}
    if a.keras_model:
        network = load_keras_network(a.keras_model)
        source["keras_model"] = os.path.abspath(a.keras_model)
        if a.workdir:  # the run's eps, and its test images unless --dataset is given
            cfg = config.read_config(a.workdir)
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
            eps = config.parse_fraction(a.eps, "eps")
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


def default_name(a):
    base = os.path.basename(os.path.abspath(a.keras_model or a.workdir).rstrip("/"))
    if a.keras_model:
        base = os.path.splitext(base)[0]
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", base).lstrip("._-")
    return name or "model"



def _one_line(e):
    return " ".join(str(e).split())
