"""``slimserve loadtest compare``: every policy on the same trace and seed, interleaved, with medians.

One server per policy is started once and kept up for the whole comparison (idle servers cost
almost nothing); each (trace, rate) point is then replayed against every policy in turn, in a
rotated order per repeat, so slow drift of a shared machine hits every policy alike. Before the
runs, a light probe measures the server overhead that the oracle bound needs.
"""

from __future__ import annotations

import json
import logging
import statistics
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from tqdm import tqdm

from loadtest.report import oracle_accuracy, per_second, read_records, server_overhead_ms
from loadtest.runner import ServerProcess, Workload, fetch_json, run_locust
from loadtest.workload import default_mix

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


def all_policies(bundle: Path) -> tuple[str, ...]:
    table = json.loads((bundle / "subnets.json").read_text())
    return ("adaptive", "largest-that-fits", *(f"static:{row['id']}" for row in table["subnets"]))


def probe_overhead(server: ServerProcess, config: CompareConfig, raw_dir: Path) -> float:
    """Median (client latency - inference time) at a light, steady load with generous budgets."""
    probe = Workload(arrival="constant", rate=10.0, duration=10.0, budget_mix="100:1000", images=200, seed=config.seed)
    run_locust(server.url, probe, raw_dir / "overhead-probe.csv")
    return server_overhead_ms(read_records(raw_dir / "overhead-probe.csv"))


def compare(config: CompareConfig, progress: bool = True) -> dict[str, Any]:
    policies = config.policies or all_policies(config.bundle)
    arrival, cv2 = TRACES[config.trace]
    raw_dir = config.raw_dir / config.trace
    raw_dir.mkdir(parents=True, exist_ok=True)
    runs_total = len(policies) * len(config.rates) * config.repeats
    minutes = runs_total * (config.duration + 8) / 60
    log.info("comparing %d policies x %d rates x %d repeats = %d runs of %.0f s: about %.0f minutes",
             len(policies), len(config.rates), config.repeats, runs_total, config.duration, minutes)  # fmt: skip
    env = {} if config.safety_margin_ms is None else {"SLIMSERVE_SAFETY_MARGIN_MS": f"{config.safety_margin_ms:g}"}
    servers = {
        p: ServerProcess(config.bundle, p, log_path=raw_dir / f"server-{p.replace(':', '_')}.log", extra_env=env)
        for p in policies
    }
    started = time.monotonic()
    results: dict[str, dict[float, list[dict[str, Any]]]] = {p: {r: [] for r in config.rates} for p in policies}
    try:
        for server in servers.values():
            server.start()
        overhead = probe_overhead(servers[policies[0]], config, raw_dir)
        mix = config.budget_mix or str(default_mix(config.bundle / "subnets.json", overhead))
        log.info("server overhead %.2f ms; budget mix %s", overhead, mix)
        bar = tqdm(total=runs_total, disable=not progress, desc=f"load test ({config.trace})", unit="run")
        for repeat in range(config.repeats):
            order = list(policies[repeat % len(policies) :] + policies[: repeat % len(policies)])
            for rate in config.rates:
                workload = Workload(arrival=arrival, rate=rate, duration=config.duration, cv2=cv2, budget_mix=mix,
                                    images=config.images, seed=config.seed + repeat)  # fmt: skip
                for policy in order:
                    csv_path = raw_dir / f"{policy.replace(':', '_')}-r{rate:g}-rep{repeat}.csv"
                    summary = run_locust(servers[policy].url, workload, csv_path)
                    records = read_records(csv_path)
                    summary["oracle_expected_accuracy"] = oracle_accuracy(
                        records, config.bundle / "subnets.json", overhead
                    )
                    summary["server_status"] = fetch_json(f"{servers[policy].url}/v1/status")
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
        "minutes": round((time.monotonic() - started) / 60, 1),
        "results": {p: {str(r): runs for r, runs in by_rate.items()} for p, by_rate in results.items()},
        "medians": medians(results),
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
            p99 = [r["latency_ms"]["p99"] for r in runs if r["latency_ms"]["p99"] is not None]
            entry["p99_ms"] = {"median": statistics.median(p99), "min": min(p99), "max": max(p99)} if p99 else None
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
