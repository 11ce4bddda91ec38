"""bench.data: real files in the official formats (tiny ones written here), normalisation, batching."""
from __future__ import annotations

import gzip
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from bench import data as D
from bench import transforms as T
from bench.data import DatasetInfo, DatasetMissingError

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
DEBIAN_FMNIST = Path("/usr/share/datasets/fashion-mnist")


# ------------------------------------------------------------------------- writers of official formats
def write_idx(path: Path, array: np.ndarray, compress: bool = True) -> None:
    """An unsigned-byte idx file (the MNIST format)."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.tobytes()
    if compress:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(payload))
    else:
        path.write_bytes(payload)


def write_mnist(folder: Path, n_train: int, n_test: int, compress: bool = True, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": (np.arange(n_train) % 10).astype(np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": (np.arange(n_test) % 10)[::-1].astype(np.uint8),
    }
    arrays["train-images-idx3-ubyte"][0] = 77  # a constant image stays constant when resized
    for name, array in arrays.items():
        write_idx(folder / name, array, compress)
    return arrays


def cifar_batch(n: int, num_labels: int, label_key: str, rng: np.random.Generator, bytes_keys: bool) -> dict:
    batch = {"batch_label": "training batch 1 of 5", "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
             label_key: [int(v) for v in rng.integers(0, num_labels, n)],
             "filenames": [f"img_{i}.png" for i in range(n)]}
    if label_key == "fine_labels":
        batch["coarse_labels"] = [v // 5 for v in batch[label_key]]
    return {k.encode(): v for k, v in batch.items()} if bytes_keys else batch


def write_pickle(path: Path, obj, protocol: int = 2) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(obj, protocol=protocol))


# ------------------------------------------------------------------------------------- real datasets
@pytest.mark.skipif(not DEBIAN_FMNIST.is_dir(), reason="Debian package dataset-fashion-mnist not installed")
def test_fashion_mnist_from_debian_files(tmp_path):
    data = D.load_dataset("fashion_mnist", root=tmp_path, download=False)  # empty root: the Debian folder
    assert data.train_x.shape == (60000, 1, 32, 32) and data.test_x.shape == (10000, 1, 32, 32)
    assert data.train_x.dtype == torch.uint8 and data.train_y.dtype == torch.int64
    assert data.train_y.bincount().tolist() == [6000] * 10 and data.test_y.bincount().tolist() == [1000] * 10
    info = data.info
    assert (info.name, info.num_classes, info.channels, info.image_size, info.train_size, info.augment) == \
        ("fashion_mnist", 10, 1, 32, 60000, "none")
    assert info.mean == (0.2860,) and info.std == (0.3530,)
    assert D.load_dataset("fashion_mnist", root=tmp_path, download=False) is data  # cached in-process


@pytest.mark.skipif(not (SHARED_DATA / "mnist-t10k").is_dir(), reason="shared/data/mnist-t10k absent")
def test_mnist_t10k_and_alternative_images():
    data = D.load_dataset("mnist_t10k", root=SHARED_DATA, download=False)
    assert data.train_x.shape == (10000, 1, 32, 32) and data.train_x.dtype == torch.uint8
    assert torch.equal(data.train_x, data.test_x) and data.info.train_size == 10000
    assert data.train_y.bincount().tolist()[:2] == [980, 1135]  # the official test-set class counts

    fmnist_like = DatasetInfo("fashion_mnist", 10, 1, 32, (0.286,), (0.353,), 60000, "none")
    images = D.load_images("mnist_t10k", like=fmnist_like, root=SHARED_DATA)
    assert images.shape == (10000, 1, 32, 32) and images.dtype == torch.uint8
    assert not torch.equal(images, data.train_x)  # shuffled...
    assert torch.equal(images.long().sum(), data.train_x.long().sum())  # ...the same images
    assert torch.equal(images, D.load_images("mnist_t10k", like=fmnist_like, root=SHARED_DATA))  # deterministic

    cifar_like = DatasetInfo("cifar10", 10, 3, 24, (0.5,) * 3, (0.25,) * 3, 50000, "crop_flip")
    rgb = D.load_images("mnist_t10k", like=cifar_like, root=SHARED_DATA, limit=100)
    assert rgb.shape == (100, 3, 24, 24) and torch.equal(rgb[:, 0], rgb[:, 2])


def test_mnist_5k_and_digits_offline_with_seeded_splits():
    m5k = D.load_dataset("mnist_5k")
    assert m5k.train_x.shape == (4000, 1, 32, 32) and m5k.test_x.shape == (1000, 1, 32, 32)
    assert m5k.train_y.bincount().tolist() == [400] * 10 and m5k.test_y.bincount().tolist() == [100] * 10
    assert m5k.train_y[:50].unique().numel() > 5  # shuffled, not sorted by class

    digits = D.load_dataset("digits")
    assert digits.train_x.shape == (1437, 1, 32, 32) and digits.test_x.shape == (360, 1, 32, 32)
    assert digits.info.train_size == 1437 and digits.train_x.max() > 200
    assert (digits.test_y.bincount() - 36).abs().max() <= 1
    D.clear_cache()
    again = D.load_dataset("digits")
    assert again is not digits
    for a, b in ((again.train_x, digits.train_x), (again.train_y, digits.train_y), (again.test_y, digits.test_y)):
        assert torch.equal(a, b)
    assert again.info == digits.info


# ----------------------------------------------------------------------- tiny files, official formats
@pytest.mark.parametrize("sub, compress", [("mnist", True), ("MNIST/raw", False)])
def test_mnist_idx_files(tmp_path, sub, compress):
    arrays = write_mnist(tmp_path / sub, 20, 10, compress)
    data = D.load_dataset("mnist", root=tmp_path, download=False)
    assert data.train_x.shape == (20, 1, 32, 32) and data.test_x.shape == (10, 1, 32, 32)
    assert data.train_y.tolist() == arrays["train-labels-idx1-ubyte"].tolist()
    assert data.test_y.tolist() == arrays["t10k-labels-idx1-ubyte"].tolist()
    assert (data.train_x[0] == 77).all()
    assert data.info.train_size == 20 and data.info.mean == (0.1307,)


def test_bad_idx_file_is_named(tmp_path):
    write_mnist(tmp_path / "mnist", 4, 4)
    (tmp_path / "mnist" / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(b"\x00\x00\x08\x01\x00\x00\x00\x09ab"))
    with pytest.raises(ValueError, match="t10k-labels-idx1-ubyte"):
        D.load_dataset("mnist", root=tmp_path, download=False)


@pytest.mark.parametrize("bytes_keys, protocol", [(False, 2), (True, 2), (False, 5)])
def test_cifar10_python_batches(tmp_path, bytes_keys, protocol):
    rng = np.random.default_rng(1)
    folder = tmp_path / "cifar-10-batches-py"
    batches = [cifar_batch(4, 10, "labels", rng, bytes_keys) for _ in range(5)]
    for i, batch in enumerate(batches, 1):
        write_pickle(folder / f"data_batch_{i}", batch, protocol)
    test = cifar_batch(3, 10, "labels", rng, bytes_keys)
    write_pickle(folder / "test_batch", test, protocol)
    data = D.load_dataset("cifar10", root=tmp_path, download=False)
    assert data.train_x.shape == (20, 3, 32, 32) and data.test_x.shape == (3, 3, 32, 32)
    key = (lambda k: k.encode()) if bytes_keys else (lambda k: k)
    assert data.train_y.tolist() == sum((b[key("labels")] for b in batches), [])
    assert data.test_y.tolist() == test[key("labels")]
    raw = batches[1][key("data")][2]  # train image 6: R plane, then G, then B, each row-major
    assert data.train_x[6, 1, 3, 5] == raw[1024 + 3 * 32 + 5] and data.train_x[6, 2, 31, 0] == raw[2048 + 31 * 32]
    assert data.info.channels == 3 and data.info.augment == "crop_flip" and data.info.num_classes == 10


def test_cifar100_python_files(tmp_path):
    rng = np.random.default_rng(2)
    train, test = cifar_batch(6, 100, "fine_labels", rng, False), cifar_batch(2, 100, "fine_labels", rng, False)
    train["fine_labels"][0] = 99
    write_pickle(tmp_path / "cifar-100-python" / "train", train)
    write_pickle(tmp_path / "cifar-100-python" / "test", test)
    data = D.load_dataset("cifar100", root=tmp_path, download=False)
    assert data.train_x.shape == (6, 3, 32, 32) and data.test_x.shape == (2, 3, 32, 32)
    assert data.train_y.tolist() == train["fine_labels"] and data.info.num_classes == 100


class _Exploit:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    folder = tmp_path / "cifar-100-python"
    write_pickle(folder / "train", {"data": _Exploit(marker), "fine_labels": [0]})
    write_pickle(folder / "test", cifar_batch(1, 100, "fine_labels", np.random.default_rng(0), False))
    with pytest.raises(pickle.UnpicklingError, match="system"):
        D.load_dataset("cifar100", root=tmp_path, download=False)
    assert not marker.exists()


def test_svhn_mat_files(tmp_path):
    from scipy.io import savemat

    rng = np.random.default_rng(3)
    folder = tmp_path / "svhn"
    folder.mkdir()
    mats = {}
    for split, n in (("train", 7), ("test", 3)):
        mats[split] = {"X": rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8),
                       "y": (np.arange(n) % 10 + 1).reshape(n, 1).astype(np.uint8)}
        savemat(folder / f"{split}_32x32.mat", mats[split])
    data = D.load_dataset("svhn", root=tmp_path, download=False)
    assert data.train_x.shape == (7, 3, 32, 32) and data.test_x.shape == (3, 3, 32, 32)
    assert data.train_y.tolist() == [1, 2, 3, 4, 5, 6, 7] and data.test_y.tolist() == [1, 2, 3]
    mats["train"]["y"][:] = 10
    savemat(folder / "train_32x32.mat", mats["train"])
    D.clear_cache()
    data = D.load_dataset("svhn", root=tmp_path, download=False)
    assert data.train_y.tolist() == [0] * 7  # label 10 is digit 0
    assert data.train_x[4, 2, 5, 9] == mats["train"]["X"][5, 9, 2, 4]  # (H, W, C, N) -> (N, C, H, W)
    assert data.info.augment == "none"


@pytest.mark.parametrize("name, needles, folder", [
    ("mnist", ["train-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"], "mnist"),
    ("cifar10", ["data_batch_1", "test_batch"], "cifar-10-batches-py"),
    ("cifar100", ["train", "test"], "cifar-100-python"),
    ("svhn", ["train_32x32.mat"], "svhn"),
    ("mnist_t10k", ["t10k-images-idx3-ubyte.gz"], "mnist-t10k"),
])
def test_missing_dataset_names_files_and_folder(tmp_path, name, needles, folder):
    with pytest.raises(DatasetMissingError) as err:
        D.load_dataset(name, root=tmp_path, download=False)
    assert isinstance(err.value, FileNotFoundError)
    message = str(err.value)
    assert all(n in message for n in needles) and str(tmp_path / folder) in message
    assert "DFKD_DATA_ROOT" in message


def test_unknown_dataset_lists_valid_names():
    with pytest.raises(ValueError, match="unknown dataset 'imagenette'") as err:
        D.load_dataset("imagenette")
    assert "fashion_mnist" in str(err.value) and "imagefolder:<path>" in str(err.value)
    names = D.list_datasets()
    assert {"fashion_mnist", "mnist", "mnist_t10k", "mnist_5k", "digits", "cifar10", "cifar100", "svhn"} <= set(names)
    assert D.list_datasets(with_forms=True) == names + ["imagefolder:<path>"]


def test_imagefolder(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(4)
    for split, n in (("train", 3), ("val", 2)):
        for cls in ("cat", "dog"):
            (tmp_path / "pets" / split / cls).mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(tmp_path / "pets" / split / cls / f"{i}.png")
    data = D.load_dataset(f"imagefolder:{tmp_path / 'pets'}")
    assert data.train_x.shape == (6, 3, 32, 32) and data.test_x.shape == (4, 3, 32, 32)
    assert data.train_y.tolist() == [0, 0, 0, 1, 1, 1] and data.test_y.tolist() == [0, 0, 1, 1]
    assert data.info.num_classes == 2 and data.info.channels == 3 and len(data.info.mean) == 3

    (tmp_path / "grey" / "train" / "a").mkdir(parents=True)
    (tmp_path / "grey" / "test" / "a").mkdir(parents=True)
    for split in ("train", "test"):
        Image.fromarray(np.full((32, 32), 200, np.uint8)).save(tmp_path / "grey" / split / "a" / "x.png")
    grey = D.load_dataset(f"imagefolder:{tmp_path / 'grey'}")
    assert grey.train_x.shape == (1, 1, 32, 32) and (grey.train_x == 200).all()
    with pytest.raises(DatasetMissingError, match="train"):
        D.load_dataset(f"imagefolder:{tmp_path / 'nothing'}")


def test_register_dataset(monkeypatch, tmp_path):
    monkeypatch.setattr(D.DATASETS, "_entries", dict(D.DATASETS._entries))

    @D.register_dataset("tiny")
    def tiny(root: Path, download: bool) -> D.ImageData:
        info = DatasetInfo("tiny", 2, 1, 8, (0.5,), (0.5,), 4, "none")
        x = torch.zeros(4, 1, 8, 8, dtype=torch.uint8)
        return D.ImageData(info, x, torch.tensor([0, 1, 0, 1]), x[:2], torch.tensor([0, 1]))

    assert "tiny" in D.list_datasets()
    assert D.load_dataset("tiny", root=tmp_path).train_x.shape == (4, 1, 8, 8)
    with pytest.raises(ValueError, match="tiny"):
        D.register_dataset("tiny")


def test_resolve_data_root(monkeypatch, tmp_path):
    monkeypatch.setenv("DFKD_DATA_ROOT", str(tmp_path / "env"))
    assert D.resolve_data_root(tmp_path / "arg") == tmp_path / "arg"
    assert D.resolve_data_root() == tmp_path / "env"
    monkeypatch.delenv("DFKD_DATA_ROOT")
    assert D.resolve_data_root() == Path.home() / ".cache" / "dfkd-bench" / "data"


# ------------------------------------------------------------------------------------ tensor helpers
INFO3 = DatasetInfo("rgb", 10, 3, 8, (0.5, 0.4, 0.3), (0.2, 0.25, 0.5), 100, "crop_flip")


def test_to_float():
    x = torch.tensor([0, 255], dtype=torch.uint8).view(1, 1, 1, 2).expand(2, 3, 8, 2).contiguous()
    out = T.to_float(x, INFO3)
    assert out.dtype == torch.float32 and out.shape == x.shape and out.device == x.device
    for c, (m, s) in enumerate(zip(INFO3.mean, INFO3.std)):
        assert torch.allclose(out[:, c, :, 0], torch.tensor(-m / s))
        assert torch.allclose(out[:, c, :, 1], torch.tensor((1 - m) / s))
    with pytest.raises(ValueError, match="uint8"):
        T.to_float(x.float(), INFO3)
    with pytest.raises(ValueError, match="3"):
        T.to_float(x[:, :1], INFO3)


def test_augment_crop_flip_is_a_padded_window():
    x = torch.randint(1, 256, (16, 3, 8, 8), dtype=torch.uint8)
    assert T.augment(x, "none") is x
    out = T.augment(x, "crop_flip", torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == x.dtype
    assert torch.equal(out, T.augment(x, "crop_flip", torch.Generator().manual_seed(0)))
    assert not torch.equal(out, T.augment(x, "crop_flip", torch.Generator().manual_seed(1)))
    pad = 1  # round(4 * 8 / 32)
    padded = torch.nn.functional.pad(x, (pad,) * 4)
    flips = 0
    for i in range(16):
        windows = [(w, f) for dy in range(2 * pad + 1) for dx in range(2 * pad + 1)
                   for w in [padded[i, :, dy:dy + 8, dx:dx + 8]] for f in (False, True)]
        matches = [f for w, f in windows if torch.equal(out[i], w.flip(2) if f else w)]
        assert matches, f"sample {i} is not a crop of its padded image"
        flips += matches[0]
    assert 0 < flips < 16
    floats = T.augment(T.to_float(x, INFO3), "crop_flip", torch.Generator().manual_seed(0))
    assert floats.dtype == torch.float32 and floats.shape == x.shape
    with pytest.raises(ValueError, match="crop_flip"):
        T.augment(x, "mixup")


def test_iterate_batches():
    x, y = torch.arange(10).view(10, 1), torch.arange(10)
    batches = list(T.iterate_batches(x, y, 4, shuffle=False))
    assert [b[1].tolist() for b in batches] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert len(list(T.iterate_batches(x, y, 4, shuffle=False, drop_last=True))) == 2
    shuffled = list(T.iterate_batches(x, y, 3, shuffle=True, generator=torch.Generator().manual_seed(0)))
    seen = torch.cat([yb for _, yb in shuffled])
    assert sorted(seen.tolist()) == list(range(10)) and seen.tolist() != list(range(10))
    assert all(torch.equal(xb[:, 0], yb) for xb, yb in shuffled)
    again = list(T.iterate_batches(x, y, 3, shuffle=True, generator=torch.Generator().manual_seed(0)))
    assert torch.equal(seen, torch.cat([yb for _, yb in again]))
    assert all(yb is None for _, yb in T.iterate_batches(x, None, 4, shuffle=True))
    with pytest.raises(ValueError, match="batch_size"):
        next(T.iterate_batches(x, y, 0, shuffle=False))
    with pytest.raises(ValueError, match="9"):
        next(T.iterate_batches(x, y[:9], 2, shuffle=False))


def test_few_sample_indices():
    labels = torch.arange(100) % 10
    idx = D.few_sample_indices(labels, 20, seed=0)
    assert idx.dtype == torch.int64 and idx.unique().numel() == 20
    assert labels[idx].bincount().tolist() == [2] * 10
    assert labels[idx[:10]].bincount().tolist() == [1] * 10  # prefixes are balanced too
    assert torch.equal(idx, D.few_sample_indices(labels, 20, seed=0))
    assert not torch.equal(idx, D.few_sample_indices(labels, 20, seed=1))
    assert labels[D.few_sample_indices(labels, 25, seed=3)].bincount().max() == 3

    skewed = torch.tensor([0] * 50 + [1] * 2 + [2] * 8)
    counts = skewed[D.few_sample_indices(skewed, 12, seed=0)].bincount().tolist()
    assert counts[1] == 2 and counts[0] == 5 and counts[2] == 5  # a short class gives what it has

    plain = D.few_sample_indices(labels, 30, seed=0, stratified=False)
    assert plain.unique().numel() == 30
    with pytest.raises(ValueError, match="101"):
        D.few_sample_indices(labels, 101, seed=0)
    with pytest.raises(ValueError):
        D.few_sample_indices(labels, 0, seed=0)


def test_image_data_to_device():
    data = D.load_dataset("digits")
    moved = data.to("cpu")
    assert moved.info == data.info and moved.train_x.device.type == "cpu" and moved.train_x.shape == data.train_x.shape
