"""Predicted latency of (subnet, batch size) on this machine, now.

    predicted = profiled p50 (from the table, interpolated over batch size)
                x drift          (learned: how this machine compares to the profile, all subnets)
                x residual[s]    (learned: what is particular to subnet s; a row not run for a
                                  while drifts toward the residuals of rows of similar cost)
                x load factor    (now: CPU/GPU taken by other processes, from telemetry)
                x (1 + k x deviation)   (learned tail margin, like TCP's RTT variance)

Beyond that one tail margin, it keeps how much longer than expected recent batches took, so the
adaptive policy can ask how likely a batch is to overrun the time it has
(:meth:`LatencyModel.overrun_probability`): a request whose row fills its budget to the edge
misses whenever the machine hiccups, one with room to spare almost never.

Observations are divided by the load factor that held when they were made, so the learned
factors describe the machine, not the moment, and a change of external load moves predictions at
once instead of after a few slow requests. Pure arithmetic: the worker thread owns the instance.
"""

from __future__ import annotations

import bisect
import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass


def interpolate_batches(profiled: dict[int, float], max_batch: int) -> list[float]:
    """Latency for every batch size 1..max_batch from the profiled ones (linear in between, and
    beyond the largest profiled size extrapolated with the last segment's slope)."""
    sizes = sorted(profiled)
    if 1 not in profiled:
        raise ValueError("the profile must include batch size 1")
    result = []
    for batch in range(1, max_batch + 1):
        upper = next((s for s in sizes if s >= batch), None)
        lower = max(s for s in sizes if s <= batch)
        if upper is None:
            upper, lower = sizes[-1], sizes[-2] if len(sizes) > 1 else sizes[-1]
        if upper == lower:
            value = profiled[lower] * (batch / lower if batch > lower else 1.0)
        else:
            slope = (profiled[upper] - profiled[lower]) / (upper - lower)
            value = profiled[lower] + slope * (batch - lower)
        result.append(max(value, 1e-6))
    return result


@dataclass(frozen=True)
class LatencyModelConfig:
    drift_alpha: float = 0.05  # EWMA weight of one observation for the machine-wide drift
    residual_alpha: float = 0.02  # slower: per-subnet corrections see fewer observations
    deviation_alpha: float = 0.05
    tail_k: float = 2.0  # predicted = mean x (1 + k x mean absolute relative deviation)
    bounds: tuple[float, float] = (0.2, 20.0)  # clamp learned factors: one absurd sample cannot wreck the model
    excess_window: int = 512  # recent (measured - expected) batch times kept for overrun probabilities
    excess_prior: int = 32  # observations before the window speaks for itself (see overrun_probability)
    # A row unobserved for this many batches counts as stale: each observation of another row pulls
    # its residual toward that row's, as strongly as a row's own observation moves it, times the
    # rows' affinity exp(-|ln(cost ratio)| / affinity_width) (batch-1 profiled cost). Rows run
    # recently are left to their own measurements (partly, in proportion, in between).
    stale_after: int = 64
    affinity_width: float = 0.5


class LatencyModel:
    """Online-corrected latency predictions; ``predict`` is in seconds."""

    def __init__(
        self,
        profiled_ms: Sequence[dict[int, float]],
        max_batch: int,
        initial_deviation: float = 0.05,
        config: LatencyModelConfig | None = None,
    ) -> None:
        self.config = config or LatencyModelConfig()
        self.base = [[v / 1000.0 for v in interpolate_batches(p, max_batch)] for p in profiled_ms]
        self.max_batch = max_batch
        self.drift = 1.0
        self.residual = [1.0] * len(profiled_ms)
        self._last_seen = [-self.config.stale_after] * len(profiled_ms)  # observation count when last run
        costs = [math.log(row[0]) for row in self.base]
        self._affinity = [[math.exp(-abs(a - b) / self.config.affinity_width) for b in costs] for a in costs]
        self.deviation = initial_deviation
        self.observations = 0
        self._excess: deque[float] = deque()  # recent measured - expected seconds, oldest first
        self._sorted_excess: list[float] = []

    def expected(self, subnet: int, batch: int, load_factor: float = 1.0) -> float:
        """Mean prediction (seconds) without the tail margin."""
        batch = min(max(batch, 1), self.max_batch)
        return self.base[subnet][batch - 1] * self.drift * self.residual[subnet] * load_factor

    def predict(self, subnet: int, batch: int, load_factor: float = 1.0) -> float:
        """Tail-aware prediction (seconds): what a deadline should be checked against."""
        return self.expected(subnet, batch, load_factor) * (1.0 + self.config.tail_k * self.deviation)

    def observe(self, subnet: int, batch: int, measured_seconds: float, load_factor: float = 1.0) -> None:
        if not math.isfinite(measured_seconds) or measured_seconds <= 0:
            return
        low, high = self.config.bounds
        expected = self.expected(subnet, batch, load_factor)
        ratio = measured_seconds / expected
        self._remember(measured_seconds - expected)
        self.deviation += self.config.deviation_alpha * (abs(ratio - 1.0) - self.deviation)
        # Split the surprise: most of it is machine-wide drift, what persists per subnet is residual.
        self.drift = _clamp(self.drift * (1.0 + self.config.drift_alpha * (ratio - 1.0)), low, high)
        residual_ratio = measured_seconds / self.expected(subnet, batch, load_factor)
        self.residual[subnet] = _clamp(
            self.residual[subnet] * (1.0 + self.config.residual_alpha * (residual_ratio - 1.0)), low, high
        )
        self._last_seen[subnet] = self.observations
        self._relax_stale_rows(subnet)
        self.observations += 1

    def _relax_stale_rows(self, observed: int) -> None:
        """Pull the residuals of rows not run lately toward that of the row just observed.

        A row the policy seldom picks keeps whatever its last few batches taught it, however long
        ago and under whatever contention: at 270 req/s s3 kept a correction of 1.6-2.0x while its
        neighbour s4 settled at 1.4-1.6x, so it looked too slow to pick (docs/RESULTS.md).
        Rows of similar cost are slowed by the same things (thread count, memory traffic), so theirs
        is the better guess; the pull is geometric, so the residuals stay positive and within bounds.
        """
        for row, affinity in enumerate(self._affinity[observed]):
            if row == observed:
                continue
            staleness = min(1.0, (self.observations - self._last_seen[row]) / self.config.stale_after)
            weight = self.config.residual_alpha * staleness * affinity
            self.residual[row] *= (self.residual[observed] / self.residual[row]) ** weight

    def _remember(self, excess: float) -> None:
        if len(self._excess) == self.config.excess_window:
            del self._sorted_excess[bisect.bisect_left(self._sorted_excess, self._excess.popleft())]
        self._excess.append(excess)
        bisect.insort(self._sorted_excess, excess)

    def overrun_probability(self, subnet: int, batch: int, available: float, load_factor: float = 1.0) -> float:
        """How likely a batch of (subnet, batch) takes longer than ``available`` seconds.

        The share of recent batches (any subnet: the machine's hiccups are shared, and they are
        milliseconds lost to other processes whatever runs, not a share of the batch) that took
        longer than expected by more than this one has to spare. Until ``excess_prior`` batches
        have run, the tail margin stands in for the missing ones: they count as overrunning any
        batch that ``predict`` says does not fit, and no other.
        """
        expected = self.expected(subnet, batch, load_factor)
        spare = available - expected
        seen = len(self._sorted_excess)
        over = seen - bisect.bisect_right(self._sorted_excess, spare)
        missing = max(0, self.config.excess_prior - seen)
        if missing and available < self.predict(subnet, batch, load_factor):
            over += missing
        return over / (seen + missing)

    def corrections(self) -> list[float]:
        """Current multiplier per subnet on the profiled latency (drift x residual)."""
        return [self.drift * r for r in self.residual]


def _clamp(value: float, low: float, high: float) -> float:
    return min(high, max(low, value))


class ArrivalRate:
    """Exponentially decayed arrival counter: requests per second over roughly the last ``tau`` seconds."""

    def __init__(self, tau: float = 1.0) -> None:
        self.tau = tau
        self._value = 0.0
        self._last = 0.0

    def record(self, now: float) -> None:
        self._value = self._value * math.exp(-(now - self._last) / self.tau) + 1.0 / self.tau
        self._last = now

    def rate(self, now: float) -> float:
        return self._value * math.exp(-max(0.0, now - self._last) / self.tau)
