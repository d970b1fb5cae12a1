"""The bundle contract as data: what the searcher writes and everything else reads (docs/ARCHITECTURE.md).

A bundle is a directory of three files:

* ``weights.safetensors``: the network's weights, plus each served subnet's batch-norm statistics
  under ``bn.<subnet id>.<layer>.mean|var`` (:func:`bn_key_for`).
* ``subnets.json``: the ranked subnet table (:class:`SubnetTable`), fastest first.
* ``manifest.json``: how to rebuild and feed the network and where everything came from
  (:class:`Manifest`), including the SHA-256 of the two other files.

This module owns the two JSON files, their ids and their digests, and imports no torch, so the
load generator (which Locust patches with gevent) reads tables through it as the server does.
Both files are validated by pydantic on load; any error names the file and the field. Loading
the weights into a network is :mod:`slimserve.models.bundle`'s job.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

MANIFEST_SCHEMA_VERSION = 1
# 2 added each row's `depths` and let an inner unit be 0 (its residual block dropped: elastic depth).
# Schema-1 tables still load; every block of their subnets runs.
# 3 let a latency entry name the intra-op threads it was measured with, the best the profiler
# tried; the server runs that subnet at that batch size with them. Schema-2 entries have none.
# 4 added a row's `resolution`: the input width the subnet runs at (elastic resolution); rows
# without one, and all earlier tables, run at the input's own.
TABLE_SCHEMA_VERSION = 4
WEIGHTS_FILE = "weights.safetensors"
TABLE_FILE = "subnets.json"
MANIFEST_FILE = "manifest.json"
# A latency column's name (a key of a table's ``devices``) where a user names one: profile --column, latency_column.
COLUMN_NAME = r"[A-Za-z0-9_.-]{1,64}"


class BundleError(RuntimeError):
    """A bundle that cannot be served; the message names the file and what is wrong with it."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LatencyStat(_Strict):
    p50_ms: float = Field(gt=0)
    p95_ms: float = Field(gt=0)
    threads: int | None = Field(default=None, ge=1)  # intra-op threads used; None: the device profile's


class DeviceProfile(_Strict):
    """Where a latency column was measured, so a table profiled elsewhere is recognized as such."""

    device: str  # "cpu", "cuda:0"
    threads: int = Field(ge=1)
    processor: str  # CPU model or GPU name
    torch: str


class SubnetRow(_Strict):
    id: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    channels: tuple[int, ...]  # one count per unit; 0 drops that unit's residual block
    depths: tuple[int, ...] | None = None  # blocks run per stage; None only in schema-1 tables (all run)
    origin: str  # "searched", "uniform-0.5", ...
    flops: int = Field(ge=0)
    params: int = Field(ge=0)
    accuracy: float = Field(ge=0, le=1)  # top-1 on `accuracy_split`, measured with the served weights
    accuracy_split: str
    search_accuracy: float = Field(ge=0, le=1)  # top-1 on the search split, what ranking used
    latency: dict[str, dict[int, LatencyStat]]  # device-profile name -> batch size -> stats
    bn_key: str  # prefix of this subnet's batch-norm statistics in weights.safetensors
    gate_threshold: float | None = Field(default=None, ge=0, lt=1)  # gated bundles: gates at or below skip
    resolution: int | None = Field(default=None, ge=4)  # input width it runs at; None = the input's own

    @field_validator("latency")
    @classmethod
    def _has_batch_one(cls, value: dict[str, dict[int, LatencyStat]]) -> dict[str, dict[int, LatencyStat]]:
        for device, by_batch in value.items():
            if 1 not in by_batch:
                raise ValueError(f"latency for device profile {device!r} lacks batch size 1")
        return value


class SubnetTable(_Strict):
    """The ranked subnet table: rows from fastest to most accurate.

    Invariants (checked on load): ids and channel tuples are unique; on the primary device profile
    the batch-1 p50 latency strictly increases down the table, and so does the search-split accuracy
    (the searcher keeps only subnets on the accuracy/latency Pareto front).
    """

    schema_version: Literal[1, 2, 3, 4]
    unit_names: tuple[str, ...]
    group_size: int = Field(ge=1)
    primary_device: str  # the device profile the table was ranked on
    devices: dict[str, DeviceProfile]
    subnets: tuple[SubnetRow, ...] = Field(min_length=1)

    @model_validator(mode="after")
    def _check_ranked(self) -> SubnetTable:
        if self.primary_device not in self.devices:
            raise ValueError(f"primary_device {self.primary_device!r} is not among devices {sorted(self.devices)}")
        ids = [row.id for row in self.subnets]
        if len(set(ids)) != len(ids):
            raise ValueError(f"duplicate subnet ids in {ids}")
        if len({(row.channels, row.gate_threshold, row.resolution) for row in self.subnets}) != len(self.subnets):
            raise ValueError("two rows have the same channel tuple (and gate threshold and resolution)")
        for index, row in enumerate(self.subnets):
            if (row.depths is None) != (self.schema_version == 1):
                raise ValueError(
                    f"subnets[{index}] ({row.id}): depths are "
                    + ("required from schema 2 on" if row.depths is None else "not part of schema 1")
                )
            if self.schema_version < 3 and any(
                stat.threads is not None for by_batch in row.latency.values() for stat in by_batch.values()
            ):
                raise ValueError(
                    f"subnets[{index}] ({row.id}): latency threads are part of schema 3, not {self.schema_version}"
                )
            if self.schema_version < 4 and row.resolution is not None:
                raise ValueError(
                    f"subnets[{index}] ({row.id}): resolution is part of schema 4, not {self.schema_version}"
                )
            if len(row.channels) != len(self.unit_names):
                raise ValueError(
                    f"subnets[{index}] ({row.id}): {len(row.channels)} channel counts for {len(self.unit_names)} units"
                )
            unknown = set(row.latency) - set(self.devices)
            if unknown:
                raise ValueError(
                    f"subnets[{index}] ({row.id}): latency for undeclared device profiles {sorted(unknown)}"
                )
            if self.primary_device not in row.latency:
                raise ValueError(
                    f"subnets[{index}] ({row.id}): no latency on the primary device {self.primary_device!r}"
                )
        for index in range(1, len(self.subnets)):
            previous, row = self.subnets[index - 1], self.subnets[index]
            if row.latency[self.primary_device][1].p50_ms <= previous.latency[self.primary_device][1].p50_ms:
                raise ValueError(
                    f"subnets[{index}] ({row.id}) is not slower than subnets[{index - 1}] ({previous.id}) at batch 1: "
                    "rows must be ranked fastest first"
                )
            if row.search_accuracy <= previous.search_accuracy:
                raise ValueError(
                    f"subnets[{index}] ({row.id}) is slower but not more accurate than subnets[{index - 1}] "
                    f"({previous.id}): a dominated subnet must be filtered out"
                )
        return self

    def row(self, subnet_id: str) -> SubnetRow:
        for row in self.subnets:
            if row.id == subnet_id:
                return row
        raise KeyError(f"no subnet {subnet_id!r} in the table (ids: {', '.join(r.id for r in self.subnets)})")


class InputSpec(_Strict):
    channels: int = Field(ge=1)
    height: int = Field(ge=1)
    width: int = Field(ge=1)
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @model_validator(mode="after")
    def _per_channel(self) -> InputSpec:
        if not len(self.mean) == len(self.std) == self.channels:
            raise ValueError(f"mean and std need {self.channels} values each (one per channel)")
        if any(s <= 0 for s in self.std):
            raise ValueError("std values must be positive")
        return self


class DatasetInfo(_Strict):
    name: str
    version: str
    splits: dict[str, str]  # split name -> how it was made


class MultiStageSpec(_Strict):
    """What makes a bundle multi-stage (S2DNAS): the network's plan and how inputs leave it.

    The weights file then holds the multi-stage network (not a supernet) and one set of batch-norm
    statistics under :data:`MULTISTAGE_BN_KEY`. Row ``k`` of the table runs stages ``1 .. k+1``
    with exits and answers whatever is left at stage ``k+1``; its ``channels`` are the widths
    those stages add up to, its latency and accuracy are measured with the exits.
    """

    subnet: tuple[int, ...]  # the static network's channels
    splits: tuple[tuple[int, ...], ...]  # per unit: channels each stage owns
    concat: tuple[bool, ...]  # per block
    thresholds: tuple[float | None, ...]  # per stage but the last; None = never answers there
    stage_latency: dict[str, dict[int, tuple[float, ...]]]  # device profile -> batch -> p50 ms of each stage alone


class GatingSpec(_Strict):
    """What makes a bundle gated (LC-Net): the network the gates sit on and how they were trained.

    The weights file then holds the gated network (the base network's weights and the gates') and
    one set of batch-norm statistics under :data:`GATED_BN_KEY`. Every row runs that network with
    its own ``gate_threshold``; its accuracy, FLOPs (mean per image) and latency are measured on
    real images, because what runs depends on the input.
    """

    subnet: tuple[int, ...]  # the gated network's channels (every row's ``channels``)
    penalty: float = Field(ge=0)  # the sparsity penalty it was trained with


class Manifest(_Strict):
    schema_version: Literal[1]
    name: str
    family: str
    family_args: dict[str, Any]
    input: InputSpec
    class_names: tuple[str, ...] = Field(min_length=2)
    dataset: DatasetInfo
    weights_dtype: Literal["float32", "float16", "bfloat16"]
    sha256: dict[str, str]  # file name -> hex digest, for weights.safetensors and subnets.json
    provenance: dict[str, Any]
    multistage: MultiStageSpec | None = None
    gating: GatingSpec | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> Manifest:
        if self.multistage is not None and self.gating is not None:
            raise ValueError("a bundle is multi-stage or gated, not both")
        return self

    @field_validator("sha256")
    @classmethod
    def _both_files(cls, value: dict[str, str]) -> dict[str, str]:
        missing = {WEIGHTS_FILE, TABLE_FILE} - set(value)
        if missing:
            raise ValueError(f"missing digests for {sorted(missing)}")
        for name, digest in value.items():
            if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
                raise ValueError(f"digest for {name} is not a lowercase hex SHA-256")
        return value


MULTISTAGE_BN_KEY = "bn.stages"  # one set of statistics serves every stage (each channel has one stage)
GATED_BN_KEY = "bn.gated"  # one set serves every threshold (measured with the gates on)


def bn_key_for(subnet_id: str) -> str:
    return f"bn.{subnet_id}"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _read_json_model(path: Path, model: type[BaseModel]) -> Any:
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise BundleError(f"{path}: missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise BundleError(f"{path}: not valid JSON ({error})") from error
    try:
        return model.model_validate(raw)
    except ValidationError as error:
        raise BundleError(f"{path}: invalid {model.__name__}: {validation_problems(error)}") from None


def validation_problems(error: ValidationError, top_level: str = "(top level)") -> str:
    """A pydantic error on one line: where and what, for the first five problems."""
    return "; ".join(f"{'.'.join(str(p) for p in e['loc']) or top_level}: {e['msg']}" for e in error.errors()[:5])


def read_manifest(directory: Path) -> Manifest:
    result: Manifest = _read_json_model(directory / MANIFEST_FILE, Manifest)
    return result


def read_table(path: Path) -> SubnetTable:
    result: SubnetTable = _read_json_model(path, SubnetTable)
    return result


def verify_hashes(directory: Path, manifest: Manifest) -> None:
    """Stop on any file whose SHA-256 differs from the manifest's (tampered or half-copied bundles)."""
    for name, expected in manifest.sha256.items():
        path = directory / name
        if not path.exists():
            raise BundleError(f"{path}: missing (listed in {MANIFEST_FILE})")
        actual = sha256_file(path)
        if actual != expected:
            raise BundleError(f"{path}: SHA-256 {actual[:12]}... does not match {MANIFEST_FILE} ({expected[:12]}...)")


def rewrite_table(directory: str | Path, table: SubnetTable) -> None:
    """Replace a bundle's table (e.g. with a new device's latency column) and re-sign the manifest."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    # model_copy skips validation: re-validate, so a new column that breaks the ranking (say, two
    # subnets that measure the same on this device) is refused before anything is overwritten.
    try:
        table = SubnetTable.model_validate_json(table.model_dump_json())
    except ValidationError as error:
        raise BundleError(
            f"{directory / TABLE_FILE}: refusing to write an invalid table: {validation_problems(error)}"
        ) from None
    (directory / TABLE_FILE).write_text(table.model_dump_json(indent=2) + "\n")
    digests = {**manifest.sha256, TABLE_FILE: sha256_file(directory / TABLE_FILE)}
    updated = manifest.model_copy(update={"sha256": digests})
    (directory / MANIFEST_FILE).write_text(updated.model_dump_json(indent=2) + "\n")
