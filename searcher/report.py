"""Search results for people: a markdown page, a JSON dump and a plot, written next to each other."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers or in CI
import matplotlib.pyplot as plt

if TYPE_CHECKING:  # the report's shape; the search itself (and torch) is not needed to render it
    from slimserve.searcher.search import SearchReport


def _points(rows: list[dict[str, Any]], batch: str = "1") -> tuple[list[float], list[float]]:
    return [r["latency_ms"][batch]["p50"] for r in rows], [100 * r["test_accuracy"] for r in rows]


def plot_search(report: SearchReport, path: Path) -> None:
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    x, y = _points(report["searched"])
    left.plot(x, y, "o-", color="tab:red", label="searched (progressive, this table)")
    if report["uniform"]:
        ux, uy = _points(report["uniform"])
        left.plot(ux, uy, "s--", color="tab:blue", label="uniform widths (US-Nets)")
        for row, px, py in zip(report["uniform"], ux, uy, strict=True):
            left.annotate(
                row["origin"].removeprefix("uniform-"),
                (px, py),
                textcoords="offset points",
                xytext=(4, -10),
                fontsize=7,
            )
    if report.get("random"):
        rx, ry = _points(report["random"])
        left.plot(rx, ry, "^", color="tab:green", alpha=0.6, label="random subnets (width x depth)")
    left.set_xscale("log")
    left.set_xlabel("measured latency, batch 1, p50 (ms)")
    left.set_ylabel("test top-1 (%)")
    left.set_title("Accuracy vs measured latency")
    left.grid(alpha=0.3, which="both")
    left.legend(loc="lower right")

    rescored = report["path_rescored"]
    right.plot(
        [p["predicted_ms"] for p in rescored],
        [100 * p["search_accuracy"] for p in rescored],
        ".",
        color="0.6",
        label="path (re-scored)",
    )
    chosen = {(r["channels"], r.get("resolution")) for r in report["searched"]}
    picked = [p for p in rescored if (p["channels"], p.get("resolution")) in chosen]
    right.plot(
        [p["predicted_ms"] for p in picked],
        [100 * p["search_accuracy"] for p in picked],
        "o",
        color="tab:red",
        label="kept in the table",
    )
    right.set_xscale("log")
    right.set_xlabel("predicted latency, batch 1 (ms)")
    right.set_ylabel("search-split top-1 (%)")
    right.set_title(f"Progressive path ({len(rescored)} subnets, {report['finetunes']} fine-tunes)")
    right.grid(alpha=0.3, which="both")
    right.legend(loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _row_table(rows: list[dict[str, Any]], ids: list[str] | None = None) -> list[str]:
    lines = [
        "| id | channels | depths | resolution | MFLOPs | params | test top-1 | search top-1 | p50 b1 (ms) | p95 b1 (ms) "
        "| p50 b8 (ms/batch) |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for index, row in enumerate(rows):
        latency = row["latency_ms"]
        b8 = f"{latency['8']['p50']:.2f}" if "8" in latency else "-"
        lines.append(
            f"| {ids[index] if ids else row['origin']} | `{row['channels']}` | {row.get('depths', '-')} | "
            f"{row.get('resolution', '-')} | "
            f"{row['flops'] / 1e6:.1f} | {row['params']:,} | "
            f"{100 * row['test_accuracy']:.2f}% | {100 * row['search_accuracy']:.2f}% | {latency['1']['p50']:.2f} | "
            f"{latency['1']['p95']:.2f} | {b8} |"
        )
    return lines


def markdown(report: SearchReport, name: str, command: str) -> str:
    minutes = report["total_s"] / 60
    profile = next(iter(report["device_profile"].values()))
    lines = [
        f"# Subnet search: {name}",
        "",
        f"Made by `{command}` in {minutes:.1f} minutes on {profile['processor']} "
        f"({profile['device']}, {profile['threads']} threads, torch {profile['torch']}).",
        f"Candidates scored on {report['search_split']}; accuracy reported on {report['test_split']}.",
        "",
    ]
    headline = [
        f"* vs {label}: **mean {100 * gain['mean']:+.2f} points** of test top-1 "
        f"(min {100 * gain['min']:+.2f}, max {100 * gain['max']:+.2f}) over {len(gain['per_subnet'])} searched subnets "
        f"inside its latency range; binomial noise (1 sd) {100 * gain['noise_sd']:.2f} points per subnet, "
        f"{100 * gain['mean_noise_sd']:.2f} on the mean."
        for label, gain in (
            ("uniform widths at full depth (US-Nets)", report.get("gain")),
            (
                "random subnets of the same space (once-for-all-style sampling), their Pareto front",
                report.get("gain_vs_random"),
            ),
        )
        if gain and gain["mean"] is not None
    ]
    if headline:
        lines += [
            "## Headline",
            "",
            "Searched subnets against each baseline's front at equal measured latency (batch 1, p50, "
            "baseline curve interpolated in log-latency):",
            "",
            *headline,
            "",
        ]
    lines += [f"![accuracy vs latency](search-{name}.png)", "", "## Channel ranking (ablation)", ""]
    ranking = report["ranking"]
    widths = ranking["probe_widths"]
    lines += [
        "Search-split top-1 of uniform subnets right after permuting channels by each ranking (before any fine-tuning):",
        "",
        "| ranking | " + " | ".join(f"width {w:g}" for w in widths) + " | mean |",
        "|---|" + "---:|" * (len(widths) + 1),
    ]
    for rank_name, scores in ranking["scores"].items():
        values = [scores[f"{w:g}"] for w in widths]
        marker = " (kept)" if rank_name == ranking["chosen"] else ""
        lines.append(
            f"| {rank_name}{marker} | "
            + " | ".join(f"{100 * v:.2f}%" for v in values)
            + f" | {100 * sum(values) / len(values):.2f}% |"
        )
    predictor = report["predictor"]
    lines += [
        "",
        "## Latency predictor",
        "",
        f"Per-resolution FLOPs model fitted on {predictor['fitted_on']} measured subnets; error on {predictor['held_out']} held-out ones:",
        "",
        "| batch | p50 relative error | p90 | max |",
        "|---:|---:|---:|---:|",
    ]
    for batch, errors in predictor["relative_error"].items():
        lines.append(
            f"| {batch} | {100 * errors['p50']:.1f}% | {100 * errors['p90']:.1f}% | {100 * errors['max']:.1f}% |"
        )
    lines += [
        "",
        "## The ranked table (searched)",
        "",
        f"{len(report['path'])} subnets on the path, {report['evaluations']} candidate evaluations, "
        f"{report['finetunes']} selective fine-tunes, Pareto front of {report['pareto_front_size']}; "
        f"{report.get('evaluated_for_the_table', '-')} of it measured for the table, "
        f"{report.get('measured_front_size', '-')} not dominated once measured.",
        "",
        *_row_table(report["searched"], [f"s{i}" for i in range(len(report["searched"]))]),
    ]
    if report["uniform"]:
        lines += [
            "",
            "## Uniform widths (US-Nets baseline, same supernet, same BN recalibration)",
            "",
            *_row_table(report["uniform"]),
        ]
    if report.get("random"):
        lines += [
            "",
            "## Random subnets (once-for-all-style sampling of width x depth, same supernet and recalibration)",
            "",
            *_row_table(report["random"]),
        ]
    phases = ", ".join(f"{k} {v:.0f} s" for k, v in report["phases_s"].items())
    lines += ["", f"Time by phase: {phases}.", ""]
    return "\n".join(lines)


def write_report(report: SearchReport, report_dir: Path, name: str, command: str) -> Path:
    report_dir.mkdir(parents=True, exist_ok=True)
    (report_dir / f"search-{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    plot_search(report, report_dir / f"search-{name}.png")
    page = report_dir / f"search-{name}.md"
    page.write_text(markdown(report, name, command))
    return page
