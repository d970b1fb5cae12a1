"""``slimserve s2dnas``: static checkpoint in, searched and fine-tuned multi-stage network out, with a report.

Phases, each resumable from what it wrote in ``--out``: rank the static network's channels (weight
norm, so the first stage keeps the important ones); search (controller and random, written to
``search.json``); fine-tune the best plan (``multistage.safetensors``, checkpointed); calibrate exit
thresholds on the search split for several targets; measure on the test split and time batch 1, 8
and 32 with exits against the static network. The report goes to ``--report-dir``.
"""

from __future__ import annotations

import json
import logging
import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from slimserve.models.bn_calibration import calibrate_bn
from slimserve.models.bundle import manifest_fields, stage_widths, write_bundle
from slimserve.models.checkpoint import SupernetInfo
from slimserve.models.datasets import Splits
from slimserve.models.early_exit import calibrate_thresholds, evaluate_exits
from slimserve.models.evaluate import accuracy, calibration_images
from slimserve.models.flops import count_flops
from slimserve.models.multistage import ExitCapped, MultiStageResNet, StagedResNet, StagePlan
from slimserve.models.multistage_train import calibrate_stage_bn, fine_tune, stage_predictions
from slimserve.models.ops import BNStats
from slimserve.models.resnet import SlimResNet
from slimserve.models.schema import MULTISTAGE_BN_KEY, MultiStageSpec, SubnetRow, SubnetTable, bn_key_for
from slimserve.models.subnet import Subnet
from slimserve.models.transforms import normalize
from slimserve.searcher.latency import ProfileSettings, device_profile, measure, profiled_table, ranked_rows
from slimserve.searcher.s2dnas import Candidate, Decisions, S2DNASConfig, best, running_best, search

log = logging.getLogger(__name__)

TARGET_DROPS = (0.0, 0.0025, 0.005, 0.01, 0.02)  # operating points: static search accuracy minus these
BATCH_SIZES = (1, 8, 32)


def run(
    base: SlimResNet,
    subnet: Subnet,
    info: SupernetInfo,
    splits: Splits,
    config: S2DNASConfig,
    out_dir: Path,
    final_steps: int,
    timing_repeats: int = 200,
    bundle_dir: Path | None = None,
    profile: ProfileSettings | None = None,
    provenance: dict[str, Any] | None = None,
    static_bundle_dir: Path | None = None,
) -> dict[str, Any]:
    """All phases; returns the report (also written to ``out_dir/report.json``).

    With ``bundle_dir``, also writes a servable multi-stage bundle there, its rows profiled with
    ``profile`` on real test images (exits depend on the input); with ``static_bundle_dir``, the
    static network as a one-row bundle, for comparisons as served.
    """
    from slimserve.searcher.ranking import apply_ranking, weight_norm_importance

    started = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    base.eval()
    apply_ranking(base, weight_norm_importance(base))
    calibration = calibration_images(splits.train, info.mean, info.std, seed=config.seed)
    static_bn = calibrate_bn(base, subnet, calibration)
    static = base.materialize(subnet, static_bn)
    static_flops = count_flops(static, base.input_shape)
    static_search = accuracy(static, splits.search, info.mean, info.std)
    static_test = accuracy(static, splits.test, info.mean, info.std)
    log.info(
        "static network: %.1f MFLOPs, search %.2f%%, test %.2f%%",
        static_flops / 1e6,
        100 * static_search,
        100 * static_test,
    )

    candidates = _searched(base, subnet, splits, info, config, static_flops, out_dir / "search.json")
    chosen = best(candidates)
    log.info("chosen: %s (%s, reward %.4f)", chosen.decisions.describe(config.fractions), chosen.method, chosen.reward)

    checkpoint = out_dir / "multistage.safetensors"
    model = MultiStageResNet(base, subnet, chosen.plan)
    fine_tune(  # resumes from the checkpoint; refuses one that holds another plan
        model,
        splits.train,
        info.mean,
        info.std,
        replace(config.finetune, steps=final_steps),
        checkpoint=checkpoint,
        info=info,
        description="fine-tune chosen plan",
        teacher=static,
    )
    with torch.no_grad():  # every figure below is of the weights as the bundle stores them (fp16)
        for parameter in model.parameters():
            parameter.copy_(parameter.half().float())
    stats = calibrate_stage_bn(model, calibration)
    staged = model.materialize(stats)
    flops = [staged.stage_flops(s) for s in range(staged.num_stages)]
    cumulative = [sum(flops[: s + 1]) for s in range(len(flops))]
    search_conf, search_right = stage_predictions(staged, splits.search, info.mean, info.std)
    test_conf, test_right = stage_predictions(staged, splits.test, info.mean, info.std)
    points: list[dict[str, Any]] = []
    for drop in sorted({*TARGET_DROPS, config.target_drop}):
        target = static_search - drop
        on_search = calibrate_thresholds(search_conf.numpy(), search_right.numpy(), cumulative, target)
        on_test = evaluate_exits(test_conf.numpy(), test_right.numpy(), cumulative, on_search.thresholds)
        points.append(
            {
                "target_search_accuracy": round(target, 5),
                "thresholds": [t if t != float("inf") else None for t in on_search.thresholds],
                "search_accuracy": on_search.accuracy,
                "search_mean_flops": on_search.mean_cost,
                "test_accuracy": on_test.accuracy,
                "mean_flops": on_test.mean_cost,
                "flops_reduction": static_flops / on_test.mean_cost,
                "exit_share": on_test.exit_share,
            }
        )
    main_point = next(p for p in points if p["target_search_accuracy"] == round(static_search - config.target_drop, 5))
    thresholds = [float("inf") if t is None else t for t in main_point["thresholds"]]
    timing = time_with_exits(staged, static, splits.test.images, info, thresholds, timing_repeats)
    report = {
        "static": {
            "flops": static_flops,
            "search_accuracy": static_search,
            "test_accuracy": static_test,
            "subnet": list(subnet),
        },
        "config": {**asdict(config), "final_steps": final_steps},
        "chosen": _candidate_json(chosen, config.fractions),
        "stage_flops": flops,
        "stage_test_accuracy": [float(a) for a in test_right.float().mean(1)],
        "stage_search_accuracy": [float(a) for a in search_right.float().mean(1)],
        "operating_points": points,
        "main_point": main_point,
        "timing": timing,
        "search_curves": {m: running_best(candidates, m) for m in ("controller", "random")},
        "best_by_method": {m: _candidate_json(best(candidates, m), config.fractions) for m in ("controller", "random")},
        "seconds_this_run": round(time.perf_counter() - started, 1),
    }
    if bundle_dir is not None:
        # The served exits aim at the best stage, not the static network: when an early stage alone
        # already reaches the static accuracy, thresholds fit for that target send every input out
        # at stage 1 and the later rows of the table would be copies of the first.
        best_stage = float(search_right.float().mean(1).max())
        served = calibrate_thresholds(
            search_conf.numpy(), search_right.numpy(), cumulative, best_stage - config.serve_drop
        )
        on_test = evaluate_exits(test_conf.numpy(), test_right.numpy(), cumulative, served.thresholds)
        report["served_point"] = {
            "target_search_accuracy": best_stage - config.serve_drop,
            "thresholds": [t if t != float("inf") else None for t in served.thresholds],
            "search_accuracy": served.accuracy,
            "test_accuracy": on_test.accuracy,
            "mean_flops": on_test.mean_cost,
            "exit_share": on_test.exit_share,
        }
        table = write_multistage_bundle(
            bundle_dir,
            model,
            stats,
            served.thresholds,
            (search_conf, search_right),
            (test_conf, test_right),
            info,
            splits,
            profile or ProfileSettings(),
            provenance or {},
        )
        report["bundle"] = {"path": str(bundle_dir), "rows": [json.loads(r.model_dump_json()) for r in table.subnets]}
    if static_bundle_dir is not None:
        write_static_bundle(
            static_bundle_dir,
            base,
            subnet,
            static_bn,
            static_test,
            static_search,
            info,
            splits,
            profile or ProfileSettings(),
            provenance or {},
        )
        report["static_bundle"] = str(static_bundle_dir)
    (out_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def write_static_bundle(
    directory: Path,
    base: SlimResNet,
    subnet: Subnet,
    stats: BNStats,
    test_accuracy: float,
    search_accuracy: float,
    info: SupernetInfo,
    splits: Splits,
    profile: ProfileSettings,
    provenance: dict[str, Any],
) -> None:
    """The static network the multi-stage one came from, as a one-row bundle: served the same way, for
    comparisons as served (``slimserve bench table``, load tests)."""
    static = base.materialize(subnet, stats)
    (latency,) = measure([static], base.input_shape, profile, progress=True, description="profiling static")
    name, _ = device_profile(profile)
    row = SubnetRow(
        id="static",
        channels=subnet,
        depths=base.space.depths(subnet),
        origin="static",
        flops=count_flops(static, base.input_shape),
        params=sum(p.numel() for p in static.parameters()),
        accuracy=test_accuracy,
        accuracy_split=splits.test.name,
        search_accuracy=search_accuracy,
        latency={name: latency},
        bn_key=bn_key_for("static"),
    )
    table = profiled_table(base.space, profile, [row])
    fields = manifest_fields(info, base.input_shape, splits, provenance)
    write_bundle(directory, base, table, {"static": stats}, fields, weights_dtype="float32")  # as it was measured


def write_multistage_bundle(
    directory: Path,
    model: MultiStageResNet,
    stats: BNStats,
    thresholds: Sequence[float],
    search: tuple[Tensor, Tensor],
    test: tuple[Tensor, Tensor],
    info: SupernetInfo,
    splits: Splits,
    profile: ProfileSettings,
    provenance: dict[str, Any],
) -> SubnetTable:
    """A servable bundle: row ``k`` exits by stage ``k + 1``, measured with the calibrated thresholds.

    ``search`` and ``test`` are each split's ``(confidence, correct)`` per stage and image.
    """
    staged = model.materialize(stats)
    stages = staged.num_stages
    cumulative = [sum(staged.stage_flops(s) for s in range(k + 1)) for k in range(stages)]
    examples = normalize(splits.test.images[:2048], info.mean, info.std)
    never = [math.inf] * (stages - 1)
    with_exits = [ExitCapped(staged, thresholds, k) for k in range(stages)]
    without = [ExitCapped(staged, never, k) for k in range(stages)]
    measured = measure(
        [*with_exits, *without],
        staged.input_shape,
        profile,
        progress=True,
        description="profiling rows",
        examples=examples,
    )
    name, _ = device_profile(profile)
    alone = measured[stages:]
    stage_latency = {
        name: {
            batch: tuple(
                max(0.001, alone[k][batch].p50_ms - (alone[k - 1][batch].p50_ms if k else 0.0)) for k in range(stages)
            )
            for batch in profile.batch_sizes
        }
    }
    rows = []
    for k in range(stages):
        on_search = evaluate_exits(
            search[0][: k + 1].numpy(), search[1][: k + 1].numpy(), cumulative[: k + 1], thresholds[:k]
        )
        on_test = evaluate_exits(
            test[0][: k + 1].numpy(), test[1][: k + 1].numpy(), cumulative[: k + 1], thresholds[:k]
        )
        channels = stage_widths(model.plan, k)
        rows.append(
            SubnetRow(
                id=f"e{k + 1}",
                channels=channels,
                depths=model.space.depths(channels),
                origin=f"s2dnas-exit-by-stage-{k + 1}",
                flops=round(on_test.mean_cost),
                params=sum(p.numel() for stage in staged.stage_list[: k + 1] for p in stage.parameters()),
                accuracy=on_test.accuracy,
                accuracy_split=splits.test.name,
                search_accuracy=on_search.accuracy,
                latency={name: measured[k]},
                bn_key=MULTISTAGE_BN_KEY,
            )
        )
    kept = ranked_rows(rows, name)
    table = profiled_table(model.space, profile, kept)
    spec = MultiStageSpec(
        subnet=model.subnet,
        splits=model.plan.splits,
        concat=model.plan.concat,
        thresholds=tuple(None if math.isinf(t) else t for t in thresholds),
        stage_latency=stage_latency,
    )
    fields = manifest_fields(info, staged.input_shape, splits, provenance)
    write_bundle(directory, model, table, {row.id: stats for row in kept}, {**fields, "multistage": spec.model_dump()})
    return table


def _searched(
    base: SlimResNet,
    subnet: Subnet,
    splits: Splits,
    info: SupernetInfo,
    config: S2DNASConfig,
    static_flops: int,
    path: Path,
) -> list[Candidate]:
    if path.exists():
        log.info("search already done: reading %s", path)
        return [_candidate_from_json(c) for c in json.loads(path.read_text())["candidates"]]
    done: list[Candidate] = []

    def record(candidate: Candidate) -> None:
        done.append(candidate)
        log.info(
            "candidate %d (%s): %s -> reward %.4f, exits %.2f%% at %.1f MFLOPs, stages %s",
            len(done),
            candidate.method,
            candidate.decisions.describe(config.fractions),
            candidate.reward,
            100 * candidate.exits.accuracy,
            candidate.exits.mean_cost / 1e6,
            ", ".join(f"{100 * a:.2f}%" for a in candidate.stage_accuracy),
        )

    candidates = search(base, subnet, splits, info, config, static_flops, on_candidate=record)
    path.write_text(
        json.dumps({"candidates": [_candidate_json(c, config.fractions) for c in candidates]}, indent=2) + "\n"
    )
    return candidates


def _candidate_json(candidate: Candidate, fractions: Sequence[float]) -> dict[str, Any]:
    return {
        "method": candidate.method,
        "decisions": {"cuts": [list(c) for c in candidate.decisions.cuts], "concat": list(candidate.decisions.concat)},
        "description": candidate.decisions.describe(fractions),
        "plan": candidate.plan.to_json(),
        "reward": candidate.reward,
        "exits": {
            **asdict(candidate.exits),
            "thresholds": [t if t != float("inf") else None for t in candidate.exits.thresholds],
        },
        "stage_accuracy": list(candidate.stage_accuracy),
        "stage_flops": list(candidate.stage_flops),
    }


def _candidate_from_json(data: dict[str, Any]) -> Candidate:
    from slimserve.models.early_exit import ExitOutcome

    exits = data["exits"]
    return Candidate(
        data["method"],
        Decisions(tuple(tuple(c) for c in data["decisions"]["cuts"]), tuple(data["decisions"]["concat"])),
        StagePlan.from_json(data["plan"]),
        data["reward"],
        ExitOutcome(
            tuple(float("inf") if t is None else t for t in exits["thresholds"]),
            exits["accuracy"],
            exits["mean_cost"],
            tuple(exits["exit_share"]),
        ),
        tuple(data["stage_accuracy"]),
        tuple(data["stage_flops"]),
    )


@torch.inference_mode()
def time_with_exits(
    staged: StagedResNet,
    static: nn.Module,
    images: Tensor,
    info: SupernetInfo,
    thresholds: Sequence[float],
    repeats: int,
) -> dict[str, Any]:
    """Median ms per batch, static network vs multi-stage with exits, on the same test batches.

    The two alternate batch by batch so machine noise hits both alike; 1 thread at batch 1 (what
    the served table picks there), 2 at larger batches.
    """
    threads = torch.get_num_threads()
    results = {}
    try:
        for batch in BATCH_SIZES:
            torch.set_num_threads(1 if batch == 1 else max(2, threads))
            static_ms, staged_ms, answered = [], [], []
            for index in range(repeats + 5):
                start = (index * batch) % (images.shape[0] - batch)
                x = normalize(images[start : start + batch], info.mean, info.std)
                began = time.perf_counter()
                static(x)
                middle = time.perf_counter()
                stage = staged.run_with_exits(x, thresholds).stage
                ended = time.perf_counter()
                if index >= 5:  # warm-up
                    static_ms.append(1000 * (middle - began))
                    staged_ms.append(1000 * (ended - middle))
                    answered.extend(stage.tolist())
            results[str(batch)] = {
                "static_p50_ms": statistics.median(static_ms),
                "multistage_p50_ms": statistics.median(staged_ms),
                "static_mean_ms": statistics.fmean(static_ms),
                "multistage_mean_ms": statistics.fmean(staged_ms),
                "speedup_mean": statistics.fmean(static_ms) / statistics.fmean(staged_ms),
                "exit_share": [answered.count(s) / len(answered) for s in range(staged.num_stages)],
            }
    finally:
        torch.set_num_threads(threads)
    return results
