"""``slimserve search``, ``slimserve profile`` and ``slimserve s2dnas``, and the arguments the searcher's commands share
(``slimserve lcnet`` is :mod:`slimserve.searcher.lcnet_cli`'s)."""

from __future__ import annotations

import argparse
import logging
import re
import shlex
import sys
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from slimserve.models.cli import (
    add_dataset_arguments,
    parse_device,
    parse_int_list,
    parse_key_value,
    parse_positive_int,
)
from slimserve.models.schema import COLUMN_NAME

log = logging.getLogger(__name__)

STATIC_FINAL_TRAINING_STEPS = 2000  # ~40% of the demo supernet's 5,148 steps, on the k subnets found


def _batch_sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated batch sizes, got {text!r}") from None
    if not sizes or min(sizes) < 1 or 1 not in sizes:
        raise argparse.ArgumentTypeError("batch sizes must be positive and include 1")
    return sizes


def _column_name(text: str) -> str:
    if not re.fullmatch(COLUMN_NAME, text):
        raise argparse.ArgumentTypeError(f"a column name is 1-64 letters, digits, '_', '.' or '-', got {text!r}")
    return text


def add_device_arguments(parser: argparse.ArgumentParser) -> None:
    from slimserve.searcher.latency import DEFAULT_BATCH_SIZES, ProfileSettings

    defaults = ProfileSettings()
    group = parser.add_argument_group("latency measurement")
    group.add_argument(
        "--device", type=parse_device, default=defaults.device, help="device to measure on: cpu, cuda, cuda:N"
    )
    group.add_argument(
        "--threads",
        type=parse_positive_int,
        default=defaults.threads,
        help="torch threads while measuring; use what the server will use (SLIMSERVE_THREADS)",
    )
    group.add_argument(
        "--batch-sizes",
        type=_batch_sizes,
        default=DEFAULT_BATCH_SIZES,
        help="comma-separated batch sizes to measure (default: 1,2,4,8,16,32)",
    )
    group.add_argument(
        "--repeats", type=parse_positive_int, default=defaults.repeats, help="timed calls per subnet and batch size"
    )
    group.add_argument(
        "--idle-gap-ms",
        type=float,
        default=defaults.idle_gap_ms,
        help="idle time before each timed call, as at light load; 0 times back-to-back",
    )
    group.add_argument(
        "--fixed-threads",
        action="store_true",
        help="time with --threads only; by default 1 thread is tried too and the faster kept per subnet and batch",
    )


def profile_settings(args: argparse.Namespace) -> Any:
    from slimserve.searcher.latency import ProfileSettings

    return ProfileSettings(
        device=args.device,
        threads=args.threads,
        batch_sizes=args.batch_sizes,
        repeats=args.repeats,
        pick_threads=not args.fixed_threads,
        idle_gap_ms=args.idle_gap_ms,
    )


def add_parsers(subparsers: Any) -> None:
    from slimserve.searcher.search import SearchConfig

    defaults = SearchConfig()
    search = subparsers.add_parser(
        "search",
        help="progressive subnet search: writes a bundle with a ranked subnet table",
        description="Rank channel groups (trainable noise ranking vs weight norm vs training order), fit a "
        "latency predictor on this device, walk the progressive path from the full network to the smallest "
        "with selective fine-tuning, keep the accuracy/latency Pareto front, select K subnets, and write the "
        "bundle (weights.safetensors, subnets.json, manifest.json). Without --supernet, only profiles the "
        "family's latency (no data, no accuracy).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    search.add_argument(
        "--supernet", type=Path, default=None, help="trained supernet (supernet.safetensors from `slimserve train`)"
    )
    search.add_argument(
        "--family", default=None, help="without --supernet: family whose latency to study (e.g. imagenet_resnet18)"
    )
    search.add_argument(
        "--family-arg",
        type=parse_key_value,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="family argument for --family, repeatable",
    )
    search.add_argument("--out", type=Path, default=Path("runs/bundle"), help="bundle directory to write")
    search.add_argument(
        "--report-dir",
        type=Path,
        default=Path("runs/search-report"),
        help="where the markdown report, JSON and plot go",
    )
    search.add_argument("--k", type=int, default=defaults.k, help="subnets to keep in the table")
    search.add_argument(
        "--ranking",
        choices=("auto", "identity", "weight-norm", "noise"),
        default=defaults.ranking,
        help="channel ranking; auto compares all three and keeps the best",
    )
    search.add_argument(
        "--step-fraction",
        type=float,
        default=defaults.step_fraction,
        help="share of a unit's full width removed per search step (at least one channel group)",
    )
    search.add_argument(
        "--search-images", type=int, default=defaults.search_images, help="search-split images per candidate"
    )
    search.add_argument(
        "--finetune-threshold",
        type=float,
        default=defaults.finetune_threshold,
        help="fine-tune when search accuracy drops this much (0.01 = 1 point) since the last fine-tune",
    )
    search.add_argument(
        "--finetune-steps", type=int, default=defaults.finetune_steps, help="steps per fine-tune (0 disables)"
    )
    search.add_argument(
        "--weights-dtype",
        choices=("float32", "float16", "bfloat16"),
        default=defaults.weights_dtype,
        help="storage dtype of the bundle's weights; reported accuracies use the stored weights",
    )
    search.add_argument(
        "--compare",
        action="store_true",
        help="also evaluate the baselines for the report: uniform widths at full depth (US-Nets) and random "
        "subnets of the width x depth space (once-for-all-style sampling)",
    )
    search.add_argument(
        "--random-subnets",
        type=int,
        default=defaults.random_subnets,
        help="random subnets evaluated as a baseline with --compare",
    )
    search.add_argument(
        "--resolutions",
        type=parse_int_list,
        default=None,
        metavar="R,R,...",
        help="input widths a subnet may run at (default: those the supernet was trained at, `train --resolutions`)",
    )
    search.add_argument(
        "--final-training-steps",
        type=int,
        default=None,
        help="after filtering, train the network on the subnets found (the paper's last step); default: "
        f"{STATIC_FINAL_TRAINING_STEPS} from a static network (`train --static-width 1`), 0 from a supernet",
    )
    search.add_argument("--quick", action="store_true", help="smoke-test settings: fewer images, steps and repeats")
    search.add_argument("--seed", type=int, default=defaults.seed, help="seed for sampling, fine-tuning and noise")
    search.add_argument(
        "--state",
        type=Path,
        default=None,
        help="where the search saves its progress after the ranking, the latency predictor and every step of "
        "the path, and resumes from (default: OUT.search-state.safetensors beside the bundle; removed once the "
        "bundle is written)",
    )
    search.add_argument(
        "--fresh", action="store_true", help="discard saved progress (--state) and start the search over"
    )
    add_dataset_arguments(search)
    add_device_arguments(search)
    search.set_defaults(handler=run_search_command)

    profile = subparsers.add_parser(
        "profile",
        help="measure subnet latency on this device (a bundle's table, or a family without data)",
        description="With --bundle: re-measure every subnet of the bundle on this device and print the figures; "
        "--write adds them to subnets.json as a new device column (and re-signs manifest.json). With --family: "
        "measure uniform widths and random subnets of a freshly built supernet and report the latency predictor's error.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    target = profile.add_mutually_exclusive_group(required=True)
    target.add_argument("--bundle", type=Path, help="bundle directory to profile")
    target.add_argument("--family", help="supernet family to study without data")
    profile.add_argument(
        "--family-arg",
        type=parse_key_value,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="family argument, repeatable (e.g. image_size=224)",
    )
    profile.add_argument(
        "--write", action="store_true", help="with --bundle: store the new latency column in the bundle"
    )
    profile.add_argument(
        "--column",
        type=_column_name,
        help="with --bundle: name of the latency column to write (default: after the device, cpu-2t or cuda0); "
        "a server predicts from it with SLIMSERVE_LATENCY_COLUMN",
    )
    profile.add_argument("--random-subnets", type=int, default=24, help="with --family: random subnets measured")
    profile.add_argument(
        "--report-dir", type=Path, default=Path("runs/latency-report"), help="with --family: report directory"
    )
    add_device_arguments(profile)
    profile.set_defaults(handler=run_profile_command)
    _add_s2dnas_parser(subparsers)


def _add_s2dnas_parser(subparsers: Any) -> None:
    from slimserve.searcher.s2dnas import S2DNASConfig

    defaults = S2DNASConfig()
    parser = subparsers.add_parser(
        "s2dnas",
        help="turn a trained static network into a multi-stage network with early exits (S2DNAS)",
        description="Rank the static network's channels, search split ratios and concat positions with a "
        "policy-gradient controller (and random search with the same budget), fine-tune the best multi-stage "
        "network, calibrate its exit thresholds on the search split, and report accuracy, FLOPs and measured "
        "latency against the static network. Every phase resumes from what --out already holds.",
    )
    parser.add_argument("--static", type=Path, required=True, help="checkpoint of the static network (slimserve train)")
    parser.add_argument(
        "--out", type=Path, default=Path("runs/s2dnas"), help="working directory (default: %(default)s)"
    )
    parser.add_argument("--report-dir", type=Path, default=Path("docs/results"), help="where the report goes")
    parser.add_argument("--stages", type=int, default=defaults.stages, help="stages of the multi-stage network")
    parser.add_argument("--candidates", type=int, default=defaults.candidates, help="candidates per search method")
    parser.add_argument(
        "--candidate-steps",
        type=int,
        default=defaults.candidate_steps,
        help="fine-tune steps before scoring a candidate",
    )
    parser.add_argument("--final-steps", type=int, default=2500, help="fine-tune steps of the chosen network")
    parser.add_argument(
        "--cost-weight", type=float, default=defaults.cost_weight, help="reward = accuracy - this x FLOPs share"
    )
    parser.add_argument(
        "--target-drop",
        type=float,
        default=defaults.target_drop,
        help="served exits keep accuracy within this of the static",
    )
    parser.add_argument(
        "--bundle",
        type=Path,
        default=None,
        help="also write a servable multi-stage bundle here (rows: exit by stage k), latency measured on this device",
    )
    parser.add_argument(
        "--static-bundle",
        type=Path,
        default=None,
        help="also write the static network as a one-row bundle here, to compare the two as served",
    )
    parser.add_argument(
        "--serve-drop",
        type=float,
        default=defaults.serve_drop,
        help="the bundle's exits keep search accuracy within this of the best stage's (default: %(default)s)",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the search and the fine-tuning (default: %(default)s)"
    )
    parser.add_argument("--quick", action="store_true", help="a smoke run in minutes: 2 candidates each, a few steps")
    add_dataset_arguments(parser)
    add_device_arguments(parser)
    parser.set_defaults(handler=run_s2dnas_command)


def run_s2dnas_command(args: argparse.Namespace) -> int:
    import torch

    from slimserve.models.checkpoint import load_supernet
    from slimserve.models.datasets import load_splits
    from slimserve.models.provenance import provenance
    from slimserve.searcher.s2dnas import S2DNASConfig
    from slimserve.searcher.s2dnas_report import write_s2dnas_report
    from slimserve.searcher.s2dnas_run import run

    torch.set_num_threads(args.threads)
    try:
        config = S2DNASConfig(
            stages=args.stages,
            candidates=args.candidates,
            candidate_steps=args.candidate_steps,
            cost_weight=args.cost_weight,
            target_drop=args.target_drop,
            serve_drop=args.serve_drop,
            seed=args.seed,
        )
    except ValueError as error:
        sys.stderr.write(f"slimserve s2dnas: {error}\n")
        return 1
    base, info, _ = load_supernet(args.static)
    static_width = info.provenance.get("train_config", {}).get("static_width")
    subnet = base.space.largest() if static_width is None else base.space.uniform(static_width)
    splits = load_splits(
        dataset_kind(args, info), args.data, args.search_split, args.split_seed, args.image_size, base.input_shape[0]
    )
    final_steps, repeats, settings = args.final_steps, 200, profile_settings(args)
    if args.quick:
        config = replace(config, candidates=min(config.candidates, 2), candidate_steps=min(config.candidate_steps, 4))
        final_steps, repeats = min(final_steps, 8), 10
        settings = replace(settings, repeats=min(settings.repeats, 6))
    report = run(
        base,
        subnet,
        info,
        splits,
        config,
        args.out,
        final_steps,
        repeats,
        args.bundle,
        settings,
        provenance(args.seed),
        args.static_bundle,
    )
    page = write_s2dnas_report(report, args.report_dir, info.dataset, command_line())
    point = report["main_point"]
    sys.stdout.write(
        f"multi-stage network in {args.out}: test top-1 {100 * point['test_accuracy']:.2f}% "
        f"(static {100 * report['static']['test_accuracy']:.2f}%) at {point['flops_reduction']:.2f}x fewer FLOPs; "
        f"report {page}\n"
    )
    return 0


def command_line() -> str:
    return shlex.join(["slimserve", *sys.argv[1:]])


def dataset_kind(args: argparse.Namespace, info: Any) -> str:
    """--dataset, unless left at its default: then the dataset the checkpoint was trained on."""
    from slimserve.models.datasets import DATASET_KINDS

    return str(args.dataset if args.dataset != "fashion-mnist" or info.dataset not in DATASET_KINDS else info.dataset)


def run_search_command(args: argparse.Namespace) -> int:
    import torch

    from slimserve.models.checkpoint import load_supernet
    from slimserve.models.datasets import load_splits
    from slimserve.models.families import create_supernet
    from slimserve.models.provenance import provenance
    from slimserve.models.resolution import check_resolutions
    from slimserve.models.schema import sha256_file
    from slimserve.searcher.profile import latency_study, write_latency_study
    from slimserve.searcher.report import write_report
    from slimserve.searcher.search import SearchConfig, run_search, write_search_bundle
    from slimserve.searcher.search_state import SearchState, SearchStateError

    torch.set_num_threads(args.threads)
    if args.supernet is None:
        if not args.family:
            raise SystemExit("slimserve search: give --supernet (a trained checkpoint) or --family (latency only)")
        sys.stderr.write(
            f"no trained supernet and no dataset: skipping channel ranking, progressive search and accuracy; "
            f"measuring {args.family} latency only\n"
        )
        supernet = create_supernet(args.family, **dict(args.family_arg))
        study = latency_study(supernet, profile_settings(args), seed=args.seed)
        page = write_latency_study(study, args.report_dir, args.family, command_line())
        sys.stdout.write(f"wrote {page}\n")
        return 0
    supernet, info, _ = load_supernet(args.supernet)
    static_width = info.provenance.get("train_config", {}).get("static_width")
    if static_width not in (None, 1.0):
        sys.stderr.write(
            f"slimserve search: {args.supernet} is a static network of width {static_width}; the search starts "
            "from a supernet or from a static network trained at full width (--static-width 1)\n"
        )
        return 1
    start = "dynamic" if static_width is None else "static"
    if start == "static":
        log.info("%s was trained alone: searching in the paper's order (noise ranking, selective "
                 "fine-tuning, then training on the subnets found)", args.supernet)  # fmt: skip
    final_steps = args.final_training_steps
    if final_steps is None:
        final_steps = STATIC_FINAL_TRAINING_STEPS if start == "static" else 0
    trained = tuple(info.provenance.get("train_config", {}).get("resolutions") or ())
    resolutions = trained if args.resolutions is None else args.resolutions
    try:
        check_resolutions(resolutions, supernet.input_shape[-1])
    except ValueError as error:
        sys.stderr.write(f"slimserve search: --resolutions: {error}\n")
        return 1
    if set(resolutions) - set(trained or supernet.input_shape[-1:]):
        log.warning("searching resolutions %s the supernet was not trained at (trained: %s)", resolutions, trained)
    try:
        config = SearchConfig(
            k=args.k,
            ranking=args.ranking,
            step_fraction=args.step_fraction,
            search_images=args.search_images,
            finetune_threshold=args.finetune_threshold,
            finetune_steps=args.finetune_steps,
            weights_dtype=args.weights_dtype,
            compare=args.compare,
            random_subnets=args.random_subnets,
            resolutions=resolutions,
            start=start,
            final_training_steps=final_steps,
            seed=args.seed,
            profile=profile_settings(args),
        )
    except ValueError as error:  # settings that cannot work together: one line, before the data is read
        sys.stderr.write(f"slimserve search: {error}\n")
        return 1
    splits = load_splits(
        dataset_kind(args, info), args.data, args.search_split, args.split_seed, args.image_size, args.channels
    )
    if args.quick:
        config = replace(
            config,
            search_images=min(config.search_images, 500),
            finetune_steps=min(config.finetune_steps, 10),
            predictor_subnets=12,
            predictor_holdout=6,
            random_subnets=min(config.random_subnets, 6),
            spare=min(config.spare, 1),
            final_training_steps=min(config.final_training_steps, 20),
            calibration_images=1024,
            step_fraction=max(config.step_fraction, 0.25),
            noise=replace(config.noise, steps=15),
            profile=replace(config.profile, repeats=min(config.profile.repeats, 6)),
        )
    state_path = args.state or args.out.with_name(args.out.name + ".search-state.safetensors")
    if args.fresh:
        state_path.unlink(missing_ok=True)
    fingerprint = {
        "config": asdict(config),
        "supernet_sha256": sha256_file(args.supernet),
        "splits": [f"{split.name} ({len(split)})" for split in (splits.train, splits.search, splits.test)],
    }
    try:
        state = SearchState.open(state_path, fingerprint)
    except SearchStateError as error:
        sys.stderr.write(f"slimserve search: {error}\n")
        return 1
    outcome = run_search(supernet, info, splits, config, state=state)
    write_search_bundle(outcome, info, splits, config, args.out, provenance(args.seed))
    page = write_report(outcome.report, args.report_dir, info.dataset, command_line())
    state.remove()
    sys.stdout.write(f"wrote bundle {args.out} ({len(outcome.table.subnets)} subnets) and report {page}\n")
    return 0


def run_profile_command(args: argparse.Namespace) -> int:
    import torch

    from slimserve.models.bundle import load_bundle
    from slimserve.models.families import create_supernet
    from slimserve.models.schema import BundleError, rewrite_table
    from slimserve.searcher.latency import device_profile
    from slimserve.searcher.profile import latency_study, profile_bundle, write_latency_study

    torch.set_num_threads(args.threads)
    if args.family:
        try:
            supernet = create_supernet(args.family, **dict(args.family_arg))
        except (ValueError, TypeError) as error:  # an unknown family, or arguments it does not take
            sys.stderr.write(f"slimserve profile: --family {args.family}: {error}\n")
            return 1
        study = latency_study(supernet, profile_settings(args), args.random_subnets)
        page = write_latency_study(study, args.report_dir, args.family, command_line())
        sys.stdout.write(page.read_text())
        return 0
    try:
        bundle = load_bundle(args.bundle, device=args.device)
        # the column to measure (new, or replacing one of that name)
        name = args.column or device_profile(profile_settings(args))[0]
        table = profile_bundle(bundle, profile_settings(args), column=name)
    except BundleError as error:
        raise SystemExit(f"slimserve profile: {error}") from None
    sys.stdout.write(f"latency on {name} ({table.devices[name].processor}), p50 ms by batch size:\n")
    for row in table.subnets:
        figures = "  ".join(
            f"b{b}: {s.p50_ms:.2f}" + (f" ({s.threads}t)" if s.threads else "")
            for b, s in sorted(row.latency[name].items())
        )
        sys.stdout.write(f"  {row.id:4} {figures}\n")
    if args.write:
        rewrite_table(args.bundle, table)
        sys.stdout.write(f"wrote device column {name!r} to {args.bundle}/subnets.json and re-signed the manifest\n")
    return 0
