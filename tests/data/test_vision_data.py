"""idx reader, Fashion-MNIST discovery and the image dataset wrapper, on tiny files in tmp_path."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from exitwise.data import (
    ImageClassificationDataset,
    find_fashion_mnist,
    load_fashion_mnist,
    read_idx,
)
from exitwise.data import vision as vision_data
from exitwise.errors import DataError


def idx_bytes(array: np.ndarray, type_code: int = 0x08) -> bytes:
    """An idx file's bytes: magic, big-endian dims, big-endian data."""
    dtype = {0x08: ">u1", 0x0B: ">i2", 0x0D: ">f4"}[type_code]
    head = bytes([0, 0, type_code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return head + array.astype(dtype).tobytes()


def write_idx(path: Path, array: np.ndarray, type_code: int = 0x08) -> Path:
    data = idx_bytes(array, type_code)
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)
    return path


def fake_fashion(folder: Path, n_train: int = 6, n_test: int = 4, size: int = 28) -> dict:
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte.gz": rng.integers(0, 256, (n_train, size, size), dtype=np.uint8),
        "train-labels-idx1-ubyte.gz": rng.integers(0, 10, (n_train,), dtype=np.uint8),
        "t10k-images-idx3-ubyte.gz": rng.integers(0, 256, (n_test, size, size), dtype=np.uint8),
        "t10k-labels-idx1-ubyte.gz": rng.integers(0, 10, (n_test,), dtype=np.uint8),
    }
    folder.mkdir(parents=True, exist_ok=True)
    for name, arr in arrays.items():
        write_idx(folder / name, arr)
    return arrays


# -- read_idx ---------------------------------------------------------------------------------
def test_read_idx_gz_roundtrip(tmp_path):
    arr = np.arange(2 * 3 * 5, dtype=np.uint8).reshape(2, 3, 5)
    out = read_idx(write_idx(tmp_path / "x-idx3-ubyte.gz", arr))
    assert out.dtype == torch.uint8 and tuple(out.shape) == (2, 3, 5)
    assert torch.equal(out, torch.from_numpy(arr))


def test_read_idx_plain_and_big_endian_types(tmp_path):
    shorts = np.array([[1, -2, 300], [-32768, 32767, 0]], dtype=np.int16)
    out = read_idx(write_idx(tmp_path / "s-idx2", shorts, 0x0B))
    assert out.dtype == torch.int16 and out.tolist() == shorts.tolist()
    floats = np.array([0.5, -1.25, 3.0], dtype=np.float32)
    out = read_idx(write_idx(tmp_path / "f-idx1", floats, 0x0D))
    assert out.dtype == torch.float32 and out.tolist() == floats.tolist()


def test_read_idx_bad_magic(tmp_path):
    bad = tmp_path / "bad.gz"
    with gzip.open(bad, "wb") as f:
        f.write(b"\x1f\x00\x08\x01" + struct.pack(">I", 3) + b"abc")
    with pytest.raises(DataError, match="bad magic"):
        read_idx(bad)
    unknown_type = tmp_path / "t"
    unknown_type.write_bytes(bytes([0, 0, 0x07, 1]) + struct.pack(">I", 1) + b"x")
    with pytest.raises(DataError, match="not an idx file"):
        read_idx(unknown_type)


def test_read_idx_truncated_data(tmp_path):
    data = idx_bytes(np.zeros((4, 28, 28), dtype=np.uint8))
    cut = tmp_path / "cut.gz"
    with gzip.open(cut, "wb") as f:
        f.write(data[:-100])  # a complete gzip stream whose idx payload is short
    with pytest.raises(DataError, match="truncated.*needs 3136 data bytes"):
        read_idx(cut)
    header_only = tmp_path / "h"
    header_only.write_bytes(data[:6])  # 3 dims promised, half a dimension given
    with pytest.raises(DataError, match="truncated"):
        read_idx(header_only)


def test_read_idx_truncated_gzip_stream(tmp_path):
    path = write_idx(tmp_path / "full.gz", np.ones((50, 28, 28), dtype=np.uint8))
    raw = path.read_bytes()
    broken = tmp_path / "broken.gz"
    broken.write_bytes(raw[: len(raw) // 2])  # the compressed stream itself is cut
    with pytest.raises(DataError, match="broken.gz"):
        read_idx(broken)


def test_read_idx_missing_file(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_idx(tmp_path / "nope.gz")


# -- Fashion-MNIST discovery --------------------------------------------------------------------
def test_load_fashion_mnist_from_folder(tmp_path):
    arrays = fake_fashion(tmp_path / "fm")
    data = load_fashion_mnist(tmp_path / "fm")
    assert data.train_images.dtype == torch.uint8
    assert tuple(data.train_images.shape) == (6, 28, 28)
    assert tuple(data.test_images.shape) == (4, 28, 28)
    assert data.train_labels.dtype == torch.int64
    assert data.test_labels.tolist() == arrays["t10k-labels-idx1-ubyte.gz"].tolist()
    assert torch.equal(data.train_images, torch.from_numpy(arrays["train-images-idx3-ubyte.gz"]))
    assert data.num_labels == 10


def test_load_fashion_mnist_from_env(tmp_path, monkeypatch):
    fake_fashion(tmp_path / "env")
    monkeypatch.setenv(vision_data.FASHION_MNIST_ENV, str(tmp_path / "env"))
    monkeypatch.setattr(vision_data, "DEBIAN_FASHION_MNIST", tmp_path / "absent")
    assert find_fashion_mnist() == tmp_path / "env"
    assert load_fashion_mnist().train_images.shape[0] == 6


def test_missing_dataset_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.delenv(vision_data.FASHION_MNIST_ENV, raising=False)
    monkeypatch.setattr(vision_data, "DEBIAN_FASHION_MNIST", tmp_path / "absent")
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist()
    # an explicit folder is the only place looked at, and is named in the message
    with pytest.raises(DataError, match=str(tmp_path / "elsewhere")):
        load_fashion_mnist(tmp_path / "elsewhere")


def test_wrong_image_shape_is_rejected(tmp_path):
    fake_fashion(tmp_path / "fm", size=32)
    with pytest.raises(DataError, match=r"\(N, 28, 28\)"):
        load_fashion_mnist(tmp_path / "fm")


def test_label_count_mismatch_is_rejected(tmp_path):
    fake_fashion(tmp_path / "fm")
    write_idx(tmp_path / "fm" / "t10k-labels-idx1-ubyte.gz", np.zeros(3, dtype=np.uint8))
    with pytest.raises(DataError, match="3 test labels for 4 images"):
        load_fashion_mnist(tmp_path / "fm")


# -- dataset wrapper ---------------------------------------------------------------------------
def test_dataset_items_are_normalised():
    images = torch.tensor([[[0, 255], [51, 102]]], dtype=torch.uint8)  # (1, 2, 2)
    ds = ImageClassificationDataset(images, torch.tensor([7]), mean=0.5, std=0.25)
    item = ds[0]
    assert set(item) == {"pixel_values", "labels"} and item["labels"] == 7
    px = item["pixel_values"]
    assert px.dtype == torch.float32 and tuple(px.shape) == (1, 2, 2)
    expected = (torch.tensor([[0.0, 1.0], [0.2, 0.4]]) - 0.5) / 0.25
    assert torch.allclose(px[0], expected, atol=1e-6)


def test_dataset_batches_and_subset():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (5, 4, 4), dtype=torch.uint8, generator=g)
    labels = torch.tensor([0, 1, 2, 3, 4])
    ds = ImageClassificationDataset(images, labels)
    batches = ds.batches(2)
    assert [b["labels"].tolist() for b in batches] == [[0, 1], [2, 3], [4]]
    assert tuple(batches[0]["pixel_values"].shape) == (2, 1, 4, 4)
    sub = ds.subset([4, 1])
    assert len(sub) == 2 and sub[0]["labels"] == 4
    assert torch.equal(sub[1]["pixel_values"], ds[1]["pixel_values"])


def test_default_normalisation_is_the_images_own_per_channel():
    """Not Fashion-MNIST's statistics (once the default of this generic class): each channel
    of these images ends at mean 0 and std 1, and another split takes them as given."""
    g = torch.Generator().manual_seed(0)
    images = torch.stack([torch.randint(0, 64, (6, 5, 5), generator=g),
                          torch.randint(128, 256, (6, 5, 5), generator=g),
                          torch.randint(0, 256, (6, 5, 5), generator=g)], 1).to(torch.uint8)
    train = ImageClassificationDataset(images, torch.zeros(6))
    px = train.pixels.transpose(0, 1).reshape(3, -1)
    assert torch.allclose(px.mean(1), torch.zeros(3), atol=1e-5)
    assert torch.allclose(px.std(1, correction=0), torch.ones(3), atol=1e-4)
    by_hand = images[:, 1].float().div(255.0)
    assert train.mean[1] == pytest.approx(float(by_hand.mean()), rel=1e-6)
    test = ImageClassificationDataset(images[:2], torch.zeros(2), mean=train.mean, std=train.std)
    assert torch.allclose(test.pixels, train.pixels[:2])
    assert train.subset([0]).mean == train.mean


def test_dataset_rejects_bad_input():
    with pytest.raises(DataError, match="one label per image"):
        ImageClassificationDataset(torch.zeros(3, 4, 4, dtype=torch.uint8), torch.zeros(2))
    with pytest.raises(DataError, match="std > 0"):
        ImageClassificationDataset(torch.zeros(3, 4, 4, dtype=torch.uint8), torch.zeros(3), std=0.0)
    with pytest.raises(DataError, match=r"\(N, H, W\)"):
        ImageClassificationDataset(torch.zeros(3, 4, dtype=torch.uint8), torch.zeros(3))
