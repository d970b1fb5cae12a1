"""Open-loop arrival schedules: when each request is *sent*, decided before the run.

A closed loop (users that wait for each reply before sending the next) slows down exactly when the
server does, which hides tail latency under overload (coordinated omission). Here the send times
are fixed in advance from the arrival process, and the client reports how late it actually sent
each one (send lag), so a generator that fell behind is visible.

Every function returns sorted send offsets in seconds from the start, in ``[0, duration)``.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

import numpy as np

ARRIVALS = ("constant", "poisson", "gamma", "step", "spike", "trace")


def constant(rate: float, duration: float) -> np.ndarray:
    count = int(rate * duration)
    return np.arange(count) / rate


def _renewal(rate: float, duration: float, rng: np.random.Generator, draw) -> np.ndarray:
    expected = int(rate * duration * 1.2) + 16
    gaps = draw(expected)
    times = np.cumsum(gaps)
    while times[-1] < duration:  # rare: draw more
        times = np.concatenate([times, times[-1] + np.cumsum(draw(expected))])
    return times[times < duration]


def poisson(rate: float, duration: float, rng: np.random.Generator) -> np.ndarray:
    """Exponential inter-arrival times (CV^2 = 1)."""
    return _renewal(rate, duration, rng, lambda n: rng.exponential(1.0 / rate, n))


def gamma(rate: float, cv2: float, duration: float, rng: np.random.Generator) -> np.ndarray:
    """Gamma inter-arrival times with squared coefficient of variation ``cv2`` (SuperServe's bursty
    synthetic traces): shape = 1 / cv2, scale = cv2 / rate, so the mean rate stays ``rate``."""
    shape, scale = 1.0 / cv2, cv2 / rate
    return _renewal(rate, duration, rng, lambda n: rng.gamma(shape, scale, n))


def piecewise(rates: Sequence[float], seconds_each: float, rng: np.random.Generator) -> np.ndarray:
    """Poisson arrivals whose rate changes every ``seconds_each`` seconds (step shapes, trace replay)."""
    parts = []
    for index, rate in enumerate(rates):
        if rate > 0:
            parts.append(index * seconds_each + poisson(rate, seconds_each, rng))
    return np.sort(np.concatenate(parts)) if parts else np.array([])


def step(low: float, high: float, duration: float, rng: np.random.Generator, steps: int = 4) -> np.ndarray:
    """Rate climbing from ``low`` to ``high`` in equal steps over the run."""
    return piecewise(np.linspace(low, high, steps).tolist(), duration / steps, rng)


def spike(base: float, peak: float, duration: float, rng: np.random.Generator, spike_share: float = 0.2) -> np.ndarray:
    """``base`` rate with one burst at ``peak`` in the middle ``spike_share`` of the run."""
    seconds = max(1, int(duration))
    start, end = int(seconds * (0.5 - spike_share / 2)), int(seconds * (0.5 + spike_share / 2))
    rates = [peak if start <= s < end else base for s in range(seconds)]
    return piecewise(rates, 1.0, rng)


def read_trace(path: Path) -> list[float]:
    """Per-second request rates from a CSV with a ``rate`` column (one row per second)."""
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        if reader.fieldnames is None or "rate" not in reader.fieldnames:
            raise ValueError(f"{path}: expected a CSV with a 'rate' column (requests per second, one row per second)")
        rates = []
        for line, row in enumerate(reader, start=2):
            try:
                rates.append(float(row["rate"]))
            except ValueError:
                raise ValueError(f"{path}:{line}: rate {row['rate']!r} is not a number") from None
    if not rates or min(rates) < 0:
        raise ValueError(f"{path}: rates must be non-negative and there must be at least one")
    return rates


def trace(
    rates: Sequence[float], duration: float, rng: np.random.Generator, mean_rate: float | None = None
) -> np.ndarray:
    """Replay a per-second rate trace (looped or cut to ``duration``), scaled so that the seconds
    replayed average ``mean_rate`` (None: the trace's own rates). The window's mean, not the whole
    trace's: a run shorter than the trace would otherwise get whatever its first seconds hold (the
    shipped trace's first 6 s average a third of its mean)."""
    window = [rates[s % len(rates)] for s in range(int(duration))]
    if mean_rate is not None and window:
        average = float(np.mean(window))
        if average <= 0:
            raise ValueError(f"the trace's first {len(window)} s hold no requests; it cannot be scaled to a mean rate")
        window = [r * mean_rate / average for r in window]
    return piecewise(window, 1.0, rng)


def schedule(
    kind: str, rate: float, duration: float, seed: int, cv2: float = 4.0, trace_rates: Sequence[float] | None = None
) -> np.ndarray:
    """One entry point for the CLI and the locustfile. ``rate`` is the mean (constant, poisson,
    gamma), the top of the ramp (step), the peak (spike, base = rate / 4) or the mean over the
    seconds of the trace replayed."""
    rng = np.random.default_rng(seed)
    if kind == "constant":
        return constant(rate, duration)
    if kind == "poisson":
        return poisson(rate, duration, rng)
    if kind == "gamma":
        return gamma(rate, cv2, duration, rng)
    if kind == "step":
        return step(rate / 4, rate, duration, rng)
    if kind == "spike":
        return spike(rate / 4, rate, duration, rng)
    if kind == "trace":
        if trace_rates is None:
            raise ValueError("the trace arrival needs a rate trace (CSV)")
        return trace(trace_rates, duration, rng, mean_rate=rate)
    raise ValueError(f"unknown arrival {kind!r}; known: {', '.join(ARRIVALS)}")
