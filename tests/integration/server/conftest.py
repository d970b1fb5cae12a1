from __future__ import annotations

import io
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from slimserve.server.app import create_app
from slimserve.server.settings import Settings
from tests.helpers import make_tiny_bundle


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_bundle(tmp_path_factory.mktemp("bundle"))


def wait_ready(client: TestClient, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while client.get("/readyz").status_code != 200:
        assert time.monotonic() < deadline, client.get("/readyz").json()
        time.sleep(0.05)


@pytest.fixture
def client_factory(tiny_bundle: Path):
    clients: list[TestClient] = []

    def make(**overrides) -> TestClient:
        settings = Settings(bundle=overrides.pop("bundle", tiny_bundle), **overrides)
        client = TestClient(create_app(settings), raise_server_exceptions=False)
        client.__enter__()
        clients.append(client)
        wait_ready(client)
        return client

    yield make
    for client in clients:
        client.__exit__(None, None, None)


@pytest.fixture
def client(client_factory) -> Iterator[TestClient]:
    yield client_factory()


def png(value: int = 128, size: tuple[int, int] = (28, 28), mode: str = "L") -> bytes:
    buffer = io.BytesIO()
    array = np.full((size[1], size[0]), value, dtype=np.uint8)
    Image.fromarray(array).convert(mode).save(buffer, "PNG")
    return buffer.getvalue()
