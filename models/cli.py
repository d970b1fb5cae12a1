"""``slimserve train``: train a supernet (or a static baseline) on a local dataset."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

DEFAULTS_NOTE = "Defaults train the demo supernet: a 4x-wide ResNet-20 on Fashion-MNIST."


def parse_key_value(text: str) -> tuple[str, Any]:
    """``key=value`` with a JSON value (``depth=20``, ``min_width=0.25``); bare words stay strings."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def parse_int_list(text: str) -> tuple[int, ...]:
    """``28,20,12`` -> ``(28, 20, 12)``."""
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def parse_positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return value


def parse_device(text: str) -> str:
    from slimserve.models.devices import device_problem

    problem = device_problem(text)
    if problem:
        raise argparse.ArgumentTypeError(problem)
    return text


def add_dataset_arguments(parser: argparse.ArgumentParser) -> None:
    from slimserve.models.datasets import DATASET_KINDS, FASHION_MNIST_DIR

    group = parser.add_argument_group("dataset")
    group.add_argument(
        "--dataset", choices=DATASET_KINDS, default="fashion-mnist", help="dataset format (default: %(default)s)"
    )
    group.add_argument(
        "--data",
        type=Path,
        default=None,
        help=f"dataset location: IDX directory (fashion-mnist default {FASHION_MNIST_DIR}), "
        "cifar-10-batches-py directory, or an ImageFolder root with train/ and test/",
    )
    group.add_argument(
        "--search-split",
        type=int,
        default=5000,
        help="images held out of the training split for search/validation (default: %(default)s)",
    )
    group.add_argument("--split-seed", type=int, default=0, help="seed of the held-out split (default: %(default)s)")
    group.add_argument(
        "--image-size", type=int, default=None, help="ImageFolder only: resize images to this square size"
    )
    group.add_argument("--channels", type=int, choices=(1, 3), default=3, help="ImageFolder only: 1 grayscale, 3 RGB")


def add_parser(subparsers: Any) -> None:
    from slimserve.models.train import TrainConfig

    defaults = TrainConfig()
    parser = subparsers.add_parser(
        "train",
        help="train a dynamic-width supernet (US-Nets sandwich rule + in-place distillation)",
        description="Train a weight-shared supernet with the sandwich rule (largest, smallest and N random "
        "subnets per step) and in-place distillation, then recalibrate batch norm per width and report "
        f"test top-1 at widths 0.25/0.5/0.75/1.0. Resumes from OUT/last.safetensors. {DEFAULTS_NOTE}",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_dataset_arguments(parser)
    parser.add_argument("--out", type=Path, default=Path("runs/supernet"), help="output directory")
    parser.add_argument("--family", default=defaults.family, help="supernet family (see `slimserve families`)")
    parser.add_argument(
        "--family-arg",
        type=parse_key_value,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="family argument, repeatable (default: depth=20 base_channels=64)",
    )
    parser.add_argument("--epochs", type=float, default=defaults.epochs, help="epochs (fractions allowed)")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size, help="images per step")
    parser.add_argument("--lr", type=float, default=defaults.learning_rate, help="peak learning rate (cosine decay)")
    parser.add_argument("--weight-decay", type=float, default=defaults.weight_decay, help="L2 on conv/linear weights")
    parser.add_argument(
        "--random-subnets",
        type=int,
        default=defaults.random_subnets,
        help="random subnets per step besides the largest and smallest (US-Nets' n)",
    )
    parser.add_argument(
        "--sampling",
        choices=("group", "uniform"),
        default=defaults.sampling,
        help="random subnets: per-unit channel groups, or one uniform width multiplier",
    )
    parser.add_argument(
        "--no-distill", action="store_true", help="train every subnet on labels, not on the largest's output"
    )
    parser.add_argument(
        "--distill-warmup-epochs",
        type=float,
        default=defaults.distill_warmup_epochs,
        help="epochs in which every subnet learns from labels before distillation starts",
    )
    parser.add_argument(
        "--label-weight",
        type=float,
        default=defaults.label_weight,
        help="students' loss = w x CE(labels) + (1 - w) x KL to the largest subnet's output",
    )
    parser.add_argument(
        "--static-width",
        type=float,
        default=None,
        help="baseline mode: train only this uniform width, alone, same schedule",
    )
    parser.add_argument(
        "--resolutions",
        type=parse_int_list,
        default=defaults.resolutions,
        metavar="R,R,...",
        help="elastic input resolution: image widths subnets train at, including the input's own "
        "(e.g. 28,24,20,16,12,8); the smallest subnet trains at the lowest (default: the input's only)",
    )
    parser.add_argument(
        "--narrowest-full-depth",
        action="store_true",
        help="also train the narrowest subnet at full depth and the input's own resolution every step "
        "(with --resolutions the smallest trains at the lowest, and this subnet is otherwise left to random draws)",
    )
    parser.add_argument("--no-augment", action="store_true", help="disable random crops and flips")
    parser.add_argument(
        "--precision",
        choices=("auto", "bf16", "fp32"),
        default=defaults.precision,
        help="auto uses bf16 autocast where the CPU (AVX-512 BF16/AMX) or GPU supports it",
    )
    parser.add_argument("--device", type=parse_device, default=defaults.device, help="cpu, cuda or cuda:N")
    parser.add_argument(
        "--threads", type=parse_positive_int, default=None, help="torch CPU threads (default: all cores)"
    )
    parser.add_argument("--seed", type=int, default=defaults.seed, help="seed for init, batches and subnet draws")
    parser.add_argument(
        "--checkpoint-every", type=int, default=defaults.checkpoint_every, help="steps between checkpoints"
    )
    parser.add_argument("--no-epoch-eval", action="store_true", help="skip the per-epoch search-split evaluation")
    parser.add_argument("--no-resume", action="store_true", help="start over even if OUT/last.safetensors exists")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from slimserve.models.datasets import load_splits
    from slimserve.models.provenance import provenance
    from slimserve.models.train import TrainConfig, train

    if args.threads:
        torch.set_num_threads(args.threads)
    defaults = TrainConfig()
    family_args = dict(defaults.family_args) if args.family == defaults.family else {}
    family_args.update(dict(args.family_arg))
    try:
        config = TrainConfig(
            family=args.family,
            family_args=family_args,
            epochs=args.epochs,
            batch_size=args.batch_size,
            learning_rate=args.lr,
            weight_decay=args.weight_decay,
            random_subnets=args.random_subnets,
            sampling=args.sampling,
            distill=not args.no_distill,
            distill_warmup_epochs=args.distill_warmup_epochs,
            label_weight=args.label_weight,
            static_width=args.static_width,
            resolutions=args.resolutions,
            narrowest_full_depth=args.narrowest_full_depth,
            augment=not args.no_augment,
            precision=args.precision,
            device=args.device,
            seed=args.seed,
            checkpoint_every=args.checkpoint_every,
            eval_each_epoch=not args.no_epoch_eval,
        )
        splits = load_splits(
            args.dataset, args.data, args.search_split, args.split_seed, args.image_size, args.channels
        )
        result = train(config, splits, args.out, resume=not args.no_resume, provenance=provenance(args.seed))
    except ValueError as error:  # a setting that cannot work, or a checkpoint of another run: one line
        sys.stderr.write(f"slimserve train: {error}\n")
        return 1
    widths = ", ".join(f"{w}: {acc:.2%}" for w, acc in result.test_accuracy.items())
    sys.stdout.write(f"wrote {result.checkpoint}\ntest top-1 by width: {widths}\n")
    return 0


def add_families_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser("families", help="list the registered supernet families and their arguments")
    parser.set_defaults(handler=run_families)


def run_families(args: argparse.Namespace) -> int:
    import inspect

    from slimserve.models.families import family_factory, list_families

    for name in list_families():
        factory = family_factory(name)
        signature = ", ".join(f"{p.name}={p.default!r}" for p in inspect.signature(factory).parameters.values())
        summary = (inspect.getdoc(factory) or "").splitlines()[0]
        sys.stdout.write(f"{name}({signature})\n    {summary}\n")
    return 0
