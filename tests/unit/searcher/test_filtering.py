import itertools
import math

import pytest

from slimserve.searcher.filtering import pareto_front, spread_selection


def test_pareto_front_drops_dominated_points_and_sorts_by_latency() -> None:
    points = [(1.0, 0.80), (2.0, 0.85), (2.5, 0.84), (3.0, 0.90), (3.0, 0.88), (4.0, 0.90), (0.5, 0.60)]
    front = pareto_front(points, lambda p: p[0], lambda p: p[1])
    assert front == [(0.5, 0.60), (1.0, 0.80), (2.0, 0.85), (3.0, 0.90)]


def test_spread_selection_keeps_both_ends_and_spreads_in_log_latency() -> None:
    front = [(2.0**i, i) for i in range(11)]  # latencies 1 .. 1024
    chosen = spread_selection(front, 3, lambda p: p[0])
    assert chosen == [front[0], front[5], front[10]]
    five = spread_selection(front, 5, lambda p: p[0])
    gaps = [math.log2(b[0] / a[0]) for a, b in itertools.pairwise(five)]
    assert len(five) == 5 and max(gaps) - min(gaps) <= 1
    assert spread_selection(front[:3], 8, lambda p: p[0]) == front[:3]
    with pytest.raises(ValueError):
        spread_selection(front, 1, lambda p: p[0])
