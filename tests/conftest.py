"""Shared fixtures. Tests live in tests/{unit,integration,e2e}; the folder sets the marker."""

from __future__ import annotations

import os

# Before torch loads libgomp: idle OpenMP threads sleep instead of spinning, so the server's
# worker, the event loop and the test client share 2 cores without starving each other.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from pathlib import Path

import pytest
import torch

from slimserve.models.datasets import FASHION_MNIST_DIR, ImageDataset, fashion_mnist

TESTS = Path(__file__).parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        kind = Path(str(item.fspath)).relative_to(TESTS).parts[0]
        if kind in ("unit", "integration", "e2e"):
            item.add_marker(getattr(pytest.mark, kind))


@pytest.fixture(autouse=True, scope="session")
def _torch_threads() -> None:
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))


@pytest.fixture(scope="session")
def fmnist_test() -> ImageDataset:
    """The real Fashion-MNIST test split (installed by `make test` via `make data`)."""
    if not FASHION_MNIST_DIR.exists():
        pytest.fail("Fashion-MNIST is not installed: run `sudo apt-get install -y dataset-fashion-mnist` (make data)")
    return fashion_mnist("test")


@pytest.fixture(scope="session")
def fmnist_train() -> ImageDataset:
    if not FASHION_MNIST_DIR.exists():
        pytest.fail("Fashion-MNIST is not installed: run `sudo apt-get install -y dataset-fashion-mnist` (make data)")
    return fashion_mnist("train")
