"""The bundle: what the searcher writes and the server reads (a contract; see docs/ARCHITECTURE.md).

A bundle is a directory of three files:

* ``weights.safetensors``: supernet weights, plus each served subnet's batch-norm statistics under
  ``bn.<subnet id>.<layer>.mean|var``.
* ``subnets.json``: the ranked subnet table (:class:`SubnetTable`), fastest first.
* ``manifest.json``: how to rebuild and feed the network and where everything came from
  (:class:`Manifest`), including the SHA-256 of the two other files.

Both JSON files are validated by pydantic on load; any error names the file and the field.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from torch import Tensor, nn

from models.checkpoint import CheckpointError, SupernetInfo, load_weights, save_weights
from models.datasets import Splits
from models.families import create_supernet
from models.gating import GatedResNet, GatedStatic
from models.multistage import InvalidPlanError, MultiStageResNet, StagedResNet, StagePlan
from models.ops import BNStats
from models.subnet import InvalidSubnetError

MANIFEST_SCHEMA_VERSION = 1
# 2 added each row's `depths` and let an inner unit be 0 (its residual block dropped: elastic depth).
# Schema-1 tables still load; every block of their subnets runs.
# 3 let a latency entry name the intra-op threads it was measured with, the best the profiler
# tried; the server runs that subnet at that batch size with them. Schema-2 entries have none.
TABLE_SCHEMA_VERSION = 3
WEIGHTS_FILE = "weights.safetensors"
TABLE_FILE = "subnets.json"
MANIFEST_FILE = "manifest.json"


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

    schema_version: Literal[1, 2, 3]
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
        if len({(row.channels, row.gate_threshold) for row in self.subnets}) != len(self.subnets):
            raise ValueError("two rows have the same channel tuple (and gate threshold)")
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


@dataclass(frozen=True)
class Bundle:
    """A loaded, verified bundle: the supernet with its weights, the table and each row's BN statistics."""

    path: Path
    manifest: Manifest
    table: SubnetTable
    supernet: Any  # a Supernet (see models.registry), in eval mode
    bn_stats: dict[str, BNStats]  # subnet id -> statistics
    staged: StagedResNet | None = None  # multi-stage bundles: the network as served
    gated: GatedStatic | None = None  # gated bundles: the network as served, at threshold 0

    @property
    def staged_plan(self) -> StagePlan:
        """The plan of a multi-stage bundle."""
        spec = self.manifest.multistage
        if spec is None:
            raise BundleError(f"{self.path}: not a multi-stage bundle")
        return StagePlan(spec.splits, spec.concat)

    @property
    def thresholds(self) -> tuple[float, ...]:
        """Exit thresholds of a multi-stage bundle (``inf``: never exits there)."""
        spec = self.manifest.multistage
        if spec is None:
            raise BundleError(f"{self.path}: not a multi-stage bundle")
        return tuple(math.inf if t is None else t for t in spec.thresholds)


def supernet_info(manifest: Manifest) -> SupernetInfo:
    """What a supernet checkpoint would record, from a bundle's manifest: a bundle's network can be a
    starting point (of LC-Net gates, say) like a checkpoint."""
    dataset = manifest.dataset.name
    return SupernetInfo(
        family=manifest.family,
        family_args=manifest.family_args,
        mean=manifest.input.mean,
        std=manifest.input.std,
        class_names=manifest.class_names,
        dataset=dataset.split("/")[0],
        dataset_version=manifest.dataset.version,
        provenance={"from_bundle": manifest.name, **manifest.provenance},
    )


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
        raise BundleError(f"{path}: invalid {model.__name__}: {_problems(error)}") from None


def _problems(error: ValidationError) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in e['loc']) or '(top level)'}: {e['msg']}" for e in error.errors()[:5])


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


def load_bundle(directory: str | Path, *, verify: bool = True, device: str = "cpu") -> Bundle:
    """Read, verify and rebuild a bundle. Raises :class:`BundleError` naming the file and field at fault."""
    directory = Path(directory)
    if not directory.is_dir():
        raise BundleError(f"{directory}: bundle directory not found")
    manifest = read_manifest(directory)
    if verify:
        verify_hashes(directory, manifest)
    table = read_table(directory / TABLE_FILE)
    try:
        tensors, _ = load_weights(directory / WEIGHTS_FILE)
    except CheckpointError as error:
        raise BundleError(str(error)) from error
    try:
        supernet = create_supernet(manifest.family, **manifest.family_args)
    except ValueError as error:
        raise BundleError(f"{directory / MANIFEST_FILE}: family: {error}") from error
    if tuple(supernet.space.unit_names) != table.unit_names:
        raise BundleError(f"{directory / TABLE_FILE}: unit_names do not match family {manifest.family!r}")
    staged, gated = None, None
    if manifest.multistage is not None:
        staged = _load_staged(supernet, manifest.multistage, table, tensors, directory, device)
    elif manifest.gating is not None:
        gated = _load_gated(supernet, manifest.gating, table, tensors, directory, device)
    else:
        _load_state(supernet, tensors, directory, manifest.family)
        for index, row in enumerate(table.subnets):
            if row.gate_threshold is not None:
                raise BundleError(
                    f"{directory / TABLE_FILE}: subnets[{index}].gate_threshold: only rows of a gated bundle have one"
                )
    supernet.to(device).eval()
    bn_stats: dict[str, BNStats] = {}
    for index, row in enumerate(table.subnets):
        try:
            depths = supernet.space.depths(row.channels)
        except InvalidSubnetError as error:
            raise BundleError(f"{directory / TABLE_FILE}: subnets[{index}].channels: {error}") from error
        if row.depths is not None and row.depths != depths:
            raise BundleError(
                f"{directory / TABLE_FILE}: subnets[{index}].depths: {list(row.depths)} but its channels run {list(depths)}"
            )
        stats = _unpack_bn(tensors, row.bn_key, device)
        if not stats:
            raise BundleError(f"{directory / WEIGHTS_FILE}: no batch-norm statistics under {row.bn_key!r} for {row.id}")
        bn_stats[row.id] = stats
    return Bundle(directory, manifest, table, supernet, bn_stats, staged, gated)


def _load_state(module: nn.Module, tensors: dict[str, Tensor], directory: Path, what: str) -> None:
    own = module.state_dict()
    missing = [k for k in own if k not in tensors]
    if missing:
        raise BundleError(f"{directory / WEIGHTS_FILE}: missing tensors {missing[:3]}")
    try:
        module.load_state_dict({k: tensors[k].to(torch.float32) for k in own})
    except RuntimeError as error:
        raise BundleError(f"{directory / WEIGHTS_FILE}: weights do not fit {what}: {error}") from error


def _load_staged(
    supernet: Any, spec: MultiStageSpec, table: SubnetTable, tensors: dict[str, Tensor], directory: Path, device: str
) -> StagedResNet:
    """Rebuild a multi-stage bundle's network; every row must name the widths of its stages."""
    plan = StagePlan(spec.splits, spec.concat)
    where = directory / MANIFEST_FILE
    try:
        model = MultiStageResNet(supernet, spec.subnet, plan)
    except (InvalidPlanError, InvalidSubnetError) as error:
        raise BundleError(f"{where}: multistage: {error}") from error
    if len(spec.thresholds) != plan.stages - 1:
        raise BundleError(f"{where}: multistage.thresholds: {plan.stages} stages need {plan.stages - 1} thresholds")
    _load_state(model, tensors, directory, "its multi-stage network")
    last_stages = row_stages(plan, table)
    for index, (row, stage) in enumerate(zip(table.subnets, last_stages, strict=True)):
        if row.bn_key != MULTISTAGE_BN_KEY:
            raise BundleError(
                f"{directory / TABLE_FILE}: subnets[{index}].bn_key: a multi-stage row uses {MULTISTAGE_BN_KEY!r}"
            )
        if stage is None or (index and (last_stages[index - 1] or 0) >= stage):
            widths = "; ".join(str(list(stage_widths(plan, s))) for s in range(plan.stages))
            raise BundleError(
                f"{directory / TABLE_FILE}: subnets[{index}].channels: a multi-stage row runs stages 1..k, later rows "
                f"more of them; its channels must be one of these, in order: {widths}"
            )
    return _materialized(model, tensors, MULTISTAGE_BN_KEY, directory, device)


def _load_gated(
    supernet: Any, spec: GatingSpec, table: SubnetTable, tensors: dict[str, Tensor], directory: Path, device: str
) -> GatedStatic:
    """Rebuild a gated bundle's network; every row must run it, with a gate threshold."""
    try:
        model = GatedResNet(supernet, spec.subnet)
    except (InvalidSubnetError, ValueError) as error:
        raise BundleError(f"{directory / MANIFEST_FILE}: gating: {error}") from error
    _load_state(model, tensors, directory, "its gated network")
    for index, row in enumerate(table.subnets):
        where = f"{directory / TABLE_FILE}: subnets[{index}]"
        if row.channels != model.subnet:
            raise BundleError(f"{where}.channels: a gated row runs the gated network, {list(model.subnet)}")
        if row.gate_threshold is None:
            raise BundleError(f"{where}.gate_threshold: required in a gated bundle")
        if row.bn_key != GATED_BN_KEY:
            raise BundleError(f"{where}.bn_key: a gated row uses {GATED_BN_KEY!r}")
    return _materialized(model, tensors, GATED_BN_KEY, directory, device)


def _materialized(model: Any, tensors: dict[str, Tensor], bn_key: str, directory: Path, device: str) -> Any:
    """A multi-stage or gated network as served, from the one set of statistics under ``bn_key``."""
    try:
        return model.materialize(_unpack_bn(tensors, bn_key, "cpu")).to(device)
    except (KeyError, ValueError, RuntimeError) as error:
        raise BundleError(f"{directory / WEIGHTS_FILE}: batch-norm statistics under {bn_key!r}: {error}") from error


def row_stages(plan: StagePlan, table: SubnetTable) -> tuple[int | None, ...]:
    """The last stage (0-based) each row of a multi-stage table runs; None where its channels fit none."""
    by_widths = {stage_widths(plan, stage): stage for stage in range(plan.stages)}
    return tuple(by_widths.get(row.channels) for row in table.subnets)


def stage_widths(plan: StagePlan, stage: int) -> tuple[int, ...]:
    """Channels of each unit that stages ``1 .. stage+1`` compute together (a multi-stage row's ``channels``)."""
    return tuple(plan.ends(unit)[stage] for unit in range(len(plan.splits)))


def _unpack_bn(tensors: dict[str, Tensor], prefix: str, device: str) -> BNStats:
    stats: BNStats = {}
    for key, value in tensors.items():
        if key.startswith(prefix + ".") and key.endswith(".mean"):
            layer = key[len(prefix) + 1 : -len(".mean")]
            var = tensors.get(f"{prefix}.{layer}.var")
            if var is None:
                raise BundleError(f"{WEIGHTS_FILE}: {key} has no matching .var")
            stats[layer] = (value.to(device, torch.float32), var.to(device, torch.float32))
    return stats


MULTISTAGE_BN_KEY = "bn.stages"  # one set of statistics serves every stage (each channel has one stage)
GATED_BN_KEY = "bn.gated"  # one set serves every threshold (measured with the gates on)


def bn_key_for(subnet_id: str) -> str:
    return f"bn.{subnet_id}"


def write_bundle(
    directory: str | Path,
    supernet: Any,
    table: SubnetTable,
    bn_stats: dict[str, BNStats],
    manifest_fields: dict[str, Any],
    weights_dtype: str = "float16",
) -> Manifest:
    """Write the three bundle files; the manifest gets the files' digests. Returns the manifest."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[weights_dtype]
    tensors: dict[str, Tensor] = {k: v.detach().to("cpu", dtype) for k, v in supernet.state_dict().items()}
    for row in table.subnets:
        for layer, (mean, var) in bn_stats[row.id].items():
            tensors[f"{row.bn_key}.{layer}.mean"] = mean.detach().cpu().float()
            tensors[f"{row.bn_key}.{layer}.var"] = var.detach().cpu().float()
    save_weights(directory / WEIGHTS_FILE, tensors, {"format": "slimserve-bundle/1"})
    (directory / TABLE_FILE).write_text(table.model_dump_json(indent=2) + "\n")
    manifest = Manifest.model_validate(
        {
            **manifest_fields,
            "schema_version": MANIFEST_SCHEMA_VERSION,
            "weights_dtype": weights_dtype,
            "sha256": {name: sha256_file(directory / name) for name in (WEIGHTS_FILE, TABLE_FILE)},
        }
    )
    (directory / MANIFEST_FILE).write_text(manifest.model_dump_json(indent=2) + "\n")
    return manifest


def manifest_fields(
    info: SupernetInfo, input_shape: tuple[int, ...], splits: Splits, provenance: dict[str, Any]
) -> dict[str, Any]:
    """The manifest of a bundle made from a checkpoint with ``info`` (the writer adds digests)."""
    return {
        "name": f"{info.dataset}-{info.family}",
        "family": info.family,
        "family_args": info.family_args,
        "input": {
            "channels": input_shape[0],
            "height": input_shape[1],
            "width": input_shape[2],
            "mean": list(info.mean),
            "std": list(info.std),
        },
        "class_names": list(info.class_names),
        "dataset": {
            "name": info.dataset,
            "version": info.dataset_version,
            "splits": {
                "train": f"{splits.train.name}: {len(splits.train)} images (official train split minus the search split)",
                "search": f"{splits.search.name}: {len(splits.search)} images, scored candidates, never trained on",
                "test": f"{splits.test.name}: {len(splits.test)} images, reported accuracy, never searched on",
            },
        },
        "provenance": {**provenance, "supernet": info.provenance},
    }


def rewrite_table(directory: str | Path, table: SubnetTable) -> None:
    """Replace a bundle's table (e.g. with a new device's latency column) and re-sign the manifest."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    # model_copy skips validation: re-validate, so a new column that breaks the ranking (say, two
    # subnets that measure the same on this device) is refused before anything is overwritten.
    try:
        table = SubnetTable.model_validate_json(table.model_dump_json())
    except ValidationError as error:
        raise BundleError(f"{directory / TABLE_FILE}: refusing to write an invalid table: {_problems(error)}") from None
    (directory / TABLE_FILE).write_text(table.model_dump_json(indent=2) + "\n")
    digests = {**manifest.sha256, TABLE_FILE: sha256_file(directory / TABLE_FILE)}
    updated = manifest.model_copy(update={"sha256": digests})
    (directory / MANIFEST_FILE).write_text(updated.model_dump_json(indent=2) + "\n")
