"""Quiet start-up: TensorFlow without its C++ start-up log, unless asked for.

TensorFlow's shared libraries log from C++ while they load and when they first look for
a GPU, before any Python logging setting can apply: absl's "All log messages before
absl::InitializeLog() is called" banner (once per library), cudart_stub's "Could not find
cuda drivers", cpu_feature_guard's instruction notice, and on a machine without a GPU
"E0000 ... failed call to cuInit: ... UNKNOWN ERROR (303)", which reads like a failure.
Measured with TensorFlow 2.21: TF_CPP_MIN_LOG_LEVEL=3 hides the cpu_feature_guard and
cuInit lines but not the banners or the cudart_stub lines, and CUDA_VISIBLE_DEVICES=-1
hides none of them. So `import_tensorflow()` imports TensorFlow and lists its devices
with file descriptor 2 pointed at a temporary file; afterwards the lines known as
start-up noise are dropped and anything else is passed on to stderr. Later C++ INFO and
WARNING lines are hidden by TF_CPP_MIN_LOG_LEVEL=2 (set unless the environment sets it);
errors still show.

KERAS_ARAT_VERBOSE=1 in the environment, or a command's --verbose, leaves everything as
TensorFlow prints it.
"""

import contextlib
import logging as pylogging
import os
import re
import sys
import tempfile

ENV_VERBOSE = "KERAS_ARAT_VERBOSE"

# Start-up lines of TensorFlow 2.21 on a machine without a usable GPU (and the CUDA
# plug-in registration lines of GPU builds); anything else captured is passed on.
NOISE = re.compile(
    r"^WARNING: All log messages before absl::InitializeLog\(\) is called"
    r"|^[IW]\d{4} "  # absl-format INFO and WARNING lines of the C++ libraries
    r"|^E\d{4} .*(cuInit|cuda_|cuDNN|cuFFT|cuBLAS|TensorRT|computation_placer)"
    r"|^To enable the following instructions: .* rebuild TensorFlow"
    r"|^TF-TRT Warning")


def verbose_from_env():
    return os.environ.get(ENV_VERBOSE, "").strip().lower() in ("1", "true", "yes")


def is_noise(line):
    return bool(NOISE.search(line))


@contextlib.contextmanager
def filtered_stderr():
    """Run the body with fd 2 captured; pass on every captured line that is not noise."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            text = capture.read().decode("utf-8", "replace")
            kept = [line for line in text.splitlines() if line.strip() and not is_noise(line)]
            if kept:
                sys.stderr.write("\n".join(kept) + "\n")
                sys.stderr.flush()


def import_tensorflow(verbose=False):
    """Import TensorFlow (and find its devices) without the start-up noise; returns it.

    verbose (or KERAS_ARAT_VERBOSE=1): import it as it is, with every log line. Call it
    before anything else imports TensorFlow (Keras, tensorflow_datasets, tf2onnx);
    afterwards it only returns the module.
    """
    if "tensorflow" in sys.modules:
        return sys.modules["tensorflow"]
    if verbose or verbose_from_env():
        import tensorflow as tf
        return tf
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    with filtered_stderr():
        import tensorflow as tf
        # The first device query loads the CUDA platform (the cuInit line); listing
        # physical devices does not start the runtime, so logical devices can still be
        # configured afterwards.
        tf.config.list_physical_devices()
    from absl import logging
    logging.set_verbosity(logging.WARNING)
    logging.get_absl_logger().addFilter(_quiet_libraries)
    pylogging.getLogger("tensorflow").setLevel(pylogging.ERROR)
    return tf


LIBRARIES = ("tensorflow", "tensorflow_datasets", "keras", "tf2onnx")


def _quiet_libraries(record):
    """absl INFO and WARNING lines of the libraries (e.g. tensorflow_datasets' "Variant
    folder ... has no dataset_info.json" before a missing-data-set error) are dropped;
    their errors and every line of keras_arat pass."""
    if record.levelno >= pylogging.ERROR:
        return True
    return not any(f"{os.sep}{name}{os.sep}" in record.pathname for name in LIBRARIES)
