"""The search pipeline: trained supernet in, bundle (weights + ranked subnet table + manifest) out.

1. Rank channel groups (identity / weight-norm / trainable noise), keep the ranking whose narrow
   subnets score best on the search split, and permute the supernet accordingly.
2. Fit a latency predictor to subnets measured on the target device.
3. Walk the progressive path from the full network to the smallest, fine-tuning selectively. With
   elastic input resolution (a supernet trained with ``--resolutions``) lowering the resolution by
   one level is one more kind of step, next to a channel group and a block.
4. Re-score the path on the final weights (whole search split), keep its accuracy/latency Pareto front, pick K
   (+ a few spare) subnets spread over latency, then recalibrate, materialize, measure and test each one, and
   keep K that measurement shows undominated.
5. Optionally evaluate two baselines the same way, for the comparison: the US-Nets uniform widths
   at full depth, and random subnets of the same width x depth space (once-for-all's sampling).

With ``start="static"`` the search runs in the order of the paper, from a network trained alone
at full width: channels ranked by trainable noise, the path fine-tuned selectively (which is what
makes the network dynamic), then, after filtering, the network trained on the subnets found
(``final_training_steps``) before step 4's evaluation. The default ``start="dynamic"`` searches a
supernet US-Nets training already made dynamic (the baseline the paper compares with).

Splits: candidates are scored on the *search* split (held out of training); the table reports
top-1 on the *test* split, which the search never sees.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NotRequired, TypedDict

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from slimserve.models.bn_calibration import calibrate_bn
from slimserve.models.bundle import manifest_fields, write_bundle
from slimserve.models.checkpoint import SupernetInfo
from slimserve.models.datasets import Splits
from slimserve.models.evaluate import accuracy, calibration_images
from slimserve.models.flops import count_flops, count_params
from slimserve.models.ops import BNStats, FrozenStatsNorm
from slimserve.models.registry import Supernet
from slimserve.models.resolution import check_resolutions, draw_resolution, input_shape_at, materialize, resize
from slimserve.models.schema import LatencyStat, SubnetRow, SubnetTable, bn_key_for
from slimserve.models.subnet import Subnet, subnet_to_str
from slimserve.models.train import TrainConfig, make_optimizer, sandwich_step, use_bf16
from slimserve.models.transforms import augment, normalize
from slimserve.searcher.filtering import pareto_front, spread_selection
from slimserve.searcher.latency import (
    LatencyPredictor,
    ProfileSettings,
    Timer,
    cost_function,
    device_profile,
    measure,
    profiled_table,
    relative_errors,
    subnet_flops_by_resolution,
)
from slimserve.searcher.progressive import PathPoint, SearchStats, progressive_search
from slimserve.searcher.ranking import (
    RANKINGS,
    NoiseRankingConfig,
    apply_ranking,
    identity_importance,
    noise_importance,
    weight_norm_importance,
)
from slimserve.searcher.search_state import SearchState, Walked

log = logging.getLogger(__name__)

UNIFORM_WIDTHS = (0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0)


@dataclass(frozen=True)
class SearchConfig:
    k: int = 8  # subnets in the table
    # Evaluated besides the k: measurement has the last word and may show a selected subnet
    # dominated (the demo search once lost its eighth row so); the k are then chosen from the rest.
    spare: int = 3
    ranking: str = "auto"  # "auto" compares every ranking and keeps the best; or one of RANKINGS
    step_fraction: float = 0.125  # a unit shrinks by this share of its full width per step (>= 1 group)
    search_images: int = 1000  # search-split images that score each candidate
    quick_calibration_images: int = 256  # BN recalibration while searching
    calibration_images: int = 2048  # BN recalibration of the final subnets
    finetune_threshold: float = 0.01  # fine-tune when search accuracy fell this much since the last one
    finetune_steps: int = 40
    finetune_batch_size: int = 64
    finetune_learning_rate: float = 0.005
    noise: NoiseRankingConfig = field(default_factory=NoiseRankingConfig)
    ranking_probe_widths: tuple[float, ...] = (0.25, 0.375, 0.5, 0.75)
    predictor_subnets: int = 32  # random subnets measured to fit the latency predictor
    predictor_holdout: int = 16  # more, measured only to report the predictor's error
    predictor_batch_sizes: tuple[int, ...] = (1, 8)
    cost_batch_size: int = 1  # the batch size whose predicted latency is the search's cost
    profile: ProfileSettings = field(default_factory=ProfileSettings)
    weights_dtype: str = "float16"  # storage; every reported accuracy is measured with these weights
    compare: bool = False  # also evaluate the baselines: uniform widths (US-Nets) and random subnets
    uniform_widths: tuple[float, ...] = UNIFORM_WIDTHS
    random_subnets: int = 16  # random subnets of the whole space (once-for-all-style sampling) with compare
    resolutions: tuple[int, ...] = ()  # input widths a subnet may run at; () = the input's own only
    seed: int = 0
    start: str = "dynamic"  # "dynamic": a US-Nets-trained supernet; "static": one network trained alone
    final_training_steps: int = 0  # train on the subnets found, after filtering (the paper's last step)
    final_learning_rate: float = 0.02  # its peak; cosine decay to 0

    def __post_init__(self) -> None:
        if self.start not in ("dynamic", "static"):
            raise ValueError(f"start must be 'dynamic' or 'static', got {self.start!r}")
        if self.final_training_steps < 0:
            raise ValueError("final_training_steps must be >= 0")
        if self.ranking != "auto" and self.ranking not in RANKINGS:
            raise ValueError(f"ranking must be auto or one of {RANKINGS}, got {self.ranking!r}")
        if self.k < 2:
            raise ValueError("k must be at least 2")
        if not 0 < self.step_fraction <= 0.5:
            raise ValueError("step_fraction must be in (0, 0.5]")
        if self.cost_batch_size not in self.predictor_batch_sizes:
            raise ValueError("cost_batch_size must be one of predictor_batch_sizes")
        if self.search_images < 1 or self.finetune_steps < 0 or self.random_subnets < 0:
            raise ValueError(
                f"search_images must be >= 1, finetune_steps and random_subnets >= 0, got {self.search_images}, "
                f"{self.finetune_steps}, {self.random_subnets}"
            )
        if self.finetune_threshold < 0:
            raise ValueError(f"finetune_threshold must be >= 0, got {self.finetune_threshold}")


@dataclass(frozen=True)
class Resolutions:
    """The input widths the search may choose, and how they ride in the searched tuple.

    :func:`progressive_search` shrinks tuples of integers; the resolution is one more coordinate
    after the channels, its *level* (1 = the lowest width, ``len(widths)`` = the input's own), which
    shrinks by 1 per step like a unit by a channel group.
    """

    widths: tuple[int, ...]  # from the input's own width down

    def point(self, subnet: Subnet, resolution: int) -> Point:
        return (*subnet, len(self.widths) - self.widths.index(resolution))

    def split(self, point: Point) -> tuple[Subnet, int]:
        return point[:-1], self.widths[len(self.widths) - point[-1]]

    @property
    def native(self) -> int:
        return self.widths[0]


Point = tuple[int, ...]  # a subnet's channels, then its resolution level (see Resolutions)


@dataclass
class EvaluatedSubnet:
    subnet: Subnet
    resolution: int
    origin: str
    search_accuracy: float
    test_accuracy: float
    flops: int
    params: int
    latency: dict[int, LatencyStat]
    bn_stats: BNStats


class SearchReport(TypedDict):
    """What a search found and how: written as JSON next to the bundle and rendered by
    :mod:`slimserve.searcher.report` (numbers rounded, subnets as ``8-8-0-...`` strings)."""

    config: dict[str, Any]
    ranking: dict[str, Any]  # scores of every ranking tried and the one kept
    predictor: dict[str, Any]  # the latency predictor's fit and held-out error
    path: list[dict[str, Any]]  # the progressive path, as scored during the search
    path_rescored: list[dict[str, Any]]  # the same path on the whole search split
    evaluations: int
    finetunes: int
    pareto_front_size: int
    evaluated_for_the_table: int  # selected from the front, then measured (k + spare at most)
    measured_front_size: int  # of those, not dominated once measured
    searched: list[dict[str, Any]]
    uniform: list[dict[str, Any]]
    random: list[dict[str, Any]]
    device_profile: dict[str, Any]
    phases_s: dict[str, float]
    total_s: float
    search_split: str
    test_split: str
    gain: NotRequired[dict[str, Any]]  # searched vs uniform at equal measured latency
    gain_vs_random: NotRequired[dict[str, Any]]


@dataclass
class SearchOutcome:
    supernet: Supernet  # as searched: channels permuted by the ranking, fine-tuned, weights rounded
    table: SubnetTable
    report: SearchReport
    searched: list[EvaluatedSubnet]
    uniform: list[EvaluatedSubnet]
    sampled: list[EvaluatedSubnet]


@dataclass
class SearchRun:
    """One search in progress: what every phase reads, and where the time went.

    The phases change ``supernet`` in place, in this order: the ranking permutes its channels, the
    progressive search fine-tunes it, filtering rounds its weights to the bundle's dtype; every
    later phase measures the network the earlier ones left.
    """

    supernet: Supernet
    info: SupernetInfo
    splits: Splits
    config: SearchConfig
    progress: bool
    bf16: bool
    scorer: Scorer  # the quick scorer: a search subset after a short BN recalibration
    timer: Timer  # what measures latency: :func:`measure` unless a test injects a clock
    resolutions: Resolutions
    phases: dict[str, float] = field(default_factory=dict)
    _mark: float = field(default_factory=time.perf_counter)

    def finished(self, phase: str) -> None:
        now = time.perf_counter()
        self.phases[phase] = round(now - self._mark, 1)
        self._mark = now
        log.info("search: %s took %.1f s", phase, self.phases[phase])

    def resumed(self, phases: dict[str, float], walking_s: float = 0.0) -> None:
        """Take over the phase times of the runs before this one; ``walking_s`` of the current
        phase were already spent."""
        self.phases.update(phases)
        self._mark = time.perf_counter() - walking_s

    def evaluate(self, points: list[Point], origins: list[str], calibration: Tensor) -> list[EvaluatedSubnet]:
        return evaluate_subnets(
            self.supernet, [self.resolutions.split(p) for p in points], origins, calibration, self.splits,
            self.info, self.config, self.progress, self.timer,
        )  # fmt: skip

    def accuracy(self, scorer: Scorer) -> Callable[[Point], float]:
        return lambda point: scorer(*self.resolutions.split(point))


class Scorer:
    """Top-1 of a subnet (at a resolution) on a fixed search subset after a quick BN recalibration
    (paired across candidates)."""

    def __init__(self, supernet: Supernet, calibration: Tensor, images: Tensor, labels: Tensor, bf16: bool) -> None:
        self.supernet, self.calibration, self.images, self.labels, self.bf16 = (
            supernet,
            calibration,
            images,
            labels,
            bf16,
        )
        self.calls = 0

    @torch.no_grad()
    def __call__(self, subnet: Subnet, resolution: int | None = None) -> float:
        self.calls += 1
        with torch.autocast(self.images.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            stats = calibrate_bn(self.supernet, subnet, self.calibration, resolution=resolution)
            correct = 0
            for start in range(0, self.images.shape[0], 500):
                images = resize(self.images[start : start + 500], resolution)
                logits = self.supernet(images, subnet, FrozenStatsNorm(stats))
                correct += int((logits.argmax(1) == self.labels[start : start + 500]).sum())
        return correct / self.images.shape[0]


def unit_steps(supernet: Supernet, fraction: float) -> tuple[int, ...]:
    group = supernet.space.group_size
    return tuple(max(group, round(u.max_channels * fraction / group) * group) for u in supernet.space.units)


def run_search(
    supernet: Supernet,
    info: SupernetInfo,
    splits: Splits,
    config: SearchConfig,
    *,
    progress: bool = True,
    timer: Timer = measure,
    state: SearchState | None = None,
) -> SearchOutcome:
    """Everything but file output (see :func:`write_search_bundle`), phase by phase. The supernet is
    modified in place (see :class:`SearchRun`); the outcome carries it. ``timer`` measures every
    latency the search uses (the predictor's samples and the table's column). With ``state``, the
    ranking, the predictor and every step of the path are saved there, and what it already holds
    is not done again (:mod:`slimserve.searcher.search_state`)."""
    run = _start(supernet, info, splits, config, progress, timer)
    if state is not None and state.ranking is not None:
        log.info("resuming the search saved in %s", state.path)
        state.restore_network(supernet)
        ranking = state.ranking
        run.resumed(state.phases)
    else:
        ranking = choose_ranking(supernet, splits, info, config, run.scorer, progress)
        run.finished("ranking")
        if state is not None:
            state.save_ranking(supernet, ranking, run.phases)
    if state is not None and state.predictor is not None:
        predictor, predictor_report = state.predictor
    else:
        predictor, predictor_report = fit_predictor(supernet, config, progress, timer)
        run.finished("latency predictor")
        if state is not None:
            state.save_predictor(supernet, predictor, predictor_report, run.phases)

    def features(point: Point) -> dict[int, float]:
        subnet, resolution = run.resolutions.split(point)
        return subnet_flops_by_resolution(supernet, subnet, input_shape_at(supernet.input_shape, resolution))

    cost = cost_function(predictor, features, config.cost_batch_size)
    path, stats = _progressive_path(run, cost, state)
    run.finished("progressive search")
    calibration, rescored, front = _final_front(run, path)
    selected = spread_selection(front, config.k + config.spare, lambda p: p.cost)
    run.finished("filtering")
    if config.final_training_steps:
        _train_on_found(run, [p.subnet for p in selected])
        run.finished("training on the subnets found")
    evaluated = run.evaluate([p.subnet for p in selected], ["searched"] * len(selected), calibration)
    # Measured latency decides the final order: drop any subnet that measurement shows dominated,
    # then keep k spread over the measured range.
    measured_front = pareto_front(evaluated, lambda e: e.latency[1].p50_ms, lambda e: e.search_accuracy)
    searched = spread_selection(measured_front, config.k, lambda e: e.latency[1].p50_ms)
    run.finished("final evaluation")
    uniform, sampled = _baselines(run, calibration)
    profile_name, profile = device_profile(config.profile)
    space = supernet.space
    report: SearchReport = {
        "config": _jsonable(asdict(config)),
        "ranking": ranking,
        "predictor": predictor_report,
        "path": [
            {
                **_where(run.resolutions.split(p.subnet)),
                "search_accuracy": p.accuracy,
                "predicted_ms": round(p.cost, 4),
                "finetuned": p.finetuned,
            }
            for p in path
        ],
        "path_rescored": [
            {**_where(run.resolutions.split(p.subnet)), "search_accuracy": p.accuracy, "predicted_ms": round(p.cost, 4)}
            for p in rescored
        ],
        "evaluations": stats.evaluations,
        "finetunes": stats.finetunes,
        "pareto_front_size": len(front),
        "evaluated_for_the_table": len(evaluated),
        "measured_front_size": len(measured_front),
        "searched": [_summary(e, space.depths(e.subnet)) for e in searched],
        "uniform": [_summary(e, space.depths(e.subnet)) for e in uniform],
        "random": [_summary(e, space.depths(e.subnet)) for e in sampled],
        "device_profile": {profile_name: profile.model_dump()},
        "phases_s": run.phases,
        "total_s": round(sum(run.phases.values()), 1),
        "search_split": f"{splits.search.name} ({config.search_images} images scored)",
        "test_split": f"{splits.test.name} ({len(splits.test)} images)",
    }
    if uniform:
        report["gain"] = accuracy_gain(searched, uniform, len(splits.test))
    if sampled:
        report["gain_vs_random"] = accuracy_gain(searched, sampled, len(splits.test))
    return SearchOutcome(supernet, _table(run, searched, profile_name), report, searched, uniform, sampled)


def _start(
    supernet: Supernet, info: SupernetInfo, splits: Splits, config: SearchConfig, progress: bool, timer: Timer
) -> SearchRun:
    """The network on its device, and the quick scorer every candidate of the path is ranked with."""
    resolutions = Resolutions(check_resolutions(config.resolutions, supernet.input_shape[-1]))
    device = torch.device(config.profile.device)
    torch.manual_seed(config.seed)
    supernet.to(device).eval()
    supernet.to(memory_format=torch.channels_last)
    bf16 = use_bf16("auto", device)
    quick_calibration = calibration_images(
        splits.train, info.mean, info.std, config.quick_calibration_images, config.seed
    ).to(device)
    subset = torch.randperm(len(splits.search), generator=torch.Generator().manual_seed(config.seed))
    subset = subset[: config.search_images]
    images = normalize(splits.search.images[subset], info.mean, info.std).to(device)
    scorer = Scorer(supernet, quick_calibration, images, splits.search.labels[subset].to(device), bf16)
    return SearchRun(supernet, info, splits, config, progress, bf16, scorer, timer, resolutions)


def _progressive_path(
    run: SearchRun, cost: Callable[[Point], float], state: SearchState | None
) -> tuple[list[PathPoint], SearchStats]:
    """Shrink from the largest subnet to the smallest, one channel group, block or resolution level at
    a time, fine-tuning on the subnets found so far whenever accuracy falls past the threshold.
    With ``state``: go on from the path it holds, and save every step there."""
    supernet, config, resolutions = run.supernet, run.config, run.resolutions
    space = supernet.space
    train_rng = random.Random(config.seed)
    finetune_round = 0
    walked = state.walked if state is not None else None
    if walked is not None:
        train_rng.setstate(walked.rng_state)
        finetune_round = walked.stats.finetunes
        run.resumed({}, walked.elapsed_s)
        log.info("the progressive path goes on from step %d", len(walked.path) - 1)

    def finetune(found: list[Point]) -> None:
        nonlocal finetune_round
        finetune_round += 1
        at = [resolutions.split(point) for point in found]
        finetune_supernet(supernet, run.splits, run.info, config, at, train_rng, finetune_round, run.bf16)

    steps = (*unit_steps(supernet, config.step_fraction), 1)
    floors = (*(unit.min_channels for unit in space.units), 1)
    blocks = [group.units[group.min_blocks :] for group in space.depth_groups]
    start = resolutions.point(space.largest(), resolutions.native)
    # an upper bound: a block dropped early saves its unit's remaining width steps
    estimated = sum((a - b + s - 1) // s for a, b, s in zip(start, floors, steps, strict=True))
    estimated += sum(len(stage) for stage in blocks)
    bar = tqdm(
        total=estimated,
        initial=len(walked.path) - 1 if walked else 0,
        disable=not run.progress,
        desc="progressive search",
        unit="step",
    )
    walk_started = time.perf_counter() - (walked.elapsed_s if walked else 0.0)

    def on_step(path: list[PathPoint], stats: SearchStats) -> None:
        bar.update(1)
        point = path[-1]
        bar.set_postfix(acc=f"{point.accuracy:.3f}", cost_ms=f"{point.cost:.2f}", finetunes=finetune_round)
        if state is not None:
            elapsed = time.perf_counter() - walk_started
            state.save_walk(supernet, Walked(path, stats, train_rng.getstate(), elapsed))

    path, stats = progressive_search(
        start,
        floors,
        steps,
        run.accuracy(run.scorer),
        cost,
        blocks=blocks,
        finetune=finetune if config.finetune_steps > 0 else None,
        finetune_threshold=config.finetune_threshold,
        on_step=on_step,
        resume=(walked.path, walked.stats) if walked else None,
    )
    bar.close()
    assert path[-1].subnet == resolutions.point(space.smallest(), resolutions.widths[-1])
    return path, stats


def _final_front(run: SearchRun, path: list[PathPoint]) -> tuple[Tensor, list[PathPoint], list[PathPoint]]:
    """Round the weights as the bundle stores them, re-score the path on the whole search split after
    the full recalibration, and keep its Pareto front. Returns the calibration images with them."""
    supernet, splits, info, config = run.supernet, run.splits, run.info, run.config
    device = next(supernet.parameters()).device
    round_weights(supernet, config.weights_dtype)
    # Neighbouring subnets on the path differ by a fraction of a point, less than the noise of
    # the search subset; the front is therefore taken on the whole search split after the full
    # recalibration. (On the quick scorer the full network once fell off the front.)
    calibration = calibration_images(splits.train, info.mean, info.std, config.calibration_images, config.seed)
    calibration = calibration.to(device)
    images = normalize(splits.search.images, info.mean, info.std).to(device)
    precise = run.accuracy(Scorer(supernet, calibration, images, splits.search.labels.to(device), run.bf16))
    rescored = [
        PathPoint(p.subnet, precise(p.subnet), p.cost)
        for p in tqdm(path, disable=not run.progress, desc="re-scoring path", unit="subnet", leave=False)
    ]
    return calibration, rescored, pareto_front(rescored, lambda p: p.cost, lambda p: p.accuracy)


def _train_on_found(run: SearchRun, found: list[Point]) -> None:
    """The paper's last step: the served network is the one trained on the searched subnets
    (sandwich over them, the largest teaching in place), then rounded to the stored dtype again."""
    at = [run.resolutions.split(point) for point in found]
    finetune_supernet(
        run.supernet, run.splits, run.info, run.config, at, random.Random(run.config.seed + 3), 0, run.bf16,
        steps=run.config.final_training_steps, learning_rate=run.config.final_learning_rate, cosine=True,
        progress=run.progress,
    )  # fmt: skip
    round_weights(run.supernet, run.config.weights_dtype)


def _baselines(run: SearchRun, calibration: Tensor) -> tuple[list[EvaluatedSubnet], list[EvaluatedSubnet]]:
    """With ``compare``: uniform widths at full depth and resolution (US-Nets), and random subnets of
    the same space (width, depth and resolution)."""
    config, space, resolutions = run.config, run.supernet.space, run.resolutions
    if not config.compare:
        return [], []
    widths = config.uniform_widths
    uniform = run.evaluate(
        [resolutions.point(space.uniform(w), resolutions.native) for w in widths],
        [f"uniform-{w:g}" for w in widths],
        calibration,
    )
    run.finished("uniform baseline")
    sampled: list[EvaluatedSubnet] = []
    if config.random_subnets:
        rng = random.Random(config.seed + 2)
        draws = list(
            dict.fromkeys(
                resolutions.point(space.random(rng), draw_resolution(rng, resolutions.widths))
                for _ in range(config.random_subnets)
            )
        )
        sampled = run.evaluate(draws, ["random"] * len(draws), calibration)
        run.finished("random baseline")
    return uniform, sampled


def _table(run: SearchRun, searched: list[EvaluatedSubnet], profile_name: str) -> SubnetTable:
    space = run.supernet.space
    rows = [
        SubnetRow(
            id=f"s{index}",
            channels=e.subnet,
            depths=space.depths(e.subnet),
            resolution=e.resolution,
            origin=e.origin,
            flops=e.flops,
            params=e.params,
            accuracy=round(e.test_accuracy, 5),
            accuracy_split=run.splits.test.name,
            search_accuracy=round(e.search_accuracy, 5),
            latency={profile_name: e.latency},
            bn_key=bn_key_for(f"s{index}"),
        )
        for index, e in enumerate(searched)
    ]
    return profiled_table(space, run.config.profile, rows)


def _where(at: tuple[Subnet, int]) -> dict[str, Any]:
    """A subnet and its resolution as the report writes them."""
    return {"channels": subnet_to_str(at[0]), "resolution": at[1]}


def _summary(e: EvaluatedSubnet, depths: tuple[int, ...]) -> dict[str, Any]:
    return {
        **_where((e.subnet, e.resolution)),
        "depths": "-".join(map(str, depths)),
        "origin": e.origin,
        "test_accuracy": round(e.test_accuracy, 5),
        "search_accuracy": round(e.search_accuracy, 5),
        "flops": e.flops,
        "params": e.params,
        "latency_ms": {str(b): {"p50": round(s.p50_ms, 4), "p95": round(s.p95_ms, 4)} for b, s in e.latency.items()},
    }


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def choose_ranking(
    supernet: Supernet, splits: Splits, info: SupernetInfo, config: SearchConfig, scorer: Scorer, progress: bool
) -> dict[str, Any]:
    """Score each ranking by the mean search accuracy of narrow uniform subnets after permuting; keep the best.

    Ties go to the identity (the training order), which needs no permutation at all.
    """
    if config.ranking != "auto":
        candidates = [config.ranking]
    elif config.start == "static":
        # a network trained alone has no training order, and any permutation leaves its narrow
        # subnets near chance before fine-tuning, so comparing rankings there says nothing
        candidates = ["noise"]
    else:
        candidates = list(RANKINGS)
    original = {k: v.clone() for k, v in supernet.state_dict().items()}
    probes = [supernet.space.uniform(w) for w in config.ranking_probe_widths]
    importances: dict[str, list[Tensor]] = {}
    scores: dict[str, dict[str, float]] = {}
    for name in candidates:
        supernet.load_state_dict(original)
        if name == "identity":
            importances[name] = identity_importance(supernet)
        elif name == "weight-norm":
            importances[name] = weight_norm_importance(supernet)
        else:
            importances[name] = _noise_ranking(supernet, splits, info, config, progress)
        apply_ranking(supernet, importances[name])
        scores[name] = {f"{w:g}": scorer(p) for w, p in zip(config.ranking_probe_widths, probes, strict=True)}
        log.info("ranking %s: search top-1 at widths %s", name, scores[name])
    best = max(candidates, key=lambda n: (float(np.mean(list(scores[n].values()))), n == "identity"))
    supernet.load_state_dict(original)
    apply_ranking(supernet, importances[best])
    return {"scores": scores, "chosen": best, "probe_widths": list(config.ranking_probe_widths)}


def _noise_ranking(
    supernet: Supernet, splits: Splits, info: SupernetInfo, config: SearchConfig, progress: bool
) -> list[Tensor]:
    device = next(supernet.parameters()).device
    count = min(4096, len(splits.train))
    images = normalize(splits.train.images[:count], info.mean, info.std).to(device)
    return noise_importance(
        supernet, images, splits.train.labels[:count].to(device), config.noise, config.seed, progress
    )


def fit_predictor(
    supernet: Supernet, config: SearchConfig, progress: bool, timer: Timer = measure
) -> tuple[LatencyPredictor, dict[str, Any]]:
    """Measure random subnets (plus the largest and smallest), fit the predictor, report held-out error."""
    rng = random.Random(config.seed + 1)
    space = supernet.space
    widths = check_resolutions(config.resolutions, supernet.input_shape[-1])
    subnets = [space.largest(), space.smallest()] + [
        space.random(rng) for _ in range(config.predictor_subnets + config.predictor_holdout - 2)
    ]
    # the largest at the input's width, the smallest at the lowest, the others drawn (after the subnets)
    at = [widths[0], widths[-1]] + [draw_resolution(rng, widths) for _ in subnets[2:]]
    probe = torch.randn(4, *supernet.input_shape, device=next(supernet.parameters()).device)
    modules = [
        materialize(supernet, s, calibrate_bn(supernet, s, probe, resolution=r), r)
        for s, r in zip(subnets, at, strict=True)
    ]
    settings = ProfileSettings(
        device=config.profile.device, threads=config.profile.threads, batch_sizes=config.predictor_batch_sizes,
        warmup=config.profile.warmup, repeats=max(5, config.profile.repeats // 2), burst=config.profile.burst,
        pick_threads=config.profile.pick_threads, idle_gap_ms=config.profile.idle_gap_ms,
    )  # fmt: skip
    measured = timer(modules, supernet.input_shape, settings, progress, "profiling predictor subnets")
    features = [
        subnet_flops_by_resolution(supernet, s, input_shape_at(supernet.input_shape, r))
        for s, r in zip(subnets, at, strict=True)
    ]
    fit_count = config.predictor_subnets
    predictor = LatencyPredictor.fit(features[:fit_count], measured[:fit_count])
    errors = relative_errors(predictor, features[fit_count:], measured[fit_count:])
    report = {
        "fitted_on": fit_count,
        "held_out": len(subnets) - fit_count,
        "relative_error": {
            str(b): {
                "p50": round(float(np.percentile(e, 50)), 4),
                "p90": round(float(np.percentile(e, 90)), 4),
                "max": round(float(e.max()), 4),
            }
            for b, e in errors.items()
        },
        "coefficients": {str(b): c for b, c in predictor.coefficients.items()},
        "areas": list(predictor.areas),
    }
    log.info("latency predictor held-out relative error: %s", report["relative_error"])
    return predictor, report


def finetune_supernet(
    supernet: Supernet,
    splits: Splits,
    info: SupernetInfo,
    config: SearchConfig,
    found: list[tuple[Subnet, int]],
    rng: random.Random,
    round_index: int,
    bf16: bool,
    *,
    steps: int | None = None,
    learning_rate: float | None = None,
    cosine: bool = False,
    progress: bool = False,
) -> None:
    """A sandwich-rule fine-tune: largest (teacher, at the input's resolution), the smallest found
    so far, two random ones of ``found``; each at its resolution. ``config.finetune_steps`` at a
    constant ``config.finetune_learning_rate`` unless told otherwise."""
    device = next(supernet.parameters()).device
    steps = config.finetune_steps if steps is None else steps
    peak = config.finetune_learning_rate if learning_rate is None else learning_rate
    optimizer = make_optimizer(supernet, TrainConfig(learning_rate=peak))
    supernet.train()
    for step in tqdm(range(steps), disable=not progress, desc="training on the subnets found", unit="step"):
        if cosine:
            for group in optimizer.param_groups:
                group["lr"] = 0.5 * peak * (1 + math.cos(math.pi * step / steps))
        batch = torch.tensor(rng.sample(range(len(splits.train)), config.finetune_batch_size))
        images = augment(
            splits.train.images[batch], torch.Generator().manual_seed(config.seed * 7919 + round_index * 1000 + step)
        )
        inputs = normalize(images, info.mean, info.std).to(device).contiguous(memory_format=torch.channels_last)
        sandwich = [
            (supernet.space.largest(), supernet.input_shape[-1]),
            found[-1],
            *rng.sample(found, min(2, len(found))),
        ]
        sandwich_step(
            supernet, optimizer, inputs, splits.train.labels[batch].to(device), [s for s, _ in sandwich],
            bf16=bf16, resolutions=[r for _, r in sandwich],
        )  # fmt: skip
    supernet.eval()


def round_weights(supernet: Supernet, dtype: str) -> None:
    """Round parameters through the storage dtype, so every measurement reflects the served weights."""
    torch_dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
    with torch.no_grad():
        for param in supernet.parameters():
            param.copy_(param.to(torch_dtype).to(param.dtype))


def evaluate_subnets(
    supernet: Supernet,
    subnets: list[tuple[Subnet, int]],
    origins: list[str],
    calibration: Tensor,
    splits: Splits,
    info: SupernetInfo,
    config: SearchConfig,
    progress: bool,
    timer: Timer = measure,
) -> list[EvaluatedSubnet]:
    """Full recalibration, materialization, test and search top-1, FLOPs, params, measured latency of
    each ``(subnet, resolution)``."""
    results = []
    modules = []
    for (subnet, resolution), origin in tqdm(
        list(zip(subnets, origins, strict=True)),
        disable=not progress,
        desc="evaluating subnets",
        unit="subnet",
        leave=False,
    ):
        stats = calibrate_bn(supernet, subnet, calibration, resolution=resolution)
        static = materialize(supernet, subnet, stats, resolution)
        modules.append(static)
        results.append(
            EvaluatedSubnet(
                subnet=subnet,
                resolution=resolution,
                origin=origin,
                search_accuracy=accuracy(static, splits.search, info.mean, info.std),
                test_accuracy=accuracy(static, splits.test, info.mean, info.std),
                flops=count_flops(static, supernet.input_shape),
                params=count_params(static),
                latency={},
                bn_stats=stats,
            )
        )
    for result, latency in zip(
        results, timer(modules, supernet.input_shape, config.profile, progress, "profiling subnets"), strict=True
    ):
        result.latency = latency
    return results


def accuracy_gain(
    searched: list[EvaluatedSubnet], baseline: list[EvaluatedSubnet], test_images: int, batch_size: int = 1
) -> dict[str, Any]:
    """Top-1 of each searched subnet minus the baseline curve's at the same measured latency.

    The baseline curve is its Pareto front, interpolated linearly in log-latency; searched subnets
    outside its latency range are left out (no extrapolation). ``noise_sd`` is the binomial standard
    deviation of one such difference on ``test_images`` images (two independent accuracies at the
    mean accuracy); ``mean_noise_sd`` that of the mean over the compared subnets.
    """
    curve = pareto_front(baseline, lambda e: e.latency[batch_size].p50_ms, lambda e: e.test_accuracy)
    xs = np.log([e.latency[batch_size].p50_ms for e in curve])
    ys = np.array([e.test_accuracy for e in curve])
    gains: list[dict[str, Any]] = []
    values: list[float] = []
    for e in searched:
        x = np.log(e.latency[batch_size].p50_ms)
        if xs[0] <= x <= xs[-1]:
            values.append(round(float(e.test_accuracy - np.interp(x, xs, ys)), 5))
            gains.append({**_where((e.subnet, e.resolution)), "gain": values[-1]})
    level = float(np.mean([e.test_accuracy for e in searched]))
    noise = math.sqrt(2 * level * (1 - level) / test_images)
    return {
        "batch_size": batch_size,
        "per_subnet": gains,
        "noise_sd": round(noise, 5),
        "mean_noise_sd": round(noise / math.sqrt(len(values)), 5) if values else None,
        "mean": round(float(np.mean(values)), 5) if values else None,
        "max": round(float(np.max(values)), 5) if values else None,
        "min": round(float(np.min(values)), 5) if values else None,
    }


def write_search_bundle(
    outcome: SearchOutcome,
    info: SupernetInfo,
    splits: Splits,
    config: SearchConfig,
    out_dir: Path,
    provenance: dict[str, Any],
) -> None:
    supernet = outcome.supernet
    write_bundle(
        out_dir,
        supernet,
        outcome.table,
        {row.id: e.bn_stats for e, row in zip(outcome.searched, outcome.table.subnets, strict=True)},
        manifest_fields(info, supernet.input_shape, splits, {**provenance, "search_config": _jsonable(asdict(config))}),
        weights_dtype=config.weights_dtype,
    )
