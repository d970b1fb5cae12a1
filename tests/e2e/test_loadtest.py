"""A short headless Locust run against a live server: the report has every field and adds up."""

from dataclasses import replace
from pathlib import Path

import pytest

from slimserve.loadtest.report import oracle_accuracy, read_records, server_overhead_ms
from slimserve.loadtest.runner import ServerProcess, ServerStartError, Workload, run_locust


def test_short_open_loop_run_reports_consistent_numbers(
    server: ServerProcess, tiny_bundle_dir: Path, tmp_path: Path
) -> None:
    workload = Workload(arrival="poisson", rate=20.0, duration=4.0, budget_mix="50:30,50:200", images=100, seed=1)
    summary = run_locust(server.url, workload, tmp_path / "run.csv")
    assert summary["sent"] == summary["scheduled"] > 40
    assert sum(summary["status_counts"].values()) == summary["sent"]
    assert summary["connection_errors"] == 0
    for key in ("slo_attainment", "effective_accuracy", "expected_effective_accuracy", "served_accuracy", "shed_rate"):
        assert 0.0 <= summary[key] <= 1.0, key
    assert summary["effective_accuracy"] <= summary["slo_attainment"]
    assert summary["latency_ms"]["p50"] <= summary["latency_ms"]["p95"] <= summary["latency_ms"]["p99"]
    assert abs(sum(summary["subnet_mix"].values()) - 1.0) < 1e-3
    assert summary["send_lag_ms"]["p50"] is not None and summary["client_cpu_percent"] is not None
    records = read_records(tmp_path / "run.csv")
    overhead = server_overhead_ms(records)
    assert 0 < overhead < 50
    # at light load nothing beats the oracle: the best subnet that fits each budget at zero load
    assert (
        oracle_accuracy(records, tiny_bundle_dir / "subnets.json", overhead) >= summary["expected_effective_accuracy"]
    )


def test_table_benchmark_serves_every_row_alone_and_compares_with_the_table(
    tiny_bundle_dir: Path, tmp_path: Path
) -> None:
    from slimserve.loadtest.benchmarks import BenchContext, table_agreement

    result = table_agreement(BenchContext(tiny_bundle_dir, tmp_path, tmp_path), requests=10)
    assert list(result["rows"]) == ["s0", "s1", "s2"] and result["column"] == "cpu-2t"
    for row in result["rows"].values():
        assert row["server_total_p50_ms"] >= row["served_inference_p50_ms"] > 0
        assert row["ratio"] == round(row["served_inference_p50_ms"] / row["table_p50_ms"], 3)
    assert result["worst_ratio_off_by"] == round(max(abs(r["ratio"] - 1) for r in result["rows"].values()), 3)


def test_the_fresh_connection_generator_accounts_for_every_request(server: ServerProcess) -> None:
    from slimserve.loadtest import fresh_connections
    from slimserve.loadtest.report import summarize

    run = fresh_connections.run(server.url, rate=40.0, seconds=2.0, budget_mix="50:30,50:2000", images=50)
    summary = summarize(run.records, 2.0, run.scheduled, run.client_cpu_percent)
    assert summary["sent"] == run.scheduled == len(run.records) > 40
    assert run.errors == {} and summary["connection_errors"] == 0
    assert set(summary["status_counts"]) <= {"200", "503", "504"} and summary["status_counts"].get("200", 0) > 0
    answered = [r for r in run.records if r.status == 200]
    assert all(r.subnet and r.predicted is not None and 0 < r.latency_ms < 30_000 for r in answered)


def test_a_comparison_resumed_makes_only_the_runs_it_lacks_and_reports_them_all(
    tiny_bundle_dir: Path, tmp_path: Path
) -> None:
    import json

    from slimserve.loadtest.compare import PROGRESS_FILE, CompareConfig, compare

    config = CompareConfig(bundle=tiny_bundle_dir, trace="poisson", rates=(20.0,), duration=2.0, repeats=1,
                           policies=("adaptive", "static:s0"), budget_mix="50:30,50:200", images=50,
                           generator="asyncio", out_dir=tmp_path / "out", raw_dir=tmp_path / "raw")  # fmt: skip
    first = compare(config, progress=False)
    progress = tmp_path / "raw" / "poisson" / PROGRESS_FILE
    assert len(json.loads(progress.read_text())["runs"]) == 2 and first["resumed_runs"] == 0

    second = compare(replace(config, repeats=2), progress=False, resume=True)
    assert second["resumed_runs"] == 2 and second["server_overhead_ms"] == first["server_overhead_ms"]
    # the oracle's latency column, probed from the servers once and kept for the runs resumed
    assert first["latency_column"] is not None and second["latency_column"] == first["latency_column"]
    for policy in ("adaptive", "static:s0"):
        runs = second["results"][policy]["20.0"]
        assert runs[0] == first["results"][policy]["20.0"][0]  # kept, not made again
        assert [Path(run["csv"]).name for run in runs] == [f"{policy.replace(':', '_')}-r20-rep{k}.csv" for k in (0, 1)]
        assert second["medians"][policy]["20.0"]["slo_attainment"]["median"] > 0


def test_a_server_that_will_not_start_says_why_in_one_line(
    tiny_bundle_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from slimserve.cli import main

    # a variant flag `serve` rejects: its reason is in the server's log, and the comparison quotes it
    code = main(["loadtest", "compare", "--bundle", str(tiny_bundle_dir), "--policies", "adaptive+pause-batches=false",
                 "--rates", "20", "--duration", "2", "--repeats", "1", "--budget-mix", "50:30,50:200",
                 "--out-dir", str(tmp_path / "out"), "--raw-dir", str(tmp_path / "raw")])  # fmt: skip
    assert code == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("slimserve loadtest compare:")]
    assert len(errors) == 1
    assert "policy adaptive+pause-batches=false exited with status 2: " in errors[0]
    assert "unrecognized arguments: false" in errors[0] and "server-adaptive_pause-batches-false.log" in errors[0]

    # without a log file the reason is still kept for the error
    with pytest.raises(ServerStartError, match=r"exited with status 2: .*unrecognized arguments: --no-such-flag$"):
        ServerProcess(tiny_bundle_dir, "adaptive+no-such-flag").start()


def test_a_load_test_of_a_port_nobody_listens_on_exits_1_saying_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from slimserve.cli import main
    from slimserve.loadtest.runner import free_port

    host = f"http://127.0.0.1:{free_port()}"
    code = main(["loadtest", "run", "--host", host, "--rate", "10", "--duration", "1", "--budget-mix", "100:50",
                 "--images", "10", "--out", str(tmp_path / "run.csv")])  # fmt: skip
    assert code == 1
    captured = capsys.readouterr()
    assert '"connection_errors"' in captured.out  # the summary is still printed
    assert captured.err == f"slimserve loadtest run: no request reached {host}; is a server listening there?\n"
