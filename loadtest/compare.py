"""``slimserve loadtest compare``: every policy on the same trace and seed, interleaved, with medians.

One slimserve server per policy is started once and kept up for the whole comparison (idle, it
costs almost nothing); a peer stack (``litserve:<id>``, ``ray:<id>``; loadtest/peers.py) is started
for each of its runs and stopped after it, because an idle Ray cluster alone keeps ~8% of a core
busy. Each (trace, rate) point is replayed against every policy in turn, in a rotated order per
repeat, so slow drift of a shared machine hits every policy alike. Server and generator can be
pinned to disjoint cores. Before the runs, a light probe measures the server overhead that the
oracle bound needs. Every finished run is written to a checkpoint at once; ``--resume`` makes only
the runs a stopped or failed comparison has not (loadtest/checkpoint.py).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from tqdm import tqdm

from slimserve.loadtest.checkpoint import Checkpoint, RunKey
from slimserve.loadtest.peers import STACKS, PeerPolicy, request_timeout_s
from slimserve.loadtest.report import median_known, oracle_accuracy, per_second, read_records, server_overhead_ms
from slimserve.loadtest.runner import (
    ServerProcess,
    Workload,
    fetch_json,
    run_fresh,
    run_locust,
    served_column,
    variant,
)
from slimserve.loadtest.workload import BudgetMix, check_test_images, default_mix
from slimserve.models.schema import TABLE_FILE, read_table

log = logging.getLogger(__name__)

PROGRESS_FILE = "progress.json"  # in RAW_DIR/<trace>/: the finished runs (loadtest/checkpoint.py)

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
    frontends: int | None = None  # SLIMSERVE_FRONTENDS for slimserve's servers (None: the server default)


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


def identity(config: CompareConfig, policies: tuple[str, ...]) -> dict[str, Any]:
    """What every run of one report must share (rates and repeats may grow on a resume)."""
    return {
        "bundle": str(config.bundle),
        "trace": config.trace,
        "duration": config.duration,
        "policies": list(policies),
        "budget_mix": config.budget_mix,
        "images": config.images,
        "seed": config.seed,
        "safety_margin_ms": config.safety_margin_ms,
        "generator": config.generator,
        "server_cpus": list(config.server_cpus) if config.server_cpus else None,
        "client_cpus": list(config.client_cpus) if config.client_cpus else None,
        "frontends": config.frontends,
    }


def server_env(config: CompareConfig) -> dict[str, str]:
    """The settings every slimserve server of the comparison gets on top of its environment (peers
    ignore them); what is not set here is the server's default."""
    env = {}
    if config.safety_margin_ms is not None:
        env["SLIMSERVE_SAFETY_MARGIN_MS"] = f"{config.safety_margin_ms:g}"
    if config.frontends is not None:
        env["SLIMSERVE_FRONTENDS"] = str(config.frontends)
    return env


def plan(policies: tuple[str, ...], rates: tuple[float, ...], repeats: int) -> list[RunKey]:
    """Every run in the order it is made: repeat by repeat, rate by rate, the policies in an order
    rotated per repeat, so slow drift of a shared machine hits every policy alike."""
    keys = []
    for repeat in range(repeats):
        order = policies[repeat % len(policies) :] + policies[: repeat % len(policies)]
        keys += [(policy, rate, repeat) for rate in rates for policy in order]
    return keys


class RunFailed(RuntimeError):
    """One run could not be made; the runs before it are kept in the checkpoint."""


def run_all(
    keys: list[RunKey],
    checkpoint: Checkpoint,
    execute: Callable[[RunKey], dict[str, Any]],
    on_done: Callable[[RunKey, dict[str, Any]], None] = lambda key, summary: None,
) -> None:
    """Make every run of ``keys`` the checkpoint does not hold yet, recording each as it finishes.

    A failure stops the comparison (a server or generator that broke once would spoil the runs
    after it too) with a message that says what failed and how to finish the rest."""
    for key in keys:
        if key in checkpoint.runs:
            continue
        try:
            summary = execute(key)
        except Exception as error:
            log.debug("run %s failed", key, exc_info=True)
            policy, rate, repeat = key
            raise RunFailed(
                f"{policy} at {rate:g} req/s, repeat {repeat}: {error}; the {len(checkpoint.runs)} of {len(keys)} "
                f"runs done are kept in {checkpoint.path}: run the same command with --resume to make the rest"
            ) from error
        checkpoint.record(key, summary)
        on_done(key, summary)


def compare(config: CompareConfig, progress: bool = True, resume: bool = False) -> dict[str, Any]:
    policies = config.policies or all_policies(config.bundle)
    check_policies(policies, config.bundle)
    check_test_images()
    if config.generator == "asyncio" and config.client_cpus:
        raise PolicyError("--client-cpus pins Locust; the asyncio generator runs in this process (use taskset)")
    arrival, cv2 = TRACES[config.trace]
    raw_dir = config.raw_dir / config.trace
    raw_dir.mkdir(parents=True, exist_ok=True)
    keys = plan(policies, config.rates, config.repeats)
    checkpoint = Checkpoint.open(raw_dir / PROGRESS_FILE, identity(config, policies), resume)
    left = [key for key in keys if key not in checkpoint.runs]
    minutes = len(left) * (config.duration + 8) / 60  # + Locust's start, the grace period, a peer's start
    log.info("comparing %d policies x %d rates x %d repeats = %d runs of %.0f s%s: about %.0f minutes",
             len(policies), len(config.rates), config.repeats, len(keys), config.duration,
             f", {len(keys) - len(left)} done before" if resume else "", minutes)  # fmt: skip
    env = server_env(config)
    servers = {
        p: ServerProcess(
            config.bundle, p, log_path=raw_dir / f"server-{file_stem(p)}.log",
            extra_env=env, cpus=config.server_cpus,
        )
        for p in policies
    }  # fmt: skip
    prober = next(p for p in policies if servers[p].peer is None)
    started = time.monotonic()
    try:
        needed = {policy for policy, _, _ in left} | (set() if checkpoint.setup else {prober})
        for policy in policies:
            if policy in needed and servers[policy].peer is None:
                servers[policy].start()
        if not checkpoint.setup:
            probe = servers[prober]
            # the margin the servers run with, as they report it: the report must not name a later default
            margin_ms = fetch_json(f"{probe.url}/v1/status")["safety_margin_ms"]
            overhead = probe_overhead(probe, config, raw_dir)
            # from the latency column the servers use (a GPU's on a GPU), not the table's primary one
            column = served_column(probe.url)
            mix = config.budget_mix or str(default_mix(config.bundle / TABLE_FILE, overhead, column))
            checkpoint.remember_setup(overhead_ms=overhead, margin_ms=margin_ms, budget_mix=mix, latency_column=column)
        overhead, margin_ms, mix = (checkpoint.setup[k] for k in ("overhead_ms", "margin_ms", "budget_mix"))
        column = checkpoint.setup.get("latency_column")  # absent from checkpoints written before it was kept
        log.info("server overhead %.2f ms; budget mix %s", overhead, mix)
        for server in servers.values():
            if server.peer is not None:
                server.request_timeout_s = request_timeout_s(BudgetMix.parse(mix).budgets_ms)

        def execute(key: RunKey) -> dict[str, Any]:
            policy, rate, repeat = key
            workload = Workload(arrival=arrival, rate=rate, duration=config.duration, cv2=cv2, budget_mix=mix,
                                images=config.images, seed=config.seed + repeat)  # fmt: skip
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
            summary["oracle_expected_accuracy"] = oracle_accuracy(records, config.bundle / TABLE_FILE, overhead, column)
            summary["csv"] = str(csv_path)
            return summary

        bar = tqdm(total=len(keys), initial=len(keys) - len(left), disable=not progress,
                   desc=f"load test ({config.trace})", unit="run")  # fmt: skip

        def done(key: RunKey, summary: dict[str, Any]) -> None:
            bar.update(1)
            bar.set_postfix(policy=key[0], rate=key[1], attain=summary["slo_attainment"],
                            eff=summary["effective_accuracy"])  # fmt: skip

        try:
            run_all(keys, checkpoint, execute, done)
        finally:
            bar.close()
    finally:
        for server in servers.values():
            server.stop()
    results = {
        p: {r: [checkpoint.runs[(p, r, k)] for k in range(config.repeats)] for r in config.rates} for p in policies
    }
    return {
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in config.__dict__.items()},
        "policies": list(policies),
        "budget_mix": mix,
        "server_overhead_ms": overhead,
        "servers_safety_margin_ms": margin_ms,
        "latency_column": column,
        "minutes": round((time.monotonic() - started) / 60, 1),
        "resumed_runs": len(keys) - len(left) if resume else 0,
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
            entry["late"] = late_medians([r["late"] for r in runs if r.get("late")])
            entry["outside_server_ms_p50"] = median_known([r.get("answered_outside_server_ms_p50") for r in runs])
            entry["send_lag_p99_ms"] = max(r["send_lag_ms"]["p99"] for r in runs)
            entry["generator_behind"] = any(r["generator_behind"] for r in runs)
            entry["connection_errors"] = sum(r["connection_errors"] for r in runs)
            table.setdefault(policy, {})[str(rate)] = entry
    return table


def late_medians(per_run: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The late answers of every repeat: how many in all, and each part's median over the repeats'
    medians (None for runs recorded before the breakdown was kept)."""
    if not per_run:
        return None
    parts = ("latency_ms", "outside_server_ms", "preprocess_ms", "queue_ms", "inference_ms", "server_other_ms")
    return {"count": sum(run["count"] for run in per_run)} | {
        part: median_known([run.get(part) for run in per_run]) for part in parts
    }


def series_for(result: dict[str, Any], policy: str, rate: str, duration: float) -> dict[str, list[float | None]]:
    """Per-second series of the first repeat, for the time-series plot."""
    run = result["results"][policy][rate][0]
    return per_second(read_records(Path(run["csv"])), duration)


def with_defaults(config: CompareConfig, **changes: Any) -> CompareConfig:
    return replace(config, **{k: v for k, v in changes.items() if v is not None})
