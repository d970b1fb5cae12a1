"""The load-test report's verdicts on the issue's targets, from plain numbers: data first, then lines."""

from __future__ import annotations

from typing import Any

import pytest

from slimserve.loadtest.publish import (
    _generator,
    _machine,
    _margin,
    _resumed,
    evaluate,
    paired,
    paired_table,
    rates_run,
    targets,
)

pytestmark = pytest.mark.unit

POLICIES = ["adaptive", "static:s0", "static:s1"]
ACCURACIES = (0.90, 0.92)  # the table's, row by row


def _point(attainment: float, effective: float, oracle: float | None = None) -> dict[str, Any]:
    def stat(value: float) -> dict[str, float]:
        return {"median": value, "min": value, "max": value}

    point = {"slo_attainment": stat(attainment), "effective_accuracy": stat(effective)}
    point["expected_effective_accuracy"] = stat(effective)
    point["oracle_expected_accuracy"] = stat(effective if oracle is None else oracle)
    return point


def _result(points: dict[str, dict[str, tuple[float, float]]]) -> dict[str, Any]:
    medians = {
        policy: {rate: _point(*values) for rate, values in by_rate.items()} for policy, by_rate in points.items()
    }
    return {"medians": medians, "policies": POLICIES}


def test_all_targets_met_when_adaptive_dominates() -> None:
    result = _result(
        {
            "adaptive": {"10": (1.0, 0.92), "100": (0.995, 0.91), "300": (0.99, 0.90)},
            "static:s0": {"10": (1.0, 0.90), "100": (1.0, 0.90), "300": (0.995, 0.90)},
            "static:s1": {"10": (1.0, 0.92), "100": (0.6, 0.55), "300": (0.1, 0.09)},
        }
    )
    verdicts = evaluate(result, ACCURACIES)
    assert [(v.target, v.status) for v in verdicts] == [
        ("light load", "met"),
        ("never dominated", "met"),
        ("margin", "reported"),
        ("margin", "reported"),
        ("margin", "reported"),
        ("capacity ratio", "met"),
    ]
    assert verdicts[1].figures["capacity"] == 300.0 and verdicts[-1].figures["ratio"] == pytest.approx(30.0)
    assert verdicts[3].figures["margins"]["effective_accuracy"] == (pytest.approx(1.0), "static:s0")
    lines = targets(result, ACCURACIES)
    assert "**met**" in lines[0] and "**met**" in lines[1]
    assert "+0.00 points" in lines[2] and "+1.00 points" in lines[3] and "= 50%" in lines[3]
    assert "ratio 30.0x" in lines[-1] and "**met**" in lines[-1]


def test_a_static_policy_out_accurate_at_full_attainment_is_reported_as_missed() -> None:
    result = _result(
        {
            "adaptive": {"10": (1.0, 0.905)},
            "static:s0": {"10": (1.0, 0.90)},
            "static:s1": {"10": (1.0, 0.92)},
        }
    )
    verdicts = evaluate(result, ACCURACIES)
    assert verdicts[1].status == "missed" and verdicts[1].figures["effective"] == ["10 req/s by static:s1"]
    assert verdicts[-1].status == "missed" and verdicts[-1].figures["ratio"] == 1.0
    lines = targets(result, ACCURACIES)
    assert "missed at 10 req/s by static:s1" in lines[1]
    assert "ratio 1.0x" in lines[-1] and "**missed**" in lines[-1]


def test_targets_without_a_reference_capacity_are_not_evaluable_rather_than_met() -> None:
    # Every policy is overloaded at every rate run: nothing to compare against.
    result = _result(
        {
            "adaptive": {"500": (0.5, 0.45)},
            "static:s0": {"500": (0.8, 0.72)},
            "static:s1": {"500": (0.1, 0.09)},
        }
    )
    assert [v.status for v in evaluate(result, ACCURACIES)] == ["missed", "not evaluable", "reported", "not evaluable"]
    lines = targets(result, ACCURACIES)
    assert "**not evaluable: static-smallest kept >= 99% at none of the rates run**" in lines[1]
    assert "not evaluable" in lines[-1] and "inf" not in lines[-1]


def test_a_comparison_without_adaptive_says_so_instead_of_failing() -> None:
    result = {"medians": {"static:s1": {"25": _point(1.0, 0.92), "10": _point(1.0, 0.92)}}, "policies": ["static:s1"]}
    assert rates_run(result) == ["10", "25"]
    (line,) = targets(result, ACCURACIES)
    assert "did not include it" in line


def _with_p50(point: dict[str, Any], p50: float) -> dict[str, Any]:
    return {**point, "p50_ms": {"median": p50, "min": p50, "max": p50}}


def test_a_peer_is_judged_against_slimserve_serving_the_same_row() -> None:
    policies = ["adaptive", "static:s0", "static:s1", "litserve:s0", "ray:s1@4x1"]
    medians = {
        "adaptive": {"10": _point(1.0, 0.92), "200": _point(0.99, 0.90)},
        "static:s0": {"10": _with_p50(_point(1.0, 0.90), 2.0), "200": _with_p50(_point(0.99, 0.90), 4.0)},
        "static:s1": {"10": _with_p50(_point(1.0, 0.92), 9.0), "200": _with_p50(_point(0.2, 0.18), 90.0)},
        # LitServe keeps 99% only at the light rate and is slower there
        "litserve:s0": {"10": _with_p50(_point(1.0, 0.90), 4.0), "200": _with_p50(_point(0.7, 0.63), 30.0)},
        # Ray serves the accurate row faster at light load and out-accurates adaptive there
        "ray:s1@4x1": {"10": _with_p50(_point(1.0, 0.925), 8.0), "200": _with_p50(_point(0.3, 0.27), 80.0)},
    }
    verdicts = evaluate({"medians": medians, "policies": policies}, ACCURACIES)
    efficiency = [v for v in verdicts if v.target == "efficiency"]
    assert [(v.figures["peer"], v.figures["ours"], v.status) for v in efficiency] == [
        ("litserve:s0", "static:s0", "met"),
        ("ray:s1@4x1", "static:s1", "missed"),  # same capacity (10 req/s), higher p50 (9 vs 8 ms)
    ]
    assert efficiency[0].figures["our_capacity"] == 200.0 and efficiency[0].figures["peer_capacity"] == 10.0
    # peers count as static policies: Ray out-accurates adaptive at 99% attainment
    never = next(v for v in verdicts if v.target == "never dominated")
    assert never.status == "missed" and never.figures["effective"] == ["10 req/s by ray:s1@4x1"]
    margin = next(v for v in verdicts if v.target == "margin")
    assert margin.figures["margins"]["effective_accuracy"][1] == "ray:s1@4x1"
    lines = targets({"medians": medians, "policies": policies}, ACCURACIES)
    assert any("static:s0 vs litserve:s0" in line and "200 req/s vs 10 req/s" in line for line in lines)


def test_an_efficiency_check_without_capacity_on_either_side_compares_p50_only() -> None:
    policies = ["static:s0", "ray:s0"]
    medians = {
        "static:s0": {"900": _with_p50(_point(0.5, 0.45), 30.0)},
        "ray:s0": {"900": _with_p50(_point(0.3, 0.27), 60.0)},
    }
    (no_adaptive, verdict) = evaluate({"medians": medians, "policies": policies}, ACCURACIES)
    assert no_adaptive.target == "no adaptive" and verdict.status == "capacity not evaluable"
    assert "neither kept 99%" in targets({"medians": medians, "policies": policies}, ACCURACIES)[1]


def test_capacity_ends_at_the_first_rate_that_misses_or_where_the_generator_fell_behind() -> None:
    from slimserve.loadtest.publish import capacity_of

    rates = [20.0, 100.0, 250.0]
    key = {r: f"{r:g}" for r in rates}
    held_late = {"20": _point(0.98, 0.9), "100": _point(0.99, 0.9), "250": _point(0.995, 0.9)}
    assert capacity_of({"p": held_late}, "p", rates, key) == 0.0  # 99% at 250 does not excuse 98% at 20
    behind = {"20": _point(1.0, 0.9), "100": {**_point(1.0, 0.9), "generator_behind": True}, "250": _point(1.0, 0.9)}
    assert capacity_of({"p": behind}, "p", rates, key) == 20.0


def test_the_report_names_the_margin_the_servers_ran_with() -> None:
    assert _margin({"config": {"safety_margin_ms": 2.5}, "servers_safety_margin_ms": 2.5}) == "2.5 ms"
    # the default as recorded when the servers started, not whatever the default is when publishing
    assert _margin({"config": {"safety_margin_ms": None}, "servers_safety_margin_ms": 3.0}) == (
        "the server default (3 ms)"
    )
    # a result from before the default was recorded
    assert _margin({"config": {"safety_margin_ms": None}}) == "the server default"
    assert _margin({"config": {"safety_margin_ms": 2.0, "frontends": 3}}) == (
        "2 ms; 3 HTTP front-end processes per slimserve server"
    )


def test_the_report_names_the_machine_and_where_a_taskset_asyncio_generator_ran() -> None:
    config = {"server_cpus": [0, 1, 2, 3], "client_cpus": None, "generator": "asyncio"}
    result = {
        "config": config,
        "medians": {},
        "machine": {"cores": 16, "generator_process_cores": [8, 9], "device": "cuda:0"},
    }
    assert _machine(result) == "16 cores, inference on cuda:0"
    assert "Servers pinned to cores 0,1,2,3, the generator to 8,9." in _generator(result)
    result["machine"] = {"cores": 16, "generator_process_cores": list(range(16)), "device": "cpu"}
    assert _machine(result) == "16 cores" and "the generator to all." in _generator(result)
    del result["machine"]  # recorded before the machine was: the 2-core development machine
    assert _machine(result) == "2 cores" and "the generator to all." in _generator(result)


def test_the_report_says_when_some_runs_came_from_an_earlier_start() -> None:
    assert _resumed({"resumed_runs": 12}) == " (12 of its runs made by an earlier start and resumed)"
    assert _resumed({"resumed_runs": 0}) == "" and _resumed({}) == ""  # one start, or recorded before resuming existed


def test_adaptive_against_its_own_variants_only_gets_the_light_load_verdict() -> None:
    # An A/B of a setting (adaptive+name=value): no static row to beat, so no margin to report.
    result = _result({"adaptive": {"90": (1.0, 0.91)}, "adaptive+split-batches": {"90": (1.0, 0.915)}})
    result["policies"] = ["adaptive", "adaptive+split-batches"]
    assert [(v.target, v.status) for v in evaluate(result, ACCURACIES)] == [("light load", "met")]
    assert len(targets(result, ACCURACIES)) == 1


def _runs(*values: tuple[float, float]) -> list[dict[str, float]]:
    return [{"slo_attainment": a, "expected_effective_accuracy": e} for a, e in values]


def test_policies_are_compared_repeat_by_repeat_not_median_against_median() -> None:
    # medians alone would say adaptive is 0.01 behind (0.90 vs 0.91); repeat by repeat it is ahead twice
    ours = _runs((0.99, 0.90), (0.99, 0.92), (0.98, 0.85))
    theirs = _runs((1.00, 0.89), (0.97, 0.91), (0.99, 0.93))
    accuracy = paired(ours, theirs, "expected_effective_accuracy")
    assert (accuracy.median, accuracy.low, accuracy.high) == pytest.approx((1.0, -8.0, 1.0))
    assert (accuracy.ahead, accuracy.count) == (2, 3)
    with pytest.raises(ValueError):  # a repeat without its partner is not silently dropped
        paired(ours, theirs[:2], "slo_attainment")


def test_the_paired_table_has_a_row_per_other_policy_and_none_without_adaptive() -> None:
    result = {
        "policies": ["adaptive", "static:s0"],
        "results": {
            "adaptive": {"20.0": _runs((0.99, 0.90), (1.0, 0.92))},
            "static:s0": {"20.0": _runs((1.0, 0.86), (0.99, 0.86))},
        },
    }
    rows = [line for line in paired_table(result, "20.0") if line.startswith("| static")]
    assert rows == ["| static:s0 | +5.00 [+4.00 to +6.00] | +0.0 [-1.0 to +1.0] | 2 of 2 |"]
    alone = {"policies": ["static:s0"], "results": {"static:s0": result["results"]["static:s0"]}}
    assert paired_table(alone, "20.0") == []
