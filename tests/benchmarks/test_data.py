"""The data loaders on the real packaged files (and their errors when files are missing)."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks import data
from benchmarks.data import (
    FASHION_MEAN,
    FASHION_STD,
    DataUnavailableError,
    load_digits,
    load_fashion_mnist,
    load_image_dataset,
    read_idx,
)

FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz")


def test_test_split_shapes_dtypes_labels() -> None:
    d = load_fashion_mnist("test")
    assert d.x.shape == (10000, 1, 28, 28) and d.x.dtype == torch.float32
    assert d.y.shape == (10000,) and d.y.dtype == torch.int64
    assert int(d.y.min()) == 0 and int(d.y.max()) == 9 == d.num_classes - 1
    assert torch.bincount(d.y).min() > 500  # all ten classes, near balanced
    # standardized with the training statistics: close to zero mean, unit variance
    assert abs(float(d.x.mean())) < 0.05 and abs(float(d.x.std()) - 1) < 0.05
    assert bool(torch.isfinite(d.x).all())


def test_limit_reads_a_prefix_of_the_training_split() -> None:
    small = load_fashion_mnist("train", limit=7)
    more = load_fashion_mnist("train", limit=300)
    assert small.x.shape == (7, 1, 28, 28) and more.y.shape == (300,)
    assert torch.equal(small.x, more.x[:7]) and torch.equal(small.y, more.y[:7])
    assert int(more.y.min()) >= 0 and int(more.y.max()) <= 9


def test_normalization_constants_match_the_training_file() -> None:
    pixels = read_idx(data.FASHION_DIR / FILES[0])
    assert pixels.shape == (60000, 28, 28) and pixels.dtype == np.uint8
    counts = np.bincount(pixels.ravel(), minlength=256)  # exact statistics of uint8 pixels
    values = np.arange(256) / 255.0
    mean = float(counts @ values) / counts.sum()
    std = float(np.sqrt(counts @ (values - mean) ** 2 / counts.sum()))
    assert abs(mean - FASHION_MEAN) < 1e-3 and abs(std - FASHION_STD) < 1e-3


def _write(path: Path, payload: bytes) -> Path:
    with gzip.open(path, "wb") as f:
        f.write(payload)
    return path


def test_read_idx_round_trip_and_bad_files(tmp_path: Path) -> None:
    arr = np.arange(24, dtype=">i4").reshape(2, 3, 4)
    header = bytes([0, 0, 0x0C, 3]) + b"".join(n.to_bytes(4, "big") for n in arr.shape)
    good = _write(tmp_path / "good.gz", header + arr.tobytes())
    np.testing.assert_array_equal(read_idx(good), arr)
    np.testing.assert_array_equal(read_idx(good, limit=1), arr[:1])
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(_write(tmp_path / "bad.gz", b"\x01\x02\x03\x04" + arr.tobytes()))
    with pytest.raises(ValueError, match="truncated"):
        read_idx(_write(tmp_path / "short.gz", header + arr.tobytes()[:-4]))
    with pytest.raises(ValueError, match="limit"):
        read_idx(good, limit=-1)


def test_missing_files_name_the_package(tmp_path: Path) -> None:
    with pytest.raises(DataUnavailableError, match="dataset-fashion-mnist"):
        load_fashion_mnist("test", root=tmp_path)
    with pytest.raises(ValueError, match="split"):
        load_fashion_mnist("valid")  # type: ignore[arg-type]


def _sklearn_importable() -> bool:
    try:
        import sklearn.datasets  # noqa: F401
    except ImportError:
        return False
    return True


def test_digits_fallback_loads_or_names_scikit_learn(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(data, "FASHION_DIR", tmp_path)  # no Fashion-MNIST here
    if _sklearn_importable():
        train, test = load_digits("train"), load_digits("test")
        assert train.x.shape[1:] == (1, 8, 8) and len(train.y) + len(test.y) == 1797
        with pytest.warns(UserWarning, match="digits"):
            assert load_image_dataset("test").name == "digits"
    else:
        with pytest.raises(DataUnavailableError, match="scikit-learn"):
            load_digits()
        with pytest.raises(DataUnavailableError, match="dataset-fashion-mnist"):
            load_image_dataset("test")
    with pytest.raises(DataUnavailableError):
        load_image_dataset("test", fallback=False)
