"""Arrival processes have the statistics they claim, without any server."""

from pathlib import Path

import numpy as np
import pytest

from slimserve.loadtest.arrivals import constant, gamma, poisson, read_trace, schedule, spike, step, trace
from slimserve.loadtest.workload import BudgetMix


def cv2(times: np.ndarray) -> float:
    gaps = np.diff(times)
    return float(gaps.var() / gaps.mean() ** 2)


def test_constant_rate_is_exact() -> None:
    times = constant(100.0, 10.0)
    assert len(times) == 1000 and np.allclose(np.diff(times), 0.01)


def test_poisson_has_the_rate_and_unit_cv2() -> None:
    times = poisson(200.0, 100.0, np.random.default_rng(0))
    assert len(times) / 100.0 == pytest.approx(200, rel=0.03)
    assert cv2(times) == pytest.approx(1.0, rel=0.08)
    assert np.all(np.diff(times) >= 0) and times.max() < 100.0


@pytest.mark.parametrize("target", [2.0, 4.0, 8.0])
def test_gamma_keeps_the_mean_rate_and_has_the_requested_burstiness(target: float) -> None:
    times = gamma(100.0, target, 400.0, np.random.default_rng(1))
    assert len(times) / 400.0 == pytest.approx(100, rel=0.08)
    assert cv2(times) == pytest.approx(target, rel=0.15)


def test_step_and_spike_change_the_rate_where_they_say() -> None:
    rng = np.random.default_rng(2)
    ramp = step(50.0, 200.0, 40.0, rng)
    first, last = np.sum(ramp < 10), np.sum(ramp >= 30)
    assert first == pytest.approx(500, rel=0.15) and last == pytest.approx(2000, rel=0.1)
    burst = spike(50.0, 400.0, 50.0, rng)
    middle = np.sum((burst >= 20) & (burst < 30))
    assert middle == pytest.approx(4000, rel=0.1) and np.sum(burst < 10) == pytest.approx(500, rel=0.2)


def test_trace_replay_follows_the_shape_and_scales_to_the_mean(tmp_path: Path) -> None:
    csv = tmp_path / "t.csv"
    csv.write_text("second,rate\n" + "".join(f"{s},{1.0 if s % 2 else 3.0}\n" for s in range(20)))
    rates = read_trace(csv)
    times = schedule("trace", 100.0, 20.0, seed=3, trace_rates=rates)
    assert len(times) / 20 == pytest.approx(100, rel=0.06)
    per_second = np.bincount(times.astype(int), minlength=20)
    assert per_second[0::2].mean() == pytest.approx(150, rel=0.1) and per_second[1::2].mean() == pytest.approx(
        50, rel=0.15
    )
    assert len(trace(rates, 40.0, np.random.default_rng(0))) > 0  # loops past its end


def test_a_run_shorter_than_the_trace_still_averages_the_rate_asked_for(tmp_path: Path) -> None:
    csv = tmp_path / "quiet_start.csv"
    csv.write_text("second,rate\n" + "".join(f"{s},{0.2 if s < 10 else 1.8}\n" for s in range(20)))
    rates = read_trace(csv)
    times = schedule("trace", 200.0, 6.0, seed=1, trace_rates=rates)  # only the quiet seconds
    assert len(times) / 6 == pytest.approx(200, rel=0.08)
    with pytest.raises(ValueError, match="first 2 s hold no requests"):
        trace([0.0, 0.0, 1.0], 2.0, np.random.default_rng(0), mean_rate=10.0)


def test_shipped_azure_like_trace_is_bursty_and_normalized() -> None:
    rates = np.array(read_trace(Path("loadtest/traces/azure_functions_like.csv")))
    assert rates.mean() == pytest.approx(1.0, abs=0.01) and rates.max() > 2.5 and rates.min() < 0.5


def test_bad_inputs_are_named(tmp_path: Path) -> None:
    (tmp_path / "bad.csv").write_text("second,qps\n0,1\n")
    with pytest.raises(ValueError, match="'rate' column"):
        read_trace(tmp_path / "bad.csv")
    with pytest.raises(ValueError, match="unknown arrival"):
        schedule("zipf", 1.0, 1.0, 0)
    with pytest.raises(ValueError, match="percent:milliseconds"):
        BudgetMix.parse("30-10")


def test_budget_mix_draws_in_proportion() -> None:
    mix = BudgetMix.parse("30:10,50:25,20:100")
    draws = mix.draw(20_000, np.random.default_rng(0))
    assert np.mean(draws == 10) == pytest.approx(0.3, abs=0.02) and np.mean(draws == 100) == pytest.approx(
        0.2, abs=0.02
    )
    assert str(mix) == "30:10,50:25,20:100"


def test_the_default_mix_comes_from_the_latency_column_the_servers_use() -> None:
    from slimserve.loadtest.workload import default_mix
    from slimserve.models.schema import read_table
    from slimserve.server.settings import DEMO_BUNDLE

    table_path = DEMO_BUNDLE / "subnets.json"
    table = read_table(table_path)
    for column in table.devices:
        batch_1 = [row.latency[column][1].p50_ms for row in table.subnets]
        fastest, largest = min(batch_1), max(batch_1)
        expected = tuple(round(b, 1) for b in (2.0 + 1.5 * fastest, 2.0 + 1.5 * largest, 2.0 + 10 * largest))
        assert default_mix(table_path, 2.0, column).budgets_ms == expected
    assert len({default_mix(table_path, 2.0, column) for column in table.devices}) == len(table.devices) > 1
    assert default_mix(table_path, 2.0) == default_mix(table_path, 2.0, table.primary_device)
    with pytest.raises(ValueError, match="no latency column 'tpu0'"):
        default_mix(table_path, 2.0, "tpu0")
