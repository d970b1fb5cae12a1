"""Where late answers lost their time: from per-request records to the report, with plain numbers."""

from pathlib import Path
from typing import Any

import pytest

from slimserve.loadtest.compare import late_medians
from slimserve.loadtest.publish import late_table
from slimserve.loadtest.report import Record, read_records, summarize, where_time_went, write_records


def answer(
    latency: float, budget: float, server: float | None, pre: float | None = 1.0, queue: float | None = 0.5
) -> Record:
    """A 200 answer; ``server`` is the server's own total (None: a peer, which does not say)."""
    return Record(0.0, 0.0, latency, 200, budget, 1, 1, "s0", 0.06, 0.86, 1.5, 1, server, pre, queue)


def test_late_answers_are_split_into_outside_the_server_and_its_own_parts(tmp_path: Path) -> None:
    records = [
        answer(9.0, 8.0, 4.0),  # 5 ms outside the server
        answer(12.0, 8.0, 5.0, pre=2.0, queue=1.5),  # 7 ms outside
        answer(4.0, 8.0, 3.0),  # in time: not late
        Record(0.0, 0.0, 2.0, 503, 8.0, 1, None, None, None, None, None, None),  # shed: not an answer
    ]
    late = where_time_went([r for r in records if r.late])
    assert late == {
        "count": 2,
        "latency_ms": 10.5,
        "outside_server_ms": 6.0,
        "preprocess_ms": 1.5,
        "queue_ms": 1.0,
        "inference_ms": 1.5,
        "server_other_ms": 0.5,  # of 4 - 1 - 0.5 - 1.5 = 1 and 5 - 2 - 1.5 - 1.5 = 0
    }
    summary = summarize(records, 1.0)
    assert summary["late"] == late and summary["answered_outside_server_ms_p50"] == 5.0  # of 5, 7 and 1 ms
    write_records(tmp_path / "run.csv", records)
    assert read_records(tmp_path / "run.csv") == records  # the new columns round-trip


def test_a_peer_s_late_answers_are_counted_but_not_split() -> None:
    late = where_time_went([answer(9.0, 8.0, None, pre=None, queue=None)])
    assert late["count"] == 1 and late["latency_ms"] == 9.0
    assert late["outside_server_ms"] is None and late["preprocess_ms"] is None


def test_repeats_add_their_counts_and_take_the_median_of_their_medians() -> None:
    runs: list[dict[str, Any]] = [
        {"count": 3, "latency_ms": 9.0, "outside_server_ms": 5.0, "preprocess_ms": 1.0, "queue_ms": 0.2, "inference_ms": 1.0, "server_other_ms": 1.0},
        {"count": 0, "latency_ms": None, "outside_server_ms": None, "preprocess_ms": None, "queue_ms": None, "inference_ms": None},
        {"count": 5, "latency_ms": 11.0, "outside_server_ms": 7.0, "preprocess_ms": 2.0, "queue_ms": 0.4, "inference_ms": 2.0, "server_other_ms": 3.0},
    ]  # fmt: skip
    assert late_medians(runs) == {
        "count": 8,
        "latency_ms": 10.0,
        "outside_server_ms": 6.0,
        "preprocess_ms": 1.5,
        "queue_ms": pytest.approx(0.3),
        "inference_ms": 1.5,
        "server_other_ms": 2.0,  # the middle run did not record it
    }
    assert late_medians([]) is None  # results recorded before the breakdown was kept


def test_the_report_tables_only_policies_with_late_answers_the_server_timed() -> None:
    late = {"count": 8, "latency_ms": 10.0, "outside_server_ms": 6.0, "preprocess_ms": 1.5, "queue_ms": 0.3,
            "inference_ms": 1.5, "server_other_ms": 2.0}  # fmt: skip
    medians = {
        "adaptive": {"20.0": {"late": late, "outside_server_ms_p50": 1.7}},
        "static:s0": {"20.0": {"late": late | {"count": 0}}},  # none late
        "litserve:s0": {"20.0": {"late": late | {"outside_server_ms": None}}},  # a peer: no server timing
        "static:s7": {"20.0": {}},  # recorded before the breakdown
    }
    lines = late_table({"policies": list(medians), "medians": medians}, "20.0")
    assert [line for line in lines if line.startswith("| ") and "policy" not in line] == [
        "| adaptive | 8 | 10.0 | 6.0 (1.7) | 1.5 | 0.3 | 1.5 | 2.0 |"
    ]
    assert late_table({"policies": ["static:s7"], "medians": {"static:s7": {"20.0": {}}}}, "20.0") == []
