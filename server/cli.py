"""The ``slimserve`` command: one entry point, a subcommand per stage of the data flow.

This module is the composition root: it only wires each stage's own ``cli`` module into one
argument parser. The serving runtime (``server.app`` and below) never imports the trainer or the
searcher; it reads their output files.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence


def build_parser() -> argparse.ArgumentParser:
    import models.cli
    import searcher.cli

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
    models.cli.add_parser(subparsers)
    searcher.cli.add_parsers(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.handler(args))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
