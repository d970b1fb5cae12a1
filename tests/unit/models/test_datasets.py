import gzip
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from slimserve.models.datasets import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_DIR,
    DatasetError,
    ImageDataset,
    channel_stats,
    cifar10,
    image_folder,
    load_idx,
    read_idx,
    split_off,
)


def test_fashion_mnist_test_split_is_the_real_one(fmnist_test: ImageDataset) -> None:
    assert fmnist_test.images.shape == (10_000, 1, 28, 28)
    assert fmnist_test.images.dtype == torch.uint8
    assert torch.bincount(fmnist_test.labels).tolist() == [1000] * 10
    assert fmnist_test.class_names == FASHION_MNIST_CLASSES
    assert fmnist_test.version.startswith(("debian:", "sha256:"))
    mean, std = channel_stats(fmnist_test.images[:2000])
    assert mean[0] == pytest.approx(0.286, abs=0.01) and std[0] == pytest.approx(0.353, abs=0.01)


def test_idx_reads_plain_and_gzip_and_rejects_bad_files(tmp_path: Path) -> None:
    raw = gzip.decompress((FASHION_MNIST_DIR / "t10k-labels-idx1-ubyte.gz").read_bytes())
    (tmp_path / "plain").write_bytes(raw)
    assert read_idx(tmp_path / "plain").shape == (10_000,)
    (tmp_path / "magic").write_bytes(b"\x00\x00\x0d\x01" + raw[4:])
    with pytest.raises(DatasetError, match="bad magic"):
        read_idx(tmp_path / "magic")
    (tmp_path / "short").write_bytes(raw[:-10])
    with pytest.raises(DatasetError, match="header declares"):
        read_idx(tmp_path / "short")
    with pytest.raises(DatasetError, match="missing t10k-images"):
        load_idx(tmp_path, "test", FASHION_MNIST_CLASSES, "x")


def test_held_out_split_is_deterministic_and_disjoint(fmnist_test: ImageDataset) -> None:
    kept, held = split_off(fmnist_test, 1000, seed=0)
    _, held2 = split_off(fmnist_test, 1000, seed=0)
    assert torch.equal(held.labels, held2.labels) and len(kept) == 9000 and len(held) == 1000
    rows = {img.numpy().tobytes() for img in held.images[:200]}
    assert not rows & {img.numpy().tobytes() for img in kept.images}
    _, other = split_off(fmnist_test, 1000, seed=1)
    assert not torch.equal(other.images, held.images)


def _cifar_arrays(n: int) -> tuple[np.ndarray, list[int]]:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (n, 3072), dtype=np.uint8), [int(v) for v in rng.integers(0, 10, n)]


def test_cifar_python_and_binary_batches(tmp_path: Path) -> None:
    data, labels = _cifar_arrays(20)
    py_dir, bin_dir = tmp_path / "py", tmp_path / "bin"
    py_dir.mkdir()
    bin_dir.mkdir()
    for name in ["test_batch"]:
        (py_dir / name).write_bytes(pickle.dumps({b"data": data, b"labels": labels}))
    records = np.concatenate([np.array(labels, dtype=np.uint8)[:, None], data], axis=1)
    (bin_dir / "test_batch.bin").write_bytes(records.tobytes())
    for directory in (py_dir, bin_dir):
        dataset = cifar10(directory, "test")
        assert dataset.images.shape == (20, 3, 32, 32)
        assert dataset.labels.tolist() == labels
        assert torch.equal(dataset.images[3].reshape(-1), torch.from_numpy(data[3]))


def test_cifar_pickle_with_code_is_refused_and_not_run(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (Path.touch, (marker,))

    (tmp_path / "test_batch").write_bytes(pickle.dumps({b"data": Exploit(), b"labels": []}))
    with pytest.raises(DatasetError, match="refusing to load"):
        cifar10(tmp_path, "test")
    assert not marker.exists()


def test_image_folder_tree(tmp_path: Path) -> None:
    for class_index, name in enumerate(["cats", "dogs"]):
        (tmp_path / name).mkdir()
        for i in range(3):
            Image.new("RGB", (40 + i, 30), (class_index * 200, i * 50, 10)).save(tmp_path / name / f"{i}.png")
    (tmp_path / "dogs" / "notes.txt").write_text("ignored")
    dataset = image_folder(tmp_path, image_size=16, channels=3)
    assert dataset.images.shape == (6, 3, 16, 16)
    assert dataset.class_names == ("cats", "dogs")
    assert dataset.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert int(dataset.images[3, 0].float().mean()) == 200
    gray = image_folder(tmp_path, image_size=8, channels=1)
    assert gray.images.shape == (6, 1, 8, 8)


def test_image_folder_errors_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="no class sub-directories"):
        image_folder(tmp_path, 16)
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DatasetError, match=r"broken\.png"):
        image_folder(tmp_path, 16)
