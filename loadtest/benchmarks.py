"""``slimserve bench``: the measurements behind docs/BENCHMARKS.md and docs/RELIABILITY.md.

Every benchmark prints a JSON result (and writes it to ``--out``) with the command that made it.
They are benchmarks, not tests: they take minutes, and their numbers depend on the machine.
These drive a server over HTTP; the in-process ones (``switch``, ``wake``, ``gil``) live with the
runtime they measure, in :mod:`slimserve.server.benchmarks`.

* ``overhead``   per-request cost of the HTTP path over the model's own time, at low load
* ``table``      each row's inference time as served against the table's profiled batch-1 p50
* ``throughput`` max sustained requests/s of every static subnet (closed loop, many clients)
* ``capacity``   the highest open-loop rate answered >= 99% in budget (a sweep of ``overload`` runs)
* ``overload``   open-loop load at a multiple of capacity: shedding, accounting, memory
* ``soak``       a long run at a fraction of capacity with malformed requests mixed in
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil

from slimserve.loadtest import fresh_connections
from slimserve.loadtest.report import summarize
from slimserve.loadtest.runner import ServerProcess, Workload, run_locust
from slimserve.loadtest.workload import test_images
from slimserve.models.schema import TABLE_FILE, read_table

BUDGET = "X-Latency-Budget-Ms"


def _percentiles(values: list[float]) -> dict[str, float]:
    return {f"p{q}": round(float(np.percentile(values, q)), 4) for q in (50, 95, 99)}


def _images(count: int = 200) -> list[bytes]:
    return test_images(count)[0]


@dataclass(frozen=True)
class BenchContext:
    bundle: Path
    out_dir: Path
    raw_dir: Path


def _sequential(server: ServerProcess, requests: int, warmup: int = 50) -> dict[str, list[float]]:
    """One client, one request at a time, generous budget: per-request client and server timings."""
    images = _images()
    timings: dict[str, list[float]] = {"client": [], "inference": [], "server_total": []}
    with httpx.Client(base_url=server.url, timeout=10) as client:
        for index in range(requests + warmup):
            started = time.perf_counter()
            response = client.post("/v1/classify", content=images[index % len(images)], headers={BUDGET: "1000"})
            elapsed = (time.perf_counter() - started) * 1000
            body = response.json()
            if index >= warmup:
                timings["client"].append(elapsed)
                timings["inference"].append(body["timing"]["inference_ms"])
                timings["server_total"].append(body["timing"]["total_ms"])
    return timings


# How idle OpenMP threads wait (models/openmp.py): the server's default, spinning, and a short spin.
OPENMP_WAITS: dict[str, dict[str, str | None]] = {
    "OMP_WAIT_POLICY=PASSIVE (default)": {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": None},
    "OMP_WAIT_POLICY=ACTIVE": {"OMP_WAIT_POLICY": "ACTIVE", "GOMP_SPINCOUNT": None},
    "GOMP_SPINCOUNT=10000 (~0.1 ms spin)": {"GOMP_SPINCOUNT": "10000", "OMP_WAIT_POLICY": None},
}


# Where inference runs: its own process (what `slimserve serve` does) or a thread of the HTTP process.
ENGINES: dict[str, dict[str, str | None]] = {
    "inference process (default)": {"SLIMSERVE_INFERENCE_PROCESS": "true"},
    "inference thread in the HTTP process": {"SLIMSERVE_INFERENCE_PROCESS": "false"},
}


def overhead(
    context: BenchContext, requests: int = 600, policy: str | None = None, compare: str = "engine", repeats: int = 2
) -> dict[str, Any]:
    """One client, one request at a time, generous budget: client latency minus server inference time,
    per server variant (``compare``: ``engine`` = where inference runs, ``openmp`` = OpenMP wait policy)."""
    rows = read_table(context.bundle / TABLE_FILE).subnets
    variants = ENGINES if compare == "engine" else OPENMP_WAITS
    policies = [policy] if policy else [f"static:{rows[0].id}", f"static:{rows[-1].id}"]
    pooled: dict[tuple[str, str], dict[str, list[float]]] = {}
    per_repeat: dict[tuple[str, str], list[float]] = {}
    for _ in range(repeats):  # interleaved, so drift on a shared machine hits every variant alike
        for variant, env in variants.items():
            for chosen in policies:
                server = ServerProcess(context.bundle, chosen, extra_env=env).start()
                try:
                    timings = _sequential(server, requests)
                finally:
                    server.stop()
                timings["server_overhead"] = [
                    a - b for a, b in zip(timings["server_total"], timings["inference"], strict=True)
                ]
                timings["client_overhead"] = [
                    a - b for a, b in zip(timings["client"], timings["inference"], strict=True)
                ]
                for name, values in timings.items():
                    pooled.setdefault((variant, chosen), {}).setdefault(name, []).extend(values)
                per_repeat.setdefault((variant, chosen), []).append(
                    round(float(np.median(timings["server_overhead"])), 4)
                )
    results: dict[str, Any] = {"requests_per_run": requests, "repeats": repeats, "compare": compare, "variants": {}}
    for (variant, chosen), timings in pooled.items():
        results["variants"].setdefault(variant, {})[chosen] = {
            "client_latency_ms": _percentiles(timings["client"]),
            "inference_ms": _percentiles(timings["inference"]),
            "server_side_total_ms": _percentiles(timings["server_total"]),
            "server_overhead_ms (total - inference)": _percentiles(timings["server_overhead"]),
            "server_overhead_p50_per_repeat_ms": per_repeat[(variant, chosen)],
            "client_overhead_ms (client - inference)": _percentiles(timings["client_overhead"]),
        }
    return results


def table_agreement(context: BenchContext, requests: int = 200) -> dict[str, Any]:
    """Each row served alone (``static:<id>``), sequentially: median inference time vs the table's batch-1 p50."""
    table = read_table(context.bundle / TABLE_FILE)
    column = table.primary_device
    rows: dict[str, Any] = {}
    for row in table.subnets:
        server = ServerProcess(context.bundle, f"static:{row.id}").start()
        try:
            timings = _sequential(server, requests)
        finally:
            server.stop()
        served = statistics.median(timings["inference"])
        profiled = row.latency[column][1].p50_ms
        rows[row.id] = {
            "table_p50_ms": profiled,
            "served_inference_p50_ms": round(served, 4),
            "ratio": round(served / profiled, 3),
            "server_total_p50_ms": round(statistics.median(timings["server_total"]), 4),
        }
    ratios = [r["ratio"] for r in rows.values()]
    return {
        "requests_per_row": requests,
        "column": column,
        "rows": rows,
        "worst_ratio_off_by": round(max(abs(r - 1) for r in ratios), 3),
        "fastest_to_slowest_served": round(
            rows[table.subnets[-1].id]["served_inference_p50_ms"]
            / rows[table.subnets[0].id]["served_inference_p50_ms"],
            2,
        ),
    }


async def _closed_loop(url: str, images: list[bytes], concurrency: int, seconds: float) -> dict[str, Any]:
    statuses: dict[int, int] = {}
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as client:

        async def worker(offset: int) -> None:
            index = offset
            while time.perf_counter() < deadline:
                started = time.perf_counter()
                response = await client.post(
                    "/v1/classify", content=images[index % len(images)], headers={BUDGET: "60000"}
                )
                latencies.append((time.perf_counter() - started) * 1000)
                statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
                index += concurrency

        started = time.perf_counter()
        await asyncio.gather(*(worker(i) for i in range(concurrency)))
        elapsed = time.perf_counter() - started
    return {
        "requests_per_s": round(statuses.get(200, 0) / elapsed, 1),
        "statuses": statuses,
        "latency_ms": _percentiles(latencies) if latencies else None,
    }


def throughput(context: BenchContext, seconds: float = 15.0, concurrency: int = 64) -> dict[str, Any]:
    """Max sustained throughput of each static subnet (and adaptive with loose budgets)."""
    images = _images()
    results = {}
    for policy in [f"static:{row.id}" for row in read_table(context.bundle / TABLE_FILE).subnets]:
        with ServerProcess(context.bundle, policy) as server:
            asyncio.run(
                _closed_loop(server.url, images, concurrency, 2.0)
            )  # warm the connections and the latency model
            results[policy] = asyncio.run(_closed_loop(server.url, images, concurrency, seconds))
            results[policy]["mean_batch"] = _mean_batch(server.url)
    return {"concurrency": concurrency, "seconds": seconds, "policies": results}


def _mean_batch(url: str) -> float | None:
    text = httpx.get(f"{url}/metrics", timeout=5).text
    values = {}
    for line in text.splitlines():
        if line.startswith(("slimserve_batch_size_sum", "slimserve_batch_size_count")):
            name, value = line.split()
            values[name] = float(value)
    count = values.get("slimserve_batch_size_count")
    return round(values["slimserve_batch_size_sum"] / count, 2) if count else None


def _poisson(rate: float, seconds: float, budget_mix: str, malformed: float, seed: int) -> Workload:
    return Workload(
        arrival="poisson",
        rate=rate,
        duration=seconds,
        budget_mix=budget_mix,
        images=2000,
        seed=seed,
        malformed=malformed,
    )


def _recovery_probe(url: str, requests: int = 50) -> dict[str, float]:
    """Sequential requests with a generous budget: client latency p50/p99 (ms) and how many got 200."""
    images = _images(requests)
    latencies, ok = [], 0
    with httpx.Client(base_url=url, timeout=10) as client:
        for image in images:
            started = time.perf_counter()
            response = client.post("/v1/classify", content=image, headers={BUDGET: "1000"})
            latencies.append((time.perf_counter() - started) * 1000)
            ok += response.status_code == 200
    return {**_percentiles(latencies), "ok": ok, "sent": requests}


CONNECTIONS = ("keep-alive", "fresh")


def overload(
    context: BenchContext,
    rate: float,
    seconds: float = 60.0,
    policy: str = "adaptive",
    malformed: float = 0.0,
    budget_mix: str = "30:10,50:25,20:100",
    connections: str = "keep-alive",
    server_env: dict[str, str | None] | None = None,
) -> dict[str, Any]:
    """Open-loop arrivals at ``rate`` for ``seconds``: every request must be accounted for.

    ``connections``: ``keep-alive`` (Locust's pooled connections) or ``fresh`` (a new connection per
    request, loadtest/fresh_connections.py). Before and 5 s after the load, a sequential probe
    measures the latency of a healthy server, so recovery is a ratio within the run.
    """
    if connections not in CONNECTIONS:
        raise ValueError(f"connections must be one of {CONNECTIONS}, got {connections!r}")
    server = ServerProcess(
        context.bundle, policy, log_path=context.raw_dir / f"server-{int(rate)}.log", extra_env=server_env
    ).start()
    assert server.process is not None
    process = psutil.Process(server.process.pid)
    rss = [_tree_rss(process)]
    try:
        before = _recovery_probe(server.url)
        kernel_before = _tcp_counters()
        if connections == "fresh":
            if malformed:
                raise ValueError("the fresh-connection generator sends images only")
            run = fresh_connections.run(server.url, rate, seconds, budget_mix)
            summary = summarize(run.records, seconds, run.scheduled, run.client_cpu_percent)
            summary["client_errors"] = run.errors
        else:
            workload = _poisson(rate, seconds, budget_mix, malformed, seed=7)
            csv = context.raw_dir / f"overload-{int(rate)}-{int(seconds)}.csv"
            summary = run_locust(server.url, workload, csv)
        rss.append(_tree_rss(process))
        kernel = {name: value - kernel_before.get(name, 0) for name, value in _tcp_counters().items()}
        time.sleep(5.0)
        after = _recovery_probe(server.url)
    finally:
        code = server.stop()
    counts = summary["status_counts"]
    answered = sum(counts.get(str(s), 0) for s in (200, 400, 503, 504))
    return {
        "rate": rate,
        "seconds": seconds,
        "connections": connections,
        "budget_mix": budget_mix,
        "server_env": server_env or {},
        "sent": summary["sent"],
        # Answered with a result (late ones included) per second of arrivals. Not a capacity
        # figure: past capacity, rejections and backlog eat into it; see `capacity`.
        "completed_per_s": round(counts.get("200", 0) / seconds, 1),
        "scheduled": summary["scheduled"],
        "status_counts": counts,
        "accounted": answered == summary["sent"] == summary["scheduled"],
        "connection_errors": summary["connection_errors"],
        "client_errors": summary.get("client_errors", {}),
        "kernel_tcp_counters": kernel,  # the whole machine's, during the load: client and server
        "rss_mb_start_end": [round(r / 2**20, 1) for r in rss],
        "slo_attainment": summary["slo_attainment"],
        "latency_ms": summary["latency_ms"],
        "probe_before_ms": before,
        "probe_5s_after_ms": after,
        "generator": {"send_lag_ms": summary["send_lag_ms"], "client_cpu_percent": summary["client_cpu_percent"]},
        "server_exit_code": code,
        "five_xx_other_than_503_504": sum(
            v for k, v in counts.items() if k.startswith("5") and k not in ("503", "504")
        ),
    }


TCP_COUNTERS = ("ListenOverflows", "ListenDrops", "TCPAbortOnData", "TCPAbortOnClose", "TCPReqQFullDrop")


def _tcp_counters() -> dict[str, int]:
    """The kernel's TcpExt counters that say why connections were dropped or reset (Linux)."""
    try:
        lines = Path("/proc/net/netstat").read_text().splitlines()
    except OSError:
        return {}
    for names, values in zip(lines[::2], lines[1::2], strict=False):
        if names.startswith("TcpExt:"):
            table = dict(zip(names.split()[1:], values.split()[1:], strict=False))
            return {name: int(table[name]) for name in TCP_COUNTERS if name in table}
    return {}


def _tree_rss(process: psutil.Process) -> int:
    """Resident memory of the server and its inference process."""
    return process.memory_info().rss + sum(child.memory_info().rss for child in process.children(recursive=True))


def capacity(
    context: BenchContext,
    rates: tuple[float, ...],
    seconds: float = 20.0,
    budget_mix: str = "100:1000",
    target: float = 0.99,
) -> dict[str, Any]:
    """Open-loop runs at increasing rates; capacity is the highest rate before the first one whose
    SLO attainment falls below ``target`` (each run on a fresh server, so backlogs do not carry over)."""
    runs = []
    for rate in sorted(rates):
        result = overload(context, rate, seconds, budget_mix=budget_mix)
        runs.append(
            {k: result[k] for k in ("rate", "status_counts", "completed_per_s", "slo_attainment", "latency_ms")}
        )
        if result["slo_attainment"] < target:
            break
    kept = [run["rate"] for run in runs if run["slo_attainment"] >= target]
    return {
        "budget_mix": budget_mix,
        "seconds_per_rate": seconds,
        "target_attainment": target,
        "capacity_per_s": max(kept) if kept else None,
        "runs": runs,
    }


def soak(
    context: BenchContext,
    rate: float,
    seconds: float = 600.0,
    malformed: float = 0.01,
    budget_mix: str = "100:1000",
) -> dict[str, Any]:
    """A long open-loop run with malformed bodies mixed in; RSS sampled each 10 s from the server."""
    server = ServerProcess(context.bundle, "adaptive", log_path=context.raw_dir / "soak-server.log").start()
    assert server.process is not None
    process = psutil.Process(server.process.pid)
    samples: list[tuple[float, float]] = []
    started = time.monotonic()
    stop = {"done": False}

    def sample() -> None:
        while not stop["done"]:
            samples.append((round(time.monotonic() - started, 1), round(process.memory_info().rss / 2**20, 2)))
            time.sleep(10)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        workload = _poisson(rate, seconds, budget_mix, malformed, seed=11)
        csv = context.raw_dir / "soak.csv"
        summary = run_locust(server.url, workload, csv)
    finally:
        stop["done"] = True
        sampler.join(timeout=15)
        server.stop()
    from slimserve.loadtest.report import read_records

    records = read_records(csv)
    minute_p99 = []
    for minute in range(int(seconds // 60)):
        window = [r.latency_ms for r in records if minute * 60 <= r.scheduled_s < (minute + 1) * 60 and r.answered]
        minute_p99.append(round(float(np.percentile(window, 99)), 2) if window else None)
    after_warmup = [rss for t, rss in samples if t >= 60]
    growth = (after_warmup[-1] - after_warmup[0]) / after_warmup[0] if len(after_warmup) > 1 else None
    return {
        "rate": rate,
        "seconds": seconds,
        "budget_mix": budget_mix,
        "malformed_share": malformed,
        "status_counts": summary["status_counts"],
        "five_xx_other_than_503_504": sum(
            v for k, v in summary["status_counts"].items() if k.startswith("5") and k not in ("503", "504")
        ),
        "rss_mb_samples": samples,
        "rss_growth_after_warmup": round(growth, 4) if growth is not None else None,
        "p99_ms_per_minute": minute_p99,
        "slo_attainment": summary["slo_attainment"],
        "generator": {"send_lag_ms": summary["send_lag_ms"], "client_cpu_percent": summary["client_cpu_percent"]},
    }


def record(result: dict[str, Any], out: Path, command: str) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {"command": command, "machine": f"{os.cpu_count()} CPUs", **result}
    out.write_text(json.dumps(result, indent=1) + "\n")
