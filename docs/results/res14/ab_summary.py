"""Pool the A/B compares of ab.sh: per rate and side, the medians over all repeats of adaptive's
attainment, its minus static:s0 (paired by repeat) and the repeats at >= 99%.

    cd docs/results/res14 && python ab_summary.py
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).parent


def pooled(side: str) -> dict[str, dict[str, list[float]]]:
    by_rate: dict[str, dict[str, list[float]]] = {}
    for path in sorted(HERE.glob(f"ab-{side}-*/loadtest-poisson.json")):
        results = json.loads(path.read_text())["results"]
        for rate, runs in results["adaptive"].items():
            into = by_rate.setdefault(rate, {"attainment": [], "minus_s0": [], "acc_minus_s0": [], "outside": []})
            for run, control in zip(runs, results["static:s0"][rate], strict=True):
                into["attainment"].append(100 * run["slo_attainment"])
                into["minus_s0"].append(100 * (run["slo_attainment"] - control["slo_attainment"]))
                into["acc_minus_s0"].append(
                    100 * (run["expected_effective_accuracy"] - control["expected_effective_accuracy"])
                )
                into["outside"].append(run["answered_outside_server_ms_p50"])
    return by_rate


def say(line: str) -> None:
    sys.stdout.write(line + "\n")


def main() -> None:
    say(
        "| req/s | side | adaptive attainment | repeats >= 99% | adaptive - s0 attainment | adaptive - s0 expected eff. acc | outside the server p50 (ms) |"
    )
    say("|---|---|---|---|---|---|---|")
    sides = {side: pooled(side) for side in ("old", "new")}
    for rate in sorted(sides["old"], key=float):
        for side, by_rate in sides.items():
            runs = by_rate[rate]
            kept = sum(value >= 99.0 for value in runs["attainment"])
            say(
                f"| {float(rate):.0f} | {side} | {statistics.median(runs['attainment']):.2f}% | {kept} of"
                f" {len(runs['attainment'])} | {statistics.median(runs['minus_s0']):+.2f} |"
                f" {statistics.median(runs['acc_minus_s0']):+.2f} |"
                f" {min(runs['outside']):.2f}-{max(runs['outside']):.2f} |"
            )


if __name__ == "__main__":
    main()
