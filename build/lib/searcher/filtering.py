"""Subnet filtering: keep the accuracy/latency Pareto front, then K subnets spread over latency."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TypeVar

T = TypeVar("T")


def pareto_front(items: Sequence[T], latency: Callable[[T], float], accuracy: Callable[[T], float]) -> list[T]:
    """Items no other item beats on both axes, fastest first, with strictly increasing accuracy."""
    front: list[T] = []
    for item in sorted(items, key=lambda i: (latency(i), -accuracy(i))):
        # sorted by latency, most accurate first among equals: keep only accuracy improvements
        if not front or (accuracy(item) > accuracy(front[-1]) and latency(item) > latency(front[-1])):
            front.append(item)
    return front


def spread_selection(front: Sequence[T], k: int, latency: Callable[[T], float]) -> list[T]:
    """Up to ``k`` items of a front, always its fastest and its slowest, the rest nearest to
    log-evenly spaced latencies (the server needs choices across the whole budget range, and
    latency ratios matter more than differences)."""
    if k < 2:
        raise ValueError("k must be at least 2 (the fastest and the most accurate subnet)")
    if len(front) <= k:
        return list(front)
    low, high = math.log(latency(front[0])), math.log(latency(front[-1]))
    chosen = {0, len(front) - 1}
    for position in range(1, k - 1):
        target = low + (high - low) * position / (k - 1)
        remaining = [i for i in range(len(front)) if i not in chosen]
        chosen.add(min(remaining, key=lambda i: abs(math.log(latency(front[i])) - target)))
    return [front[i] for i in sorted(chosen)]
