"""``slimserve serve``: its flags (one per setting), the listening socket bound before anything slow,
and the start of the front end and the inference process. The ``slimserve`` command itself is
assembled in :mod:`slimserve.cli`.
"""

from __future__ import annotations

import argparse
import errno
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from slimserve.models.cli import parse_device


def _settings_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per Settings field, with its description, environment variable and default."""
    from typing import Literal, get_args, get_origin

    from slimserve.server.settings import Settings

    for name, field in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        annotation = field.annotation
        help_text = f"{field.description} (env SLIMSERVE_{name.upper()}; default: {field.default})"
        if annotation is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif get_origin(annotation) is Literal:
            parser.add_argument(flag, choices=get_args(annotation), default=None, help=help_text)
        else:
            kind: Any = {int: int, float: float, Path: Path}.get(annotation, str)  # type: ignore[arg-type]
            parser.add_argument(flag, type=kind, default=None, metavar=name.upper(), help=help_text)


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="serve a bundle over HTTP (FastAPI + uvicorn)",
        description="Serve a bundle: POST /v1/classify with X-Latency-Budget-Ms, the KServe v2 API under /v2, "
        "/v1/subnets, /v1/status, /metrics, /livez, /readyz, docs at /docs. Every option can also be set "
        "with its SLIMSERVE_* environment variable; flags win. Binds 127.0.0.1 unless told otherwise.",
    )
    _settings_flags(parser)
    ray = parser.add_argument_group("scale-out on Ray Serve (pip install 'slimserve[ray]')")
    ray.add_argument("--ray", action="store_true", help="serve through Ray Serve instead of a single uvicorn process")
    ray.add_argument("--replicas", type=int, default=1, help="replicas (the minimum, with --max-replicas)")
    ray.add_argument(
        "--max-replicas", type=int, default=None, help="autoscale up to this many replicas on ongoing requests"
    )
    ray.add_argument("--cpus-per-replica", type=float, default=None, help="Ray CPUs per replica (default: --threads)")
    parser.set_defaults(handler=run_serve)


def add_bench_parsers(add: Callable[[str, str, Callable[[argparse.Namespace], dict[str, Any]]], Any]) -> None:
    """The in-process benchmarks of the runtime, added to ``slimserve bench`` by the composition root."""
    add("switch", "cost of changing subnet between consecutive forward passes (in process)", _switch)
    add("wake", "batch-1 latency after an idle gap, per intra-op thread count (in process)", _wake)
    add("gil", "fastest subnet's inference time while another Python thread is busy, per GIL switch interval", _gil)
    decide = add(
        "decide",
        "the adaptive policy's time per decision by queue length, weighing splits or not (in process)",
        _decide,
    )
    decide.add_argument("--column", default=None, help="latency column of the table (default: its primary one)")
    simulate = add(
        "simulate",
        "the scheduler and policies on a virtual clock: same arrivals and hiccups for each, medians and paired "
        "differences over repeats (decision logic only; server/simulation.py says what it leaves out)",
        _simulate,
    )
    simulate.add_argument(
        "--policies", default="adaptive,adaptive+split-batches=true", help="comma-separated; +name=value: a setting"
    )
    simulate.add_argument("--rate", type=float, required=True, help="mean requests per second")
    simulate.add_argument("--seconds", type=float, default=30.0, help="seconds of arrivals per run")
    simulate.add_argument("--cv2", type=float, default=1.0, help="squared CV of the gaps (1 Poisson, 4 bursty)")
    simulate.add_argument("--budget-mix", default="30:60,50:100,20:250", help="percent:ms pairs")
    simulate.add_argument("--column", default=None, help="latency column of the table (default: its primary one)")
    simulate.add_argument("--slowdown", type=float, default=1.0, help="batches take the table's time x this")
    simulate.add_argument("--hiccups-per-s", type=float, default=0.0, help="hiccups per busy second")
    simulate.add_argument("--hiccup-ms", type=float, default=0.0, help="mean length of a hiccup (exponential)")
    simulate.add_argument("--repeats", type=int, default=5, help="seeds; every policy meets the same ones")
    simulate.add_argument("--front-ms", type=float, default=0.5, help="arrival stamp to queue (reading, decoding)")
    simulate.add_argument("--back-ms", type=float, default=0.3, help="batch end to answer sent")
    simulate.add_argument("--outside-ms", type=float, default=1.0, help="client time the server never sees")
    simulate.add_argument(
        "--outside-jitter-ms", type=float, default=0.0, help="mean exponential extra of it, drawn per request"
    )
    steps = add(
        "steps", "a batch run whole vs step by step, and its longest step (what pausing costs, in process)", _steps
    )
    steps.add_argument(
        "--device", type=parse_device, default="cpu", help="cpu, cuda or cuda:N (on a GPU each step ends in a sync)"
    )
    first = add(
        "first-batches",
        "each batch size's first forward on a serving thread, warmed elsewhere vs on itself, and a batch's parts",
        _first_batches,
    )
    first.add_argument("--device", type=parse_device, default="cpu", help="cpu, cuda or cuda:N")


def _switch(args: argparse.Namespace) -> dict[str, Any]:
    from slimserve.server import benchmarks

    return benchmarks.switch_cost(args.bundle)


def _wake(args: argparse.Namespace) -> dict[str, Any]:
    from slimserve.server import benchmarks

    return benchmarks.idle_wake(args.bundle)


def _steps(args: argparse.Namespace) -> dict[str, Any]:
    from slimserve.server import benchmarks

    return benchmarks.step_cost(args.bundle, device=args.device)


def _first_batches(args: argparse.Namespace) -> dict[str, Any]:
    from slimserve.server import benchmarks

    return benchmarks.first_batches(args.bundle, device=args.device)


def _decide(args: argparse.Namespace) -> dict[str, Any]:
    from slimserve.server import benchmarks

    return benchmarks.decision_time(args.bundle, column=args.column)


def _simulate(args: argparse.Namespace) -> dict[str, Any]:
    from slimserve.server.benchmarks import table_and_column
    from slimserve.server.simulation import Load, Machine, compare, parse_mix

    table, column = table_and_column(args.bundle, args.column)
    load = Load(args.rate, args.seconds, parse_mix(args.budget_mix), args.cv2)
    machine = Machine(
        args.slowdown, args.hiccups_per_s, args.hiccup_ms, args.front_ms, args.back_ms, args.outside_ms,
        args.outside_jitter_ms,
    )  # fmt: skip
    return compare(table, column, [spec for spec in args.policies.split(",") if spec], load, machine, args.repeats)


def _gil(args: argparse.Namespace) -> dict[str, Any]:
    from slimserve.server import benchmarks

    return benchmarks.gil_starvation(args.bundle)


def bind_listener(host: str, port: int, backlog: int) -> socket.socket:
    """The listening socket, bound before anything slow happens, so a taken port fails at once.

    Raises:
        OSError: with a message that names the address (port in use, no such interface, ...).
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a TIME_WAIT port is free, as uvicorn has it
    try:
        listener.bind((host, port))
        listener.listen(backlog)
    except OSError as error:
        listener.close()
        reason = "address already in use" if error.errno == errno.EADDRINUSE else (error.strerror or str(error))
        raise OSError(error.errno, f"cannot listen on {host}:{port}: {reason}") from None
    listener.setblocking(False)
    return listener


def run_serve(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from slimserve.models.schema import validation_problems
    from slimserve.server.settings import Settings

    overrides = {name: getattr(args, name) for name in Settings.model_fields if getattr(args, name, None) is not None}
    try:
        settings = Settings(**overrides)
    except ValidationError as error:
        problems = validation_problems(error, "settings")
        sys.stderr.write(f"slimserve serve: invalid settings: {problems}\n")
        return 1
    listener = None
    if not args.ray:
        try:
            listener = bind_listener(settings.host, settings.port, settings.listen_backlog)
        except OSError as error:
            sys.stderr.write(f"slimserve serve: {error.strerror}\n")
            return 1
    # torch comes in with the engine: seconds, so only after the port is ours
    from slimserve.models.bundle import load_bundle
    from slimserve.models.schema import BundleError
    from slimserve.server.engine import Engine
    from slimserve.server.engine_client import EngineStartError, LocalEngine, launch
    from slimserve.server.frontends import serve, serve_all

    if args.ray:
        try:
            from slimserve.server.ray_serve import run as run_ray
        except ImportError:
            sys.stderr.write("slimserve serve --ray needs Ray Serve: pip install 'slimserve[ray]'\n")
            return 2
        try:  # each replica verifies its own copy; a bad bundle should fail here, once, with its reason
            load_bundle(settings.bundle, verify=settings.verify_hashes, device=settings.device)
        except BundleError as error:
            sys.stderr.write(f"slimserve serve: cannot serve {settings.bundle}: {error}\n")
            return 1
        run_ray(settings, args.replicas, args.max_replicas, args.cpus_per_replica)
        return 0
    assert listener is not None
    try:
        engines = launch(settings) if settings.inference_process else []
    except (BundleError, EngineStartError) as error:
        message = str(error) if isinstance(error, EngineStartError) else f"cannot serve {settings.bundle}: {error}"
        sys.stderr.write(f"slimserve serve: {message}\n")
        listener.close()
        return 1
    count = settings.frontend_processes
    frontends = f" ({count} front-end processes)" if count > 1 else ""
    sys.stderr.write(
        f"slimserve: serving {settings.bundle} on http://{settings.host}:{settings.port}{frontends} (docs at /docs)\n"
    )
    if engines:
        serve_all(settings, listener, engines)
        return 0
    try:
        engine = LocalEngine(Engine.open(settings))
    except (BundleError, ValueError) as error:
        sys.stderr.write(f"slimserve serve: cannot serve {settings.bundle}: {error}\n")
        listener.close()
        return 1
    serve(settings, listener, engine)
    return 0
