"""Data for the training command: scikit-learn's 8x8 digits, MNIST IDX files, mini-batches.

Images come back as float arrays (N, 1, H, W), labels as int64 (N,). ``standardize`` scales with
the training split's statistics only, so nothing about the test split leaks into training.

IDX format (LeCun's, used by MNIST): a big-endian header ``0x00 0x00 <type> <ndim>``, then
``ndim`` big-endian uint32 sizes, then the data in C order, big-endian. Type codes: 0x08 uint8,
0x09 int8, 0x0B int16, 0x0C int32, 0x0D float32, 0x0E float64. Files may be gzip-compressed.
"""
from __future__ import annotations

from dataclasses import dataclass
import gzip
import os
import struct

import numpy as np

__all__ = ["read_idx", "write_idx", "Split", "load_digits", "load_mnist", "standardize",
           "minibatches", "DIGITS_SPLIT_SEED"]

# IDX type code -> big-endian dtype
IDX_DTYPES = {0x08: np.dtype(">u1"), 0x09: np.dtype(">i1"), 0x0B: np.dtype(">i2"),
              0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}

# The digits test split is a property of the data set, not of a run: a fixed permutation, so
# accuracies from runs with different --seed values are measured on the same 20%.
DIGITS_SPLIT_SEED = 0


# ---------------------------------------------------------------------------------------------
# IDX files
# ---------------------------------------------------------------------------------------------
def _open(path):
    with open(path, "rb") as f:
        gz = f.read(2) == b"\x1f\x8b"  # gzip's magic number, whatever the file is called
    return gzip.open(path, "rb") if gz else open(path, "rb")


def read_idx(path):
    """The array stored in IDX file `path` (gzip-compressed or not), in native byte order.

    ValueError, naming the file, for a bad magic number, an unknown type code or a size that
    does not match the header.
    """
    with _open(path) as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{path}: not an IDX file (the first two bytes must be zero)")
    code, ndim = raw[2], raw[3]
    if code not in IDX_DTYPES:
        raise ValueError(f"{path}: unknown IDX data type 0x{code:02X}")
    head = 4 + 4 * ndim
    if len(raw) < head:
        raise ValueError(f"{path}: truncated IDX header ({ndim} dimensions announced)")
    shape = struct.unpack(f">{ndim}I", raw[4:head])
    dtype = IDX_DTYPES[code]
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) - head != expected:
        raise ValueError(f"{path}: header says shape {shape} ({expected} bytes of data) but "
                         f"the file holds {len(raw) - head} bytes")
    data = np.frombuffer(raw, dtype=dtype, offset=head).reshape(shape)
    return data.astype(dtype.newbyteorder("="))


def write_idx(path, array):
    """Writes `array` as an IDX file (gzip-compressed when `path` ends in .gz)."""
    array = np.asarray(array)
    for code, dt in IDX_DTYPES.items():
        if dt.newbyteorder("=") == array.dtype.newbyteorder("="):
            break
    else:
        raise TypeError(f"IDX cannot store dtype {array.dtype}; use one of "
                        f"{', '.join(str(d.newbyteorder('=')) for d in IDX_DTYPES.values())}")
    if array.ndim > 255:
        raise ValueError("IDX stores at most 255 dimensions")
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    body = np.ascontiguousarray(array, dtype=dt).tobytes()
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(header + body)


# ---------------------------------------------------------------------------------------------
# data sets
# ---------------------------------------------------------------------------------------------
@dataclass
class Split:
    """Training and test images (N, 1, H, W) float, labels (N,) int64, and the class count."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    classes: int
    name: str = ""


def load_digits(test_fraction=0.2, dtype=np.float32):
    """scikit-learn's bundled 8x8 digits (1,797 images, values 0..16; no download).

    The test split is the last `test_fraction` of a permutation with the fixed seed
    DIGITS_SPLIT_SEED. Pixels are scaled to [0, 1] (not standardised: see :func:`standardize`).
    ImportError with the install command where scikit-learn is missing.
    """
    try:
        from sklearn.datasets import load_digits as sk_load_digits
    except ImportError as e:
        raise ImportError("the digits data set needs scikit-learn: pip install gpuconv[digits]"
                          ) from e
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction!r}")
    d = sk_load_digits()
    x = (d.images / 16.0).astype(dtype)[:, None]  # (1797, 1, 8, 8)
    y = d.target.astype(np.int64)
    order = np.random.default_rng(DIGITS_SPLIT_SEED).permutation(len(y))
    n_test = int(round(len(y) * test_fraction))
    train, test = order[:-n_test], order[-n_test:]
    return Split(x[train], y[train], x[test], y[test], classes=10, name="digits 8x8")


MNIST_FILES = {"x_train": "train-images-idx3-ubyte", "y_train": "train-labels-idx1-ubyte",
               "x_test": "t10k-images-idx3-ubyte", "y_test": "t10k-labels-idx1-ubyte"}


def _find(directory, stem):
    # the usual spellings: as distributed (.gz), unpacked, and with '.' before idx (Kaggle's)
    for name in (stem, stem + ".gz", stem.replace("-idx", ".idx"),
                 stem.replace("-idx", ".idx") + ".gz"):
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"{directory}: no {stem} or {stem}.gz (MNIST IDX files expected: "
                            f"{', '.join(MNIST_FILES.values())})")


def load_mnist(directory, dtype=np.float32):
    """MNIST (or any IDX set laid out like it, e.g. Fashion-MNIST) from `directory`.

    Images are scaled from 0..255 to [0, 1]; ValueError where images and labels disagree.
    """
    arrays = {k: read_idx(_find(directory, stem)) for k, stem in MNIST_FILES.items()}
    for part in ("train", "test"):
        x, y = arrays["x_" + part], arrays["y_" + part]
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
            raise ValueError(f"{directory}: {part} images {x.shape} and labels {y.shape} do not "
                             "match (expected (N, H, W) and (N,))")
    classes = int(max(arrays["y_train"].max(), arrays["y_test"].max())) + 1
    return Split(*((arrays[k] / 255.0).astype(dtype)[:, None] if k[0] == "x"
                   else arrays[k].astype(np.int64) for k in MNIST_FILES),
                 classes=classes, name=f"MNIST-format IDX from {directory}")


def standardize(split: Split) -> Split:
    """Zero mean, unit variance, with the training split's mean and std for both splits."""
    mean = split.x_train.mean(dtype=np.float64)
    std = split.x_train.std(dtype=np.float64) or 1.0
    dt = split.x_train.dtype
    scale = lambda x: ((x - mean) / std).astype(dt)  # noqa: E731
    return Split(scale(split.x_train), split.y_train, scale(split.x_test), split.y_test,
                 split.classes, split.name)


def minibatches(n, batch_size, rng=None):
    """Index arrays covering range(n) in batches of `batch_size` (the last may be smaller);
    shuffled by `rng` (a numpy Generator) when given."""
    order = rng.permutation(n) if rng is not None else np.arange(n)
    for start in range(0, n, batch_size):
        yield order[start:start + batch_size]
