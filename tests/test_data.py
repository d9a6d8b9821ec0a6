"""gpuconv.data: the IDX parser (against files written byte by byte here), MNIST loading, the
digits split, standardisation and mini-batches."""
import gzip
import struct

import numpy as np
import pytest

from gpuconv import data as D


# ---------------------------------------------------------------------------------------------
# IDX
# ---------------------------------------------------------------------------------------------
def test_read_idx_of_hand_written_bytes(tmp_path):
    # the format spelt out independently of write_idx: magic 0 0 <type> <ndim>, big-endian
    # uint32 sizes, big-endian data
    path = tmp_path / "u8.idx"
    path.write_bytes(b"\x00\x00\x08\x03" + struct.pack(">3I", 2, 3, 4) + bytes(range(24)))
    a = D.read_idx(path)
    assert a.dtype == np.uint8
    np.testing.assert_array_equal(a, np.arange(24).reshape(2, 3, 4))

    values = [-2, 300, -32768, 7]
    path = tmp_path / "i16.idx"
    path.write_bytes(b"\x00\x00\x0b\x01" + struct.pack(">I", 4) + struct.pack(">4h", *values))
    a = D.read_idx(path)
    assert a.dtype == np.int16 and a.dtype.isnative
    assert a.tolist() == values

    path = tmp_path / "f64.idx"
    path.write_bytes(b"\x00\x00\x0e\x02" + struct.pack(">2I", 1, 2) + struct.pack(">2d", 1.5, -3))
    assert D.read_idx(path).tolist() == [[1.5, -3.0]]


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.int32, np.float32,
                                   np.float64])
@pytest.mark.parametrize("name", ["a.idx", "a.idx.gz"])
def test_idx_round_trip(tmp_path, dtype, name):
    rng = np.random.default_rng(0)
    a = (rng.standard_normal((3, 5, 4)) * 50).astype(dtype)
    D.write_idx(tmp_path / name, a)
    raw = (tmp_path / name).read_bytes()
    assert raw[:2] == (b"\x1f\x8b" if name.endswith(".gz") else b"\x00\x00")
    b = D.read_idx(tmp_path / name)
    assert b.dtype == a.dtype and b.dtype.isnative
    np.testing.assert_array_equal(b, a)


def test_read_idx_detects_gzip_by_content(tmp_path):
    # a compressed file whose name does not say so (renamed downloads)
    path = tmp_path / "labels-idx1-ubyte"
    path.write_bytes(gzip.compress(b"\x00\x00\x08\x01" + struct.pack(">I", 3) + b"\x07\x00\x09"))
    assert D.read_idx(path).tolist() == [7, 0, 9]


@pytest.mark.parametrize("content,match", [
    (b"\x01\x00\x08\x01\x00\x00\x00\x01\x05", "not an IDX file"),
    (b"\x00\x00\x07\x01\x00\x00\x00\x01\x05", "unknown IDX data type 0x07"),
    (b"\x00\x00\x08\x02\x00\x00\x00\x01", "truncated IDX header"),
    (b"\x00\x00\x08\x01\x00\x00\x00\x03\x05\x06", r"shape \(3,\) \(3 bytes.*holds 2 bytes"),
    (b"\x00\x00\x08\x01\x00\x00\x00\x01\x05\x06", "holds 2 bytes"),
    (b"\x00", "not an IDX file"),
])
def test_read_idx_rejects_bad_files(tmp_path, content, match):
    path = tmp_path / "bad.idx"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=match):
        D.read_idx(path)


def test_write_idx_rejects_dtypes_idx_cannot_hold(tmp_path):
    with pytest.raises(TypeError, match="IDX cannot store dtype int64"):
        D.write_idx(tmp_path / "x.idx", np.zeros(3, np.int64))


# ---------------------------------------------------------------------------------------------
# MNIST from a directory
# ---------------------------------------------------------------------------------------------
def write_fake_mnist(directory, n_train=12, n_test=5, size=6, gz=True, seed=0):
    rng = np.random.default_rng(seed)
    parts = {"train-images-idx3-ubyte": rng.integers(0, 256, (n_train, size, size), np.uint8),
             "train-labels-idx1-ubyte": rng.integers(0, 10, n_train).astype(np.uint8),
             "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, size, size), np.uint8),
             "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test).astype(np.uint8)}
    parts["train-labels-idx1-ubyte"][0] = 9  # so the class count is 10 whatever was drawn
    for stem, a in parts.items():
        D.write_idx(directory / (stem + (".gz" if gz else "")), a)
    return parts


@pytest.mark.parametrize("gz", [True, False])
def test_load_mnist(tmp_path, gz):
    parts = write_fake_mnist(tmp_path, gz=gz)
    s = D.load_mnist(tmp_path)
    assert s.x_train.shape == (12, 1, 6, 6) and s.x_test.shape == (5, 1, 6, 6)
    assert s.x_train.dtype == np.float32 and s.y_train.dtype == np.int64
    np.testing.assert_allclose(s.x_train[:, 0], parts["train-images-idx3-ubyte"] / 255.0,
                               rtol=1e-6)
    np.testing.assert_array_equal(s.y_test, parts["t10k-labels-idx1-ubyte"])
    assert s.classes == 10


def test_load_mnist_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte"):
        D.load_mnist(tmp_path)
    write_fake_mnist(tmp_path)
    D.write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.zeros(4, np.uint8))  # 5 images
    with pytest.raises(ValueError, match="test images .* and labels .* do not match"):
        D.load_mnist(tmp_path)


# ---------------------------------------------------------------------------------------------
# digits, standardisation, batches
# ---------------------------------------------------------------------------------------------
def test_digits_split_is_fixed_disjoint_and_complete():
    pytest.importorskip("sklearn")
    np.random.seed(123)  # the global NumPy state must not matter
    a = D.load_digits()
    np.random.seed(456)
    b = D.load_digits()
    np.testing.assert_array_equal(a.x_test, b.x_test)
    np.testing.assert_array_equal(a.y_train, b.y_train)
    n_train, n_test = len(a.y_train), len(a.y_test)
    assert n_train + n_test == 1797 and abs(n_test - 0.2 * 1797) <= 1
    assert a.x_train.shape == (n_train, 1, 8, 8) and a.x_train.dtype == np.float32
    assert a.x_train.min() >= 0 and a.x_train.max() <= 1
    # a partition: train + test hold each of the 1,797 (image, label) pairs exactly once
    from sklearn.datasets import load_digits
    full = load_digits()
    flat = lambda x, y: np.column_stack([x.reshape(len(x), -1) * 16, y])  # noqa: E731
    got = flat(np.concatenate([a.x_train, a.x_test]), np.concatenate([a.y_train, a.y_test]))
    want = flat(full.images / 16, full.target)
    np.testing.assert_array_equal(np.unique(got, axis=0, return_counts=True)[1],
                                  np.unique(want, axis=0, return_counts=True)[1])
    np.testing.assert_allclose(np.unique(got, axis=0), np.unique(want, axis=0), atol=1e-5)
    assert set(np.unique(a.y_test)) == set(range(10))


def test_missing_sklearn_names_the_extra(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "sklearn.datasets", None)
    with pytest.raises(ImportError, match=r"pip install gpuconv\[digits\]"):
        D.load_digits()


def test_standardize_uses_training_statistics_only():
    rng = np.random.default_rng(0)
    s = D.Split(rng.uniform(2, 4, (50, 1, 3, 3)).astype(np.float32), np.zeros(50, np.int64),
                rng.uniform(10, 12, (20, 1, 3, 3)).astype(np.float32), np.zeros(20, np.int64),
                classes=2)
    t = D.standardize(s)
    assert abs(t.x_train.mean()) < 1e-5 and abs(t.x_train.std() - 1) < 1e-5
    # the test split is shifted by the train mean, not its own: far from zero mean
    expected = (s.x_test - s.x_train.mean(dtype=np.float64)) / s.x_train.std(dtype=np.float64)
    np.testing.assert_allclose(t.x_test, expected, rtol=1e-5)
    assert t.x_test.dtype == np.float32


def test_minibatches_cover_every_index_once():
    batches = list(D.minibatches(10, 4))
    assert [len(b) for b in batches] == [4, 4, 2]
    np.testing.assert_array_equal(np.concatenate(batches), np.arange(10))
    shuffled = list(D.minibatches(10, 3, np.random.default_rng(5)))
    assert sorted(np.concatenate(shuffled).tolist()) == list(range(10))
    again = list(D.minibatches(10, 3, np.random.default_rng(5)))
    assert all(np.array_equal(a, b) for a, b in zip(shuffled, again))
    assert not np.array_equal(np.concatenate(shuffled), np.arange(10))
