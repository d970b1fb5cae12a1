"""The learned price of upgrades, with plain numbers."""

import math

import pytest

from slimserve.server.collateral import CollateralRate


def test_no_misses_cost_nothing() -> None:
    rate = CollateralRate()
    rate.record_upgrade(1.0, 0.010)
    assert rate.rate(1.0) == 0.0


def test_misses_per_second_of_extra_busy_time_with_a_prior() -> None:
    rate = CollateralRate(tau=1e9, prior_seconds=0.25)  # no decay within the test
    for step in range(75):
        rate.record_upgrade(step * 0.01, 0.010)  # 0.75 s of extra busy time in all
    rate.record_miss(0.75)
    rate.record_miss(0.76)
    assert rate.rate(0.8) == pytest.approx(2 / (0.75 + 0.25))


def test_one_early_miss_is_not_read_as_certainty_and_old_evidence_fades() -> None:
    rate = CollateralRate(tau=10.0, prior_seconds=0.25)
    rate.record_miss(0.0)
    assert rate.rate(0.0) == pytest.approx(4.0)
    assert rate.rate(10.0) == pytest.approx(4.0 * math.exp(-1.0))  # with no new upgrades, the price falls
    assert rate.rate(100.0) < 0.001


def test_a_clock_that_steps_back_does_not_inflate_the_evidence() -> None:
    rate = CollateralRate(tau=10.0)
    rate.record_upgrade(5.0, 0.1)
    rate.record_miss(4.0)
    assert rate.extra_seconds == pytest.approx(0.1) and rate.misses == 1.0


def test_bad_parameters_are_refused() -> None:
    with pytest.raises(ValueError, match="positive"):
        CollateralRate(tau=0.0)
