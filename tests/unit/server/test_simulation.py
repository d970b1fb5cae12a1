"""The scheduler and policies on a virtual clock (slimserve bench simulate), on the demo table."""

import itertools
import random
import statistics

import pytest

from slimserve.models.schema import TABLE_FILE, read_table
from slimserve.server.settings import DEMO_BUNDLE
from slimserve.server.simulation import Load, Machine, compare, parse_mix, parse_policy_spec, simulate

TABLE = read_table(DEMO_BUNDLE / TABLE_FILE)
COLUMN = "cpu-2t"
LOOSE = Load(rate=20, seconds=5, mix=((100, 250),))


def test_a_run_is_a_function_of_its_seed() -> None:
    first = simulate(TABLE, COLUMN, "adaptive", LOOSE, Machine(hiccups_per_s=5, hiccup_ms=20), seed=3)
    assert first == simulate(TABLE, COLUMN, "adaptive", LOOSE, Machine(hiccups_per_s=5, hiccup_ms=20), seed=3)
    assert first != simulate(TABLE, COLUMN, "adaptive", LOOSE, Machine(hiccups_per_s=5, hiccup_ms=20), seed=4)


def test_at_light_load_a_static_row_answers_everything_in_time_with_its_own_accuracy() -> None:
    result = simulate(TABLE, COLUMN, "static:s0", LOOSE, Machine())
    assert result["slo_attainment"] == 1.0
    assert result["expected_effective_accuracy"] == pytest.approx(TABLE.subnets[0].accuracy)
    assert result["rows"] == {"s0": result["sent"]}


def test_at_light_load_adaptive_gives_a_loose_budget_the_most_accurate_row() -> None:
    result = simulate(TABLE, COLUMN, "adaptive", LOOSE, Machine())
    assert result["slo_attainment"] == 1.0
    assert result["rows"] == {TABLE.subnets[-1].id: result["sent"]}


def test_past_its_capacity_a_static_row_misses_and_adaptive_falls_back_to_narrower_rows() -> None:
    # The widest row takes ~9.5 ms alone on this column: 400 req/s is several times what it serves.
    heavy = Load(rate=400, seconds=3, mix=((100, 100),))
    widest = simulate(TABLE, COLUMN, f"static:{TABLE.subnets[-1].id}", heavy, Machine())
    adaptive = simulate(TABLE, COLUMN, "adaptive", heavy, Machine())
    assert widest["slo_attainment"] < 0.5
    assert adaptive["slo_attainment"] > 0.95
    assert set(adaptive["rows"]) != {TABLE.subnets[-1].id}


def test_a_slower_machine_with_hiccups_costs_attainment() -> None:
    tight = Load(rate=50, seconds=5, mix=((100, 20),))
    calm = simulate(TABLE, COLUMN, "static:s4", tight, Machine())
    rough = simulate(TABLE, COLUMN, "static:s4", tight, Machine(slowdown=2.0, hiccups_per_s=20, hiccup_ms=30))
    assert rough["slo_attainment"] < calm["slo_attainment"] == 1.0


def test_time_outside_the_server_comes_off_the_budget_and_its_tail_costs_attainment() -> None:
    # static:s0 takes ~0.2 ms here; a 3 ms budget holds 1.5 ms outside plus the front end and the
    # answer path (0.8 ms) whole, but an exponential tail of 1 ms on top of it does not always fit.
    tight = Load(rate=20, seconds=20, mix=((100, 3),))
    assert simulate(TABLE, COLUMN, "static:s0", tight, Machine(outside_ms=1.5))["slo_attainment"] == 1.0
    jittery = simulate(TABLE, COLUMN, "static:s0", tight, Machine(outside_ms=1.5, outside_jitter_ms=1.0))
    assert 0.2 < jittery["slo_attainment"] < 0.9


def test_policies_meet_the_same_arrivals_and_differences_are_paired_by_seed() -> None:
    result = compare(TABLE, COLUMN, ["static:s0", "static:s2"], LOOSE, Machine(), repeats=3)
    assert [r["sent"] for r in result["runs"]["static:s0"]] == [r["sent"] for r in result["runs"]["static:s2"]]
    gains = result["medians"]["static:s2"]["expected_effective_accuracy_minus_static:s0"]
    assert gains == [pytest.approx(TABLE.subnets[2].accuracy - TABLE.subnets[0].accuracy, abs=1e-4)] * 3


def test_bursty_arrivals_have_the_asked_rate_and_spread() -> None:
    sent = Load(rate=100, seconds=200, mix=((100, 50),), cv2=4.0).arrivals(random.Random(0))
    gaps = [b[0] - a[0] for a, b in itertools.pairwise(sent)]
    assert len(sent) / 200 == pytest.approx(100, rel=0.1)
    assert statistics.variance(gaps) / statistics.mean(gaps) ** 2 == pytest.approx(4.0, rel=0.2)


def test_policy_specs_and_mixes_are_checked_with_a_message_that_names_the_problem() -> None:
    assert parse_policy_spec("adaptive+split-batches=false").split_batches is False
    assert parse_policy_spec("static:s3").policy == "static:s3"
    with pytest.raises(ValueError, match="'splitting=off' is not name=value of a server setting"):
        parse_policy_spec("adaptive+splitting=off")
    with pytest.raises(ValueError, match="miss_penalty"):
        parse_policy_spec("adaptive+miss-penalty=lots")
    assert parse_mix("30:60,70:100") == ((30.0, 60.0), (70.0, 100.0))
    with pytest.raises(ValueError, match="'70' is not percent:milliseconds"):
        parse_mix("30:60,70")
    with pytest.raises(ValueError, match="hiccup-ms > 0"):
        Machine(hiccups_per_s=10)
    with pytest.raises(ValueError, match="at least one policy and one repeat"):
        compare(TABLE, COLUMN, [], LOOSE, Machine())
    with pytest.raises(ValueError, match="rate, seconds and cv2 must be > 0"):
        Load(rate=0, seconds=5, mix=((100, 50),))
