"""A bundle's weights as a servable network: load, verify and rebuild it, or write one.

The files and their JSON contract are :mod:`slimserve.models.schema`'s; this module adds what needs
torch: the supernet (or multi-stage / gated network) rebuilt from ``weights.safetensors`` with each
row's batch-norm statistics, and the writer the searcher uses.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from slimserve.models.checkpoint import CheckpointError, SupernetInfo, load_weights, save_weights
from slimserve.models.datasets import Splits
from slimserve.models.families import create_supernet
from slimserve.models.gating import GatedResNet, GatedStatic
from slimserve.models.multistage import InvalidPlanError, MultiStageResNet, StagedResNet, StagePlan
from slimserve.models.ops import BNStats
from slimserve.models.registry import Supernet
from slimserve.models.resnet import SlimResNet
from slimserve.models.resolution import materialize
from slimserve.models.schema import (
    GATED_BN_KEY,
    MANIFEST_FILE,
    MANIFEST_SCHEMA_VERSION,
    MULTISTAGE_BN_KEY,
    TABLE_FILE,
    WEIGHTS_FILE,
    BundleError,
    GatingSpec,
    Manifest,
    MultiStageSpec,
    SubnetRow,
    SubnetTable,
    read_manifest,
    read_table,
    sha256_file,
    verify_hashes,
)
from slimserve.models.subnet import InvalidSubnetError


@dataclass(frozen=True)
class Bundle:
    """A loaded, verified bundle: the supernet with its weights, the table and each row's BN statistics."""

    path: Path
    manifest: Manifest
    table: SubnetTable
    supernet: Supernet  # a Supernet (see models.registry), in eval mode
    bn_stats: dict[str, BNStats]  # subnet id -> statistics
    staged: StagedResNet | None = None  # multi-stage bundles: the network as served
    gated: GatedStatic | None = None  # gated bundles: the network as served, at threshold 0

    def materialize(self, row: SubnetRow) -> nn.Module:
        """A plain bundle's row as a static module (at its resolution): what the server runs for it."""
        return materialize(self.supernet, row.channels, self.bn_stats[row.id], row.resolution)

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
        if row.resolution is not None and (manifest.multistage or manifest.gating):
            raise BundleError(
                f"{directory / TABLE_FILE}: subnets[{index}].resolution: only plain supernet rows have one"
            )
        if row.resolution is not None and row.resolution > manifest.input.width:
            raise BundleError(
                f"{directory / TABLE_FILE}: subnets[{index}].resolution: {row.resolution} exceeds the input width "
                f"{manifest.input.width} (a row may only shrink its input)"
            )
        stats = _unpack_bn(tensors, row.bn_key, device)
        if not stats:
            raise BundleError(f"{directory / WEIGHTS_FILE}: no batch-norm statistics under {row.bn_key!r} for {row.id}")
        bn_stats[row.id] = stats
    return Bundle(directory, manifest, table, supernet, bn_stats, staged, gated)


def _load_state(module: nn.Module | Supernet, tensors: dict[str, Tensor], directory: Path, what: str) -> None:
    own = module.state_dict()
    missing = [k for k in own if k not in tensors]
    if missing:
        raise BundleError(f"{directory / WEIGHTS_FILE}: missing tensors {missing[:3]}")
    try:
        module.load_state_dict({k: tensors[k].to(torch.float32) for k in own})
    except RuntimeError as error:
        raise BundleError(f"{directory / WEIGHTS_FILE}: weights do not fit {what}: {error}") from error


def _load_staged(
    supernet: Supernet,
    spec: MultiStageSpec,
    table: SubnetTable,
    tensors: dict[str, Tensor],
    directory: Path,
    device: str,
) -> StagedResNet:
    """Rebuild a multi-stage bundle's network; every row must name the widths of its stages."""
    plan = StagePlan(spec.splits, spec.concat)
    where = directory / MANIFEST_FILE
    if not isinstance(supernet, SlimResNet):
        raise BundleError(f"{where}: multistage: S2DNAS needs a ResNet family, not {type(supernet).__name__}")
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
    supernet: Supernet, spec: GatingSpec, table: SubnetTable, tensors: dict[str, Tensor], directory: Path, device: str
) -> GatedStatic:
    """Rebuild a gated bundle's network; every row must run it, with a gate threshold."""
    if not isinstance(supernet, SlimResNet):
        raise BundleError(
            f"{directory / MANIFEST_FILE}: gating: LC-Net needs a ResNet family, not {type(supernet).__name__}"
        )
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


def write_bundle(
    directory: str | Path,
    supernet: nn.Module | Supernet,
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
