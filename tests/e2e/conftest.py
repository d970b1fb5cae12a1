from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from slimserve.loadtest.runner import ServerProcess
from tests.helpers import make_tiny_bundle


@pytest.fixture(scope="session")
def tiny_bundle_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_bundle(tmp_path_factory.mktemp("e2e-bundle"))


@pytest.fixture
def bundle_copy(tiny_bundle_dir: Path, tmp_path: Path) -> Path:
    target = tmp_path / "bundle"
    shutil.copytree(tiny_bundle_dir, target)
    return target


@pytest.fixture
def server(tiny_bundle_dir: Path, tmp_path: Path) -> Iterator[ServerProcess]:
    process = ServerProcess(tiny_bundle_dir, "adaptive", log_path=tmp_path / "server.log").start()
    yield process
    process.stop()
