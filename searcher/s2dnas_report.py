"""The S2DNAS report: a markdown page, the JSON, and plots (accuracy vs FLOPs and latency, search curves)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only
import matplotlib.pyplot as plt

from slimserve.models.schema import read_table


def _rows(table: Path) -> list[dict[str, Any]]:
    """Rows of a bundle's table (for comparison plots); empty if there is none."""
    if not table.exists():
        return []
    data = read_table(table)
    return [
        {"flops": r.flops, "accuracy": r.accuracy, "ms": r.latency[data.primary_device][1].p50_ms, "id": r.id}
        for r in data.subnets
    ]


def _accuracy_axis(axis: Any, x: list[float], slimmable: list[dict[str, Any]], xlabel: str, title: str) -> None:
    """The slimmable table for comparison (x: its rows' cost), log x, labels, grid and legend."""
    if slimmable:
        axis.plot(
            x,
            [100 * r["accuracy"] for r in slimmable],
            "^--",
            color="tab:blue",
            alpha=0.7,
            label="slimmable table (demo bundle)",
        )
    axis.set_xscale("log")
    axis.set_xlabel(xlabel)
    axis.set_ylabel("test top-1 (%)")
    axis.set_title(title)
    axis.grid(alpha=0.3, which="both")
    axis.legend(loc="lower right", fontsize=8)


def plot(report: dict[str, Any], path: Path, slimmable: list[dict[str, Any]]) -> None:
    figure, axes = plt.subplots(2, 2, figsize=(13, 9))
    left, latency_axis, middle, right = axes.flat
    points = report["operating_points"]
    static = report["static"]
    left.plot(
        [p["mean_flops"] / 1e6 for p in points],
        [100 * p["test_accuracy"] for p in points],
        "o-",
        color="tab:red",
        label="multi-stage with exits (targets)",
    )
    cumulative = [sum(report["stage_flops"][: s + 1]) / 1e6 for s in range(len(report["stage_flops"]))]
    left.plot(
        cumulative, [100 * a for a in report["stage_test_accuracy"]], "x:", color="tab:orange", label="each stage alone"
    )
    left.plot([static["flops"] / 1e6], [100 * static["test_accuracy"]], "s", color="black", label="static network")
    _accuracy_axis(
        left, [r["flops"] / 1e6 for r in slimmable], slimmable, "mean MFLOPs per image", "Accuracy vs average FLOPs"
    )

    bundle = report.get("bundle")
    if bundle:
        rows = bundle["rows"]
        device = next(iter(rows[0]["latency"]))
        latency_axis.plot(
            [r["latency"][device]["1"]["p50_ms"] for r in rows],
            [100 * r["accuracy"] for r in rows],
            "o-",
            color="tab:red",
            label="multi-stage rows (exit by stage k)",
        )
        for r in rows:
            latency_axis.annotate(r["id"], (r["latency"][device]["1"]["p50_ms"], 100 * r["accuracy"]), fontsize=8)
        static_row = _rows(Path(report["static_bundle"]) / "subnets.json") if report.get("static_bundle") else []
        if static_row:
            latency_axis.plot(
                [r["ms"] for r in static_row],
                [100 * r["accuracy"] for r in static_row],
                "s",
                color="black",
                label="static network",
            )
    _accuracy_axis(
        latency_axis,
        [r["ms"] for r in slimmable],
        slimmable,
        "measured latency, batch 1, p50 (ms; table profiles)",
        "Accuracy vs measured latency",
    )

    timing = report["timing"]
    batches = list(timing)
    width = 0.38
    positions = range(len(batches))
    middle.bar(
        [p - width / 2 for p in positions],
        [timing[b]["static_mean_ms"] / int(b) for b in batches],
        width,
        label="static",
        color="0.5",
    )
    middle.bar(
        [p + width / 2 for p in positions],
        [timing[b]["multistage_mean_ms"] / int(b) for b in batches],
        width,
        label="multi-stage with exits",
        color="tab:red",
    )
    middle.set_xticks(list(positions), [f"batch {b}" for b in batches])
    middle.set_ylabel("mean ms per image")
    middle.set_title("Measured time (main operating point)")
    middle.legend(fontsize=8)

    for method, color in (("controller", "tab:red"), ("random", "tab:blue")):
        curve = report["search_curves"][method]
        right.plot(range(1, len(curve) + 1), curve, "o-", color=color, label=method)
    right.set_xlabel("candidates scored")
    right.set_ylabel("best reward so far")
    right.set_title("Search: policy gradient vs random")
    right.grid(alpha=0.3)
    right.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def write_s2dnas_report(report: dict[str, Any], report_dir: Path, dataset: str, command: str) -> Path:
    report_dir.mkdir(parents=True, exist_ok=True)
    stem = f"s2dnas-{dataset}"
    (report_dir / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(report, report_dir / f"{stem}.png", _rows(Path("models/demo/subnets.json")))
    static, point, timing = report["static"], report["main_point"], report["timing"]
    lines = [
        f"# S2DNAS: multi-stage network with early exits ({dataset})",
        "",
        f"Made by `{command}` ({report['seconds_this_run'] / 60:.1f} minutes this run).",
        "Thresholds calibrated on the search split (held out of training); accuracies on the test split.",
        "",
        "## Headline",
        "",
        f"* static network: {static['flops'] / 1e6:.1f} MFLOPs, test top-1 {100 * static['test_accuracy']:.2f}%",
        f"* multi-stage with exits (target: static search accuracy - {100 * report['config']['target_drop']:.2f} "
        f"points): test top-1 **{100 * point['test_accuracy']:.2f}%** at **{point['mean_flops'] / 1e6:.1f} MFLOPs** "
        f"mean (**{point['flops_reduction']:.2f}x** fewer); exits per stage "
        + ", ".join(f"{100 * s:.1f}%" for s in point["exit_share"]),
        "* measured mean time per batch, static vs multi-stage with exits: "
        + "; ".join(
            f"batch {b}: {t['static_mean_ms']:.2f} vs {t['multistage_mean_ms']:.2f} ms (**{t['speedup_mean']:.2f}x**)"
            for b, t in timing.items()
        ),
        f"* chosen plan: {report['chosen']['description']} (found by {report['chosen']['method']})",
        "",
        "![accuracy, time and search](" + f"{stem}.png)",
        "",
        "## Stages",
        "",
        "| stage | MFLOPs (own slices) | cumulative MFLOPs | test top-1, every image | search top-1 |",
        "|---:|---:|---:|---:|---:|",
    ]
    total = 0
    for stage, (flops, test, search) in enumerate(
        zip(report["stage_flops"], report["stage_test_accuracy"], report["stage_search_accuracy"], strict=True)
    ):
        total += flops
        lines.append(
            f"| {stage + 1} | {flops / 1e6:.1f} | {total / 1e6:.1f} | {100 * test:.2f}% | {100 * search:.2f}% |"
        )
    lines += [
        "",
        "## Operating points (thresholds from the search split)",
        "",
        "| target (search) | thresholds | search top-1 | test top-1 | mean MFLOPs | fewer FLOPs | exits per stage |",
        "|---:|---|---:|---:|---:|---:|---|",
    ]
    for p in report["operating_points"]:
        thresholds = ", ".join("never" if t is None else f"{t:.3f}" for t in p["thresholds"])
        shares = " / ".join(f"{100 * s:.1f}%" for s in p["exit_share"])
        lines.append(
            f"| {100 * p['target_search_accuracy']:.2f}% | {thresholds} | {100 * p['search_accuracy']:.2f}% | "
            f"{100 * p['test_accuracy']:.2f}% | {p['mean_flops'] / 1e6:.1f} | {p['flops_reduction']:.2f}x | {shares} |"
        )
    if report.get("bundle"):
        rows = report["bundle"]["rows"]
        device = next(iter(rows[0]["latency"]))
        served = report["served_point"]
        thresholds = ", ".join("never" if t is None else f"{t:.3f}" for t in served["thresholds"])
        lines += [
            "",
            f"## The served table ({report['bundle']['path']}; static network: {report.get('static_bundle', 'not written')})",
            "",
            f"The bundle's exits aim at the best stage's search accuracy minus {100 * report['config']['serve_drop']:.2f}",
            f"points ({100 * served['target_search_accuracy']:.2f}%): thresholds {thresholds}; on the test split "
            f"{100 * served['test_accuracy']:.2f}% at {served['mean_flops'] / 1e6:.1f} MFLOPs mean, exits "
            + " / ".join(f"{100 * x:.1f}%" for x in served["exit_share"])
            + ".",
            "Row `e<k>` runs stages 1..k with these exits and answers what is left at stage k; FLOPs,",
            f"accuracy and latency ({device}, on real test images) are with the exits.",
            "",
            "| row | mean MFLOPs | test top-1 | search top-1 | p50 b1 (ms) | p95 b1 (ms) | p50 b8 (ms/batch) |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for r in rows:
            by_batch = r["latency"][device]
            b8 = f"{by_batch['8']['p50_ms']:.2f}" if "8" in by_batch else "-"
            lines.append(
                f"| {r['id']} | {r['flops'] / 1e6:.1f} | {100 * r['accuracy']:.2f}% | {100 * r['search_accuracy']:.2f}% | "
                f"{by_batch['1']['p50_ms']:.2f} | {by_batch['1']['p95_ms']:.2f} | {b8} |"
            )
    lines += [
        "",
        "## Search",
        "",
        "| method | best reward | plan | exits accuracy (search) | mean MFLOPs | candidates |",
        "|---|---:|---|---:|---:|---:|",
    ]
    for method, candidate in report["best_by_method"].items():
        lines.append(
            f"| {method} | {candidate['reward']:.4f} | {candidate['description']} | "
            f"{100 * candidate['exits']['accuracy']:.2f}% | {candidate['exits']['mean_cost'] / 1e6:.1f} | "
            f"{len(report['search_curves'][method])} |"
        )
    page = report_dir / f"{stem}.md"
    page.write_text("\n".join(lines) + "\n")
    return page
