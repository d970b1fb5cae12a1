"""Adaptive minus static:s2, repeat by repeat, over comparisons' reports (same trace per pair).

Pairs are ordered by their *mean* attainment (adaptive's and static:s2's together): sorting on
static:s2's attainment alone would pick the repeats where s2 was lucky and bias the difference
down. Prints the pooled median, the medians by rate and by tercile of mean attainment, and plots
the difference against the mean attainment.

    python docs/results/res12/paired.py --plot docs/results/res12/paired-bursty.png REPORT.json...
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import sys
from pathlib import Path


def pairs(reports: list[Path], base: str, policy: str) -> list[tuple[str, float, float, float]]:
    """(rate, mean attainment %, difference in expected effective accuracy (points), attainment difference)."""
    found = []
    for report in reports:
        results = json.loads(report.read_text())["results"]
        for rate, runs in results[base].items():
            for ours, theirs in zip(results[policy][rate], runs, strict=True):
                mean = 50 * (ours["slo_attainment"] + theirs["slo_attainment"])
                gain = 100 * (ours["expected_effective_accuracy"] - theirs["expected_effective_accuracy"])
                found.append((rate, mean, gain, 100 * (ours["slo_attainment"] - theirs["slo_attainment"])))
    return sorted(found, key=lambda pair: pair[1])


def describe(group: list[tuple[str, float, float, float]]) -> str:
    gains = [pair[2] for pair in group]
    return (
        f"n {len(group):2d}  median {statistics.median(gains):+.2f}  [{min(gains):+.2f}, {max(gains):+.2f}]  "
        f"ahead {sum(g > 0 for g in gains)}  attainment {statistics.median(p[3] for p in group):+.1f}"
    )


def say(line: str) -> None:
    sys.stdout.write(line + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("reports", nargs="+", type=Path)
    parser.add_argument("--base", default="static:s2")
    parser.add_argument("--policy", default="adaptive")
    parser.add_argument("--plot", type=Path)
    args = parser.parse_args()
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `| head` ends the script quietly
    found = pairs(args.reports, args.base, args.policy)
    say(f"{args.policy} - {args.base}, expected effective accuracy (points)")
    say(f"all          {describe(found)}")
    for rate in sorted({pair[0] for pair in found}, key=float):
        say(f"{float(rate):5g} req/s  {describe([pair for pair in found if pair[0] == rate])}")
    third = len(found) // 3
    for low, high in ((0, third), (third, len(found) - third), (len(found) - third, len(found))):
        group = found[low:high]
        say(f"mean attainment {group[0][1]:.1f}-{group[-1][1]:.1f}%  {describe(group)}")
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        figure, axes = plt.subplots(figsize=(6.4, 4))
        for rate in sorted({pair[0] for pair in found}, key=float):
            group = [pair for pair in found if pair[0] == rate]
            axes.scatter([p[1] for p in group], [p[2] for p in group], label=f"{float(rate):g} req/s", s=18)
        axes.axhline(0, color="grey", linewidth=0.8)
        axes.set_xlabel(f"mean attainment of the pair (%, {args.policy} and {args.base})")
        axes.set_ylabel(f"{args.policy} - {args.base} (points)")
        axes.set_title("Paired repeats: expected effective accuracy gained over the static row", fontsize=10)
        axes.legend(fontsize=8)
        figure.tight_layout()
        figure.savefig(args.plot, dpi=120)


if __name__ == "__main__":
    main()
