"""Image-classification data: the idx file format (MNIST, Fashion-MNIST) and Fashion-MNIST.

The idx format (LeCun's MNIST files) is a 4-byte magic ``0x00 0x00 <type> <ndim>``, then
``ndim`` big-endian uint32 dimension sizes, then the values in row-major order, big-endian.
Files may be gzip-compressed (``.gz``); :func:`read_idx` reads both.

Fashion-MNIST (Xiao et al., 2017: 60,000 training and 10,000 test 28x28 grayscale images of
10 clothing classes) is found, in this order, in the folder given, in ``$EXITWISE_FASHION_MNIST``
or in Debian's ``dataset-fashion-mnist`` package folder. Nothing is downloaded.
"""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import DataError

# idx type byte -> big-endian numpy dtype
_IDX_TYPES: dict[int, str] = {
    0x08: ">u1",  # unsigned byte
    0x09: ">i1",  # signed byte
    0x0B: ">i2",  # short
    0x0C: ">i4",  # int
    0x0D: ">f4",  # float
    0x0E: ">f8",  # double
}

FASHION_MNIST_ENV = "EXITWISE_FASHION_MNIST"
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
# Per-pixel mean and standard deviation of the 60,000 training images (pixels scaled to [0, 1]).
FASHION_MNIST_MEAN = 0.2860
FASHION_MNIST_STD = 0.3530
_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


def read_idx(path: str | Path) -> torch.Tensor:
    """Read one idx file (plain or ``.gz``) into a tensor of its own shape and type.

    Returns e.g. (60000, 28, 28) uint8 for MNIST-style image files, (60000,) uint8 for label
    files. Raises :class:`DataError` naming the file for a missing file, a bad magic number, an
    unknown type byte, or a file shorter (or longer) than its header says.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"idx file {path} does not exist")
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                raw = f.read()
        else:
            raw = path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as err:
        # A cut-off .gz ends in EOFError ("Compressed file ended before ...").
        raise DataError(f"{path} cannot be read (truncated or corrupt gzip?): {err}") from None
    if len(raw) < 4:
        raise DataError(f"{path} is too short to be an idx file ({len(raw)} bytes)")
    zero1, zero2, type_code, ndim = raw[0], raw[1], raw[2], raw[3]
    if zero1 != 0 or zero2 != 0 or type_code not in _IDX_TYPES or ndim < 1:
        raise DataError(
            f"{path} is not an idx file: bad magic number 0x{raw[:4].hex()} (expected "
            "00 00 <type in 08/09/0b/0c/0d/0e> <ndim >= 1>)"
        )
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path} is truncated: its header needs {header} bytes, it has {len(raw)}")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_TYPES[type_code])
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    have = len(raw) - header
    if have != expected:
        what = "truncated" if have < expected else "longer than its header says"
        raise DataError(
            f"{path} is {what}: shape {shape} of {dtype.name} needs {expected} data bytes, "
            f"the file has {have}"
        )
    values = np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)
    # Native byte order (torch has no big-endian dtypes); a copy, so the tensor is writable.
    return torch.from_numpy(values.astype(dtype.newbyteorder("="), copy=True))


@dataclass
class ImageSplits:
    """An image-classification dataset's train and test splits.

    train_images: (N, H, W) uint8;  train_labels: (N,) int64
    test_images:  (M, H, W) uint8;  test_labels:  (M,) int64
    """

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    classes: tuple[str, ...]
    source: str = ""

    @property
    def num_labels(self) -> int:
        return len(self.classes)


def _find_file(folder: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (folder / name).is_file():
            return folder / name
    return None


def _candidate_folders(root: str | Path | None) -> list[tuple[Path, str]]:
    if root is not None:
        base = Path(root)
        # torchvision's layout (root/FashionMNIST/raw) is accepted too.
        return [(base, "the folder given"), (base / "FashionMNIST" / "raw", "the folder given")]
    out = []
    env = os.environ.get(FASHION_MNIST_ENV)
    if env:
        out += [(Path(env), f"${FASHION_MNIST_ENV}"), (Path(env) / "FashionMNIST" / "raw",
                                                         f"${FASHION_MNIST_ENV}")]
    out.append((DEBIAN_FASHION_MNIST, "the Debian package folder"))
    return out


def find_fashion_mnist(root: str | Path | None = None) -> Path:
    """The folder holding the four Fashion-MNIST idx files (``.gz`` or not).

    Looks in ``root`` when given (and only there), else in ``$EXITWISE_FASHION_MNIST``, else
    in ``/usr/share/datasets/fashion-mnist`` (Debian's ``dataset-fashion-mnist``). Raises
    :class:`DataError` saying how to get the files when none of them has all four.
    """
    tried = []
    for folder, why in _candidate_folders(root):
        if all(_find_file(folder, stem) for stem in _FILES.values()):
            return folder
        tried.append(f"{folder} ({why})")
    names = ", ".join(f"{s}.gz" for s in _FILES.values())
    raise DataError(
        "Fashion-MNIST not found; looked in: " + "; ".join(tried) + ". Install it with "
        "`sudo apt-get install dataset-fashion-mnist` (Debian/Ubuntu; files go to "
        f"{DEBIAN_FASHION_MNIST}), or put the four idx files ({names}) in a folder and pass "
        f"it as root=... or set ${FASHION_MNIST_ENV} to it."
    )


def load_fashion_mnist(root: str | Path | None = None) -> ImageSplits:
    """Fashion-MNIST as uint8 image tensors and int64 labels (see :func:`find_fashion_mnist`).

    Returns :class:`ImageSplits` with train (60000, 28, 28) and test (10000, 28, 28) images.
    Raises :class:`DataError` if the files are missing, corrupt, of the wrong shape, or carry
    labels outside 0..9.
    """
    folder = find_fashion_mnist(root)
    arrays = {key: read_idx(_find_file(folder, stem)) for key, stem in _FILES.items()}
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if images.dim() != 3 or tuple(images.shape[1:]) != (28, 28) or images.dtype != torch.uint8:
            raise DataError(
                f"{folder}: {split} images should be (N, 28, 28) uint8, got "
                f"{tuple(images.shape)} {images.dtype}"
            )
        if labels.dim() != 1 or labels.shape[0] != images.shape[0]:
            raise DataError(
                f"{folder}: {labels.shape[0] if labels.dim() else 0} {split} labels for "
                f"{images.shape[0]} images"
            )
        if labels.numel() and int(labels.max()) >= len(FASHION_MNIST_CLASSES):
            raise DataError(f"{folder}: {split} labels go up to {int(labels.max())}; expected 0..9")
    return ImageSplits(
        train_images=arrays["train_images"],
        train_labels=arrays["train_labels"].long(),
        test_images=arrays["test_images"],
        test_labels=arrays["test_labels"].long(),
        classes=FASHION_MNIST_CLASSES,
        source=str(folder),
    )


class ImageClassificationDataset(Dataset):
    """uint8 images + labels as ``{"pixel_values": (C, H, W) float32, "labels": int}`` items.

    images: (N, H, W) (one channel) or (N, C, H, W) uint8; labels: (N,) integers.
    Pixels are scaled to [0, 1], then normalised as ``(x - mean) / std`` (per channel when
    mean/std are sequences). Left out, mean and std are these images' own, per channel
    (kept as ``.mean`` / ``.std``): give the training split's to every other split, e.g.
    ``ImageClassificationDataset(test_x, test_y, mean=train.mean, std=train.std)``.
    The normalised tensor is built once, so items are views (fast to batch in a training loop).
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        mean: float | tuple[float, ...] | None = None,
        std: float | tuple[float, ...] | None = None,
    ) -> None:
        images = torch.as_tensor(images)
        labels = torch.as_tensor(labels)
        if images.dim() == 3:
            images = images.unsqueeze(1)
        if images.dim() != 4:
            raise DataError(
                f"images must be (N, H, W) or (N, C, H, W); got {tuple(images.shape)}"
            )
        if labels.dim() != 1 or labels.shape[0] != images.shape[0]:
            raise DataError(
                f"need one label per image: {tuple(labels.shape)} labels for "
                f"{images.shape[0]} images"
            )
        if images.shape[0] == 0:
            raise DataError("no images")
        c = images.shape[1]
        scale = 255.0 if images.dtype == torch.uint8 else 1.0
        x = images.float() / scale
        if mean is None or std is None:  # float64 sums: millions of pixels; one copy
            flat = x.transpose(0, 1).reshape(c, -1).double()
            if mean is None:
                mean = tuple(flat.mean(1).tolist())
            if std is None:
                std = tuple(max(v, 1e-6) for v in flat.std(1, correction=0).tolist())
            del flat
        m = torch.as_tensor(mean, dtype=torch.float32).reshape(-1)
        s = torch.as_tensor(std, dtype=torch.float32).reshape(-1)
        if m.numel() not in (1, c) or s.numel() not in (1, c) or bool((s <= 0).any()):
            raise DataError(f"mean/std must be one value or one per channel ({c}); std > 0")
        self.mean, self.std = tuple(m.tolist()), tuple(s.tolist())
        self.pixels = (x - m.view(1, -1, 1, 1)) / s.view(1, -1, 1, 1)
        self.labels = labels.long()

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"pixel_values": self.pixels[index], "labels": int(self.labels[index])}

    def batches(self, batch_size: int) -> list[dict[str, torch.Tensor]]:
        """The whole dataset as in-order batches {"pixel_values" (b, C, H, W), "labels" (b,)}."""
        if batch_size < 1:
            raise DataError(f"batch_size must be >= 1, got {batch_size}")
        return [
            {"pixel_values": self.pixels[i : i + batch_size], "labels": self.labels[i : i + batch_size]}
            for i in range(0, len(self), batch_size)
        ]

    def subset(self, indices: torch.Tensor | list[int]) -> "ImageClassificationDataset":
        """A dataset of the given rows (already normalised; no copy of the statistics)."""
        idx = torch.as_tensor(indices, dtype=torch.long)
        out = ImageClassificationDataset.__new__(ImageClassificationDataset)
        out.pixels, out.labels = self.pixels[idx], self.labels[idx]
        out.mean, out.std = self.mean, self.std
        return out
