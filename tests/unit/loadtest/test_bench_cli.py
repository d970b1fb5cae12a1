"""The benchmark command's own logic, with the server runs replaced by canned results."""

import argparse
from pathlib import Path
from typing import Any

import pytest

from slimserve.loadtest import benchmarks
from slimserve.loadtest.cli import _budget_mix


def test_capacity_is_the_highest_rate_before_the_first_that_misses(monkeypatch: pytest.MonkeyPatch) -> None:
    attainment = {100.0: 1.0, 200.0: 0.995, 300.0: 0.97, 400.0: 1.0}
    tried: list[float] = []

    def fake_overload(context: Any, rate: float, seconds: float, **kwargs: Any) -> dict[str, Any]:
        tried.append(rate)
        return {
            "rate": rate,
            "status_counts": {"200": 10},
            "completed_per_s": rate,
            "slo_attainment": attainment[rate],
            "latency_ms": {},
        }

    monkeypatch.setattr(benchmarks, "overload", fake_overload)
    context = benchmarks.BenchContext(Path("models/demo"), Path("out"), Path("raw"))
    result = benchmarks.capacity(context, (400.0, 100.0, 300.0, 200.0))
    assert result["capacity_per_s"] == 200.0
    assert tried == [100.0, 200.0, 300.0]  # increasing order, stops at the first miss
    nothing = benchmarks.capacity(context, (300.0,))
    assert nothing["capacity_per_s"] is None


def test_budget_mix_arguments_are_normalized_or_refused_by_name() -> None:
    assert _budget_mix("1:1000") == "100:1000"
    with pytest.raises(argparse.ArgumentTypeError, match="percent:milliseconds"):
        _budget_mix("1000")
