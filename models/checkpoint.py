"""The one place weights are read and written: safetensors only, never pickle.

A pickled checkpoint (``torch.save``'s ``.pt`` / ``.pth`` / ``.bin``, or anything that is not a
safetensors file) can run arbitrary code when loaded, so it is refused with a message that says
how to convert it, without ever being opened by an unpickler.
"""

from __future__ import annotations

import json
import struct
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from slimserve.models.registry import Supernet

_PICKLE_SUFFIXES = {".pt", ".pth", ".pkl", ".pickle", ".bin", ".ckpt", ".tar"}
_MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit


class CheckpointError(RuntimeError):
    """A weights file that is missing, not safetensors, or corrupt; the message names the file."""


def _check_safetensors(path: Path) -> dict[str, str]:
    """Validate the header without loading tensors; return the file's string metadata."""
    if path.suffix.lower() in _PICKLE_SUFFIXES:
        raise CheckpointError(
            f"{path}: refusing a {path.suffix} checkpoint - pickled weights can execute code on load. "
            "Convert it once in a trusted environment with "
            "safetensors.torch.save_file(torch.load(p, weights_only=True), 'weights.safetensors')."
        )
    try:
        with path.open("rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise CheckpointError(f"{path}: too short to be a safetensors file")
            (header_size,) = struct.unpack("<Q", prefix)
            if header_size > _MAX_HEADER_BYTES:
                raise CheckpointError(f"{path}: not a safetensors file (header size {header_size} is implausible)")
            header = json.loads(handle.read(header_size))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such weights file") from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError(f"{path}: not a safetensors file (header is not JSON); pickles are refused") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: not a safetensors file (header is not a JSON object)")
    metadata = header.get("__metadata__") or {}
    return {str(k): str(v) for k, v in metadata.items()}


def load_weights(path: str | Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Load a safetensors file: ``(tensors, metadata)``. Raises :class:`CheckpointError` on anything else."""
    path = Path(path)
    metadata = _check_safetensors(path)
    try:
        return load_file(path), metadata
    except (SafetensorError, OSError) as error:
        raise CheckpointError(f"{path}: corrupt safetensors file: {error}") from error


def save_weights(path: str | Path, tensors: dict[str, Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write tensors atomically (a crash mid-write never leaves a truncated checkpoint behind)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, partial, metadata=metadata)
    partial.replace(path)


# --- supernet checkpoints: weights plus what is needed to rebuild and feed the network ---------

SUPERNET_FORMAT = "slimserve-supernet/1"


@dataclass(frozen=True)
class SupernetInfo:
    """Everything besides weights that a supernet checkpoint records, stored as safetensors metadata."""

    family: str
    family_args: dict[str, Any]
    mean: tuple[float, ...]  # input normalization, per channel, on [0, 1] pixels
    std: tuple[float, ...]
    class_names: tuple[str, ...]
    dataset: str
    dataset_version: str
    provenance: dict[str, Any] = field(default_factory=dict)  # command, seed, versions, train config, step

    def to_metadata(self) -> dict[str, str]:
        return {"format": SUPERNET_FORMAT, "info": json.dumps(asdict(self), sort_keys=True)}

    @classmethod
    def from_metadata(cls, metadata: dict[str, str], path: Path) -> SupernetInfo:
        if metadata.get("format") != SUPERNET_FORMAT or "info" not in metadata:
            raise CheckpointError(
                f"{path}: not a slimserve supernet checkpoint (metadata format {metadata.get('format')!r})"
            )
        raw = json.loads(metadata["info"])
        return cls(
            family=raw["family"],
            family_args=raw["family_args"],
            mean=tuple(raw["mean"]),
            std=tuple(raw["std"]),
            class_names=tuple(raw["class_names"]),
            dataset=raw["dataset"],
            dataset_version=raw["dataset_version"],
            provenance=raw.get("provenance", {}),
        )


def save_supernet(
    path: str | Path, supernet: nn.Module | Supernet, info: SupernetInfo, extra: dict[str, Tensor] | None = None
) -> None:
    """Write a supernet's parameters (plus optional extra tensors, e.g. optimizer state) and its info."""
    tensors = {name: param.detach().float().cpu() for name, param in supernet.state_dict().items()}
    tensors.update(extra or {})
    save_weights(path, tensors, info.to_metadata())


def load_supernet(path: str | Path) -> tuple[Any, SupernetInfo, dict[str, Tensor]]:
    """Rebuild a supernet from a checkpoint: ``(supernet, info, extra tensors not in the network)``."""
    from slimserve.models.families import create_supernet

    path = Path(path)
    tensors, metadata = load_weights(path)
    info = SupernetInfo.from_metadata(metadata, path)
    supernet = create_supernet(info.family, **info.family_args)
    own = set(supernet.state_dict())
    missing = own - set(tensors)
    if missing:
        raise CheckpointError(f"{path}: missing parameters for {info.family}: {', '.join(sorted(missing)[:5])}")
    try:
        supernet.load_state_dict({k: tensors[k] for k in own})
    except RuntimeError as error:
        raise CheckpointError(f"{path}: weights do not fit {info.family}{info.family_args}: {error}") from error
    return supernet, info, {k: v for k, v in tensors.items() if k not in own}


# --- networks made from a supernet's subnet (multi-stage, gated) -----------------------------


def save_derived(
    path: str | Path,
    model: nn.Module,
    info: SupernetInfo,
    kind: str,
    fields: dict[str, Any],
    extra: dict[str, Tensor] | None = None,
) -> None:
    """A network built on a supernet: its parameters (plus ``extra``), the supernet's info, and the
    JSON ``fields`` that rebuild it, under metadata format ``kind``."""
    tensors = {name: t.detach().float().cpu() for name, t in model.state_dict().items()}
    tensors.update(extra or {})
    metadata = {"format": kind, "info": json.dumps(asdict(info), sort_keys=True)}
    metadata.update({key: json.dumps(value) for key, value in fields.items()})
    save_weights(path, tensors, metadata)


def load_derived(path: str | Path, kind: str, what: str) -> tuple[Any, SupernetInfo, dict[str, Any], dict[str, Tensor]]:
    """``(fresh supernet of the recorded family, info, fields, tensors)`` from a :func:`save_derived` file;
    build the network from the supernet and fields, then :func:`load_own_state`."""
    from slimserve.models.families import create_supernet

    path = Path(path)
    tensors, metadata = load_weights(path)
    if metadata.get("format") != kind:
        raise CheckpointError(f"{path}: not a slimserve {what} checkpoint (format {metadata.get('format')!r})")
    info = SupernetInfo.from_metadata({"format": SUPERNET_FORMAT, "info": metadata["info"]}, path)
    fields = {key: json.loads(value) for key, value in metadata.items() if key not in ("format", "info")}
    return create_supernet(info.family, **info.family_args), info, fields, tensors


def load_own_state(path: str | Path, model: nn.Module, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """Load ``model``'s parameters from ``tensors``; returns the tensors that are not its own (step, momentum)."""
    own = set(model.state_dict())
    missing = own - set(tensors)
    if missing:
        raise CheckpointError(f"{path}: missing parameters {', '.join(sorted(missing)[:5])}")
    model.load_state_dict({k: tensors[k] for k in own})
    return {k: v for k, v in tensors.items() if k not in own}
