"""IDX files (MNIST, Fashion-MNIST), with numpy only: the load generator reads test images too,
and it must not import torch (Locust monkey-patches the process with gevent)."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np


class DatasetError(RuntimeError):
    """A dataset is missing or malformed; the message says which file and what to do."""


def read_idx(path: Path) -> np.ndarray:
    """Read one IDX file (optionally gzip-compressed) as a numpy array."""
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise DatasetError(f"cannot read {path}: {error.strerror}") from error
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DatasetError(f"{path} is not an unsigned-byte IDX file (bad magic {raw[:4].hex()})")
    ndim = raw[3]
    header = 4 + 4 * ndim
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    expected = int(np.prod(shape))
    if len(raw) - header != expected:
        raise DatasetError(f"{path}: header declares {shape} ({expected} bytes), file holds {len(raw) - header}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)
