"""The ``slimserve`` command: the composition root.

It is the only module that knows every part; each part owns its own subcommands (an ``add_parser``
per part, the handler next to it) and none imports another part's command line. Layers below it:
``models`` <- ``searcher``, ``models`` <- ``server``; ``loadtest`` talks to a server over HTTP and
reads bundles through :mod:`slimserve.models.schema`.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import sys
from collections.abc import Sequence

from slimserve.models import openmp

# Commands that run torch the way the server does: the OpenMP wait setting is made before torch
# is imported, so a table is profiled exactly as it will be served.
_SERVING_LIKE = ("serve", "search", "profile", "bench", "peer", "lcnet", "s2dnas")
_GLOBAL_OPTIONS_WITH_VALUE = ("--log-level",)


def subcommand(arguments: Sequence[str]) -> str | None:
    """The subcommand's name: the first argument that is neither an option nor a global option's
    value (``slimserve --log-level WARNING peer ...`` is a ``peer``, not a ``WARNING``)."""
    value_next = False
    for argument in arguments:
        if value_next:
            value_next = False
        elif argument in _GLOBAL_OPTIONS_WITH_VALUE:
            value_next = True
        elif not argument.startswith("-"):
            return argument
    return None


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The whole ``slimserve`` parser, or with ``command="serve"`` only what serving needs.

    Building the training and search subcommands imports torch (their defaults live in torch-using
    modules); ``serve`` must not pay that before it holds its port, so a taken port fails at once.
    """
    from slimserve.server import cli as server_cli

    parser = argparse.ArgumentParser(
        prog="slimserve",
        description="Latency-adaptive image classification: train a dynamic-width supernet, search its best "
        "subnets, serve them per request under a latency budget, and load-test the result.",
    )
    parser.add_argument(
        "--log-level",
        default="INFO",
        choices=("DEBUG", "INFO", "WARNING", "ERROR"),
        help="logging verbosity (default: %(default)s)",
    )
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)
    if command == "serve":
        server_cli.add_parser(subparsers)
        return parser
    from slimserve.loadtest import cli as loadtest_cli
    from slimserve.models import cli as models_cli
    from slimserve.searcher import cli as searcher_cli
    from slimserve.searcher import lcnet_cli
    from slimserve.server.peers import cli as peers_cli

    models_cli.add_parser(subparsers)
    models_cli.add_families_parser(subparsers)
    searcher_cli.add_parsers(subparsers)
    lcnet_cli.add_parser(subparsers)
    server_cli.add_parser(subparsers)
    peers_cli.add_parser(subparsers)
    loadtest_cli.add_parser(subparsers)
    benchmarks = loadtest_cli.add_bench_parser(subparsers)
    server_cli.add_bench_parsers(benchmarks)
    return parser


def input_errors() -> tuple[type[Exception], ...]:
    """What a command raises when it was given something it cannot use (a dataset that is not there,
    a file that is not a checkpoint or a bundle, a search state of another run): one line naming the
    problem and status 1, not a traceback. Imported only when an exception is already on its way out,
    so `serve` starts no slower; any other exception is a bug and keeps its traceback."""
    from slimserve.models.checkpoint import CheckpointError
    from slimserve.models.idx import DatasetError
    from slimserve.models.schema import BundleError
    from slimserve.searcher.search_state import SearchStateError

    return (DatasetError, CheckpointError, BundleError, SearchStateError)


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    command = subcommand(arguments)
    if command in _SERVING_LIKE:
        openmp.configure()
    parser = build_parser(command if command == "serve" else None)
    args = parser.parse_args(arguments)
    logging.basicConfig(
        level=(args.log_level or "info").upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        return int(args.handler(args))
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`slimserve families | head -1`): one line, not a traceback; stdout
        # goes to /dev/null so the interpreter's final flush cannot raise again.
        sys.stderr.write("slimserve: output closed before the command finished (broken pipe)\n")
        with contextlib.suppress(OSError, ValueError, io.UnsupportedOperation):  # no real fd (captured output)
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except input_errors() as error:
        sys.stderr.write(f"slimserve {command}: {error}\n")
        return 1


if __name__ == "__main__":
    sys.exit(main())
