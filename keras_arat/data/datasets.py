"""Loading image classification data sets as uint8 NHWC numpy arrays.

Three sources are supported:

* ``"digits"``: 5,000 MNIST digits shipped inside the package (no download,
  see ``keras_arat/data/README.md`` for provenance and licence), padded to
  32x32 and repeated to 3 channels.
* ``"npz:/path/file.npz"`` (or any name ending in ``.npz``): user data with
  keys ``x_train``, ``y_train``, ``x_test``, ``y_test``.
* TensorFlow Datasets names ``cifar10``, ``cifar100``, ``svhn_cropped``
  (alias ``svhn``) and ``mnist``. These must already be prepared in the TFDS
  data directory unless ``download=True``; absence is detected before any
  call that could try the network.

Every bad-data condition raises :class:`DataError` with a one-line message.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import os
import zipfile
from typing import Optional

import numpy as np

from keras_arat.errors import UsageError

__all__ = [
    "DataError",
    "Dataset",
    "load_dataset",
    "load_test_images",
    "DATASET_NAMES",
    "TFDS_NAMES",
]

# name -> (tfds name, flip default, pad 28x28x1 to 32x32x3)
_TFDS_SPECS = {
    "cifar10": ("cifar10", True, False),
    "cifar100": ("cifar100", True, False),
    "svhn_cropped": ("svhn_cropped", False, False),
    "mnist": ("mnist", False, True),
}
_ALIASES = {"svhn": "svhn_cropped"}
TFDS_NAMES = tuple(_TFDS_SPECS)
DATASET_NAMES = ("digits",) + TFDS_NAMES

_NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")
_DIGITS_FILE = "digits_5k.npz"


class DataError(UsageError):
    """A data set is missing, malformed or incompatible with the request."""

    def __init__(self, message: str):
        # Keep messages on one line whatever was interpolated into them.
        super().__init__(" ".join(str(message).split()))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    line = text.splitlines()[0] if text else ""
    return f"{type(exc).__name__}: {line}" if line else type(exc).__name__


@dataclasses.dataclass
class Dataset:
    """A train/test split held in memory.

    Images are uint8 NHWC arrays, labels int64 1-D arrays.
    ``flip`` tells whether horizontal-flip augmentation makes sense.
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    flip: bool = False

    def __post_init__(self):
        for split in ("train", "test"):
            x = getattr(self, f"x_{split}")
            y = getattr(self, f"y_{split}")
            if not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.ndim != 4:
                raise DataError(
                    f"{self.name}: x_{split} must be a uint8 numpy array of shape "
                    f"(N, H, W, C), got {_describe(x)}"
                )
            if not isinstance(y, np.ndarray) or y.ndim != 1:
                raise DataError(
                    f"{self.name}: y_{split} must be a 1-D numpy array of labels, "
                    f"got {_describe(y)}"
                )
            if len(x) != len(y):
                raise DataError(
                    f"{self.name}: x_{split} has {len(x)} images but y_{split} has "
                    f"{len(y)} labels: they must match"
                )
            if y.dtype != np.int64:
                setattr(self, f"y_{split}", y.astype(np.int64))
        if self.x_train.shape[1:] != self.x_test.shape[1:]:
            raise DataError(
                f"{self.name}: train images are {self.x_train.shape[1:]} but test "
                f"images are {self.x_test.shape[1:]}: both splits need one shape"
            )
        self.num_classes = int(self.num_classes)
        self.flip = bool(self.flip)

    @property
    def image_shape(self) -> tuple:
        """(H, W, C) of one image."""
        return tuple(int(d) for d in self.x_train.shape[1:])


def _describe(a) -> str:
    if isinstance(a, np.ndarray):
        return f"dtype {a.dtype} shape {a.shape}"
    return type(a).__name__


def _check_count(label: str, value) -> Optional[int]:
    if value is None:
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise DataError(f"{label} must be a positive integer or None, got {value!r}")
    if value <= 0:
        raise DataError(f"{label} must be a positive integer or None, got {value}")
    return int(value)


def _pad_to_32x32x3(x: np.ndarray) -> np.ndarray:
    """(N,28,28) or (N,28,28,1) uint8 -> (N,32,32,3): 2 px zero border, gray x3."""
    if x.ndim == 4:
        x = x[..., 0]
    x = np.pad(x, ((0, 0), (2, 2), (2, 2)), mode="constant", constant_values=0)
    return np.repeat(x[..., None], 3, axis=-1)


def _subset(x, y, n):
    return (x, y) if n is None else (x[:n], y[:n])


# ----------------------------------------------------------------- digits


def _load_digits(n_train, n_test, flip) -> Dataset:
    resource = importlib.resources.files(__package__).joinpath(_DIGITS_FILE)
    try:
        with importlib.resources.as_file(resource) as path:
            with np.load(path, allow_pickle=False) as f:
                arrays = {k: np.asarray(f[k]) for k in _NPZ_KEYS}
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as exc:
        raise DataError(
            f"the embedded digits file {_DIGITS_FILE} could not be read "
            f"({_first_line(exc)}): reinstall keras_arat"
        ) from None
    x_train, y_train = _subset(arrays["x_train"], arrays["y_train"], n_train)
    x_test, y_test = _subset(arrays["x_test"], arrays["y_test"], n_test)
    return Dataset(
        name="digits",
        x_train=_pad_to_32x32x3(x_train),
        y_train=y_train.astype(np.int64),
        x_test=_pad_to_32x32x3(x_test),
        y_test=y_test.astype(np.int64),
        num_classes=10,
        flip=False if flip is None else flip,
    )


# -------------------------------------------------------------------- npz


def _npz_images(path, key, x) -> np.ndarray:
    if x.dtype != np.uint8:
        raise DataError(
            f"{path}: {key} has dtype {x.dtype} but images must be uint8 (0-255): "
            f"convert them, e.g. np.round(x * 255).astype(np.uint8) for floats in [0, 1]"
        )
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4:
        raise DataError(
            f"{path}: {key} has shape {x.shape} but images must be (N, H, W) or "
            f"(N, H, W, C)"
        )
    if x.shape[-1] not in (1, 3):
        raise DataError(
            f"{path}: {key} has {x.shape[-1]} channels (shape {x.shape}) but only "
            f"1 (grayscale) or 3 (RGB) channels are supported: images must be NHWC"
        )
    if x.shape[0] == 0:
        raise DataError(f"{path}: {key} is empty: each split needs at least one image")
    if x.shape[1] == 0 or x.shape[2] == 0:
        raise DataError(f"{path}: {key} has empty images (shape {x.shape})")
    return x


def _npz_labels(path, key, y, n_images) -> np.ndarray:
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise DataError(
            f"{path}: {key} has shape {y.shape} but labels must be 1-D (N,) or (N, 1) "
            f"class indices, not one-hot"
        )
    if y.dtype.kind not in "iu":
        raise DataError(
            f"{path}: {key} has dtype {y.dtype} but labels must be integers: "
            f"convert them with .astype(np.int64)"
        )
    if len(y) != n_images:
        raise DataError(
            f"{path}: {key} has {len(y)} labels but there are {n_images} images: "
            f"counts must match"
        )
    if len(y) and y.min() < 0:
        raise DataError(
            f"{path}: {key} contains negative labels (min {int(y.min())}): "
            f"labels must be class indices 0..num_classes-1"
        )
    return y.astype(np.int64)


MAX_CLASSES = 100_000  # a larger label is a data error, not a classifier to build


def _load_npz(name: str, n_train, n_test, flip) -> Dataset:
    path = name[len("npz:"):] if name.startswith("npz:") else name
    path = os.path.expanduser(path)
    if not path:
        raise DataError("empty npz path: use npz:/path/to/file.npz")
    if not os.path.isfile(path):
        raise DataError(
            f"npz file not found: {path}: check the path (keys needed: "
            f"{', '.join(_NPZ_KEYS)})"
        )
    try:
        loaded = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise DataError(
            f"cannot read {path} as an .npz archive ({_first_line(exc)}): save it with "
            f"np.savez(path, x_train=..., y_train=..., x_test=..., y_test=...)"
        ) from None
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        raise DataError(
            f"{path} holds a single array, not an .npz archive: save it with "
            f"np.savez(path, x_train=..., y_train=..., x_test=..., y_test=...)"
        )
    with loaded as f:
        missing = [k for k in _NPZ_KEYS if k not in f.files]
        if missing:
            raise DataError(
                f"{path} is missing key(s) {', '.join(missing)} (found: "
                f"{', '.join(f.files) or 'none'}): it needs {', '.join(_NPZ_KEYS)}"
            )
        try:
            arrays = {k: np.asarray(f[k]) for k in _NPZ_KEYS}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
            raise DataError(
                f"cannot read the arrays of {path} ({_first_line(exc)}): save them as "
                f"plain numeric arrays with np.savez"
            ) from None

    x_train = _npz_images(path, "x_train", arrays["x_train"])
    x_test = _npz_images(path, "x_test", arrays["x_test"])
    y_train = _npz_labels(path, "y_train", arrays["y_train"], len(x_train))
    y_test = _npz_labels(path, "y_test", arrays["y_test"], len(x_test))
    if x_train.shape[1:] != x_test.shape[1:]:
        raise DataError(
            f"{path}: train images have shape {x_train.shape[1:]} but test images "
            f"have {x_test.shape[1:]}: both splits need the same (H, W, C)"
        )
    if y_test.max() > y_train.max():
        raise DataError(
            f"{path}: y_test has label {int(y_test.max())} but y_train's labels only go up "
            f"to {int(y_train.max())}: every test class must appear in training"
        )
    num_classes = int(y_train.max()) + 1
    if num_classes > MAX_CLASSES:
        raise DataError(
            f"{path}: y_train has label {num_classes - 1}, which would make a "
            f"{num_classes}-way classifier: labels must be class indices below {MAX_CLASSES}"
        )
    x_train, y_train = _subset(x_train, y_train, n_train)
    x_test, y_test = _subset(x_test, y_test, n_test)
    return Dataset(
        name=name,
        x_train=np.ascontiguousarray(x_train),
        y_train=y_train,
        x_test=np.ascontiguousarray(x_test),
        y_test=y_test,
        num_classes=num_classes,
        flip=False if flip is None else flip,
    )


# ------------------------------------------------------------ test images only

_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif")


def load_test_images(spec, n: Optional[int] = None, data_dir=None):
    """Labelled test images for evaluation: (x uint8 NHWC, y int64, description).

    spec: a data set name of load_dataset; an .npz (``npz:PATH`` or a path ending in
    .npz) holding at least x_test and y_test (training arrays are not needed); or a
    folder of images with one sub-folder per class (``folder:PATH`` or a directory
    path): classes are the sub-folders' names in sorted order, images PNG, JPEG, BMP or
    GIF, all of one size. n keeps the first n images.
    """
    n = _check_count("n_examples", n)
    spec = str(spec).strip()
    folder = spec[len("folder:"):] if spec.startswith("folder:") else (
        spec if os.path.isdir(os.path.expanduser(spec)) else None)
    if folder is not None:
        return _load_image_folder(os.path.expanduser(folder), n)
    if spec.startswith("npz:") or spec.lower().endswith(".npz"):
        path = os.path.expanduser(spec[len("npz:"):] if spec.startswith("npz:") else spec)
        try:
            loaded = np.load(path, allow_pickle=False)
            if not isinstance(loaded, np.lib.npyio.NpzFile):
                raise DataError(f"{path} holds a single array, not an .npz archive: save it "
                                f"with np.savez(path, x_test=..., y_test=...)")
            with loaded as f:
                missing = [k for k in ("x_test", "y_test") if k not in f.files]
                if missing:
                    raise DataError(f"{path} has no {' or '.join(missing)} (found: "
                                    f"{', '.join(f.files) or 'none'}): evaluation needs "
                                    f"x_test and y_test")
                x, y = np.asarray(f["x_test"]), np.asarray(f["y_test"])
        except FileNotFoundError:
            raise DataError(f"npz file not found: {path}") from None
        except DataError:
            raise
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
            raise DataError(f"cannot read {path} as an .npz archive ({_first_line(exc)})") \
                from None
        x = _npz_images(path, "x_test", x)
        y = _npz_labels(path, "y_test", y, len(x))
        x, y = _subset(x, y, n)
        return np.ascontiguousarray(x), y, {"kind": "npz", "path": os.path.abspath(path),
                                            "split": "test"}
    data = load_dataset(spec, data_dir=data_dir, n_train=1, n_test=n)
    return data.x_test, data.y_test, {"kind": "dataset", "dataset": spec, "split": "test"}


def _load_image_folder(root, n):
    if not os.path.isdir(root):
        raise DataError(f"image folder not found: {root}")
    classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    if not classes:
        raise DataError(f"{root} has no sub-folders: put each class's images in a folder of "
                        f"its own (e.g. {root}/0/*.png, {root}/1/*.png)")
    import tensorflow as tf
    images, labels, shape = [], [], None
    for label, name in enumerate(classes):
        folder = os.path.join(root, name)
        files = sorted(f for f in os.listdir(folder) if f.lower().endswith(_IMAGE_SUFFIXES))
        for file_name in files:
            path = os.path.join(folder, file_name)
            try:
                image = tf.io.decode_image(tf.io.read_file(path), expand_animations=False)
            except (tf.errors.OpError, ValueError) as exc:
                raise DataError(f"cannot decode {path} as an image "
                                f"({_first_line(exc)[:120]})") from None
            image = image.numpy()
            if image.dtype != np.uint8:
                raise DataError(f"{path} has {image.dtype} pixels; 8-bit images are needed")
            if shape is None:
                shape = image.shape
            elif image.shape != shape:
                raise DataError(f"{path} is {image.shape[0]}x{image.shape[1]}x"
                                f"{image.shape[2]} but the images before it are {shape[0]}x"
                                f"{shape[1]}x{shape[2]}: all images need one size")
            images.append(image)
            labels.append(label)
    if not images:
        raise DataError(f"{root}'s class folders hold no images ({', '.join(_IMAGE_SUFFIXES)})")
    x, y = np.stack(images), np.asarray(labels, np.int64)
    x, y = _subset(x, y, n)
    return x, y, {"kind": "folder", "path": os.path.abspath(root), "classes": classes}


# ------------------------------------------------------------------- tfds


def _import_tfds():
    try:
        import tensorflow_datasets as tfds
    except ImportError as exc:
        raise DataError(
            f"tensorflow-datasets is needed for TFDS data sets but cannot be imported "
            f"({_first_line(exc)}): pip install tensorflow-datasets"
        ) from None
    return tfds


def _tfds_is_prepared(builder) -> bool:
    """True if the builder's files (dataset_info.json) exist locally.

    ``DatasetBuilder.is_prepared`` only looks at the local file system (it
    checks for ``dataset_info.json`` under data_dir/name/version), so it never
    touches the network.
    """
    return bool(builder.is_prepared())


def _tfds_split_numpy(tfds, builder, split: str, n: Optional[int]):
    """Read a split as (uint8 images, int64 labels), in stored order.

    Iterates in chunks instead of ``batch_size=-1``: the latter sizes its single
    batch from the split metadata, which is unreliable for unusual builders.
    """
    spec = split if n is None else f"{split}[:{n}]"
    data = builder.as_dataset(split=spec, as_supervised=True, shuffle_files=False)
    xs, ys = [], []
    for x, y in tfds.as_numpy(data.batch(4096)):
        xs.append(x)
        ys.append(y)
    if not xs:
        raise DataError(f"{builder.name}: split {spec!r} is empty: re-prepare the data set")
    x = np.concatenate(xs)
    y = np.concatenate(ys).astype(np.int64)
    return _subset(x, y, n)


def _tfds_root(builder, data_dir) -> str:
    if data_dir is not None:
        return str(data_dir)
    root = getattr(builder, "data_dir_root", None)
    if root is not None:
        return str(root)
    return os.environ.get("TFDS_DATA_DIR", os.path.expanduser("~/tensorflow_datasets"))


def _load_tfds(name: str, data_dir, download: bool, n_train, n_test, flip) -> Dataset:
    tfds_name, flip_default, pad = _TFDS_SPECS[name]
    tfds = _import_tfds()
    if data_dir is not None:
        data_dir = os.path.expanduser(str(data_dir))
    try:
        builder = tfds.builder(tfds_name, data_dir=data_dir)
    except Exception as exc:  # noqa: BLE001 - report any TFDS failure in one line
        raise DataError(
            f"cannot create the TFDS builder for {tfds_name} ({_first_line(exc)}): "
            f"check --data_dir and the tensorflow-datasets installation"
        ) from None
    if not _tfds_is_prepared(builder):
        root = _tfds_root(builder, data_dir)
        if not download:
            raise DataError(
                f"{tfds_name} is not prepared in {root}: run `python -c \"import "
                f"tensorflow_datasets as tfds; tfds.builder('{tfds_name}')"
                f".download_and_prepare()\"` on a machine with internet and copy the "
                f"folder to --data_dir, or pass --download"
            )
        try:
            builder.download_and_prepare()
        except Exception as exc:  # noqa: BLE001
            raise DataError(
                f"downloading {tfds_name} into {root} failed ({_first_line(exc)}): "
                f"check the internet connection, or prepare it elsewhere and pass "
                f"--data_dir"
            ) from None
    x_train, y_train = _tfds_split_numpy(tfds, builder, "train", n_train)
    x_test, y_test = _tfds_split_numpy(tfds, builder, "test", n_test)
    if pad:
        x_train, x_test = _pad_to_32x32x3(x_train), _pad_to_32x32x3(x_test)
    num_classes = int(builder.info.features["label"].num_classes)
    return Dataset(
        name=name,
        x_train=x_train.astype(np.uint8, copy=False),
        y_train=y_train,
        x_test=x_test.astype(np.uint8, copy=False),
        y_test=y_test,
        num_classes=num_classes,
        flip=flip_default if flip is None else flip,
    )


# ------------------------------------------------------------------ entry


def load_dataset(
    name: str,
    data_dir=None,
    download: bool = False,
    n_train: Optional[int] = None,
    n_test: Optional[int] = None,
    flip: Optional[bool] = None,
) -> Dataset:
    """Load a data set by name.

    Args:
      name: ``"digits"``, ``"cifar10"``, ``"cifar100"``, ``"svhn_cropped"``
        (or ``"svhn"``), ``"mnist"``, or ``"npz:/path/file.npz"`` / a path
        ending in ``.npz``.
      data_dir: TFDS data directory (default: TFDS's own default,
        ``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``). Ignored otherwise.
      download: allow TFDS to download and prepare a missing data set.
      n_train, n_test: keep only the first N examples of each split.
      flip: override whether horizontal flips make sense for this data set.

    Raises:
      DataError: unknown name, bad arguments, missing or malformed data.
    """
    n_train = _check_count("n_train", n_train)
    n_test = _check_count("n_test", n_test)
    if flip is not None and not isinstance(flip, (bool, np.bool_)):
        raise DataError(f"flip must be True, False or None, got {flip!r}")
    if not isinstance(name, str) or not name.strip():
        raise DataError(
            f"data set name must be a non-empty string, got {name!r}: use one of "
            f"{', '.join(DATASET_NAMES)} or npz:/path/file.npz"
        )
    name = name.strip()
    if name.startswith("npz:") or name.lower().endswith(".npz"):
        return _load_npz(name, n_train, n_test, flip)
    key = _ALIASES.get(name.lower(), name.lower())
    if key == "digits":
        return _load_digits(n_train, n_test, flip)
    if key in _TFDS_SPECS:
        return _load_tfds(key, data_dir, download, n_train, n_test, flip)
    raise DataError(
        f"unknown data set {name!r}: valid names are {', '.join(DATASET_NAMES)}, "
        f"or npz:/path/file.npz for your own data"
    )
