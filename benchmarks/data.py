"""Real data that ships in packages: nothing is downloaded at run time.

* Fashion-MNIST (Xiao et al. 2017, https://arxiv.org/abs/1708.07747) from the Debian package
  ``dataset-fashion-mnist``: four gzip-compressed IDX files under
  ``/usr/share/datasets/fashion-mnist``.
* The 8x8 handwritten digits of scikit-learn (``sklearn.datasets.load_digits``), used only as a
  fallback and only when scikit-learn is already importable.

Every loader returns a :class:`Dataset`: float32 images of shape ``(N, 1, H, W)``, standardized
to zero mean and unit variance with statistics of the training split, and int64 labels.
"""

from __future__ import annotations

import gzip
import os
import warnings
from pathlib import Path
from typing import Literal, NamedTuple

import numpy as np
import torch

__all__ = [
    "FASHION_DIR",
    "FASHION_MEAN",
    "FASHION_STD",
    "DataUnavailableError",
    "Dataset",
    "load_digits",
    "load_fashion_mnist",
    "load_image_dataset",
    "read_idx",
]

#: where the Debian package puts the files; the ``GRADZIP_FASHION_DIR`` variable overrides it
FASHION_DIR = Path(os.environ.get("GRADZIP_FASHION_DIR", "/usr/share/datasets/fashion-mnist"))
#: mean and standard deviation of all training pixels after scaling to [0, 1]
#: (measured on the packaged training file; ``tests/benchmarks/test_data.py`` re-measures them)
FASHION_MEAN = 0.2860
FASHION_STD = 0.3530

_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
# IDX type codes (third byte of the magic number) -> numpy dtype; multi-byte values big-endian
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}

Split = Literal["train", "test"]


class DataUnavailableError(FileNotFoundError):
    """A data set is not installed; the message says which package provides it."""


class Dataset(NamedTuple):
    """Images ``x`` (float32, N x 1 x H x W, standardized) and labels ``y`` (int64, N)."""

    x: torch.Tensor
    y: torch.Tensor
    name: str
    num_classes: int


def read_idx(path: str | Path, limit: int | None = None) -> np.ndarray:
    """Read a gzip-compressed IDX file (the MNIST file format) into a numpy array.

    ``limit`` keeps only the first ``limit`` items along the first axis (read no further).
    """
    with gzip.open(path, "rb") as f:
        header = f.read(4)
        if len(header) != 4 or header[0] != 0 or header[1] != 0 or header[2] not in _IDX_DTYPES:
            raise ValueError(f"{path} is not an IDX file (magic bytes {header.hex()})")
        ndim = header[3]
        dims = [int.from_bytes(f.read(4), "big") for _ in range(ndim)]
        if limit is not None:
            if limit < 0:
                raise ValueError(f"limit must be >= 0 or None, got {limit}")
            dims[0] = min(dims[0], limit)
        dtype = np.dtype(_IDX_DTYPES[header[2]])
        count = int(np.prod(dims)) if dims else 1
        raw = f.read(count * dtype.itemsize)
    if len(raw) != count * dtype.itemsize:
        raise ValueError(f"{path} is truncated: expected {count} items of shape {dims}")
    return np.frombuffer(raw, dtype=dtype).reshape(dims)


def _missing(what: str, path: Path) -> DataUnavailableError:
    return DataUnavailableError(
        f"{what} not found at {path}. Install the Debian package that ships it: "
        "`apt-get install dataset-fashion-mnist` (or `make data`), or point "
        "GRADZIP_FASHION_DIR at a folder with the four *-ubyte.gz files. For the small 8x8 "
        "digits fallback instead, install scikit-learn (`pip install scikit-learn`)."
    )


def load_fashion_mnist(
    split: Split = "train", limit: int | None = None, root: str | Path | None = None
) -> Dataset:
    """Fashion-MNIST (https://arxiv.org/abs/1708.07747): 28x28 grey images of 10 clothing kinds.

    ``split`` is "train" (60000 images) or "test" (10000); ``limit`` keeps the first ``limit``.
    """
    if split not in _FILES:
        raise ValueError(f"split must be one of {sorted(_FILES)}, got {split!r}")
    folder = Path(root) if root is not None else FASHION_DIR
    image_file, label_file = (folder / name for name in _FILES[split])
    for path in (image_file, label_file):
        if not path.is_file():
            raise _missing(f"Fashion-MNIST {split} file {path.name}", folder)
    images = read_idx(image_file, limit)
    labels = read_idx(label_file, limit)
    if images.ndim != 3 or labels.shape != images.shape[:1]:
        raise ValueError(
            f"Fashion-MNIST {split}: {images.shape[0]} images of shape {images.shape[1:]} "
            f"do not match {labels.shape} labels"
        )
    x = torch.from_numpy(images.astype(np.float32)).unsqueeze(1)
    x = (x / 255.0 - FASHION_MEAN) / FASHION_STD
    y = torch.from_numpy(labels.astype(np.int64))
    return Dataset(x, y, "fashion-mnist", 10)


def load_digits(
    split: Split = "train", limit: int | None = None, test_fraction: float = 0.2
) -> Dataset:
    """scikit-learn's 8x8 digits (1797 images, 10 classes), split by a fixed permutation.

    Only for machines without Fashion-MNIST; needs scikit-learn (not installed by gradzip).
    """
    try:
        from sklearn.datasets import load_digits as sk_load_digits
    except ImportError:
        raise DataUnavailableError(
            "the 8x8 digits need scikit-learn (`pip install scikit-learn`); Fashion-MNIST needs "
            "`apt-get install dataset-fashion-mnist`"
        ) from None
    if split not in _FILES:
        raise ValueError(f"split must be one of {sorted(_FILES)}, got {split!r}")
    bunch = sk_load_digits()
    images = np.asarray(bunch.images, dtype=np.float32) / 16.0
    labels = np.asarray(bunch.target, dtype=np.int64)
    order = np.random.default_rng(0).permutation(len(labels))
    n_test = round(len(labels) * test_fraction)
    idx = order[n_test:] if split == "train" else order[:n_test]
    train_pixels = images[order[n_test:]]
    mean, std = float(train_pixels.mean()), float(train_pixels.std())
    idx = idx[:limit] if limit is not None else idx
    x = (torch.from_numpy(images[idx]).unsqueeze(1) - mean) / std
    return Dataset(x, torch.from_numpy(labels[idx]), "digits", 10)


def load_image_dataset(
    split: Split = "train", limit: int | None = None, fallback: bool = True
) -> Dataset:
    """Fashion-MNIST, or (``fallback``, scikit-learn importable) the 8x8 digits with a warning."""
    try:
        return load_fashion_mnist(split, limit)
    except DataUnavailableError as err:
        if not fallback:
            raise
        try:
            data = load_digits(split, limit)
        except DataUnavailableError:
            raise err from None
        warnings.warn(f"{err} Falling back to scikit-learn's 8x8 digits.", stacklevel=2)
        return data
