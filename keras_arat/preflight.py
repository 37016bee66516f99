"""Checks of paths, files and data that need no TensorFlow, run before it loads.

Importing TensorFlow takes 4-6 s on a small machine; a wrong path, a file of the wrong
kind or a broken data set should be one `error:` line long before that. Every check
raises errors.UsageError with a message that says what is wrong and what to do. The
digits and .npz data sets load with numpy alone, so they are checked in full here;
TFDS data sets need TensorFlow and are checked when they are loaded.
"""

import glob
import os
import sys

from keras_arat import config
from keras_arat.errors import UsageError

ZIP_MAGIC = b"PK\x03\x04"  # .keras and .npz files are zip archives


def _head(path, n=4):
    try:
        with open(path, "rb") as f:
            return f.read(n)
    except OSError as e:
        raise UsageError(f"cannot read {path}: {e.strerror}") from None


def check_data(dataset, data_dir=None, n_train=None, n_test=None):
    """Load digits or an .npz data set to check it (TFDS names are checked later)."""
    from keras_arat.data import DataError, datasets
    key = datasets._ALIASES.get(str(dataset).lower(), str(dataset).lower())  # noqa: SLF001
    if key in datasets.TFDS_NAMES:
        return
    try:
        datasets.load_dataset(dataset, data_dir=data_dir, n_train=n_train, n_test=n_test)
    except DataError as e:
        raise UsageError(str(e)) from None


def check_test_images(spec, data_dir=None):
    """--dataset of evaluate and export: a data set name, an .npz with x_test/y_test or a
    folder of class folders (its first image read; TFDS names are checked later)."""
    from keras_arat.data import DataError, datasets
    key = datasets._ALIASES.get(str(spec).lower(), str(spec).lower())  # noqa: SLF001
    if key in datasets.TFDS_NAMES:
        return
    try:
        datasets.load_test_images(spec, 1, data_dir)
    except DataError as e:
        raise UsageError(str(e)) from None


def check_new_folder(path, flag):
    """A folder a command will create or fill: not an existing file, parent writable."""
    path = os.path.abspath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f"--{flag}={path} is a file, not a folder")
    parent = path
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise UsageError(f"--{flag}={path}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"--{flag}={path}: cannot write into {parent}")


def check_run(workdir, data=True):
    """A training run's folder: config.json readable and, with data, its data set."""
    if not os.path.isdir(workdir):
        raise UsageError(f"--workdir={workdir} is not a folder: give a training run's "
                         "folder (the --workdir of keras_arat.train)")
    cfg = config.read_config(workdir)
    # A converted run (keras_arat.convert_torch) records its shapes and loads without data.
    if data and (cfg.num_classes is None or cfg.image_shape is None):
        check_data(cfg.dataset, cfg.data_dir, n_train=1, n_test=1)
    return cfg


def check_saved_model(path):
    """A SavedModel folder (holding saved_model.pb), with a hint when it is not one."""
    if not os.path.exists(path):
        raise UsageError(f"--saved_model={path} not found")
    if not os.path.isdir(path):
        kind = "an ONNX model? pass --onnx" if path.endswith(".onnx") else "not a folder"
        raise UsageError(f"--saved_model={path} is a file ({kind}): a SavedModel is a "
                         "folder holding saved_model.pb")
    if os.path.isfile(os.path.join(path, "saved_model.pb")):
        return
    found = sorted(glob.glob(os.path.join(path, "**", "saved_model.pb"), recursive=True))
    hint = (f": did you mean --saved_model={os.path.dirname(found[0])}" if found
            else " (python -m export writes OUT/saved_model/NAME/1/)")
    raise UsageError(f"--saved_model={path} holds no saved_model.pb{hint}")


def check_onnx(path):
    """An ONNX file (a protobuf): not a folder, not a zip archive, not empty."""
    if not os.path.exists(path):
        raise UsageError(f"--onnx={path} not found")
    if os.path.isdir(path):
        raise UsageError(f"--onnx={path} is a folder (a SavedModel? pass --saved_model): "
                         "give an .onnx file")
    head = _head(path)
    if not head:
        raise UsageError(f"--onnx={path} is empty")
    if head == ZIP_MAGIC:
        raise UsageError(f"--onnx={path} is a zip archive (a .keras or .npz file?), not an "
                         "ONNX model")


def check_keras_file(path, flag="keras_model"):
    """A .keras file (a zip archive)."""
    if not os.path.isfile(path):
        raise UsageError(f"--{flag}={path} is not a file")
    if _head(path) != ZIP_MAGIC:
        raise UsageError(f"--{flag}={path} is not a .keras file (a zip archive written by "
                         "model.save('....keras'))")


def evaluate_argv(argv):
    """keras_arat.evaluate's path and number flags, checked before TensorFlow loads.

    Reads only the flags named here (absl, so --flagfile and both `--name=value` and
    `--name value` work) and leaves every other flag to the full parse. Returns True
    when --verbose was given.
    """
    from absl import flags
    values = flags.FlagValues()
    flags.DEFINE_string("workdir", None, "", flag_values=values)
    flags.DEFINE_string("saved_model", None, "", flag_values=values)
    flags.DEFINE_string("onnx", None, "", flag_values=values)
    flags.DEFINE_string("dataset", None, "", flag_values=values)
    flags.DEFINE_string("data_dir", None, "", flag_values=values)
    flags.DEFINE_string("output_dir", None, "", flag_values=values)
    flags.DEFINE_string("eps", None, "", flag_values=values)
    flags.DEFINE_bool("verbose", False, "", flag_values=values)
    try:
        values(["evaluate", *argv], known_only=True)  # absl skips argv[0], the program
    except flags.Error:
        return False  # the full parse reports it
    if values.eps:
        config.parse_fraction(values.eps, "eps")
    if values.saved_model:
        check_saved_model(values.saved_model)
    if values.onnx:
        check_onnx(values.onnx)
    if values.workdir:
        check_run(values.workdir, data=not values.dataset)
    if values.dataset:
        check_test_images(values.dataset, values.data_dir)
    if values.output_dir:
        check_new_folder(values.output_dir, "output_dir")
    return values.verbose


def exit_on_error(check, *args, **kwargs):
    """Run a check; on UsageError print its one `error:` line and exit with status 2."""
    try:
        return check(*args, **kwargs)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)


def argument_parser(**kwargs):
    """An argparse parser whose usage errors are one `error:` line (exit status 2)."""
    import argparse

    class Parser(argparse.ArgumentParser):
        def error(self, message):
            print(f"error: {message} (--help shows the usage)", file=sys.stderr, flush=True)
            sys.exit(2)

    return Parser(**kwargs)
