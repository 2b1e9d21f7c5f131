"""Datasets as in-memory tensors: ``load_dataset(name, root=None, ...) -> Dataset``.

Embedded (no files, no network):

- ``mnist1d`` (default): MNIST-1D generated locally by the ``mnist1d`` package with its default
  arguments (seed 42): 4000 train / 1000 test signals of 40 samples, 10 classes. The generator
  already standardizes the signals globally. Generated once per process (a few seconds).
- ``digits``: scikit-learn's bundled 8×8 handwritten digits (1797 images, pixels 0–16 scaled to
  ``[0, 1]``), a fixed stratified split of 1347 train / 450 test (``random_state=0``).

From a local folder ``root`` (never downloaded):

- ``mnist`` and ``fashion-mnist``: the four IDX files ``train-images-idx3-ubyte``,
  ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte`` (raw or
  ``.gz``) in ``root`` or in torchvision's ``root/MNIST/raw`` / ``root/FashionMNIST/raw``.
- ``cifar10``: the python pickle batches ``data_batch_1`` … ``data_batch_5`` and ``test_batch`` in
  ``root`` or ``root/cifar-10-batches-py``. They are unpickled with an allow-list that admits only
  numpy arrays and plain containers, so a tampered file cannot run code.

Images are scaled to ``[0, 1]``. ``shape`` chooses the input layout: ``"flat"`` (a vector),
``"image"`` (channels first, ``(C, H, W)``) or ``"sequence"`` (``(steps, features)`` for recurrent
nets: MNIST-1D as 40 steps of 1 value, grayscale images as rows). ``standardize`` uses training-set
statistics only: ``True``/``"feature"`` per input feature (constant features keep std 1, so they
become 0), ``"global"`` one mean and std over all training values.
"""

from __future__ import annotations

import codecs
import functools
import gzip
import io
import math
import os
import pickle
import random
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "DATASETS",
    "SHAPES",
    "Dataset",
    "DataFormatError",
    "load_dataset",
    "read_idx",
]

DATASETS = ("mnist1d", "digits", "mnist", "fashion-mnist", "cifar10")
SHAPES = ("flat", "image", "sequence")
STANDARDIZE = (False, True, "feature", "global")

DIGIT_NAMES = tuple(str(i) for i in range(10))
FASHION_NAMES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
CIFAR10_NAMES = (
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip

IDX_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
CIFAR10_FILES = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch",)
IDX_DTYPES = {
    0x08: (">u1", "unsigned byte"),
    0x09: (">i1", "signed byte"),
    0x0B: (">i2", "short"),
    0x0C: (">i4", "int"),
    0x0D: (">f4", "float"),
    0x0E: (">f8", "double"),
}
DIGITS_TEST_SIZE = 450
DIGITS_SPLIT_SEED = 0


class DataFormatError(ValueError):
    """A dataset file is corrupt, truncated or not in the expected format."""


@dataclass(frozen=True, repr=False)
class Dataset:
    """Train/test tensors (``float32`` inputs, ``int64`` labels) and their metadata.

    ``input_shape`` is the shape of one input (``x_train.shape[1:]``); ``feature_mean`` and
    ``feature_std`` are the training statistics used by ``standardize`` (``None`` when not
    standardized; shape ``input_shape`` per feature, ``()`` global).
    """

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    input_shape: tuple[int, ...]
    shape: str = "flat"
    classes: tuple[str, ...] = ()
    standardize: bool | str = False
    feature_mean: torch.Tensor | None = None
    feature_std: torch.Tensor | None = None

    @property
    def in_features(self) -> int:
        """Number of input features (the product of ``input_shape``), for ``build_mlp``."""
        return math.prod(self.input_shape)

    def __repr__(self) -> str:
        return (
            f"Dataset(name={self.name!r}, train={len(self.y_train)}, test={len(self.y_test)}, "
            f"input_shape={self.input_shape}, num_classes={self.num_classes}, "
            f"shape={self.shape!r}, standardize={self.standardize!r})"
        )


def _key(name: str) -> str:
    return name.lower().replace("_", "").replace("-", "")


_CANONICAL = {_key(n): n for n in DATASETS}
_SUPPORTED_SHAPES = {
    "mnist1d": ("flat", "sequence"),
    "digits": SHAPES,
    "mnist": SHAPES,
    "fashion-mnist": SHAPES,
    "cifar10": ("flat", "image"),
}


# --------------------------------------------------------------------------- argument checks


def _check_name(name) -> str:
    if not isinstance(name, str) or _key(name) not in _CANONICAL:
        raise ValueError(f"dataset {name!r} is not known; expected one of {DATASETS}")
    return _CANONICAL[_key(name)]


def _check_subset(subset) -> tuple[int | None, int | None]:
    def ok(n) -> bool:
        return n is None or (isinstance(n, int | np.integer) and not isinstance(n, bool) and n >= 1)

    if subset is None:
        return None, None
    if isinstance(subset, int | np.integer) and not isinstance(subset, bool) and ok(subset):
        return int(subset), int(subset)
    if isinstance(subset, Sequence) and not isinstance(subset, str) and len(subset) == 2:
        if all(ok(n) for n in subset):
            return tuple(None if n is None else int(n) for n in subset)
    raise ValueError(
        f"subset={subset!r} is not valid; expected None, an integer >= 1 (caps train and test) "
        "or a (train, test) pair of integers >= 1 or None"
    )


def _check_root(root, name: str) -> Path | None:
    if root is not None and not isinstance(root, str | os.PathLike):
        raise TypeError(f"root must be a path (str or os.PathLike), got {type(root).__name__}")
    if name in ("mnist1d", "digits"):
        return None  # embedded datasets; root is not used
    files = IDX_FILES if name != "cifar10" else CIFAR10_FILES
    if root is None:
        raise ValueError(
            f"dataset {name!r} is read from local files and needs root=<folder> holding "
            f"{', '.join(files)}; it is never downloaded"
        )
    path = Path(root).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(
            f"root folder {str(path)!r} for dataset {name!r} does not exist or is not a folder; "
            f"expected it to hold {', '.join(files)}"
        )
    return path


# --------------------------------------------------------------------------- file formats


def _read_bytes(path: Path) -> bytes:
    """File contents, gunzipped when the file starts with the gzip magic (whatever its name)."""
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise DataFormatError(f"{path}: cannot be read ({err})") from err
    if raw[:2] != b"\x1f\x8b":
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as err:
        raise DataFormatError(f"{path}: truncated or corrupt gzip stream ({err})") from err


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Parse one IDX file (raw or gzip) into a native-endian numpy array.

    Layout: two zero bytes, a dtype code (``0x08`` unsigned byte … ``0x0E`` double), the number
    of dimensions, one big-endian ``uint32`` size per dimension, then the data, big-endian.
    """
    path = Path(path)
    buf = _read_bytes(path)
    if len(buf) < 4:
        raise DataFormatError(f"{path}: {len(buf)} bytes is too short for an IDX header")
    if buf[0] != 0 or buf[1] != 0:
        raise DataFormatError(
            f"{path}: bad magic number 0x{buf[:4].hex()} (an IDX file starts with two zero bytes)"
        )
    code, ndim = buf[2], buf[3]
    if code not in IDX_DTYPES:
        raise DataFormatError(
            f"{path}: unknown IDX dtype code 0x{code:02X}; expected one of "
            f"{', '.join(f'0x{c:02X}' for c in IDX_DTYPES)}"
        )
    header = 4 + 4 * ndim
    if len(buf) < header:
        raise DataFormatError(f"{path}: truncated header ({len(buf)} bytes, need {header})")
    dims = tuple(int(d) for d in np.frombuffer(buf, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(IDX_DTYPES[code][0])
    expected = math.prod(dims) * dtype.itemsize
    found = len(buf) - header
    if found != expected:
        what = "truncated" if found < expected else "has trailing bytes"
        raise DataFormatError(
            f"{path}: {what}: header says {dims} × {dtype.itemsize} bytes = {expected} data bytes, "
            f"file holds {found}"
        )
    data = np.frombuffer(buf, dtype=dtype, offset=header).reshape(dims)
    return data.astype(dtype.newbyteorder("="))


def _find_files(folders: Sequence[Path], files: Sequence[str], name: str):
    """The first folder among ``folders`` holding every file (raw or ``.gz``) → ``{file: path}``."""
    for folder in folders:
        found = {}
        for file in files:
            for candidate in (folder / file, folder / f"{file}.gz"):
                if candidate.is_file():
                    found[file] = candidate
                    break
        if len(found) == len(files):
            return found
    first = folders[0]
    missing = [f for f in files if not (first / f).is_file() and not (first / f"{f}.gz").is_file()]
    others = ", ".join(str(f) for f in folders[1:])
    raise FileNotFoundError(
        f"dataset {name!r}: folder {str(first)!r} lacks {', '.join(missing)}; expected the files "
        f"{', '.join(files)} (raw or .gz)" + (f"; also looked in {others}" if others else "")
    )


def _idx_pair(images_path: Path, labels_path: Path, num_classes: int):
    images, labels = read_idx(images_path), read_idx(labels_path)
    for path, arr, ndim in ((images_path, images, 3), (labels_path, labels, 1)):
        if arr.dtype != np.uint8:
            raise DataFormatError(
                f"{path}: expected dtype code 0x08 (unsigned byte), found {arr.dtype.name}"
            )
        if arr.ndim != ndim:
            raise DataFormatError(f"{path}: expected {ndim} dimensions, found shape {arr.shape}")
    if len(images) != len(labels):
        raise DataFormatError(
            f"{images_path.name} holds {len(images)} images but {labels_path.name} holds "
            f"{len(labels)} labels"
        )
    if labels.size and labels.max() >= num_classes:
        raise DataFormatError(f"{labels_path}: label {labels.max()} is >= {num_classes} classes")
    return images[:, None].astype(np.float32) / 255.0, labels.astype(np.int64)


def _load_idx(root: Path, name: str):
    folders = [root, root / ("MNIST" if name == "mnist" else "FashionMNIST") / "raw"]
    paths = _find_files(folders, IDX_FILES, name)
    train = _idx_pair(paths[IDX_FILES[0]], paths[IDX_FILES[1]], 10)
    test = _idx_pair(paths[IDX_FILES[2]], paths[IDX_FILES[3]], 10)
    if train[0].shape[1:] != test[0].shape[1:]:
        raise DataFormatError(
            f"dataset {name!r}: train images are {train[0].shape[2:]} but test images are "
            f"{test[0].shape[2:]}"
        )
    return (*train, *test)


class _ArrayUnpickler(pickle.Unpickler):
    """Admit numpy arrays and plain Python containers only (no arbitrary code)."""

    def find_class(self, module: str, name: str):
        allowed = {
            ("numpy", "ndarray"): np.ndarray,
            ("numpy", "dtype"): np.dtype,
            ("_codecs", "encode"): codecs.encode,
        }
        if (module, name) in allowed:
            return allowed[(module, name)]
        if module in ("numpy.core.multiarray", "numpy._core.multiarray") and name in (
            "_reconstruct",
            "scalar",
        ):
            core = getattr(np, "_core", None) or np.core
            return getattr(core.multiarray, name)
        if module in ("numpy.core.numeric", "numpy._core.numeric") and name == "_frombuffer":
            core = getattr(np, "_core", None) or np.core
            return core.numeric._frombuffer
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _unpickle_batch(path: Path) -> dict:
    buf = _read_bytes(path)
    try:
        obj = _ArrayUnpickler(io.BytesIO(buf), encoding="bytes").load()
    except Exception as err:  # any unpickling failure is a format error of this file
        raise DataFormatError(f"{path}: not a readable CIFAR-10 pickle batch ({err})") from err
    if not isinstance(obj, dict):
        raise DataFormatError(f"{path}: expected a dict, found {type(obj).__name__}")
    batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}
    missing = [k for k in ("data", "labels") if k not in batch]
    if missing:
        raise DataFormatError(f"{path}: missing key(s) {missing}; found {sorted(map(str, batch))}")
    data = np.asarray(batch["data"])
    try:
        labels = np.asarray(batch["labels"], dtype=np.int64)
    except (TypeError, ValueError) as err:
        raise DataFormatError(f"{path}: labels are not integers ({err})") from err
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or data.dtype != np.uint8:
        raise DataFormatError(
            f"{path}: 'data' must be a uint8 array of shape (N, 3072), found "
            f"{data.dtype} {data.shape}"
        )
    if labels.ndim != 1 or len(labels) != len(data):
        raise DataFormatError(
            f"{path}: 'data' holds {len(data)} images but 'labels' holds {labels.size} labels"
        )
    if labels.size and (labels.min() < 0 or labels.max() >= 10):
        raise DataFormatError(
            f"{path}: labels must lie in 0..9, found {labels.min()}..{labels.max()}"
        )
    return {"data": data, "labels": labels}


def _load_cifar10(root: Path):
    paths = _find_files([root, root / "cifar-10-batches-py"], CIFAR10_FILES, "cifar10")
    batches = [_unpickle_batch(paths[f]) for f in CIFAR10_FILES]
    train, test = batches[:5], batches[5]

    def images(data: np.ndarray) -> np.ndarray:
        return data.reshape(-1, 3, 32, 32).astype(np.float32) / 255.0

    return (
        images(np.concatenate([b["data"] for b in train])),
        np.concatenate([b["labels"] for b in train]),
        images(test["data"]),
        test["labels"],
    )


# --------------------------------------------------------------------------- embedded datasets


@functools.cache
def _mnist1d_arrays() -> tuple[np.ndarray, ...]:
    """MNIST-1D from the package's local generator (never its download path), cached per process.

    The generator seeds Python's and numpy's global RNGs; their states are restored afterwards.
    """
    from mnist1d.data import get_dataset_args, make_dataset

    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        ds = make_dataset(get_dataset_args())
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
    arrays = (
        ds["x"].astype(np.float32),
        ds["y"].astype(np.int64),
        ds["x_test"].astype(np.float32),
        ds["y_test"].astype(np.int64),
    )
    for a in arrays:
        a.setflags(write=False)
    return arrays


def _load_digits():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    x = (bunch.data / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
    y = bunch.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=DIGITS_TEST_SIZE, stratify=y, random_state=DIGITS_SPLIT_SEED
    )
    return x_tr, y_tr, x_te, y_te


# --------------------------------------------------------------------------- public loader


def _layout(x: np.ndarray, name: str, shape: str) -> np.ndarray:
    """Reshape the native layout (``(N, 40)`` for MNIST-1D, ``(N, C, H, W)`` otherwise)."""
    n = len(x)
    if shape == "flat":
        return x.reshape(n, -1)
    if shape == "image":
        return x
    if name == "mnist1d":
        return x.reshape(n, -1, 1)
    return x.reshape(n, x.shape[2], -1)  # grayscale: rows are the time steps


def _take(x: np.ndarray, y: np.ndarray, cap: int | None, seed: int, stream: int):
    if cap is None or cap >= len(y):
        return x, y
    idx = np.sort(np.random.default_rng([seed, stream]).choice(len(y), size=cap, replace=False))
    return x[idx], y[idx]


def load_dataset(
    name: str = "mnist1d",
    root: str | os.PathLike | None = None,
    *,
    shape: str = "flat",
    standardize: bool | str = False,
    subset: int | tuple[int | None, int | None] | None = None,
    seed: int = 0,
) -> Dataset:
    """Load a dataset (see the module docstring) as float32/int64 tensors on the CPU.

    ``subset`` caps the sizes for quick runs: an int caps train and test, a ``(train, test)`` pair
    caps each (``None`` = all); the kept samples are a random subset drawn with ``seed``, in their
    original order. Standardization statistics come from the (subsetted) training set.
    """
    name = _check_name(name)
    if shape not in SHAPES:
        raise ValueError(f"shape={shape!r} is not known; expected one of {SHAPES}")
    if shape not in _SUPPORTED_SHAPES[name]:
        raise ValueError(
            f"dataset {name!r} does not support shape={shape!r}; use one of "
            f"{_SUPPORTED_SHAPES[name]}"
        )
    if not any(standardize is s or (isinstance(s, str) and standardize == s) for s in STANDARDIZE):
        raise ValueError(f"standardize={standardize!r} is not known; expected one of {STANDARDIZE}")
    if not isinstance(seed, int | np.integer) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
    cap_train, cap_test = _check_subset(subset)
    folder = _check_root(root, name)

    if name == "mnist1d":
        x_tr, y_tr, x_te, y_te = _mnist1d_arrays()
    elif name == "digits":
        x_tr, y_tr, x_te, y_te = _load_digits()
    elif name == "cifar10":
        x_tr, y_tr, x_te, y_te = _load_cifar10(folder)
    else:
        x_tr, y_tr, x_te, y_te = _load_idx(folder, name)

    x_tr, y_tr = _take(x_tr, y_tr, cap_train, seed, 0)
    x_te, y_te = _take(x_te, y_te, cap_test, seed, 1)
    x_tr, x_te = _layout(x_tr, name, shape), _layout(x_te, name, shape)

    mean = std = None
    mode: bool | str = False
    if standardize is not False and len(x_tr):
        mode = "global" if standardize == "global" else "feature"
        x64 = x_tr.astype(np.float64)
        if mode == "global":
            mean, std = np.asarray(x64.mean()), np.asarray(x64.std())
        else:
            mean, std = x64.mean(axis=0), x64.std(axis=0)
        std = np.where(std > 1e-8, std, 1.0)
        x_tr = ((x_tr - mean) / std).astype(np.float32)
        x_te = ((x_te - mean) / std).astype(np.float32)
        mean, std = torch.tensor(mean, dtype=torch.float32), torch.tensor(std, dtype=torch.float32)

    classes = {"fashion-mnist": FASHION_NAMES, "cifar10": CIFAR10_NAMES}.get(name, DIGIT_NAMES)

    def tensor(a: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
        return torch.tensor(np.ascontiguousarray(a), dtype=dtype)

    return Dataset(
        name=name,
        x_train=tensor(x_tr, torch.float32),
        y_train=tensor(y_tr, torch.int64),
        x_test=tensor(x_te, torch.float32),
        y_test=tensor(y_te, torch.int64),
        num_classes=len(classes),
        input_shape=tuple(x_tr.shape[1:]),
        shape=shape,
        classes=classes,
        standardize=mode,
        feature_mean=mean,
        feature_std=std,
    )
