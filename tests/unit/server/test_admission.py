"""CoDel's rule for the front end's own queue, on plain numbers."""

from __future__ import annotations

import pytest

from slimserve.server.admission import FrontEndDelay


def test_a_burst_whose_shortest_wait_stays_under_target_is_admitted() -> None:
    gate = FrontEndDelay(target=0.005, interval=0.1)
    for step in range(10):  # long lags, but one short one in the interval: a burst that drains
        gate.observe(step * 0.01, 0.050 if step % 5 else 0.001)
    assert not gate.congested(0.1)


def test_a_standing_queue_sheds_until_an_interval_is_short_or_empty() -> None:
    gate = FrontEndDelay(target=0.005, interval=0.1)
    for step in range(10):
        gate.observe(step * 0.01, 0.020)  # every sample 20 ms late: a standing queue
    assert gate.congested(0.1)
    assert gate.congested(0.15)  # decided per interval, not per request
    gate.observe(0.16, 0.001)  # the backlog drained
    assert not gate.congested(0.2)
    assert not gate.congested(0.35)  # and a window with no samples at all admits too


def test_nothing_observed_is_never_congested() -> None:
    assert not FrontEndDelay(target=0.005).congested(123.0)


@pytest.mark.parametrize(("target", "interval"), [(0.0, 0.1), (0.005, 0.0), (-1.0, 0.1)])
def test_nonsense_parameters_are_refused(target: float, interval: float) -> None:
    with pytest.raises(ValueError, match="positive"):
        FrontEndDelay(target, interval)
