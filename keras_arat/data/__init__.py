"""Data sets and deterministic input pipelines for keras_arat.

``load_dataset`` returns a :class:`Dataset` of uint8 NHWC images and int64
labels; ``make_train_dataset`` / ``make_eval_dataset`` turn it into tf.data
pipelines of float32 images in [0, 1]. Every data problem raises
:class:`DataError` with a one-line message.
"""

from .datasets import (DATASET_NAMES, TFDS_NAMES, DataError, Dataset, load_dataset,
                       load_test_images)
from .pipeline import a_prev_subset, epoch_order, make_eval_dataset, make_train_dataset

__all__ = [
    "DATASET_NAMES",
    "TFDS_NAMES",
    "DataError",
    "Dataset",
    "load_dataset",
    "load_test_images",
    "make_train_dataset",
    "make_eval_dataset",
    "a_prev_subset",
    "epoch_order",
]
