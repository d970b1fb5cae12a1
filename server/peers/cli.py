"""``slimserve peer litserve|ray``: one static subnet of a bundle on another serving stack."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from slimserve.models.cli import parse_device, parse_positive_int

STACKS = ("litserve", "ray")
INSTALL = "pip install 'slimserve[peers]'"


def _non_negative(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _positive(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "peer",
        help="serve one static subnet with LitServe or Ray Serve (the load test's peers)",
        description="Serve one row of a bundle's table on another serving stack, with that stack's own dynamic "
        "batching and the same model code, preprocessing and threads as slimserve. The budget header is ignored. "
        f"Needs the optional extras: {INSTALL}.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("stack", choices=STACKS, help="serving stack")
    parser.add_argument("--bundle", type=Path, default=Path("models/demo"), help="bundle directory")
    parser.add_argument("--subnet", required=True, help="table row to serve, e.g. s0")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind")
    parser.add_argument("--port", type=int, default=8001, help="port to bind")
    parser.add_argument("--threads", type=parse_positive_int, default=2, help="torch intra-op threads (as slimserve)")
    parser.add_argument("--max-batch", type=parse_positive_int, default=8, help="LitServe max_batch_size / serve.batch")
    parser.add_argument(
        "--batch-timeout-ms", type=_non_negative, default=0.0, help="LitServe batch_timeout / batch_wait_timeout_s"
    )
    parser.add_argument(
        "--request-timeout-s",
        type=_positive,
        default=30.0,
        help="LitServe timeout / Ray's HTTP request_timeout_s: requests older than this get an error",
    )
    parser.add_argument(
        "--device",
        type=parse_device,
        default=os.environ.get("SLIMSERVE_DEVICE", "cpu"),
        help="cpu, cuda or cuda:N (default: SLIMSERVE_DEVICE, as slimserve serve, else cpu)",
    )
    parser.add_argument(
        "--max-ongoing",
        type=parse_positive_int,
        default=256,
        help="Ray: max_ongoing_requests of the replica (the default is slimserve's own queue limit)",
    )
    parser.set_defaults(handler=run_peer)


def run_peer(args: argparse.Namespace) -> int:
    from slimserve.models.schema import BundleError, read_table
    from slimserve.server.peers.model import PeerConfig

    try:
        table = read_table(args.bundle / "subnets.json")
        table.row(args.subnet)
    except (BundleError, KeyError) as error:
        message = error.args[0] if isinstance(error, KeyError) else str(error)
        sys.stderr.write(f"slimserve peer: cannot serve {args.bundle}: {message}\n")
        return 1
    config = PeerConfig(args.bundle, args.subnet, args.host, args.port, args.threads, args.max_batch,
                        args.batch_timeout_ms / 1000.0, args.request_timeout_s, args.max_ongoing,
                        args.device)  # fmt: skip
    try:
        if args.stack == "litserve":
            from slimserve.server.peers import litserve_app

            litserve_app.run(config)
        else:
            from slimserve.server.peers import ray_app

            ray_app.run(config)
    except ModuleNotFoundError as error:
        sys.stderr.write(f"slimserve peer {args.stack}: {error.name} is not installed: {INSTALL}\n")
        return 2
    return 0
