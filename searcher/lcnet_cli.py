"""``slimserve lcnet``: train LC-Net gates on a bundle's network and report (and serve) its operating points."""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from slimserve.models.cli import add_dataset_arguments


def _floats(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values or min(values) < 0:
        raise argparse.ArgumentTypeError(f"expected non-negative numbers, got {text!r}")
    return values


def add_parser(subparsers: Any) -> None:
    from slimserve.searcher.cli import add_device_arguments
    from slimserve.searcher.lcnet_run import LCNetConfig

    defaults = LCNetConfig()
    parser = subparsers.add_parser(
        "lcnet",
        help="train LC-Net gates that skip residual blocks and channel groups per input (LC-Net)",
        description="Put an L-gate (skip the block) and C-gates (skip channel groups) on every residual block of a "
        "bundle's row, train gates and network jointly with a FLOPs-weighted sparsity penalty for each penalty, "
        "measure every (penalty, threshold) operating point on the search and test splits and time it against the "
        "ungated network and the bundle's slimmable rows. Every training run resumes from what --out holds.",
    )
    parser.add_argument("--from", dest="source", type=Path, default=Path("models/demo"), help="bundle to start from")
    parser.add_argument("--row", default=None, help="its row to gate (default: the most accurate)")
    parser.add_argument("--out", type=Path, default=Path("runs/lcnet"), help="working directory (default: %(default)s)")
    parser.add_argument("--report-dir", type=Path, default=Path("docs/results"), help="where the report goes")
    parser.add_argument(
        "--penalties",
        type=_floats,
        default=defaults.penalties,
        help="sparsity penalty weights, one trained network each (default: 0.1,0.25,0.5)",
    )
    parser.add_argument(
        "--thresholds",
        type=_floats,
        default=defaults.thresholds,
        help="gate thresholds: a gate at or below skips; one operating point each (default: 0,0.05,0.1,0.2,0.3)",
    )
    parser.add_argument("--steps", type=int, default=defaults.finetune.steps, help="training steps per penalty")
    parser.add_argument(
        "--target-drop",
        type=float,
        default=defaults.target_drop,
        help="the chosen point: fewest FLOPs within this of the ungated network's search accuracy",
    )
    parser.add_argument("--bundle", type=Path, default=None, help="also write a servable gated bundle here")
    parser.add_argument("--seed", type=int, default=0, help="seed of the training (default: %(default)s)")
    parser.add_argument("--quick", action="store_true", help="a smoke run in minutes: a few steps, few timings")
    add_dataset_arguments(parser)
    add_device_arguments(parser)
    parser.set_defaults(handler=run_lcnet_command)


def run_lcnet_command(args: argparse.Namespace) -> int:
    import torch

    from slimserve.models.bundle import load_bundle, supernet_info
    from slimserve.models.datasets import load_splits
    from slimserve.models.idx import DatasetError
    from slimserve.models.provenance import provenance
    from slimserve.models.resnet import SlimResNet
    from slimserve.models.schema import BundleError
    from slimserve.searcher.cli import command_line, dataset_kind, profile_settings
    from slimserve.searcher.lcnet_report import write_lcnet_report
    from slimserve.searcher.lcnet_run import BATCH_SIZES, LCNetConfig, run

    torch.set_num_threads(args.threads)
    try:
        config = LCNetConfig(penalties=args.penalties, thresholds=args.thresholds, target_drop=args.target_drop)
        config = replace(config, finetune=replace(config.finetune, steps=args.steps, seed=args.seed))
    except ValueError as error:
        sys.stderr.write(f"slimserve lcnet: {error}\n")
        return 1
    try:
        source = load_bundle(args.source)
        if source.manifest.multistage is not None or source.manifest.gating is not None:
            raise BundleError(f"{args.source}: LC-Net starts from a subnet table, not a multi-stage or gated bundle")
        if not isinstance(source.supernet, SlimResNet):
            raise BundleError(f"{args.source}: LC-Net gates a ResNet family, not {source.manifest.family!r}")
        rows = source.table.subnets
        row = rows[-1] if args.row is None else source.table.row(args.row)
        if row.resolution not in (None, source.supernet.input_shape[-1]):
            raise BundleError(
                f"{args.source}: row {row.id} runs at resolution {row.resolution}; LC-Net gates a row at the input's own"
            )
        info = supernet_info(source.manifest)
        splits = load_splits(
            dataset_kind(args, info),
            args.data,
            args.search_split,
            args.split_seed,
            args.image_size,
            source.supernet.input_shape[0],
        )
    except (BundleError, DatasetError, KeyError) as error:
        sys.stderr.write(f"slimserve lcnet: {error.args[0] if isinstance(error, KeyError) else error}\n")
        return 1
    settings = replace(profile_settings(args), batch_sizes=BATCH_SIZES)
    if args.quick:
        config = replace(config, finetune=replace(config.finetune, steps=min(args.steps, 4), warmup_steps=1))
        settings = replace(settings, repeats=min(settings.repeats, 4))
    front = [(r, source.bn_stats[r.id]) for r in rows if r.id != row.id]
    record = provenance(args.seed)
    record["source"] = {"bundle": str(args.source), "row": row.id, "test_accuracy": row.accuracy}
    report = run(
        source.supernet,
        row.channels,
        source.bn_stats[row.id],
        info,
        splits,
        config,
        args.out,
        front=front,
        profile=settings,
        bundle_dir=args.bundle,
        provenance=record,
    )
    page = write_lcnet_report(report, args.report_dir, info.dataset, command_line())
    chosen, ungated = report["chosen"], report["ungated"]
    sys.stdout.write(
        f"LC-Net in {args.out}: penalty {chosen['penalty']:g}, threshold {chosen['threshold']:g}: test top-1 "
        f"{100 * chosen['test']['accuracy']:.2f}% (ungated {100 * ungated['test_accuracy']:.2f}%) at "
        f"{ungated['flops'] / chosen['test']['flops']:.2f}x fewer FLOPs; report {page}\n"
    )
    return 0
