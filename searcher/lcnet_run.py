"""``slimserve lcnet``: a trained network in, LC-Net gates trained for several penalties, operating points out.

Phases, each resumable from what it wrote in ``--out``: train gates and network jointly once per
penalty (``gated-penalty-<p>.safetensors``, checkpointed); calibrate each gated network's batch
norm; measure every (penalty, threshold) operating point on the search and test splits (accuracy,
mean FLOPs per image, blocks and channel groups run); time them at batch 1, 8 and 32 against the
ungated network. The report goes to ``--report-dir``; with ``--bundle``, the chosen penalty's
thresholds become the rows of a servable bundle.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from slimserve.models.bn_calibration import calibrate_module_bn
from slimserve.models.bundle import manifest_fields, write_bundle
from slimserve.models.checkpoint import SupernetInfo
from slimserve.models.datasets import Splits
from slimserve.models.evaluate import accuracy, calibration_images
from slimserve.models.fine_tune import FineTuneConfig
from slimserve.models.flops import count_flops
from slimserve.models.gating import GatedResNet, GatedStatic
from slimserve.models.gating_train import evaluate_gates, gate_flops, train_gates
from slimserve.models.ops import BNStats
from slimserve.models.resnet import SlimResNet
from slimserve.models.resolution import materialize
from slimserve.models.schema import GATED_BN_KEY, GatingSpec, LatencyStat, SubnetRow, SubnetTable
from slimserve.models.subnet import Subnet
from slimserve.models.transforms import normalize
from slimserve.searcher.latency import ProfileSettings, device_profile, measure, profiled_table, ranked_rows

log = logging.getLogger(__name__)

BATCH_SIZES = (1, 8, 32)


@dataclass(frozen=True)
class LCNetConfig:
    penalties: tuple[float, ...] = (0.1, 0.25, 0.5)  # sparsity penalty weights, one trained network each
    thresholds: tuple[float, ...] = (0.0, 0.05, 0.1, 0.2, 0.3)  # a gate at or below skips; one point each
    finetune: FineTuneConfig = field(default_factory=lambda: FineTuneConfig(steps=600))
    target_drop: float = 0.005  # the served network: most FLOPs saved within this of the ungated (search split)

    def __post_init__(self) -> None:
        if not self.penalties or min(self.penalties) < 0:
            raise ValueError(f"penalties must be one or more weights >= 0, got {self.penalties}")
        if not self.thresholds or not all(0 <= t < 1 for t in self.thresholds):
            raise ValueError(f"thresholds must be one or more gate values in [0, 1), got {self.thresholds}")
        if not 0 <= self.target_drop < 1:
            raise ValueError(f"target drop is a share of accuracy in [0, 1), got {self.target_drop}")
        if self.finetune.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.finetune.steps}")


def checkpoint_path(out_dir: Path, penalty: float) -> Path:
    return out_dir / f"gated-penalty-{penalty:g}.safetensors"


def train_all(
    base: SlimResNet,
    subnet: Subnet,
    teacher: nn.Module,
    info: SupernetInfo,
    splits: Splits,
    config: LCNetConfig,
    out_dir: Path,
) -> list[GatedResNet]:
    """One gated network per penalty, each from a fresh copy of ``base`` (resumes finished and half-done runs)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    models = []
    for penalty in config.penalties:
        model = GatedResNet(copy.deepcopy(base), subnet)
        train_gates(
            model,
            splits.train,
            info.mean,
            info.std,
            config.finetune,
            penalty,
            checkpoint=checkpoint_path(out_dir, penalty),
            info=info,
            teacher=teacher,
            description=f"gates, penalty {penalty:g}",
        )
        models.append(model)
    return models


def operating_points(
    model: GatedResNet,
    calibration: Tensor,
    splits: Splits,
    info: SupernetInfo,
    fixed_flops: float,
    thresholds: Sequence[float],
    test: bool = True,
) -> tuple[GatedStatic, list[dict[str, Any]]]:
    """The gated network as served (batch norm calibrated with its gates on) and its points, one per threshold.

    Weights are first rounded to fp16, as a bundle stores them, so every figure is of what is served.
    """
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(parameter.half().float())
    static = model.materialize(calibrate_module_bn(model, calibration))
    points = []
    for threshold in thresholds:
        at = static.at_threshold(threshold)
        point: dict[str, Any] = {
            "threshold": threshold,
            "search": evaluate_gates(at, splits.search, info.mean, info.std, fixed_flops).to_json(),
        }
        if test:
            point["test"] = evaluate_gates(at, splits.test, info.mean, info.std, fixed_flops).to_json()
        points.append(point)
    return static, points


def run(
    base: SlimResNet,
    subnet: Subnet,
    source_stats: BNStats,
    info: SupernetInfo,
    splits: Splits,
    config: LCNetConfig,
    out_dir: Path,
    *,
    front: Sequence[tuple[SubnetRow, BNStats]] = (),
    profile: ProfileSettings | None = None,
    bundle_dir: Path | None = None,
    provenance: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """All phases; returns the report (also written to ``out_dir/report.json``).

    ``source_stats`` are the batch-norm statistics of ``subnet`` (the ungated network, the teacher).
    ``front``: rows of a slimmable table on the same supernet with their statistics, timed in the
    same run, for the comparison at equal measured latency. ``profile`` says how to time (the server's profiler, on
    real test images: what runs depends on the input).
    """
    started = time.perf_counter()
    profile = profile or ProfileSettings(batch_sizes=BATCH_SIZES, repeats=40)
    base.eval()
    teacher = base.materialize(subnet, source_stats)
    teacher_flops = count_flops(teacher, base.input_shape)
    ungated: dict[str, Any] = {
        "flops": teacher_flops,
        "search_accuracy": accuracy(teacher, splits.search, info.mean, info.std),
        "test_accuracy": accuracy(teacher, splits.test, info.mean, info.std),
    }
    log.info("ungated network: %.1f MFLOPs, test %.2f%%", teacher_flops / 1e6, 100 * ungated["test_accuracy"])
    models = train_all(base, subnet, teacher, info, splits, config, out_dir)
    calibration = calibration_images(splits.train, info.mean, info.std, seed=config.finetune.seed)
    networks: dict[float, tuple[GatedResNet, GatedStatic]] = {}
    points: list[dict[str, Any]] = []
    for penalty, model in zip(config.penalties, models, strict=True):
        fixed = teacher_flops - sum(model.branch_flops) + gate_flops(model)
        static, measured = operating_points(model, calibration, splits, info, fixed, config.thresholds)
        networks[penalty] = (model, static)
        points.extend({"penalty": penalty, **point} for point in measured)
    chosen = choose(points, ungated["search_accuracy"] - config.target_drop)
    log.info("chosen: penalty %g, threshold %g", chosen["penalty"], chosen["threshold"])

    examples = normalize(splits.test.images[:2048], info.mean, info.std)
    _, chosen_static = networks[chosen["penalty"]]
    gated_modules = [networks[p["penalty"]][1].at_threshold(p["threshold"]) for p in points]
    by_pattern = [chosen_static.at_threshold(t, "pattern") for t in config.thresholds]
    on_slices = [chosen_static.at_threshold(t, kernels="slices") for t in config.thresholds]
    front_modules = [materialize(base, row.channels, stats, row.resolution) for row, stats in front]
    latency = measure(
        [teacher, *gated_modules, *by_pattern, *on_slices, *front_modules],
        base.input_shape,
        profile,
        progress=True,
        description="timing",
        examples=examples,
    )
    ungated["latency"] = _latency_json(latency[0])
    for index, point in enumerate(points):
        point["latency"] = _latency_json(latency[1 + index])
    offset = 1 + len(points)
    thresholds = len(config.thresholds)
    pattern_latency = {f"{t:g}": _latency_json(latency[offset + i]) for i, t in enumerate(config.thresholds)}
    slices_latency = {
        f"{t:g}": _latency_json(latency[offset + thresholds + i]) for i, t in enumerate(config.thresholds)
    }
    front_rows = [
        {
            "id": row.id,
            "flops": row.flops,
            "test_accuracy": row.accuracy,
            "latency": _latency_json(latency[offset + 2 * thresholds + index]),
        }
        for index, (row, _) in enumerate(front)
    ]
    report: dict[str, Any] = {
        "source": {"subnet": list(subnet), **(provenance or {}).get("source", {})},
        "config": {
            "penalties": list(config.penalties),
            "thresholds": list(config.thresholds),
            "target_drop": config.target_drop,
            "finetune": asdict(config.finetune),
        },
        "ungated": ungated,
        "points": points,
        "chosen": chosen,
        "pattern_batching": {"penalty": chosen["penalty"], "by_threshold": pattern_latency},
        "slices_kernels": {"penalty": chosen["penalty"], "by_threshold": slices_latency},
        "front": front_rows,
        "profile": {"threads": profile.threads, "repeats": profile.repeats, "idle_gap_ms": profile.idle_gap_ms},
        "seconds_this_run": round(time.perf_counter() - started, 1),
    }
    if bundle_dir is not None:
        model, _ = networks[chosen["penalty"]]
        table = write_gated_bundle(
            bundle_dir,
            model,
            calibrate_module_bn(model, calibration),
            chosen["penalty"],
            [p for p in points if p["penalty"] == chosen["penalty"]],
            info,
            splits,
            profile,
            provenance or {},
            examples,
        )
        report["bundle"] = {"path": str(bundle_dir), "rows": [json.loads(r.model_dump_json()) for r in table.subnets]}
    (out_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def choose(points: Sequence[dict[str, Any]], least_search_accuracy: float) -> dict[str, Any]:
    """The operating point with the fewest mean FLOPs on the search split among those at least this
    accurate there (the most accurate one when none is): chosen without looking at the test split."""
    good = [p for p in points if p["search"]["accuracy"] >= least_search_accuracy]
    if not good:
        return max(points, key=lambda p: p["search"]["accuracy"])
    return min(good, key=lambda p: p["search"]["flops"])


def _latency_json(by_batch: dict[int, LatencyStat]) -> dict[str, dict[str, float]]:
    return {str(b): {"p50_ms": s.p50_ms, "p95_ms": s.p95_ms, "threads": s.threads or 0} for b, s in by_batch.items()}


def write_gated_bundle(
    directory: Path,
    model: GatedResNet,
    stats: BNStats,
    penalty: float,
    points: Sequence[dict[str, Any]],
    info: SupernetInfo,
    splits: Splits,
    profile: ProfileSettings,
    provenance: dict[str, Any],
    examples: Tensor,
) -> SubnetTable:
    """A servable bundle: one row per threshold of ``points`` (one penalty), profiled on real images.

    Rows must be slower and more accurate (search split) down the table; a threshold that is not
    both, compared with the row above, is dropped.
    """
    static = model.materialize(stats)
    ordered = sorted(points, key=lambda p: -p["threshold"])  # highest threshold: fewest gates open, fastest
    measured = measure(
        [static.at_threshold(p["threshold"]) for p in ordered],
        model.base.input_shape,
        profile,
        progress=True,
        description="profiling rows",
        examples=examples,
    )
    name, _ = device_profile(profile)
    params = sum(p.numel() for p in static.parameters())
    rows = [
        SubnetRow(
            id=f"t{round(100 * point['threshold']):02d}",
            channels=model.subnet,
            depths=model.base.space.depths(model.subnet),
            origin=f"lcnet-penalty-{penalty:g}-threshold-{point['threshold']:g}",
            flops=round(point["test"]["flops"]),
            params=params,
            accuracy=point["test"]["accuracy"],
            accuracy_split=splits.test.name,
            search_accuracy=point["search"]["accuracy"],
            latency={name: latency},
            bn_key=GATED_BN_KEY,
            gate_threshold=point["threshold"],
        )
        for point, latency in zip(ordered, measured, strict=True)
    ]
    kept = ranked_rows(rows, name)
    table = profiled_table(model.base.space, profile, kept)
    fields = manifest_fields(info, model.base.input_shape, splits, provenance)
    gating = GatingSpec(subnet=model.subnet, penalty=penalty)
    write_bundle(directory, model, table, {row.id: stats for row in kept}, {**fields, "gating": gating.model_dump()})
    return table
