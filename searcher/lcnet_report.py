"""The LC-Net report: a markdown page, the JSON, and plots (accuracy vs mean FLOPs and vs measured latency).

Every latency here was measured in one run of the server's profiler (ungated network, every
operating point, the slimmable rows, interleaved), on real test images, so they compare as ratios.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only
import matplotlib.pyplot as plt

TEST_IMAGES = 10_000  # Fashion-MNIST's test split; the noise of an accuracy difference scales with it


def front_accuracy_at(front: Sequence[tuple[float, float]], ms: float) -> float | None:
    """The slimmable front's accuracy at ``ms``: linear in log-latency between the two rows around it.

    ``front`` is ``(ms, accuracy)`` per row; None outside the front's range (no extrapolation).
    """
    ordered = sorted(front)
    for (left_ms, left_acc), (right_ms, right_acc) in itertools.pairwise(ordered):
        if left_ms <= ms <= right_ms:
            if right_ms == left_ms:
                return max(left_acc, right_acc)
            share = (math.log(ms) - math.log(left_ms)) / (math.log(right_ms) - math.log(left_ms))
            return left_acc + share * (right_acc - left_acc)
    return None


def difference_noise(accuracy: float, images: int = TEST_IMAGES) -> float:
    """One standard error of the difference of two accuracies near ``accuracy`` on ``images`` images,
    counted as independent (pessimistic: the same test images make the two correlated)."""
    return math.sqrt(2 * accuracy * (1 - accuracy) / images)


def comparisons(report: dict[str, Any], batch: str) -> list[dict[str, Any]]:
    """Every operating point against the slimmable front (and the ungated network) at equal measured p50."""
    front = [(r["latency"][batch]["p50_ms"], r["test_accuracy"]) for r in report["front"]]
    ungated = report["ungated"]
    front.append((ungated["latency"][batch]["p50_ms"], ungated["test_accuracy"]))
    rows = []
    for point in report["points"]:
        ms = point["latency"][batch]["p50_ms"]
        slimmable = front_accuracy_at(front, ms)
        rows.append(
            {
                "penalty": point["penalty"],
                "threshold": point["threshold"],
                "ms": ms,
                "accuracy": point["test"]["accuracy"],
                "slimmable": slimmable,
                "difference": None if slimmable is None else point["test"]["accuracy"] - slimmable,
            }
        )
    return rows


def plot(report: dict[str, Any], path: Path) -> None:
    figure, axes = plt.subplots(2, 2, figsize=(13, 9))
    flops_axis, *latency_axes = axes.flat
    ungated, front = report["ungated"], report["front"]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for index, penalty in enumerate(report["config"]["penalties"]):
        points = sorted((p for p in report["points"] if p["penalty"] == penalty), key=lambda p: p["threshold"])
        style = {"color": colors[(index + 3) % len(colors)], "label": f"LC-Net, penalty {penalty:g} (thresholds)"}
        flops_axis.plot(
            [p["test"]["flops"] / 1e6 for p in points], [100 * p["test"]["accuracy"] for p in points], "o-", **style
        )
        for axis, batch in zip(latency_axes, ("1", "8", "32"), strict=True):
            axis.plot(
                [p["latency"][batch]["p50_ms"] for p in points],
                [100 * p["test"]["accuracy"] for p in points],
                "o-",
                **style,
            )
    chosen = report["chosen"]
    flops_axis.plot(
        [chosen["test"]["flops"] / 1e6], [100 * chosen["test"]["accuracy"]], "*", ms=14, color="gold", label="chosen"
    )
    flops_axis.plot(
        [r["flops"] / 1e6 for r in front], [100 * r["test_accuracy"] for r in front], "^--", color="tab:blue"
    )
    flops_axis.plot([ungated["flops"] / 1e6], [100 * ungated["test_accuracy"]], "s", color="black")
    _finish(flops_axis, "mean MFLOPs per image", "Accuracy vs average FLOPs")
    for axis, batch in zip(latency_axes, ("1", "8", "32"), strict=True):
        axis.plot(
            [r["latency"][batch]["p50_ms"] for r in front],
            [100 * r["test_accuracy"] for r in front],
            "^--",
            color="tab:blue",
            label="slimmable rows (same bundle)",
        )
        axis.plot(
            [ungated["latency"][batch]["p50_ms"]],
            [100 * ungated["test_accuracy"]],
            "s",
            color="black",
            label="ungated network",
        )
        _finish(axis, f"measured p50 per batch of {batch} (ms)", f"Accuracy vs measured latency, batch {batch}")
    # Zoom on the useful band: points far below it (a gate threshold that breaks the network) are off
    # the chart, and the table lists them.
    low = 100 * min(r["test_accuracy"] for r in front) - 1 if front else 100 * ungated["test_accuracy"] - 5
    for axis in axes.flat:
        axis.set_ylim(low, 100 * ungated["test_accuracy"] + 0.5)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _finish(axis: Any, xlabel: str, title: str) -> None:
    axis.set_xscale("log")
    axis.set_xlabel(xlabel)
    axis.set_ylabel("test top-1 (%)")
    axis.set_title(title)
    axis.grid(alpha=0.3, which="both")
    axis.legend(loc="lower right", fontsize=7)


def write_lcnet_report(report: dict[str, Any], report_dir: Path, dataset: str, command: str) -> Path:
    report_dir.mkdir(parents=True, exist_ok=True)
    stem = f"lcnet-{dataset}"
    (report_dir / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(report, report_dir / f"{stem}.png")
    ungated, chosen = report["ungated"], report["chosen"]
    source = report["source"]
    noise = difference_noise(ungated["test_accuracy"])
    lines = [
        f"# LC-Net: per-input block and channel-group skipping ({dataset})",
        "",
        f"Made by `{command}` ({report['seconds_this_run'] / 60:.1f} minutes this run, training resumed from "
        "checkpoints where they existed).",
        f"Gates on row `{source.get('row', '?')}` of `{source.get('bundle', '?')}`, trained jointly with it. "
        "Operating points chosen on the search split; accuracies on the test split (one standard error of a",
        f"difference of two accuracies here: about {100 * noise:.2f} points). Latency: the server's profiler, "
        f"{report['profile']['threads']} threads (1 tried too), {report['profile']['repeats']} timed calls per "
        "batch size, on real test images, all networks in one run.",
        "",
        "## Headline",
        "",
        f"* ungated network: {ungated['flops'] / 1e6:.1f} MFLOPs, test top-1 {100 * ungated['test_accuracy']:.2f}%, "
        f"p50 batch 1 {ungated['latency']['1']['p50_ms']:.2f} ms",
        f"* chosen point (fewest search-split FLOPs within {100 * report['config']['target_drop']:.2f} points of the "
        f"ungated search accuracy): penalty {chosen['penalty']:g}, threshold {chosen['threshold']:g}: test top-1 "
        f"**{100 * chosen['test']['accuracy']:.2f}%** at **{chosen['test']['flops'] / 1e6:.1f} MFLOPs** mean "
        f"(**{ungated['flops'] / chosen['test']['flops']:.2f}x** fewer), "
        f"{chosen['test']['blocks_run']:.2f} blocks and {100 * chosen['test']['groups_run']:.1f}% of channel groups "
        "run per image",
        "* measured p50 per batch, ungated vs chosen: "
        + "; ".join(
            f"batch {b}: {ungated['latency'][b]['p50_ms']:.2f} vs {chosen['latency'][b]['p50_ms']:.2f} ms "
            f"(**{ungated['latency'][b]['p50_ms'] / chosen['latency'][b]['p50_ms']:.2f}x**)"
            for b in ungated["latency"]
        ),
        "",
        f"![accuracy vs FLOPs and measured latency]({stem}.png)",
        "",
        "## Operating points",
        "",
        "| penalty | threshold | search top-1 | test top-1 | mean MFLOPs | fewer FLOPs | blocks run | groups run "
        "| p50 b1 (ms) | p95 b1 (ms) | p50 b8 (ms) | p50 b32 (ms) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for p in sorted(report["points"], key=lambda p: (p["penalty"], p["threshold"])):
        t, lat = p["test"], p["latency"]
        lines.append(
            f"| {p['penalty']:g} | {p['threshold']:g} | {100 * p['search']['accuracy']:.2f}% | "
            f"{100 * t['accuracy']:.2f}% | {t['flops'] / 1e6:.1f} | {ungated['flops'] / t['flops']:.2f}x | "
            f"{t['blocks_run']:.2f} | {100 * t['groups_run']:.1f}% | {lat['1']['p50_ms']:.2f} | "
            f"{lat['1']['p95_ms']:.2f} | {lat['8']['p50_ms']:.2f} | {lat['32']['p50_ms']:.2f} |"
        )
    pattern, slices = report["pattern_batching"], report["slices_kernels"]
    lines += [
        "",
        f"## How skipped work is skipped (penalty {pattern['penalty']:g}; p50 ms per batch)",
        "",
        "Kernels: *gather* copies the kept groups' weights and runs two convolutions (the default); *slices* "
        "runs each run of consecutive kept groups on views of the stored weights. Batches: *union* computes "
        "the groups any image keeps, once; *pattern* one sub-batch per gate pattern.",
        "",
        "| threshold | gather b1 | slices b1 | union b8 | pattern b8 | union b32 | pattern b32 |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for p in sorted(report["points"], key=lambda p: p["threshold"]):
        if p["penalty"] != pattern["penalty"]:
            continue
        key = f"{p['threshold']:g}"
        by, on = pattern["by_threshold"][key], slices["by_threshold"][key]
        lat = p["latency"]
        lines.append(
            f"| {key} | {lat['1']['p50_ms']:.2f} | {on['1']['p50_ms']:.2f} | {lat['8']['p50_ms']:.2f} | "
            f"{by['8']['p50_ms']:.2f} | {lat['32']['p50_ms']:.2f} | {by['32']['p50_ms']:.2f} |"
        )
    lines += [
        "",
        "## Against the slimmable front at equal measured latency",
        "",
        "The front's accuracy at a point's p50, interpolated (log latency) between the slimmable rows around it; ",
        f"positive: LC-Net more accurate. Noise of a difference: about {100 * noise:.2f} points (one standard error).",
        "",
        "| batch | penalty | threshold | p50 (ms) | LC-Net test top-1 | slimmable at that p50 | difference |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for batch in ("1", "8", "32"):
        for c in comparisons(report, batch):
            slim = "outside the front" if c["slimmable"] is None else f"{100 * c['slimmable']:.2f}%"
            diff = "-" if c["difference"] is None else f"{100 * c['difference']:+.2f}"
            lines.append(
                f"| {batch} | {c['penalty']:g} | {c['threshold']:g} | {c['ms']:.2f} | {100 * c['accuracy']:.2f}% | "
                f"{slim} | {diff} |"
            )
    lines += ["", "Slimmable rows as timed here:", "", "| row | MFLOPs | test top-1 | p50 b1 | p50 b8 | p50 b32 |"]
    lines.append("|---|---:|---:|---:|---:|---:|")
    for r in report["front"]:
        lat = r["latency"]
        lines.append(
            f"| {r['id']} | {r['flops'] / 1e6:.1f} | {100 * r['test_accuracy']:.2f}% | {lat['1']['p50_ms']:.2f} | "
            f"{lat['8']['p50_ms']:.2f} | {lat['32']['p50_ms']:.2f} |"
        )
    if report.get("bundle"):
        lines += ["", f"## The served table ({report['bundle']['path']})", ""]
        lines.append("| row | threshold | mean MFLOPs | test top-1 | search top-1 | p50 b1 (ms) | p95 b1 (ms) |")
        lines.append("|---|---:|---:|---:|---:|---:|---:|")
        for r in report["bundle"]["rows"]:
            device = next(iter(r["latency"]))
            b1 = r["latency"][device]["1"]
            lines.append(
                f"| {r['id']} | {r['gate_threshold']:g} | {r['flops'] / 1e6:.1f} | {100 * r['accuracy']:.2f}% | "
                f"{100 * r['search_accuracy']:.2f}% | {b1['p50_ms']:.2f} | {b1['p95_ms']:.2f} |"
            )
    page = report_dir / f"{stem}.md"
    page.write_text("\n".join(lines) + "\n")
    return page
