"""Generate a per-second request-rate trace shaped like the Azure Functions 2019 invocation trace.

The public trace (Shahrad et al., "Serverless in the Wild", ATC '20) cannot be downloaded here.
What matters about it for serving is reproduced: a diurnal swing compressed into minutes (as
SuperServe and INFaaS replay it), heavy-tailed second-to-second noise, and rare sharp bursts of a
few seconds several times the mean. The output is normalized to mean 1.0; the load test scales it
to any mean rate.

    python -m slimserve.loadtest.make_trace --seconds 600 --seed 2019 --out loadtest/traces/azure_functions_like.csv
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np


def azure_like(seconds: int, seed: int, period: float = 300.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(seconds)
    diurnal = 1.0 + 0.6 * np.sin(2 * np.pi * t / period - np.pi / 2) + 0.15 * np.sin(4 * np.pi * t / period)
    noise = rng.lognormal(mean=0.0, sigma=0.35, size=seconds)  # heavy-ish tail per second
    smooth = np.convolve(noise, np.ones(3) / 3, mode="same")  # invocations cluster over a few seconds
    rates = diurnal * smooth
    for start in rng.choice(seconds, size=max(1, seconds // 120), replace=False):  # rare bursts
        length = int(rng.integers(2, 7))
        rates[start : start + length] *= rng.uniform(2.5, 4.0)
    return rates / rates.mean()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=600)
    parser.add_argument("--seed", type=int, default=2019)
    parser.add_argument("--out", type=Path, default=Path("loadtest/traces/azure_functions_like.csv"))
    args = parser.parse_args()
    rates = azure_like(args.seconds, args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["second", "rate"])
        for second, rate in enumerate(rates):
            writer.writerow([second, f"{rate:.4f}"])


if __name__ == "__main__":
    main()
