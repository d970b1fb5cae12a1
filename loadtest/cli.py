"""``slimserve loadtest run`` (one headless run) and ``slimserve loadtest compare`` (all policies)."""

from __future__ import annotations

import argparse
import json
import logging
import math
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from slimserve.loadtest.arrivals import ARRIVALS
from slimserve.models.schema import TABLE_FILE, BundleError, read_table

if TYPE_CHECKING:
    from slimserve.loadtest.workload import BudgetMix

log = logging.getLogger(__name__)


def _positive(text: str) -> float:
    """A finite number > 0 (a rate, a duration): zero, negative or NaN would make a run of nothing."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return value


def _rates(text: str) -> tuple[float, ...]:
    try:
        return tuple(_positive(v) for v in text.split(","))
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected comma-separated rates > 0, got {text!r}") from None


def _share(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"expected a share between 0 and 1, got {text!r}")
    return value


# The benchmarks' budget mixes: the overload one matches the prototype's 10/25/100 ms shape. The
# capacity and soak one is a single loose budget: they measure throughput and stability, so below
# capacity every request should be answered in time and any 5xx is a defect, not a deadline that
# was infeasible (the load tests measure tight mixes; a tight budget blocked behind a wide batch
# is a policy question, not a stability one).
OVERLOAD_MIX = "30:10,50:25,20:100"
SOAK_MIX = "100:1000"


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return value


def _cpus(text: str) -> tuple[int, ...]:
    """``0``, ``0,1`` or ``0-3``: a set of cores for os.sched_setaffinity."""
    cores: set[int] = set()
    try:
        for part in text.split(","):
            low, _, high = part.partition("-")
            cores.update(range(int(low), int(high or low) + 1))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected cores like 0, 0,1 or 0-3, got {text!r}") from None
    if not cores or min(cores) < 0:
        raise argparse.ArgumentTypeError(f"expected cores like 0, 0,1 or 0-3, got {text!r}")
    return tuple(sorted(cores))


def _budget_mix(text: str) -> str:
    from slimserve.loadtest.workload import BudgetMix

    try:
        return str(BudgetMix.parse(text))
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def add_parser(subparsers: Any) -> None:
    from slimserve.loadtest.compare import TRACES, CompareConfig

    parser = subparsers.add_parser("loadtest", help="open-loop Locust load tests: one run, or every policy compared")
    commands = parser.add_subparsers(title="loadtest commands", metavar="COMMAND", required=True)

    run = commands.add_parser(
        "run",
        help="one headless open-loop run against a running server",
        description="Send real Fashion-MNIST test images with latency budgets on an open-loop schedule and print "
        "SLO attainment, effective accuracy, latency percentiles, shed rate, subnet mix and send lag.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    run.add_argument("--host", default="http://127.0.0.1:8000", help="URL of the server under test")
    run.add_argument("--arrival", choices=ARRIVALS, default="poisson", help="arrival process")
    run.add_argument("--rate", type=_positive, default=50.0, help="mean requests per second (peak for step/spike)")
    run.add_argument("--duration", type=_positive, default=30.0, help="seconds of arrivals")
    run.add_argument("--cv2", type=_positive, default=4.0, help="gamma arrivals: squared coefficient of variation")
    run.add_argument(
        "--trace-csv", default="loadtest/traces/azure_functions_like.csv", help="trace arrivals: per-second rates"
    )
    run.add_argument(
        "--budget-mix",
        type=_budget_mix,
        default=None,
        help="percent:ms pairs, e.g. 30:10,50:25,20:100 (default: from --bundle's table, in the latency column the "
        "server at --host says it uses; the table's primary one if it does not say)",
    )
    run.add_argument(
        "--bundle", type=Path, default=Path("models/demo"), help="table to derive the default budget mix from"
    )
    run.add_argument("--images", type=_positive_int, default=2000, help="distinct test images")
    run.add_argument("--seed", type=int, default=0, help="seed of arrivals, budgets and image order")
    run.add_argument("--out", type=Path, default=Path("runs/loadtest/run.csv"), help="per-request records (CSV)")
    run.set_defaults(handler=run_one)

    defaults = CompareConfig(bundle=Path("models/demo"))
    compare = commands.add_parser(
        "compare",
        help="start one server per policy and replay the same trace against each, interleaved",
        description="Policies: adaptive, largest-that-fits, static:<id> for every subnet of the table and, where "
        "installed, the peers litserve:<id> and ray:<id> at the fastest and most accurate rows (or --policies; a "
        "peer's batching as litserve:s0@8x2 = max batch 8, 2 ms timeout). Each (rate, repeat) point is replayed "
        "against every policy in rotated order; the report gives medians and spreads, the oracle bound, the "
        "targets and plots, in OUT_DIR/loadtest-<trace>.md.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    compare.add_argument("--bundle", type=Path, default=defaults.bundle, help="bundle every server serves")
    compare.add_argument(
        "--trace", choices=tuple(TRACES), default=defaults.trace, help="arrival pattern (bursty = gamma, CV^2 4)"
    )
    compare.add_argument("--rates", type=_rates, default=defaults.rates, help="mean rates to sweep, req/s")
    compare.add_argument("--duration", type=_positive, default=defaults.duration, help="seconds per run")
    compare.add_argument(
        "--repeats", type=_positive_int, default=defaults.repeats, help="interleaved repeats per point"
    )
    compare.add_argument("--policies", default="", help="comma-separated subset (default: all)")
    compare.add_argument(
        "--budget-mix", type=_budget_mix, default=None, help="percent:ms pairs (default: derived from the table)"
    )
    compare.add_argument("--images", type=_positive_int, default=defaults.images, help="distinct test images")
    compare.add_argument("--seed", type=int, default=defaults.seed, help="workload seed (repeat r uses seed + r)")
    compare.add_argument(
        "--safety-margin-ms",
        type=float,
        default=None,
        help="SLIMSERVE_SAFETY_MARGIN_MS for every server: client time the server cannot see (default: server's)",
    )
    compare.add_argument(
        "--generator",
        choices=("locust", "asyncio"),
        default=defaults.generator,
        help="locust: Locust's pooled keep-alive connections; asyncio: a plain asyncio sender in this process, "
        "a new connection per request (a second client, to check that results are not Locust's)",
    )
    compare.add_argument("--server-cpus", type=_cpus, default=None, help="pin every server to these cores, e.g. 0")
    compare.add_argument("--client-cpus", type=_cpus, default=None, help="pin the load generator to these cores")
    compare.add_argument(
        "--frontends",
        type=_positive_int,
        default=None,
        help="SLIMSERVE_FRONTENDS for slimserve's servers: HTTP front-end processes each (default: server's)",
    )
    compare.add_argument("--out-dir", type=Path, default=defaults.out_dir, help="where the report goes")
    compare.add_argument("--raw-dir", type=Path, default=defaults.raw_dir, help="per-run CSVs and server logs")
    compare.add_argument(
        "--resume",
        action="store_true",
        help="make only the runs missing from RAW_DIR/<trace>/progress.json (written after every run) of a "
        "stopped or failed comparison of the same command; --rates and --repeats may grow",
    )
    compare.set_defaults(handler=run_compare)


def run_one(args: argparse.Namespace) -> int:
    from slimserve.loadtest.runner import Workload, run_locust
    from slimserve.loadtest.workload import check_test_images

    check_test_images()
    if args.arrival == "trace":
        from slimserve.loadtest.arrivals import read_trace

        try:
            read_trace(Path(args.trace_csv))  # here, not in the Locust process where it would fail unseen
        except (OSError, ValueError) as error:
            sys.stderr.write(f"slimserve loadtest run: --trace-csv: {error}\n")
            return 1
    try:
        mix = args.budget_mix or str(served_mix(args.host, args.bundle))  # --budget-mix is parsed by its type
    except BundleError as error:
        sys.stderr.write(f"slimserve loadtest run: {error} (the budget mix is derived from --bundle's table)\n")
        return 1
    workload = Workload(args.arrival, args.rate, args.duration, args.cv2, args.trace_csv, mix, args.images, args.seed)
    summary = run_locust(args.host, workload, args.out)
    sys.stdout.write(json.dumps(summary, indent=2) + "\n")
    if summary["sent"] and summary["connection_errors"] == summary["sent"]:
        sys.stderr.write(f"slimserve loadtest run: no request reached {args.host}; is a server listening there?\n")
        return 1
    if summary["generator_behind"]:
        sys.stderr.write(
            "warning: the load generator fell behind its schedule (send lag p99 > 5 ms); do not trust this run\n"
        )
    return 0


def served_mix(host: str, bundle: Path) -> BudgetMix:
    """The default budget mix from the latency column the server at ``host`` uses; from the table's
    primary column when it does not say (a peer) or uses one the table at ``bundle`` lacks."""
    from slimserve.loadtest.runner import served_column
    from slimserve.loadtest.workload import default_mix

    column = served_column(host)
    devices = read_table(bundle / TABLE_FILE).devices
    if column not in devices:
        log.warning(
            "%s did not name a latency column of %s (%s); the budget mix is derived from the table's primary one",
            host, bundle, column or "no answer from /v1/subnets",
        )  # fmt: skip
        column = None
    return default_mix(bundle / TABLE_FILE, column=column)


def run_compare(args: argparse.Namespace) -> int:
    from slimserve.loadtest.checkpoint import ResumeError
    from slimserve.loadtest.compare import CompareConfig, PolicyError, RunFailed, compare
    from slimserve.loadtest.publish import publish
    from slimserve.loadtest.runner import ServerStartError

    config = CompareConfig(
        bundle=args.bundle,
        trace=args.trace,
        rates=args.rates,
        duration=args.duration,
        repeats=args.repeats,
        policies=tuple(p for p in args.policies.split(",") if p),
        budget_mix=args.budget_mix,
        images=args.images,
        seed=args.seed,
        safety_margin_ms=args.safety_margin_ms,
        out_dir=args.out_dir,
        raw_dir=args.raw_dir,
        generator=args.generator,
        server_cpus=args.server_cpus,
        client_cpus=args.client_cpus,
        frontends=args.frontends,
    )
    try:
        result = compare(config, resume=args.resume)
    except (PolicyError, BundleError, ResumeError, RunFailed, ServerStartError) as error:
        sys.stderr.write(f"slimserve loadtest compare: {error}\n")
        return 1
    page = publish(result, shlex.join(["slimserve", *sys.argv[1:]]))
    sys.stdout.write(f"wrote {page}\n")
    return 0


Measure = Callable[[argparse.Namespace], dict[str, Any]]
AddBenchmark = Callable[[str, str, Measure], argparse.ArgumentParser]


def add_bench_parser(subparsers: Any) -> AddBenchmark:
    """``slimserve bench`` with the benchmarks that drive a server over HTTP; returns the function that
    adds one more (the server's in-process benchmarks are added by the composition root)."""
    parser = subparsers.add_parser(
        "bench",
        help="benchmarks behind docs/BENCHMARKS.md and docs/RELIABILITY.md (minutes each)",
        description="Each benchmark prints a JSON result and writes it to --out; those that serve start their own "
        "servers on loopback ports.",
    )
    commands = parser.add_subparsers(title="benchmarks", metavar="BENCHMARK", required=True)

    def common(name: str, help_text: str, measure: Measure) -> argparse.ArgumentParser:
        sub = commands.add_parser(
            name, help=help_text, description=help_text, formatter_class=argparse.ArgumentDefaultsHelpFormatter
        )
        sub.add_argument("--bundle", type=Path, default=Path("models/demo"), help="bundle to serve")
        sub.add_argument("--out", type=Path, default=Path(f"docs/results/bench-{name}.json"), help="JSON result")
        sub.add_argument("--raw-dir", type=Path, default=Path("runs/bench"), help="per-request CSVs and server logs")
        sub.set_defaults(handler=run_bench, measure=measure)
        return sub

    overhead = common(
        "overhead",
        "HTTP-path cost over the model's own time at low load (one client, sequential), per server variant",
        _overhead,
    )
    overhead.add_argument(
        "--compare",
        choices=("engine", "openmp"),
        default="engine",
        help="what varies: where inference runs (own process vs HTTP-process thread) or the OpenMP wait policy",
    )
    overhead.add_argument("--requests", type=_positive_int, default=600, help="measured requests per server run")
    overhead.add_argument("--repeats", type=_positive_int, default=2, help="interleaved repeats of every variant")
    common("table", "each row served alone: median inference time as served vs the table's batch-1 p50", _table)
    throughput = common(
        "throughput", "max sustained req/s of each static subnet (closed loop, many concurrent clients)", _throughput
    )
    throughput.add_argument("--seconds", type=_positive, default=15.0, help="measured seconds per subnet")
    throughput.add_argument("--concurrency", type=_positive_int, default=64, help="concurrent clients")
    capacity = common(
        "capacity", "highest open-loop rate answered >= 99%% in budget (a sweep of overload runs)", _capacity
    )
    capacity.add_argument("--rates", type=_rates, required=True, help="rates to try in increasing order, req/s")
    capacity.add_argument("--seconds", type=_positive, default=20.0, help="seconds of arrivals per rate")
    capacity.add_argument("--budget-mix", type=_budget_mix, default=SOAK_MIX, help="percent:ms pairs")
    overload = common(
        "overload", "open-loop Poisson load at a fixed rate: shedding, accounting of every request, memory", _overload
    )
    overload.add_argument(
        "--rate", type=_positive, required=True, help="requests per second (e.g. 3x the rate from `capacity`)"
    )
    overload.add_argument("--seconds", type=_positive, default=60.0, help="seconds of arrivals")
    overload.add_argument("--policy", default="adaptive", help="server policy")
    overload.add_argument("--budget-mix", type=_budget_mix, default=OVERLOAD_MIX, help="percent:ms pairs")
    overload.add_argument(
        "--connections",
        choices=("keep-alive", "fresh"),
        default="keep-alive",
        help="keep-alive: Locust's pooled connections; fresh: a new TCP connection per request (Connection: close)",
    )
    overload.add_argument(
        "--frontends", type=_positive_int, default=None, help="serve with this many front-end processes"
    )
    overload.add_argument(
        "--inference-thread",
        action="store_true",
        help="serve with inference on a thread of the HTTP process (SLIMSERVE_INFERENCE_PROCESS=false), to compare",
    )
    soak = common("soak", "long open-loop run with malformed bodies mixed in: RSS growth, p99 per minute, 5xx", _soak)
    soak.add_argument("--rate", type=_positive, required=True, help="requests per second (e.g. 80%% of capacity)")
    soak.add_argument("--seconds", type=_positive, default=600.0, help="seconds of arrivals")
    soak.add_argument("--malformed", type=_share, default=0.01, help="share of non-image bodies")
    soak.add_argument(
        "--budget-mix",
        type=_budget_mix,
        default=SOAK_MIX,
        help="percent:ms pairs; the default is loose enough that a healthy server below capacity answers every "
        "request in time, so any 5xx is a defect",
    )
    return common


def run_bench(args: argparse.Namespace) -> int:
    from slimserve.loadtest.benchmarks import record
    from slimserve.loadtest.runner import ServerStartError

    try:
        read_table(args.bundle / TABLE_FILE)  # a missing or broken bundle fails here, not minutes in
        args.raw_dir.mkdir(parents=True, exist_ok=True)
        result = args.measure(args)
    # a bundle, column or argument the benchmark cannot use, or a server that would not start
    except (BundleError, ValueError, ServerStartError) as error:
        sys.stderr.write(f"slimserve bench: {error}\n")
        return 1
    record(result, args.out, shlex.join(["slimserve", *sys.argv[1:]]))
    sys.stdout.write(json.dumps(result, indent=1) + "\n")
    return 0


def _context(args: argparse.Namespace) -> Any:
    from slimserve.loadtest.benchmarks import BenchContext

    return BenchContext(args.bundle, args.out.parent, args.raw_dir)


def _overhead(args: argparse.Namespace) -> dict[str, Any]:
    from slimserve.loadtest import benchmarks

    return benchmarks.overhead(_context(args), args.requests, compare=args.compare, repeats=args.repeats)


def _table(args: argparse.Namespace) -> dict[str, Any]:
    from slimserve.loadtest import benchmarks

    return benchmarks.table_agreement(_context(args))


def _throughput(args: argparse.Namespace) -> dict[str, Any]:
    from slimserve.loadtest import benchmarks

    return benchmarks.throughput(_context(args), args.seconds, args.concurrency)


def _capacity(args: argparse.Namespace) -> dict[str, Any]:
    from slimserve.loadtest import benchmarks

    return benchmarks.capacity(_context(args), args.rates, args.seconds, args.budget_mix)


def _overload(args: argparse.Namespace) -> dict[str, Any]:
    from slimserve.loadtest import benchmarks

    server_env: dict[str, str | None] = {
        **({"SLIMSERVE_INFERENCE_PROCESS": "false"} if args.inference_thread else {}),
        **({"SLIMSERVE_FRONTENDS": str(args.frontends)} if args.frontends else {}),
    }
    return benchmarks.overload(
        _context(args),
        args.rate,
        args.seconds,
        args.policy,
        budget_mix=args.budget_mix,
        connections=args.connections,
        server_env=server_env or None,
    )


def _soak(args: argparse.Namespace) -> dict[str, Any]:
    from slimserve.loadtest import benchmarks

    return benchmarks.soak(_context(args), args.rate, args.seconds, args.malformed, budget_mix=args.budget_mix)
