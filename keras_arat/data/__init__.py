"""Data sets and deterministic input pipelines for keras_arat.

``load_dataset`` returns a :class:`Dataset` of uint8 NHWC images and int64
labels; ``make_train_dataset`` / ``make_eval_dataset`` turn it into tf.data
pipelines of float32 images in [0, 1]. Every data problem raises
:class:`DataError` with a one-line message.
"""

from .datasets import (DATASET_NAMES, TFDS_NAMES, DataError, Dataset, load_dataset,
                       load_test_images)

# The pipelines need TensorFlow; loading data does not. They are imported on first use,
# so a command can check its data set before TensorFlow loads (4-6 s).
_PIPELINE = ("a_prev_batches", "a_prev_subset", "epoch_order", "make_eval_dataset",
             "make_train_dataset")


def __getattr__(name):
    if name in _PIPELINE:
        from . import pipeline
        return getattr(pipeline, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "DATASET_NAMES",
    "TFDS_NAMES",
    "DataError",
    "Dataset",
    "load_dataset",
    "load_test_images",
    "make_train_dataset",
    "make_eval_dataset",
    "a_prev_batches",
    "a_prev_subset",
    "epoch_order",
]
