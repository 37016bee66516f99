"""Deterministic, resumable tf.data input pipelines.

The training pipeline is a pure function of ``(seed, epoch)``: the example
order of epoch ``e`` is a stateless permutation seeded by ``(seed, e)``, and
the augmentation (random crop after zero padding, optional horizontal flip) of
example ``i`` in epoch ``e`` comes from per-epoch stateless random tables
indexed by ``i``. A run resumed with ``initial_epoch=k`` therefore yields
exactly the batches the uninterrupted run produced for epochs ``k..epochs-1``.

Images stay uint8 in memory and are converted to float32 in [0, 1] in the map.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import numpy as np
import tensorflow as tf

from .datasets import DataError, Dataset

__all__ = [
    "make_train_dataset",
    "make_eval_dataset",
    "a_prev_batches",
    "a_prev_subset",
    "epoch_order",
]

_ALG = "philox"  # fixed so results do not depend on device auto-selection


def _check_int(label: str, value, minimum: int) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise DataError(f"{label} must be an integer, got {value!r}")
    if value < minimum:
        raise DataError(f"{label} must be >= {minimum}, got {value}")
    return int(value)


def _base_seed(seed) -> tf.Tensor:
    """Map any Python int seed to a stateless seed pair (low, high 32 bits)."""
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)):
        raise DataError(f"seed must be an integer, got {seed!r}")
    s = int(seed) % (1 << 64)
    return tf.constant([s & 0xFFFFFFFF, s >> 32], dtype=tf.int64)


def _epoch_keys(base: tf.Tensor, epoch) -> tf.Tensor:
    """Three independent stateless seeds for (order, crop, flip) of one epoch."""
    epoch = tf.cast(epoch, tf.int64)
    key = tf.random.experimental.stateless_fold_in(base, epoch, alg=_ALG)
    return tf.random.experimental.stateless_split(key, 3, alg=_ALG)


def _permutation(n: int, key: tf.Tensor) -> tf.Tensor:
    return tf.random.experimental.stateless_shuffle(
        tf.range(n, dtype=tf.int64), seed=key, alg=_ALG
    )


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The order (indices into x_train) in which epoch ``epoch`` visits examples.

    This is the permutation ``make_train_dataset`` uses; it does not depend on
    batch size, padding or flips.
    """
    n = _check_int("n", n, 1)
    epoch = _check_int("epoch", epoch, 0)
    keys = _epoch_keys(_base_seed(seed), epoch)
    return _permutation(n, keys[0]).numpy()


def make_train_dataset(
    ds: Dataset,
    batch_size: int,
    epochs: int,
    seed: int,
    initial_epoch: int = 0,
    crop_padding: int = 4,
    flip: Optional[bool] = None,
    drop_remainder: bool = True,
) -> Tuple[tf.data.Dataset, int]:
    """Augmented training batches for epochs ``initial_epoch..epochs-1``.

    Returns ``(dataset, steps_per_epoch)``; the dataset yields
    ``(x float32 [0,1] (B,H,W,C), y int64 (B,))`` and is finite: it holds
    ``(epochs - initial_epoch) * steps_per_epoch`` batches.
    """
    batch_size = _check_int("batch_size", batch_size, 1)
    epochs = _check_int("epochs", epochs, 1)
    initial_epoch = _check_int("initial_epoch", initial_epoch, 0)
    crop_padding = _check_int("crop_padding", crop_padding, 0)
    if initial_epoch > epochs:
        raise DataError(
            f"initial_epoch {initial_epoch} is past epochs {epochs}: "
            f"nothing is left to train"
        )
    base = _base_seed(seed)
    if flip is None:
        flip = ds.flip
    flip = bool(flip)

    n = len(ds.x_train)
    steps = n // batch_size if drop_remainder else math.ceil(n / batch_size)
    if steps == 0:
        raise DataError(
            f"batch_size {batch_size} is larger than the {n} training images of "
            f"{ds.name}: use a smaller batch size or more data"
        )
    h, w, c = ds.image_shape
    p = crop_padding

    x_all = tf.convert_to_tensor(ds.x_train, dtype=tf.uint8)
    y_all = tf.convert_to_tensor(np.asarray(ds.y_train, dtype=np.int64))

    def per_epoch(epoch):
        keys = _epoch_keys(base, epoch)
        order = _permutation(n, keys[0])
        # Per-example augmentation parameters for this epoch, indexed by the
        # example's position in x_train (not by its position in the batch).
        offsets = tf.random.stateless_uniform(
            [n, 2], seed=keys[1], minval=0, maxval=2 * p + 1, dtype=tf.int32, alg=_ALG
        )
        flips = tf.random.stateless_uniform([n], seed=keys[2], alg=_ALG) < 0.5
        parts = (order, tf.gather(offsets, order), tf.gather(flips, order))
        return tf.data.Dataset.from_tensor_slices(parts).batch(
            batch_size, drop_remainder=drop_remainder
        )

    rows_base = tf.range(h, dtype=tf.int32)[None, :]
    cols_base = tf.range(w, dtype=tf.int32)[None, :]

    def augment(idx, off, flp):
        img = tf.gather(x_all, idx)  # (B, H, W, C) uint8
        if p > 0:
            img = tf.pad(img, [[0, 0], [p, p], [p, p], [0, 0]])
            rows = off[:, 0:1] + rows_base  # (B, H)
            cols = off[:, 1:2] + cols_base  # (B, W)
            img = tf.gather(img, rows, axis=1, batch_dims=1)
            img = tf.gather(img, cols, axis=2, batch_dims=1)
        if flip:
            img = tf.where(flp[:, None, None, None], tf.reverse(img, axis=[2]), img)
        x = tf.cast(img, tf.float32) / 255.0
        x = tf.ensure_shape(x, [batch_size if drop_remainder else None, h, w, c])
        return x, tf.gather(y_all, idx)

    data = tf.data.Dataset.range(initial_epoch, epochs).flat_map(per_epoch)
    # flat_map hides the length: stated, so that fit knows where an epoch ends (under a
    # tf.distribute strategy, a dataset of unknown length made fit run one step too many).
    data = data.apply(tf.data.experimental.assert_cardinality((epochs - initial_epoch) * steps))
    data = data.map(augment, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    data = data.prefetch(tf.data.AUTOTUNE)
    return data, steps


def _to_float(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x)
    if x.dtype == np.uint8:
        return x.astype(np.float32) / np.float32(255.0)
    if x.dtype.kind == "f":
        return x.astype(np.float32, copy=False)
    raise DataError(f"images must be uint8 (0-255) or float in [0, 1], got dtype {x.dtype}")


def make_eval_dataset(x: np.ndarray, y: np.ndarray, batch_size: int) -> tf.data.Dataset:
    """In-order, unaugmented ``(x float32 [0,1], y int64)`` batches; last batch kept.

    ``x`` may be uint8 (divided by 255) or float already in [0, 1].
    """
    batch_size = _check_int("batch_size", batch_size, 1)
    x = np.asarray(x)
    y = np.asarray(y)
    if x.dtype.kind not in "uf":
        raise DataError(f"images must be uint8 (0-255) or float in [0, 1], got dtype {x.dtype}")
    if y.ndim != 1 or y.dtype.kind not in "iu":
        raise DataError(f"labels must be a 1-D integer array, got dtype {y.dtype} shape {y.shape}")
    if len(x) != len(y):
        raise DataError(f"{len(x)} images but {len(y)} labels: counts must match")
    if len(x) == 0:
        raise DataError("cannot evaluate on an empty set of images")
    scale = x.dtype == np.uint8
    data = tf.data.Dataset.from_tensor_slices((x, y.astype(np.int64))).batch(batch_size)

    def convert(xb, yb):
        xb = tf.cast(xb, tf.float32)
        if scale:
            xb = xb / 255.0
        return xb, yb

    data = data.map(convert, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return data.prefetch(tf.data.AUTOTUNE)


def a_prev_subset(ds: Dataset, n: int = 1024, seed: int = 0) -> Tuple[np.ndarray, np.ndarray]:
    """A fixed random subset of ``n`` training images (all if fewer), unaugmented.

    Returns ``(x float32 [0,1] NHWC, y int64)``; indices are sorted so the
    subset keeps the data set's order. Same ``(ds, n, seed)`` -> same subset.
    """
    n = _check_int("n", n, 1)
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)):
        raise DataError(f"seed must be an integer, got {seed!r}")
    total = len(ds.x_train)
    if n >= total:
        idx = np.arange(total)
    else:
        rng = np.random.default_rng(int(seed) % (1 << 64))
        idx = np.sort(rng.choice(total, size=n, replace=False))
    return _to_float(ds.x_train[idx]), np.asarray(ds.y_train[idx], dtype=np.int64)


# a_prev's draws are a random stream of their own: the run's seed plus this offset.
A_PREV_SEED_OFFSET = 0x5EED << 32


def a_prev_batches(ds: Dataset, n: int, batch_size: int, seed: int, epoch: int,
                   crop_padding: int = 4, flip: Optional[bool] = None
                   ) -> Tuple[np.ndarray, np.ndarray]:
    """The training images ARAT's a_prev is measured on at the start of ``epoch``.

    As the official code's ``test_single_bn(net, train_loader, max_n=n)``: whole batches
    of a fresh, shuffled and augmented pass over the training set, until at least ``n``
    images (``n=1000`` at batch 128: 8 batches, 1,024 images), or all batches if the set
    is smaller. A new subset each epoch; the same one for the same ``(seed, epoch)``, so a
    resumed run measures the a_prev the uninterrupted run did. Returns
    ``(x float32 [0,1] NHWC, y int64)``.
    """
    n = _check_int("n", n, 1)
    data, steps = make_train_dataset(ds, batch_size, epoch + 1,
                                     (int(seed) + A_PREV_SEED_OFFSET) % (1 << 64),
                                     initial_epoch=epoch, crop_padding=crop_padding, flip=flip)
    xs, ys = [], []
    for xb, yb in data.take(min(math.ceil(n / batch_size), steps)):
        xs.append(xb.numpy())
        ys.append(yb.numpy())
    return np.concatenate(xs), np.concatenate(ys)
