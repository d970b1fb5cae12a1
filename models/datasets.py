"""Image-classification datasets from local files: IDX (MNIST / Fashion-MNIST), CIFAR-10, ImageFolder.

Nothing is downloaded. Every loader returns an :class:`ImageDataset` held in memory as uint8
``[N, C, H, W]``: the datasets this project trains on fit easily, and in-memory batches keep a
2-core machine's cores on the model instead of on a data-loader.

Fashion-MNIST comes from Debian (``apt-get install -y dataset-fashion-mnist``), which puts the IDX
files under :data:`FASHION_MNIST_DIR`.
"""

from __future__ import annotations

import hashlib
import io
import pickle
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from torch import Tensor

from slimserve.models.idx import DatasetError, read_idx

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclass(frozen=True)
class ImageDataset:
    images: Tensor  # uint8 [N, C, H, W]
    labels: Tensor  # int64 [N]
    class_names: tuple[str, ...]
    name: str
    version: str  # where it came from, precise enough to reproduce (package version or file hashes)

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise DatasetError(
                f"{self.name}: images must be uint8 [N, C, H, W], got {self.images.dtype} {tuple(self.images.shape)}"
            )
        if self.labels.shape != (self.images.shape[0],):
            raise DatasetError(f"{self.name}: {self.images.shape[0]} images but {self.labels.shape[0]} labels")

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def subset(self, indices: Tensor, suffix: str) -> ImageDataset:
        return ImageDataset(
            self.images[indices], self.labels[indices], self.class_names, f"{self.name}{suffix}", self.version
        )


@dataclass(frozen=True)
class Splits:
    """Train / search / test, disjoint. ``search`` is held out of training for the searcher's scoring."""

    train: ImageDataset
    search: ImageDataset
    test: ImageDataset


def split_off(dataset: ImageDataset, held_out: int, seed: int = 0) -> tuple[ImageDataset, ImageDataset]:
    """Deterministically hold ``held_out`` images out of ``dataset`` (the same seed gives the same split)."""
    if not 0 < held_out < len(dataset):
        raise DatasetError(f"cannot hold out {held_out} of {len(dataset)} images")
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))
    kept, held = order[:-held_out].sort().values, order[-held_out:].sort().values
    return dataset.subset(kept, ""), dataset.subset(held, f"[held-out {held_out}, seed {seed}]")


# --- IDX (MNIST, Fashion-MNIST) ------------------------------------------------------------------


def _find(directory: Path, stem: str) -> Path:
    for candidate in (directory / stem, directory / f"{stem}.gz"):
        if candidate.exists():
            return candidate
    raise DatasetError(f"missing {stem}[.gz] in {directory}")


def load_idx(
    directory: Path, split: str, class_names: tuple[str, ...], name: str, version: str | None = None
) -> ImageDataset:
    """Load the ``train`` or ``t10k`` split of an MNIST-layout directory of IDX files."""
    prefix = {"train": "train", "test": "t10k"}[split]
    images_path = _find(directory, f"{prefix}-images-idx3-ubyte")
    images = read_idx(images_path)
    labels = read_idx(_find(directory, f"{prefix}-labels-idx1-ubyte"))
    if version is None:
        version = f"sha256:{hashlib.sha256(images_path.read_bytes()).hexdigest()[:16]}"
    return ImageDataset(
        torch.from_numpy(images.copy()).unsqueeze(1),
        torch.from_numpy(labels.astype(np.int64)),
        class_names,
        f"{name}/{split}",
        version,
    )


def fashion_mnist(split: str, directory: Path = FASHION_MNIST_DIR) -> ImageDataset:
    if not directory.exists():
        raise DatasetError(
            f"Fashion-MNIST not found at {directory}. Install it with "
            "`sudo apt-get install -y dataset-fashion-mnist`, or pass the directory holding the IDX files."
        )
    return load_idx(directory, split, FASHION_MNIST_CLASSES, "fashion-mnist", _debian_version(directory))


def _debian_version(directory: Path) -> str | None:
    """The Debian package version when the files are the packaged ones (None: hash the files instead)."""
    if directory != FASHION_MNIST_DIR:
        return None
    try:
        result = subprocess.run(
            ["dpkg-query", "-W", "-f=${Version}", "dataset-fashion-mnist"], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return f"debian:dataset-fashion-mnist={result.stdout.strip()}" if result.returncode == 0 and result.stdout else None


# --- CIFAR-10 -----------------------------------------------------------------------------------


class _CifarUnpickler(pickle.Unpickler):
    """The CIFAR-10 "python version" batches are pickles; allow only what they need to hold.

    A pickle can name any callable; this one refuses every global except numpy's array
    reconstruction, so a planted file cannot run code.
    """

    _ALLOWED: ClassVar[set[tuple[str, str]]] = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in self._ALLOWED:
            raise DatasetError(f"refusing to load {module}.{name} from a CIFAR batch: not plain data")
        return super().find_class(module, name)


def _read_cifar_python_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        batch = _CifarUnpickler(io.BytesIO(path.read_bytes()), encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, OSError) as error:
        raise DatasetError(f"{path} is not a readable CIFAR-10 python batch: {error}") from error
    data, labels = batch.get(b"data"), batch.get(b"labels")
    if data is None or labels is None:
        raise DatasetError(f"{path}: CIFAR batch without b'data' / b'labels'")
    return np.asarray(data, dtype=np.uint8).reshape(-1, 3, 32, 32), np.asarray(labels, dtype=np.int64)


def _read_cifar_binary_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    raw = np.frombuffer(path.read_bytes(), dtype=np.uint8)
    record = 1 + 3 * 32 * 32
    if raw.size % record:
        raise DatasetError(f"{path}: size {raw.size} is not a whole number of {record}-byte CIFAR records")
    rows = raw.reshape(-1, record)
    return rows[:, 1:].reshape(-1, 3, 32, 32), rows[:, 0].astype(np.int64)


def cifar10(directory: Path, split: str) -> ImageDataset:
    """CIFAR-10 from its python batches (``cifar-10-batches-py``) or its binary ones (``-bin``)."""
    python_names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    binary_names = [f"data_batch_{i}.bin" for i in range(1, 6)] if split == "train" else ["test_batch.bin"]
    if all((directory / n).exists() for n in python_names):
        parts = [_read_cifar_python_batch(directory / n) for n in python_names]
    elif all((directory / n).exists() for n in binary_names):
        parts = [_read_cifar_binary_batch(directory / n) for n in binary_names]
    else:
        raise DatasetError(f"{directory} holds neither CIFAR-10 python batches ({python_names[0]}) nor binary ones")
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    digest = hashlib.sha256(images.tobytes()).hexdigest()[:16]
    return ImageDataset(
        torch.from_numpy(images.copy()),
        torch.from_numpy(labels),
        CIFAR10_CLASSES,
        f"cifar10/{split}",
        f"sha256:{digest}",
    )


# --- ImageFolder --------------------------------------------------------------------------------


def image_folder(directory: Path, image_size: int, channels: int = 3) -> ImageDataset:
    """``directory/<class name>/<image>`` (torchvision's ImageFolder layout), resized to a square.

    Classes are the sorted sub-directory names. Images are decoded with Pillow, converted to
    ``channels`` (1: grayscale, 3: RGB) and resized to ``image_size`` x ``image_size``.
    """
    from PIL import Image, UnidentifiedImageError

    classes = sorted(p.name for p in directory.iterdir() if p.is_dir()) if directory.is_dir() else []
    if not classes:
        raise DatasetError(f"{directory} has no class sub-directories (expected <root>/<class>/<image>)")
    arrays, labels = [], []
    digest = hashlib.sha256()
    mode = {1: "L", 3: "RGB"}[channels]
    for label, class_name in enumerate(classes):
        for path in sorted((directory / class_name).iterdir()):
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            try:
                with Image.open(path) as image:
                    resized = image.convert(mode).resize((image_size, image_size), Image.Resampling.BILINEAR)
            except (UnidentifiedImageError, OSError) as error:
                raise DatasetError(f"cannot decode {path}: {error}") from error
            array = np.asarray(resized, dtype=np.uint8).reshape(image_size, image_size, channels)
            arrays.append(array.transpose(2, 0, 1))
            labels.append(label)
            digest.update(array.tobytes())
    if not arrays:
        raise DatasetError(f"{directory} has class folders but no images ({', '.join(IMAGE_SUFFIXES)})")
    return ImageDataset(
        torch.from_numpy(np.stack(arrays)),
        torch.tensor(labels, dtype=torch.int64),
        tuple(classes),
        f"imagefolder:{directory.name}",
        f"sha256:{digest.hexdigest()[:16]}",
    )


# --- one entry point for the CLI ----------------------------------------------------------------

DATASET_KINDS = ("fashion-mnist", "mnist", "cifar10", "imagefolder")


def load_splits(
    kind: str,
    path: Path | None,
    search_size: int = 5000,
    seed: int = 0,
    image_size: int | None = None,
    channels: int = 3,
) -> Splits:
    """Train, search and test splits for a dataset kind (see :data:`DATASET_KINDS`).

    The search split is ``search_size`` images held out of the official training split, so the
    searcher never scores on test images and never on images the network was trained on. An
    ImageFolder tree has no official test split: it must contain ``train/`` and ``test/``.
    """
    if kind == "fashion-mnist":
        directory = path or FASHION_MNIST_DIR
        train, test = fashion_mnist("train", directory), fashion_mnist("test", directory)
    elif kind == "mnist":
        if path is None:
            raise DatasetError("mnist needs --data pointing at the directory with its IDX files")
        names = tuple(str(i) for i in range(10))
        train, test = load_idx(path, "train", names, "mnist"), load_idx(path, "test", names, "mnist")
    elif kind == "cifar10":
        if path is None:
            raise DatasetError("cifar10 needs --data pointing at cifar-10-batches-py (or -bin)")
        train, test = cifar10(path, "train"), cifar10(path, "test")
    elif kind == "imagefolder":
        if path is None or image_size is None:
            raise DatasetError("imagefolder needs --data <root with train/ and test/> and an image size")
        train, test = (
            image_folder(path / "train", image_size, channels),
            image_folder(path / "test", image_size, channels),
        )
        if train.class_names != test.class_names:
            raise DatasetError(f"{path}: train/ and test/ have different class folders")
    else:
        raise DatasetError(f"unknown dataset kind {kind!r}; known: {', '.join(DATASET_KINDS)}")
    train, search = split_off(train, search_size, seed)
    return Splits(train=train, search=search, test=test)


def channel_stats(images: Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 images, scaled to [0, 1] (the manifest's normalization)."""
    pixels = images.to(torch.float64).div_(255.0).transpose(0, 1).reshape(images.shape[1], -1)
    return tuple(pixels.mean(1).tolist()), tuple(pixels.std(1).tolist())
