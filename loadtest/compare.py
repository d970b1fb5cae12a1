"""``slimserve loadtest compare``: every policy on the same trace and seed, interleaved, with medians.

One slimserve server per policy is started once and kept up for the whole comparison (idle, it
costs almost nothing); a peer stack (``litserve:<id>``, ``ray:<id>``; loadtest/peers.py) is started
for each of its runs and stopped after it, because an idle Ray cluster alone keeps ~8% of a core
busy. Each (trace, rate) point is replayed against every policy in turn, in a rotated order per
repeat, so slow drift of a shared machine hits every policy alike. Server and generator can be
pinned to disjoint cores. Before the runs, a light probe measures the server overhead that the
oracle bound needs.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import statistics
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from tqdm import tqdm

from slimserve.loadtest.peers import STACKS, PeerPolicy, request_timeout_s
from slimserve.loadtest.report import oracle_accuracy, per_second, read_records, server_overhead_ms
from slimserve.loadtest.runner import ServerProcess, Workload, fetch_json, run_fresh, run_locust, variant
from slimserve.loadtest.workload import BudgetMix, default_mix
from slimserve.models.schema import TABLE_FILE, read_table

log = logging.getLogger(__name__)

TRACES = {  # name -> (arrival, cv2)
    "poisson": ("poisson", 1.0),
    "bursty": ("gamma", 4.0),
    "very-bursty": ("gamma", 8.0),
    "azure": ("trace", 1.0),
    "step": ("step", 1.0),
    "spike": ("spike", 1.0),
    "constant": ("constant", 0.0),
}
METRICS = (
    "slo_attainment",
    "effective_accuracy",
    "expected_effective_accuracy",
    "served_accuracy",
    "goodput_per_s",
    "shed_rate",
    "mean_width",
    "client_cpu_percent",
)


@dataclass(frozen=True)
class CompareConfig:
    bundle: Path
    trace: str = "bursty"
    rates: tuple[float, ...] = (25.0, 50.0, 100.0, 200.0)
    duration: float = 120.0
    repeats: int = 3
    policies: tuple[str, ...] = ()  # empty: adaptive, largest-that-fits and every static subnet
    budget_mix: str | None = None  # None: derived from the table (see loadtest.workload.default_mix)
    images: int = 2000
    seed: int = 0
    # Client-side time the servers cannot see (SLIMSERVE_SAFETY_MARGIN_MS); None: the server default.
    # With Locust on the server's own cores this is ~2 ms, not the 1 ms a remote client costs.
    safety_margin_ms: float | None = None
    out_dir: Path = Path("docs/results")
    raw_dir: Path = Path("runs/loadtest")
    generator: str = "locust"  # or "asyncio": a plain asyncio sender, a new connection per request
    server_cpus: tuple[int, ...] | None = None  # pin every server to these cores (None: not pinned)
    client_cpus: tuple[int, ...] | None = None  # pin the load generator to these cores


def all_policies(bundle: Path) -> tuple[str, ...]:
    """adaptive, largest-that-fits, every static row and, for each peer stack that is installed,
    that stack serving the fastest and the most accurate rows."""
    ids = [row.id for row in read_table(bundle / TABLE_FILE).subnets]
    peers = [f"{stack}:{i}" for stack in STACKS if installed(stack) for i in dict.fromkeys((ids[0], ids[-1]))]
    return ("adaptive", "largest-that-fits", *(f"static:{i}" for i in ids), *peers)


def installed(stack: str) -> bool:
    available = importlib.util.find_spec(stack) is not None
    if not available:
        log.warning(
            "%s is not installed: no %s peers in this comparison (pip install 'slimserve[peers]')", stack, stack
        )
    return available


def file_stem(policy: str) -> str:
    """A policy as part of a file name (``litserve:s0@8x0`` -> ``litserve_s0_8x0``)."""
    return policy.replace(":", "_").replace("@", "_").replace("+", "_").replace("=", "-")


class PolicyError(ValueError):
    """A policy list that cannot be run; the message names the policy."""


def check_policies(policies: tuple[str, ...], bundle: Path) -> None:
    """Fail before any server starts: malformed peer policies, unknown rows, missing peer stacks."""
    ids = {row.id for row in read_table(bundle / TABLE_FILE).subnets}
    peers = []
    for policy in policies:
        try:
            peer = PeerPolicy.parse(policy)
            if peer is None:
                variant(policy)
        except ValueError as error:
            raise PolicyError(str(error)) from None
        if peer is None:
            continue
        peers.append(peer)
        if peer.subnet not in ids:
            raise PolicyError(
                f"policy {policy!r}: no subnet {peer.subnet!r} in {bundle} (ids: {', '.join(sorted(ids))})"
            )
        if importlib.util.find_spec(peer.stack) is None:
            raise PolicyError(f"policy {policy!r}: {peer.stack} is not installed (pip install 'slimserve[peers]')")
    if len(peers) == len(policies):
        raise PolicyError("a comparison needs at least one slimserve policy: it measures the server overhead")


def send(server: ServerProcess, workload: Workload, csv_path: Path, config: CompareConfig) -> dict[str, Any]:
    """One open-loop run against ``server`` with the configured generator; records go to ``csv_path``."""
    if config.generator == "asyncio":
        return run_fresh(server.url, workload, csv_path, body=server.body)
    return run_locust(server.url, workload, csv_path, body=server.body, cpus=config.client_cpus)


def probe_overhead(server: ServerProcess, config: CompareConfig, raw_dir: Path) -> float:
    """Median (client latency - inference time) at a light, steady load with generous budgets, as the
    runs' own generator sees it (a new connection per request costs the asyncio client more)."""
    probe = Workload(arrival="constant", rate=10.0, duration=10.0, budget_mix="100:1000", images=200, seed=config.seed)
    send(server, probe, raw_dir / "overhead-probe.csv", config)
    return server_overhead_ms(read_records(raw_dir / "overhead-probe.csv"))


def compare(config: CompareConfig, progress: bool = True) -> dict[str, Any]:
    policies = config.policies or all_policies(config.bundle)
    check_policies(policies, config.bundle)
    if config.generator == "asyncio" and config.client_cpus:
        raise PolicyError("--client-cpus pins Locust; the asyncio generator runs in this process (use taskset)")
    arrival, cv2 = TRACES[config.trace]
    raw_dir = config.raw_dir / config.trace
    raw_dir.mkdir(parents=True, exist_ok=True)
    runs_total = len(policies) * len(config.rates) * config.repeats
    minutes = runs_total * (config.duration + 8) / 60  # + Locust's start, the grace period, a peer's start
    log.info("comparing %d policies x %d rates x %d repeats = %d runs of %.0f s: about %.0f minutes",
             len(policies), len(config.rates), config.repeats, runs_total, config.duration, minutes)  # fmt: skip
    env = {} if config.safety_margin_ms is None else {"SLIMSERVE_SAFETY_MARGIN_MS": f"{config.safety_margin_ms:g}"}
    servers = {
        p: ServerProcess(
            config.bundle, p, log_path=raw_dir / f"server-{file_stem(p)}.log",
            extra_env=env, cpus=config.server_cpus,
        )
        for p in policies
    }  # fmt: skip
    started = time.monotonic()
    results: dict[str, dict[float, list[dict[str, Any]]]] = {p: {r: [] for r in config.rates} for p in policies}
    try:
        for server in servers.values():
            if server.peer is None:
                server.start()
        probe = next(s for s in servers.values() if s.peer is None)
        # the margin the servers run with, as they report it: the report must not name a later default
        margin_ms = fetch_json(f"{probe.url}/v1/status")["safety_margin_ms"]
        overhead = probe_overhead(probe, config, raw_dir)
        # from the latency column the servers use (a GPU's on a GPU), not the table's primary one
        column = fetch_json(f"{probe.url}/v1/subnets")["device_profile"]
        mix = config.budget_mix or str(default_mix(config.bundle / TABLE_FILE, overhead, column))
        log.info("server overhead %.2f ms; budget mix %s", overhead, mix)
        for server in servers.values():
            if server.peer is not None:
                server.request_timeout_s = request_timeout_s(BudgetMix.parse(mix).budgets_ms)
        bar = tqdm(total=runs_total, disable=not progress, desc=f"load test ({config.trace})", unit="run")
        for repeat in range(config.repeats):
            order = list(policies[repeat % len(policies) :] + policies[: repeat % len(policies)])
            for rate in config.rates:
                workload = Workload(arrival=arrival, rate=rate, duration=config.duration, cv2=cv2, budget_mix=mix,
                                    images=config.images, seed=config.seed + repeat)  # fmt: skip
                for policy in order:
                    server = servers[policy]
                    csv_path = raw_dir / f"{file_stem(policy)}-r{rate:g}-rep{repeat}.csv"
                    if server.peer is not None:
                        server.start()
                    try:
                        summary = send(server, workload, csv_path, config)
                        summary["server_status"] = None if server.peer else fetch_json(f"{server.url}/v1/status")
                    finally:
                        if server.peer is not None:
                            server.stop()
                    records = read_records(csv_path)
                    summary["oracle_expected_accuracy"] = oracle_accuracy(records, config.bundle / TABLE_FILE, overhead)
                    summary["csv"] = str(csv_path)
                    results[policy][rate].append(summary)
                    bar.update(1)
                    bar.set_postfix(
                        policy=policy, rate=rate, attain=summary["slo_attainment"], eff=summary["effective_accuracy"]
                    )
        bar.close()
    finally:
        for server in servers.values():
            server.stop()
    return {
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in config.__dict__.items()},
        "policies": list(policies),
        "budget_mix": mix,
        "server_overhead_ms": overhead,
        "servers_safety_margin_ms": margin_ms,
        "minutes": round((time.monotonic() - started) / 60, 1),
        "machine": machine(),
        "results": {p: {str(r): runs for r, runs in by_rate.items()} for p, by_rate in results.items()},
        "medians": medians(results),
    }


def machine() -> dict[str, Any]:
    """What the report must say of where it ran: cores, this process's cores (an asyncio generator
    runs here; `taskset` pins it), and the servers' device (they inherit SLIMSERVE_DEVICE)."""
    return {
        "cores": os.cpu_count(),
        "generator_process_cores": sorted(os.sched_getaffinity(0)),
        "device": os.environ.get("SLIMSERVE_DEVICE", "cpu"),
    }


def medians(results: dict[str, dict[float, list[dict[str, Any]]]]) -> dict[str, dict[str, dict[str, Any]]]:
    """Per policy and rate: median, min and max of each metric over the repeats."""
    table: dict[str, dict[str, dict[str, Any]]] = {}
    for policy, by_rate in results.items():
        for rate, runs in by_rate.items():
            entry: dict[str, Any] = {}
            for metric in (*METRICS, "oracle_expected_accuracy"):
                values = [r[metric] for r in runs if r.get(metric) is not None]
                if values:
                    entry[metric] = {"median": statistics.median(values), "min": min(values), "max": max(values)}
            for q in ("p50", "p99"):
                values = [r["latency_ms"][q] for r in runs if r["latency_ms"][q] is not None]
                entry[f"{q}_ms"] = (
                    {"median": statistics.median(values), "min": min(values), "max": max(values)} if values else None
                )
            entry["send_lag_p99_ms"] = max(r["send_lag_ms"]["p99"] for r in runs)
            entry["generator_behind"] = any(r["generator_behind"] for r in runs)
            entry["connection_errors"] = sum(r["connection_errors"] for r in runs)
            table.setdefault(policy, {})[str(rate)] = entry
    return table


def series_for(result: dict[str, Any], policy: str, rate: str, duration: float) -> dict[str, list[float | None]]:
    """Per-second series of the first repeat, for the time-series plot."""
    run = result["results"][policy][rate][0]
    return per_second(read_records(Path(run["csv"])), duration)


def with_defaults(config: CompareConfig, **changes: Any) -> CompareConfig:
    return replace(config, **{k: v for k, v in changes.items() if v is not None})
