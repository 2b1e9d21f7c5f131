"""Dataset loaders: embedded MNIST-1D and digits, IDX and CIFAR-10 files built in tmp_path."""

import gzip
import os
import pickle
import random
import struct

import numpy as np
import pytest
import torch

from lcw_analysis import data as data_module
from lcw_analysis.data import (
    CIFAR10_FILES,
    DATASETS,
    IDX_FILES,
    DataFormatError,
    Dataset,
    load_dataset,
    read_idx,
)

# --------------------------------------------------------------------------- file builders


def idx_bytes(arr: np.ndarray, code: int = 0x08, dims=None) -> bytes:
    dtype = dict((c, d) for c, (d, _) in data_module.IDX_DTYPES.items())[code]
    dims = arr.shape if dims is None else dims
    header = bytes([0, 0, code, len(dims)]) + struct.pack(f">{len(dims)}I", *dims)
    return header + arr.astype(dtype).tobytes()


def make_idx_folder(folder, n_train=6, n_test=4, rows=4, cols=5, compress=False, seed=0):
    """Tiny MNIST-format files; returns the arrays written."""
    rng = np.random.default_rng(seed)
    arrays = {
        IDX_FILES[0]: rng.integers(0, 256, (n_train, rows, cols), dtype=np.uint8),
        IDX_FILES[1]: (np.arange(n_train) % 10).astype(np.uint8),
        IDX_FILES[2]: rng.integers(0, 256, (n_test, rows, cols), dtype=np.uint8),
        IDX_FILES[3]: (np.arange(n_test)[::-1] % 10).astype(np.uint8),
    }
    folder.mkdir(parents=True, exist_ok=True)
    for file, arr in arrays.items():
        raw = idx_bytes(arr)
        if compress:
            (folder / f"{file}.gz").write_bytes(gzip.compress(raw))
        else:
            (folder / file).write_bytes(raw)
    return arrays


def cifar_batch(n: int, seed: int, protocol: int = 2, str_keys: bool = False) -> bytes:
    rng = np.random.default_rng(seed)
    batch = {
        b"batch_label": b"training batch",
        b"labels": [int(v) for v in rng.integers(0, 10, n)],
        b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        b"filenames": [b"img.png"] * n,
    }
    if str_keys:
        batch = {k.decode(): v for k, v in batch.items()}
    return pickle.dumps(batch, protocol=protocol)


def make_cifar_folder(folder, n=2, protocol=2):
    folder.mkdir(parents=True, exist_ok=True)
    for i, file in enumerate(CIFAR10_FILES):
        (folder / file).write_bytes(cifar_batch(n, seed=i, protocol=protocol))


# --------------------------------------------------------------------------- embedded datasets


def test_mnist1d_is_generated_locally_with_the_paper_split_and_leaves_global_rngs_alone():
    data_module._mnist1d_arrays.cache_clear()
    np.random.seed(123)
    random.seed(123)
    before = (np.random.random(), random.random())
    np.random.seed(123)
    random.seed(123)
    ds = load_dataset()
    assert (np.random.random(), random.random()) == before
    assert isinstance(ds, Dataset) and ds.name == "mnist1d"
    assert ds.x_train.shape == (4000, 40) and ds.x_test.shape == (1000, 40)
    assert ds.y_train.shape == (4000,) and ds.y_test.shape == (1000,)
    assert ds.x_train.dtype == torch.float32 and ds.y_train.dtype == torch.int64
    assert ds.num_classes == 10 and ds.input_shape == (40,) and ds.in_features == 40
    assert set(ds.y_train.tolist()) == set(range(10))
    assert abs(float(ds.x_train.mean())) < 0.05  # the generator standardizes globally
    again = load_dataset("MNIST1D")
    assert torch.equal(again.x_train, ds.x_train) and torch.equal(again.y_test, ds.y_test)


def test_mnist1d_as_a_sequence_of_40_steps():
    ds = load_dataset("mnist1d", shape="sequence")
    assert ds.x_train.shape == (4000, 40, 1) and ds.input_shape == (40, 1)
    flat = load_dataset("mnist1d")
    assert torch.equal(ds.x_train[:, :, 0], flat.x_train)
    with pytest.raises(ValueError, match="does not support shape='image'"):
        load_dataset("mnist1d", shape="image")


def test_digits_fixed_stratified_split_and_layouts():
    ds = load_dataset("digits")
    assert ds.x_train.shape == (1347, 64) and ds.x_test.shape == (450, 64)
    assert 0.0 <= float(ds.x_train.min()) and float(ds.x_train.max()) <= 1.0
    counts = torch.bincount(ds.y_test, minlength=10).double()
    everything = torch.bincount(torch.cat([ds.y_train, ds.y_test]), minlength=10).double()
    assert torch.all((counts - everything * 450 / 1797).abs() <= 1)  # stratified
    assert torch.equal(load_dataset("digits").x_test, ds.x_test)  # fixed split
    image = load_dataset("digits", shape="image")
    seq = load_dataset("digits", shape="sequence")
    assert image.x_train.shape == (1347, 1, 8, 8) and image.input_shape == (1, 8, 8)
    assert seq.x_train.shape == (1347, 8, 8)
    assert torch.equal(image.x_train.reshape(1347, -1), ds.x_train)
    assert torch.equal(seq.x_train, image.x_train[:, 0])  # rows are the time steps
    assert "train=1347" in repr(ds)


def test_standardize_per_feature_uses_training_statistics_only():
    raw = load_dataset("digits")
    ds = load_dataset("digits", standardize=True)
    assert ds.standardize == "feature" and ds.feature_mean.shape == (64,)
    varying = raw.x_train.std(0) > 0
    assert torch.allclose(ds.x_train.mean(0), torch.zeros(64), atol=1e-5)
    assert torch.allclose(ds.x_train.std(0, unbiased=False)[varying], torch.ones(1), atol=1e-4)
    assert torch.all(ds.x_train[:, ~varying] == 0)  # constant features: std kept at 1
    restored = ds.x_test * ds.feature_std + ds.feature_mean
    assert torch.allclose(restored, raw.x_test, atol=1e-5)
    assert abs(float(ds.x_test.mean())) > 1e-4  # test set not re-centered on itself


def test_standardize_global_keeps_one_mean_and_std():
    raw = load_dataset("digits", shape="image")
    ds = load_dataset("digits", shape="image", standardize="global")
    assert ds.feature_mean.shape == () and ds.feature_std.shape == ()
    assert abs(float(ds.x_train.mean())) < 1e-5
    assert abs(float(ds.x_train.std(unbiased=False)) - 1) < 1e-4
    assert torch.allclose(ds.x_test * ds.feature_std + ds.feature_mean, raw.x_test, atol=1e-5)


def test_subset_caps_sizes_deterministically():
    full = load_dataset("digits")
    ds = load_dataset("digits", subset=100)
    assert len(ds.y_train) == 100 and len(ds.y_test) == 100
    same = load_dataset("digits", subset=100)
    assert torch.equal(ds.x_train, same.x_train) and torch.equal(ds.y_test, same.y_test)
    other = load_dataset("digits", subset=100, seed=1)
    assert not torch.equal(ds.y_train, other.y_train)
    pair = load_dataset("digits", subset=(50, None))
    assert len(pair.y_train) == 50 and len(pair.y_test) == 450
    big = load_dataset("digits", subset=10**6)
    assert torch.equal(big.x_train, full.x_train)
    # the kept samples are rows of the full set, in their original order
    rows = {tuple(r) for r in full.x_train.tolist()}
    assert all(tuple(r) in rows for r in ds.x_train.tolist())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"name": "imagenet"}, r"not known; expected one of \('mnist1d', 'digits'"),
        ({"name": "digits", "shape": "cube"}, "shape='cube' is not known"),
        ({"name": "cifar10", "root": ".", "shape": "sequence"}, "does not support shape"),
        ({"name": "digits", "subset": 0}, "subset=0 is not valid"),
        ({"name": "digits", "subset": (1, 2, 3)}, "subset=.* is not valid"),
        ({"name": "digits", "subset": True}, "subset=True is not valid"),
        ({"name": "digits", "standardize": "yes"}, "standardize='yes' is not known"),
        ({"name": "digits", "seed": -1}, "seed must be"),
        ({"name": "mnist"}, "needs root=<folder> holding train-images-idx3-ubyte"),
    ],
)
def test_bad_arguments_are_rejected_with_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        load_dataset(**kwargs)


def test_arguments_are_checked_before_any_file_is_read(tmp_path):
    with pytest.raises(ValueError, match="shape='bogus'"):
        load_dataset("mnist", tmp_path, shape="bogus")  # the folder is empty: no FileNotFoundError
    with pytest.raises(TypeError, match="root must be a path"):
        load_dataset("mnist", 42)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_dataset("mnist", tmp_path / "nowhere")


def test_all_names_are_listed():
    assert DATASETS == ("mnist1d", "digits", "mnist", "fashion-mnist", "cifar10")


# --------------------------------------------------------------------------- IDX files


@pytest.mark.parametrize("compress", [False, True])
def test_mnist_idx_files_raw_and_gzip(tmp_path, compress):
    arrays = make_idx_folder(tmp_path, compress=compress)
    ds = load_dataset("mnist", tmp_path, shape="image")
    assert ds.x_train.shape == (6, 1, 4, 5) and ds.x_test.shape == (4, 1, 4, 5)
    expected = torch.from_numpy(arrays[IDX_FILES[0]].astype(np.float32) / 255)
    assert torch.allclose(ds.x_train[:, 0], expected)
    assert ds.y_train.tolist() == arrays[IDX_FILES[1]].tolist()
    assert ds.y_test.tolist() == arrays[IDX_FILES[3]].tolist()
    assert ds.num_classes == 10 and ds.classes[0] == "0"
    flat = load_dataset("mnist", tmp_path)
    seq = load_dataset("mnist", str(tmp_path), shape="sequence")
    assert flat.input_shape == (20,) and seq.input_shape == (4, 5)
    assert torch.equal(seq.x_train, ds.x_train[:, 0])


def test_fashion_mnist_in_the_torchvision_layout(tmp_path):
    make_idx_folder(tmp_path / "FashionMNIST" / "raw", compress=True)
    ds = load_dataset("fashion_mnist", tmp_path)
    assert ds.name == "fashion-mnist" and ds.classes[-1] == "Ankle boot"
    assert ds.x_train.shape == (6, 20)


def test_read_idx_other_dtypes(tmp_path):
    arr = np.arange(12, dtype=np.float32).reshape(3, 4) / 7
    (tmp_path / "f").write_bytes(idx_bytes(arr, code=0x0D))
    out = read_idx(tmp_path / "f")
    assert out.dtype == np.float32 and np.array_equal(out, arr)
    ints = np.array([-5, 0, 70000], dtype=np.int32)
    (tmp_path / "i").write_bytes(idx_bytes(ints, code=0x0C))
    assert read_idx(tmp_path / "i").tolist() == ints.tolist()


def test_missing_files_name_the_folder_and_the_expected_files(tmp_path):
    make_idx_folder(tmp_path)
    (tmp_path / IDX_FILES[3]).unlink()
    with pytest.raises(FileNotFoundError) as err:
        load_dataset("mnist", tmp_path)
    msg = str(err.value)
    assert str(tmp_path) in msg and "lacks t10k-labels-idx1-ubyte" in msg
    assert all(f in msg for f in IDX_FILES) and "MNIST/raw" in msg
    with pytest.raises(FileNotFoundError, match="data_batch_1.*test_batch"):
        load_dataset("cifar10", tmp_path)


def _corrupt(tmp_path, file, payload: bytes):
    make_idx_folder(tmp_path)
    (tmp_path / file).write_bytes(payload)
    with pytest.raises(DataFormatError) as err:
        load_dataset("mnist", tmp_path)
    assert file in str(err.value)
    return str(err.value)


def test_idx_bad_magic(tmp_path):
    payload = b"\x12\x34" + idx_bytes(np.zeros((6, 4, 5), np.uint8))[2:]
    assert "bad magic" in _corrupt(tmp_path, IDX_FILES[0], payload)


def test_idx_unknown_dtype_code(tmp_path):
    payload = bytearray(idx_bytes(np.zeros((6, 4, 5), np.uint8)))
    payload[2] = 0x42
    assert "unknown IDX dtype code 0x42" in _corrupt(tmp_path, IDX_FILES[0], bytes(payload))


def test_idx_wrong_dtype_for_images(tmp_path):
    payload = idx_bytes(np.zeros((6, 4, 5), np.float32), code=0x0D)
    assert "expected dtype code 0x08" in _corrupt(tmp_path, IDX_FILES[0], payload)


def test_idx_truncated_and_trailing_data(tmp_path):
    full = idx_bytes(np.zeros((6, 4, 5), np.uint8))
    assert "truncated" in _corrupt(tmp_path, IDX_FILES[0], full[:-7])
    assert "trailing bytes" in _corrupt(tmp_path, IDX_FILES[0], full + b"\0")
    assert "too short" in _corrupt(tmp_path, IDX_FILES[0], b"\0\0")
    assert "truncated header" in _corrupt(tmp_path, IDX_FILES[0], full[:9])


def test_idx_truncated_gzip(tmp_path):
    make_idx_folder(tmp_path, compress=True)
    path = tmp_path / f"{IDX_FILES[2]}.gz"
    path.write_bytes(path.read_bytes()[:-12])
    with pytest.raises(DataFormatError, match="t10k-images-idx3-ubyte.gz: truncated or corrupt"):
        load_dataset("mnist", tmp_path)


def test_idx_image_label_count_mismatch(tmp_path):
    payload = idx_bytes(np.zeros(5, np.uint8))
    msg = _corrupt(tmp_path, IDX_FILES[1], payload)
    assert "6 images" in msg and "5 labels" in msg


def test_idx_labels_out_of_range_and_wrong_rank(tmp_path):
    assert ">= 10 classes" in _corrupt(tmp_path, IDX_FILES[1], idx_bytes(np.full(6, 12, np.uint8)))
    flat_images = idx_bytes(np.zeros((6, 20), np.uint8))
    assert "expected 3 dimensions" in _corrupt(tmp_path, IDX_FILES[0], flat_images)


# --------------------------------------------------------------------------- CIFAR-10 batches


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_cifar10_pickle_batches(tmp_path, protocol):
    folder = tmp_path / "cifar-10-batches-py"
    make_cifar_folder(folder, protocol=protocol)
    ds = load_dataset("cifar10", tmp_path, shape="image")
    assert ds.x_train.shape == (10, 3, 32, 32) and ds.x_test.shape == (2, 3, 32, 32)
    first = pickle.loads((folder / "data_batch_1").read_bytes())
    assert ds.y_train[:2].tolist() == first[b"labels"]
    red = torch.from_numpy(first[b"data"][0, :1024].reshape(32, 32).astype(np.float32) / 255)
    assert torch.allclose(ds.x_train[0, 0], red)  # rows are channel-first R, G, B planes
    flat = load_dataset("cifar10", folder)  # the batch folder itself also works
    assert flat.input_shape == (3072,) and flat.classes[0] == "airplane"


def test_cifar10_str_keys_and_gzip(tmp_path):
    make_cifar_folder(tmp_path)
    (tmp_path / "test_batch").unlink()
    (tmp_path / "test_batch.gz").write_bytes(gzip.compress(cifar_batch(3, 9, str_keys=True)))
    assert load_dataset("cifar10", tmp_path).x_test.shape == (3, 3072)


def _bad_cifar(tmp_path, payload: bytes) -> str:
    make_cifar_folder(tmp_path)
    (tmp_path / "data_batch_3").write_bytes(payload)
    with pytest.raises(DataFormatError) as err:
        load_dataset("cifar10", tmp_path)
    assert "data_batch_3" in str(err.value)
    return str(err.value)


class _Sneaky:
    def __reduce__(self):
        return (os.getcwd, ())  # harmless if it ever ran; it must be refused instead


def test_cifar10_unpickling_failures(tmp_path):
    assert "not a readable CIFAR-10 pickle batch" in _bad_cifar(tmp_path, b"garbage, not pickle")
    assert "not a readable" in _bad_cifar(tmp_path, cifar_batch(2, 0)[:-40])
    refused = _bad_cifar(tmp_path, pickle.dumps({b"data": _Sneaky()}))
    assert "refusing to load posix.getcwd" in refused or "refusing to load nt.getcwd" in refused
    assert "expected a dict" in _bad_cifar(tmp_path, pickle.dumps([1, 2]))


def test_cifar10_missing_keys_and_count_mismatch(tmp_path):
    no_labels = pickle.dumps({b"data": np.zeros((2, 3072), np.uint8)})
    assert "missing key(s) ['labels']" in _bad_cifar(tmp_path, no_labels)
    mismatch = pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [1, 2, 3]})
    assert "2 images but 'labels' holds 3" in _bad_cifar(tmp_path, mismatch)
    wrong_width = pickle.dumps({b"data": np.zeros((2, 100), np.uint8), b"labels": [1, 2]})
    assert "shape (N, 3072)" in _bad_cifar(tmp_path, wrong_width)
    bad_label = pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [1, 10]})
    assert "labels must lie in 0..9" in _bad_cifar(tmp_path, bad_label)
