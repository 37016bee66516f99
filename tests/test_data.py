"""Tests for keras_arat.data: data sets, npz validation, TFDS and pipelines.

No test touches the network: TFDS paths use tfds.testing.mock_data or an empty
data_dir, and a fixture makes any socket connection attempt fail loudly.
"""

import socket
import time

import numpy as np
import pytest

from keras_arat import data as kd
from keras_arat.data import (
    DataError,
    Dataset,
    a_prev_subset,
    epoch_order,
    load_dataset,
    make_eval_dataset,
    make_train_dataset,
)
from keras_arat.data import datasets as datasets_mod


# ------------------------------------------------------------------ helpers


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection raises instead of hanging."""

    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted during a test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def collect(data):
    xs, ys = [], []
    for x, y in data:
        xs.append(x.numpy())
        ys.append(y.numpy())
    return xs, ys


def small(ds, n):
    return Dataset(
        name=ds.name,
        x_train=ds.x_train[:n],
        y_train=ds.y_train[:n],
        x_test=ds.x_test[:n],
        y_test=ds.y_test[:n],
        num_classes=ds.num_classes,
        flip=ds.flip,
    )


# ------------------------------------------------------------ digits


def test_digits_embedded(digits):
    assert digits.name == "digits"
    assert digits.x_train.shape == (4000, 32, 32, 3)
    assert digits.x_test.shape == (1000, 32, 32, 3)
    assert digits.x_train.dtype == np.uint8 and digits.x_test.dtype == np.uint8
    assert digits.y_train.shape == (4000,) and digits.y_test.shape == (1000,)
    assert digits.y_train.dtype == np.int64 and digits.y_test.dtype == np.int64
    assert digits.image_shape == (32, 32, 3)
    assert digits.num_classes == 10
    assert digits.flip is False
    for y in (digits.y_train, digits.y_test):
        assert y.min() >= 0 and y.max() <= 9
        assert set(np.unique(y)) == set(range(10))
    for x in (digits.x_train, digits.x_test):
        # 2-pixel zero border from padding 28x28 -> 32x32.
        assert not x[:, :2].any() and not x[:, -2:].any()
        assert not x[:, :, :2].any() and not x[:, :, -2:].any()
        # Gray repeated to three identical channels.
        assert np.array_equal(x[..., 0], x[..., 1])
        assert np.array_equal(x[..., 0], x[..., 2])
        # Real content: every image has ink, and the range is used.
        assert (x.reshape(len(x), -1).max(axis=1) > 0).all()
        assert x.max() == 255


def test_digits_subset_and_flip_override():
    ds = load_dataset("digits", n_train=100, n_test=30, flip=True)
    assert ds.x_train.shape == (100, 32, 32, 3) and ds.x_test.shape == (30, 32, 32, 3)
    assert ds.flip is True
    full = load_dataset("digits")
    assert np.array_equal(ds.x_train, full.x_train[:100])


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "10"])
def test_bad_counts_rejected(bad):
    with pytest.raises(DataError, match="n_train"):
        load_dataset("digits", n_train=bad)
    with pytest.raises(DataError, match="n_test"):
        load_dataset("digits", n_test=bad)


def test_unknown_name():
    with pytest.raises(DataError, match="unknown data set") as info:
        load_dataset("imagenet")
    msg = str(info.value)
    for name in ("digits", "cifar10", "cifar100", "svhn_cropped", "mnist", "npz:"):
        assert name in msg
    assert "\n" not in msg


# ------------------------------------------------------------ pipeline


def test_train_batches_format(digits):
    ds = small(digits, 256)
    data, steps = make_train_dataset(ds, batch_size=32, epochs=2, seed=3)
    assert steps == 8
    # Its length is known (fit under a tf.distribute strategy needs it to end an epoch).
    assert int(data.cardinality()) == 2 * steps
    xs, ys = collect(data)
    assert len(xs) == 2 * steps
    for x, y in zip(xs, ys):
        assert x.shape == (32, 32, 32, 3) and x.dtype == np.float32
        assert y.shape == (32,) and y.dtype == np.int64
        assert x.min() >= 0.0 and x.max() <= 1.0
    assert max(x.max() for x in xs) == 1.0
    spec_x, spec_y = data.element_spec
    assert tuple(spec_x.shape) == (32, 32, 32, 3)
    assert tuple(spec_y.shape) == (32,)


def test_same_seed_same_batches_other_seed_differs(digits):
    ds = small(digits, 200)
    a = collect(make_train_dataset(ds, 50, 2, seed=7)[0])
    b = collect(make_train_dataset(ds, 50, 2, seed=7)[0])
    c = collect(make_train_dataset(ds, 50, 2, seed=8)[0])
    assert all(np.array_equal(p, q) for p, q in zip(a[0] + a[1], b[0] + b[1]))
    assert not all(np.array_equal(p, q) for p, q in zip(a[0], c[0]))


def test_epochs_have_different_orders(digits):
    ds = small(digits, 200)
    o0, o1 = epoch_order(200, seed=5, epoch=0), epoch_order(200, seed=5, epoch=1)
    assert sorted(o0) == list(range(200)) and sorted(o1) == list(range(200))
    assert not np.array_equal(o0, o1)
    _, ys = collect(make_train_dataset(ds, 50, 2, seed=5, crop_padding=0)[0])
    assert not np.array_equal(np.concatenate(ys[:4]), np.concatenate(ys[4:]))
    assert np.array_equal(np.concatenate(ys[:4]), ds.y_train[o0])
    assert np.array_equal(np.concatenate(ys[4:]), ds.y_train[o1])


def test_resume_reproduces_uninterrupted_run(digits):
    ds = small(digits, 300)
    full, steps = make_train_dataset(ds, 64, 3, seed=11, flip=True)
    resumed, steps2 = make_train_dataset(ds, 64, 3, seed=11, flip=True, initial_epoch=1)
    assert steps == steps2 == 4
    fx, fy = collect(full)
    rx, ry = collect(resumed)
    assert len(fx) == 3 * steps and len(rx) == 2 * steps
    for a, b in zip(fx[steps:], rx):
        assert np.array_equal(a, b)
    for a, b in zip(fy[steps:], ry):
        assert np.array_equal(a, b)
    # A resumed run at the last epoch is empty, past it is an error.
    assert collect(make_train_dataset(ds, 64, 3, seed=11, initial_epoch=3)[0]) == ([], [])
    with pytest.raises(DataError, match="initial_epoch"):
        make_train_dataset(ds, 64, 3, seed=11, initial_epoch=4)


def test_no_crop_no_flip_is_raw_images_in_permuted_order(digits):
    ds = small(digits, 160)
    data, steps = make_train_dataset(ds, 40, 2, seed=2, crop_padding=0, flip=False)
    xs, ys = collect(data)
    for e in range(2):
        order = epoch_order(160, seed=2, epoch=e)
        x = np.concatenate(xs[e * steps:(e + 1) * steps])
        y = np.concatenate(ys[e * steps:(e + 1) * steps])
        assert np.array_equal(x, ds.x_train[order].astype(np.float32) / np.float32(255))
        assert np.array_equal(y, ds.y_train[order])


def _shift(img, dy, dx):
    """img translated by (dy, dx) with zero fill: what a crop of a padded copy gives."""
    p = 4
    padded = np.pad(img, ((p, p), (p, p), (0, 0)))
    h, w = img.shape[:2]
    return padded[p + dy:p + dy + h, p + dx:p + dx + w]


def test_crop_is_a_shifted_copy(digits):
    ds = small(digits, 128)
    xs, _ = collect(make_train_dataset(ds, 128, 1, seed=4, crop_padding=4, flip=False)[0])
    order = epoch_order(128, seed=4, epoch=0)
    batch = np.round(xs[0] * 255).astype(np.uint8)
    shifts = []
    for out, src in zip(batch, ds.x_train[order]):
        found = [
            (dy, dx)
            for dy in range(-4, 5)
            for dx in range(-4, 5)
            if np.array_equal(out, _shift(src, dy, dx))
        ]
        assert found, "augmented image is not a shifted copy of its source"
        shifts.append(found[0])
    # Offsets are random: several distinct shifts, not always the identity.
    assert len(set(shifts)) > 5
    assert any(s != (0, 0) for s in shifts)


def test_flip_on_and_off(digits):
    ds = small(digits, 128)
    order = epoch_order(128, seed=9, epoch=0)
    src = ds.x_train[order].astype(np.float32) / np.float32(255)
    # Default for digits is ds.flip == False: no mirrored images.
    (x_off,), _ = collect(make_train_dataset(ds, 128, 1, seed=9, crop_padding=0)[0])
    assert np.array_equal(x_off, src)
    (x_on,), _ = collect(make_train_dataset(ds, 128, 1, seed=9, crop_padding=0, flip=True)[0])
    same = np.array([np.array_equal(a, b) for a, b in zip(x_on, src)])
    mirrored = np.array([np.array_equal(a, b[:, ::-1]) for a, b in zip(x_on, src)])
    assert (same | mirrored).all()
    # Digits are not left-right symmetric, so both cases must occur (p~0.5 each).
    assert 20 < mirrored.sum() < 108 and (same & ~mirrored).sum() > 20
    # ds.flip=True makes flipping the default.
    ds_flip = Dataset(ds.name, ds.x_train, ds.y_train, ds.x_test, ds.y_test, 10, flip=True)
    (x_def,), _ = collect(make_train_dataset(ds_flip, 128, 1, seed=9, crop_padding=0)[0])
    assert np.array_equal(x_def, x_on)


def test_remainder_and_batch_too_large(digits):
    ds = small(digits, 100)
    data, steps = make_train_dataset(ds, 30, 2, seed=0, drop_remainder=False)
    assert steps == 4
    xs, _ = collect(data)
    assert [len(x) for x in xs] == [30, 30, 30, 10] * 2
    assert make_train_dataset(ds, 30, 2, seed=0)[1] == 3
    with pytest.raises(DataError, match="larger than"):
        make_train_dataset(ds, 101, 1, seed=0)
    with pytest.raises(DataError, match="batch_size"):
        make_train_dataset(ds, 0, 1, seed=0)


def test_eval_dataset(digits):
    x, y = digits.x_test[:70], digits.y_test[:70]
    xs, ys = collect(make_eval_dataset(x, y, 32))
    assert [len(b) for b in xs] == [32, 32, 6]
    assert all(b.dtype == np.float32 for b in xs)
    assert np.array_equal(np.concatenate(xs), x.astype(np.float32) / np.float32(255))
    assert np.array_equal(np.concatenate(ys), y) and ys[0].dtype == np.int64
    with pytest.raises(DataError, match="labels"):
        make_eval_dataset(x, y[:5], 32)


def test_a_prev_subset(digits):
    x1, y1 = a_prev_subset(digits, n=256, seed=0)
    x2, y2 = a_prev_subset(digits, n=256, seed=0)
    x3, _ = a_prev_subset(digits, n=256, seed=1)
    assert x1.shape == (256, 32, 32, 3) and x1.dtype == np.float32
    assert y1.shape == (256,) and y1.dtype == np.int64
    assert 0.0 <= x1.min() and x1.max() <= 1.0
    assert np.array_equal(x1, x2) and np.array_equal(y1, y2)
    assert not np.array_equal(x1, x3)
    assert not np.array_equal(x1, digits.x_train[:256] / 255.0)  # random, not a prefix
    xa, ya = a_prev_subset(small(digits, 50), n=1024)
    assert xa.shape == (50, 32, 32, 3) and np.array_equal(ya, digits.y_train[:50])


# ------------------------------------------------------------ npz


def _arrays(n_train=20, n_test=8, shape=(12, 10), channels=None, classes=5):
    rng = np.random.default_rng(0)
    tail = shape if channels is None else shape + (channels,)
    return {
        "x_train": rng.integers(0, 256, (n_train,) + tail, dtype=np.uint8),
        "y_train": np.arange(n_train) % classes,
        "x_test": rng.integers(0, 256, (n_test,) + tail, dtype=np.uint8),
        "y_test": np.arange(n_test) % classes,
    }


def _save(tmp_path, arrays, name="user.npz"):
    path = tmp_path / name
    np.savez(path, **arrays)
    return path


def test_npz_round_trip_grayscale(tmp_path):
    arrays = _arrays()
    arrays["y_train"][0] = 6  # the largest label sets num_classes
    arrays["y_train"] = arrays["y_train"].reshape(-1, 1).astype(np.uint8)
    arrays["y_test"] = arrays["y_test"].astype(np.int32)
    path = _save(tmp_path, arrays)
    ds = load_dataset(f"npz:{path}")
    assert ds.x_train.shape == (20, 12, 10, 1) and ds.x_test.shape == (8, 12, 10, 1)
    assert ds.x_train.dtype == np.uint8
    assert np.array_equal(ds.x_train[..., 0], arrays["x_train"])
    assert ds.y_train.shape == (20,) and ds.y_train.dtype == np.int64
    assert np.array_equal(ds.y_train, arrays["y_train"][:, 0])
    assert ds.num_classes == 7
    assert ds.flip is False and ds.image_shape == (12, 10, 1)
    # A bare path ending in .npz works too, with flip override and subsets.
    ds2 = load_dataset(str(path), flip=True, n_train=5, n_test=3)
    assert ds2.flip is True and len(ds2.x_train) == 5 and len(ds2.y_test) == 3
    # The result feeds the training pipeline.
    data, steps = make_train_dataset(ds, 4, 1, seed=0)
    assert steps == 5
    assert next(iter(data))[0].shape == (4, 12, 10, 1)


def test_npz_round_trip_rgb(tmp_path):
    path = _save(tmp_path, _arrays(channels=3))
    ds = load_dataset(f"npz:{path}")
    assert ds.image_shape == (12, 10, 3) and ds.num_classes == 5


def _bad_dtype(a):
    a["x_train"] = a["x_train"].astype(np.float32) / 255
    return a


def _bad_rank(a):
    a["x_test"] = a["x_test"].reshape(len(a["x_test"]), -1)
    return a


def _bad_channels(a):
    a["x_train"] = np.zeros((20, 12, 10, 4), np.uint8)
    a["x_test"] = np.zeros((8, 12, 10, 4), np.uint8)
    return a


def _bad_count(a):
    a["y_train"] = a["y_train"][:-1]
    return a


def _bad_negative(a):
    a["y_test"] = a["y_test"] - 1
    return a


def _bad_mismatch(a):
    a["x_test"] = np.zeros((8, 12, 11), np.uint8)
    return a


def _bad_empty(a):
    a["x_train"] = np.zeros((0, 12, 10), np.uint8)
    a["y_train"] = np.zeros((0,), np.int64)
    return a


def _bad_float_labels(a):
    a["y_train"] = a["y_train"].astype(np.float32)
    return a


def _bad_one_hot(a):
    a["y_test"] = np.eye(5, dtype=np.int64)[a["y_test"]]
    return a


def _test_label_unseen_in_training(a):
    a["y_test"][0] = a["y_train"].max() + 3
    return a


def _absurd_label(a):
    a["y_train"][0] = 10 ** 9
    a["y_test"][0] = 10 ** 9
    return a


def _missing_keys(a):
    del a["y_train"], a["x_test"]
    return a


@pytest.mark.parametrize(
    "mutate, pattern",
    [
        (_bad_dtype, r"x_train has dtype float32 but images must be uint8"),
        (_bad_rank, r"x_test has shape \(8, 120\) but images must be"),
        (_bad_channels, r"4 channels"),
        (_bad_count, r"y_train has 19 labels but there are 20 images"),
        (_bad_negative, r"y_test contains negative labels"),
        (_bad_mismatch, r"train images have shape \(12, 10, 1\) but test images have \(12, 11, 1\)"),
        (_bad_empty, r"x_train is empty"),
        (_bad_float_labels, r"y_train has dtype float32 but labels must be integers"),
        (_bad_one_hot, r"y_test has shape \(8, 5\) but labels must be 1-D"),
        (_missing_keys, r"missing key\(s\) y_train, x_test"),
        (_test_label_unseen_in_training, r"y_test has label \d+ but y_train's labels only go up"),
        (_absurd_label, r"1000000000, which would make a 1000000001-way classifier"),
    ],
)
def test_npz_invalid(tmp_path, mutate, pattern):
    path = _save(tmp_path, mutate(_arrays()))
    with pytest.raises(DataError, match=pattern) as info:
        load_dataset(f"npz:{path}")
    assert "\n" not in str(info.value)


def test_npz_missing_and_unreadable(tmp_path):
    with pytest.raises(DataError, match="npz file not found"):
        load_dataset(f"npz:{tmp_path / 'absent.npz'}")
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"this is not a zip archive\n" * 10)
    with pytest.raises(DataError, match="cannot read") as info:
        load_dataset(str(garbage))
    assert "\n" not in str(info.value)
    single = tmp_path / "single.npz"
    with open(single, "wb") as f:
        np.save(f, np.zeros((3, 4), np.uint8))
    with pytest.raises(DataError, match="single array"):
        load_dataset(f"npz:{single}")


# ------------------------------------------------------------ tfds


def test_tfds_absent_fails_fast(tmp_path, no_network):
    start = time.monotonic()
    with pytest.raises(DataError) as info:
        load_dataset("cifar10", data_dir=tmp_path)
    elapsed = time.monotonic() - start
    assert elapsed < 5.0, f"absence detection took {elapsed:.1f} s"
    msg = str(info.value)
    assert "not prepared" in msg and "--download" in msg
    assert str(tmp_path) in msg and "download_and_prepare" in msg
    assert "\n" not in msg


def test_tfds_mocked_download_path(tmp_path, no_network):
    """download=True under mock_data: the real readiness check says 'absent',
    the mocked download_and_prepare is a no-op, then mocked data loads."""
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=12):
        ds = load_dataset("cifar10", data_dir=tmp_path, download=True, n_test=5)
    assert ds.x_train.shape == (12, 32, 32, 3) and ds.x_test.shape == (5, 32, 32, 3)
    assert ds.x_train.dtype == np.uint8 and ds.y_train.dtype == np.int64
    assert ds.num_classes == 10 and ds.flip is True
    assert ds.y_train.min() >= 0 and ds.y_train.max() < 10


def test_tfds_mocked_prepared_path(tmp_path, no_network, monkeypatch):
    """download=False: mock_data does not mock is_prepared, so the test patches
    the module's readiness check to report the data set as prepared."""
    tfds = pytest.importorskip("tensorflow_datasets")
    monkeypatch.setattr(datasets_mod, "_tfds_is_prepared", lambda builder: True)
    with tfds.testing.mock_data(num_examples=6):
        c100 = load_dataset("cifar100", data_dir=tmp_path)
        mnist = load_dataset("mnist", data_dir=tmp_path, n_train=4)
        svhn = load_dataset("svhn", data_dir=tmp_path)
    assert c100.num_classes == 100 and c100.x_test.shape == (6, 32, 32, 3)
    assert c100.y_test.max() < 100
    assert mnist.x_train.shape == (4, 32, 32, 3) and mnist.x_train.dtype == np.uint8
    assert not mnist.x_train[:, :2].any()
    assert np.array_equal(mnist.x_train[..., 0], mnist.x_train[..., 2])
    assert mnist.flip is False and mnist.num_classes == 10
    assert svhn.name == "svhn_cropped" and svhn.flip is False and svhn.num_classes == 10


def test_public_api_exports():
    for name in (
        "DataError",
        "Dataset",
        "load_dataset",
        "make_train_dataset",
        "make_eval_dataset",
        "a_prev_subset",
    ):
        assert hasattr(kd, name)
    assert issubclass(DataError, ValueError)
