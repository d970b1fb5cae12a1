"""The S2DNAS search (Yuan et al., ECCV 2020): which multi-stage network to turn a static model into.

Each candidate is a :class:`~models.multistage.StagePlan` drawn from per-network-stage choices:
the cumulative share of channels stages ``1 .. S-1`` own, and whether the stage's blocks
concatenate earlier stages' features. A candidate is scored by transforming the (importance-ranked)
static network, fine-tuning it briefly, calibrating its exit thresholds on the search split for
its own last stage's accuracy minus ``target_drop``, and computing

    reward = accuracy with exits - cost_weight x expected FLOPs / static FLOPs

on the search split. The paper trains an RNN controller by policy gradient on this reward; here the
policy is factorized (one categorical distribution per decision, REINFORCE with a moving-average
baseline), and random search with the same number of candidates is the baseline it must beat.
"""

from __future__ import annotations

import copy
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from slimserve.models.checkpoint import SupernetInfo
from slimserve.models.datasets import Splits
from slimserve.models.early_exit import ExitOutcome, calibrate_thresholds
from slimserve.models.evaluate import calibration_images
from slimserve.models.fine_tune import FineTuneConfig
from slimserve.models.multistage import MultiStageResNet, StagePlan, fraction_plan
from slimserve.models.multistage_train import calibrate_stage_bn, fine_tune, stage_predictions
from slimserve.models.resnet import SlimResNet
from slimserve.models.subnet import Subnet

FRACTIONS = (0.125, 0.25, 0.375, 0.5, 0.625, 0.75)  # cumulative channel share choices for early stages


@dataclass(frozen=True)
class S2DNASConfig:
    stages: int = 3
    fractions: tuple[float, ...] = FRACTIONS
    candidates: int = 8  # per method: the controller's samples, and as many random ones
    candidate_steps: int = 80  # fine-tune steps before a candidate is scored (a proxy, as in the paper)
    cost_weight: float = 0.05  # reward: 0.1 of the static FLOPs is worth 0.5 points of accuracy
    target_drop: float = 0.005  # exits calibrated to keep accuracy within this of the last stage's
    serve_drop: float = 0.001  # the bundle's exits: within this of the best stage's search accuracy
    controller_learning_rate: float = 0.3
    baseline_decay: float = 0.7
    score_images: int = 2000  # of the search split, scoring each candidate (all of it for the final network)
    calibration_images: int = 1024  # batch-norm recalibration of each candidate
    seed: int = 0
    finetune: FineTuneConfig = field(default_factory=FineTuneConfig)

    def __post_init__(self) -> None:
        if not 2 <= self.stages <= len(self.fractions) + 1:
            raise ValueError(
                f"stages must be 2 to {len(self.fractions) + 1} (one stage has no early exit; each later one "
                f"needs its own channel share), got {self.stages}"
            )
        if self.candidates < 1 or self.candidate_steps < 0:
            raise ValueError(
                f"candidates must be >= 1 and candidate steps >= 0, got {self.candidates}, {self.candidate_steps}"
            )
        if self.cost_weight < 0:
            raise ValueError(f"cost weight must be >= 0, got {self.cost_weight}")
        for name in ("target_drop", "serve_drop"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(
                    f"{name.replace('_', ' ')} is a share of accuracy in [0, 1), got {getattr(self, name)}"
                )


@dataclass(frozen=True)
class Decisions:
    """One point of the search space: per network stage, the cut indices and the concat flag."""

    cuts: tuple[tuple[int, ...], ...]  # per network stage: S-1 indices into the fraction choices
    concat: tuple[bool, ...]

    def plan(self, base: SlimResNet, subnet: Subnet, fractions: Sequence[float]) -> StagePlan:
        shares = [sorted(fractions[i] for i in cuts) for cuts in self.cuts]
        return fraction_plan(base, subnet, shares, self.concat)

    def describe(self, fractions: Sequence[float]) -> str:
        parts = []
        for stage, (cuts, concat) in enumerate(zip(self.cuts, self.concat, strict=True)):
            shares = "/".join(f"{fractions[i]:g}" for i in sorted(cuts))
            parts.append(f"stage{stage} {shares}{' concat' if concat else ''}")
        return ", ".join(parts)


@dataclass(frozen=True)
class Candidate:
    method: str  # "controller" or "random"
    decisions: Decisions
    plan: StagePlan
    reward: float
    exits: ExitOutcome  # on the search split
    stage_accuracy: tuple[float, ...]  # search split, every input through every stage
    stage_flops: tuple[int, ...]  # incremental FLOPs of each stage


class Controller:
    """A factorized policy over the decisions, trained with REINFORCE and a moving-average baseline."""

    def __init__(self, network_stages: int, stages: int, choices: int, config: S2DNASConfig) -> None:
        generator = torch.Generator().manual_seed(config.seed)
        self.cut_logits = torch.zeros(network_stages, stages - 1, choices, requires_grad=True)
        self.concat_logits = torch.zeros(network_stages, 2, requires_grad=True)
        self.optimizer = torch.optim.Adam([self.cut_logits, self.concat_logits], lr=config.controller_learning_rate)
        self.generator = generator
        self.baseline: float | None = None
        self.decay = config.baseline_decay

    def sample(self) -> tuple[Decisions, Tensor]:
        cut_dist = torch.distributions.Categorical(logits=self.cut_logits)
        concat_dist = torch.distributions.Categorical(logits=self.concat_logits)
        cuts = torch.multinomial(cut_dist.probs.reshape(-1, cut_dist.probs.shape[-1]), 1, generator=self.generator)
        cuts = cuts.reshape(self.cut_logits.shape[:2])
        concat = torch.multinomial(concat_dist.probs, 1, generator=self.generator).squeeze(1)
        log_prob = cut_dist.log_prob(cuts).sum() + concat_dist.log_prob(concat).sum()
        decisions = Decisions(
            tuple(tuple(int(c) for c in row) for row in cuts), tuple(bool(c) for c in concat.tolist())
        )
        return decisions, log_prob

    def update(self, log_prob: Tensor, reward: float) -> None:
        if self.baseline is None:
            self.baseline = reward
        advantage = reward - self.baseline
        self.baseline = self.decay * self.baseline + (1 - self.decay) * reward
        loss = -advantage * log_prob
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()

    def most_likely(self) -> Decisions:
        return Decisions(
            tuple(tuple(int(c) for c in row) for row in self.cut_logits.argmax(-1)),
            tuple(bool(c) for c in self.concat_logits.argmax(-1).tolist()),
        )


def random_decisions(rng: random.Random, network_stages: int, stages: int, choices: int) -> Decisions:
    return Decisions(
        tuple(tuple(rng.randrange(choices) for _ in range(stages - 1)) for _ in range(network_stages)),
        tuple(rng.random() < 0.5 for _ in range(network_stages)),
    )


def score(
    base: SlimResNet,
    subnet: Subnet,
    plan: StagePlan,
    splits: Splits,
    info: SupernetInfo,
    config: S2DNASConfig,
    static_flops: int,
    steps: int,
    calibration: Tensor,
) -> tuple[float, ExitOutcome, tuple[float, ...], tuple[int, ...]]:
    """Transform, fine-tune ``steps``, calibrate exits on the search split: the reward, the exits,
    each stage's accuracy (every image through every stage) and each stage's FLOPs."""
    model = MultiStageResNet(base, subnet, plan)
    fine_tune(model, splits.train, info.mean, info.std, _steps(config.finetune, steps), progress=False)
    staged = model.materialize(calibrate_stage_bn(model, calibration[: config.calibration_images]))
    flops = tuple(staged.stage_flops(s) for s in range(staged.num_stages))
    cumulative = [sum(flops[: s + 1]) for s in range(len(flops))]
    scored = splits.search.subset(torch.arange(min(config.score_images, len(splits.search))), "")
    confidence, correct = stage_predictions(staged, scored, info.mean, info.std)
    stage_accuracy = tuple(float(a) for a in correct.float().mean(1))
    exits = calibrate_thresholds(
        confidence.numpy(), correct.numpy(), cumulative, stage_accuracy[-1] - config.target_drop
    )
    reward = exits.accuracy - config.cost_weight * exits.mean_cost / static_flops
    return reward, exits, stage_accuracy, flops


def _steps(config: FineTuneConfig, steps: int) -> FineTuneConfig:
    return replace(config, steps=steps, warmup_steps=min(config.warmup_steps, max(1, steps // 5)))


def search(
    base: SlimResNet,
    subnet: Subnet,
    splits: Splits,
    info: SupernetInfo,
    config: S2DNASConfig,
    static_flops: int,
    on_candidate: Callable[[Candidate], None] | None = None,
) -> list[Candidate]:
    """Controller candidates interleaved with random ones (same count each), in the order scored.

    ``base`` must already have its channels ranked (most important first); it is not modified.
    """
    network_stages = len(base.space.depth_groups)
    choices = len(config.fractions)
    controller = Controller(network_stages, config.stages, choices, config)
    rng = random.Random(config.seed)
    calibration = calibration_images(splits.train, info.mean, info.std, seed=config.seed)
    candidates: list[Candidate] = []
    for _ in range(config.candidates):
        for method in ("controller", "random"):
            if method == "controller":
                decisions, log_prob = controller.sample()
            else:
                decisions = random_decisions(rng, network_stages, config.stages, choices)
            plan = decisions.plan(base, subnet, config.fractions)
            reward, exits, accuracy, flops = score(
                copy.deepcopy(base),
                subnet,
                plan,
                splits,
                info,
                config,
                static_flops,
                config.candidate_steps,
                calibration,
            )
            if method == "controller":
                controller.update(log_prob, reward)
            candidate = Candidate(method, decisions, plan, reward, exits, accuracy, flops)
            candidates.append(candidate)
            if on_candidate is not None:
                on_candidate(candidate)
    return candidates


def best(candidates: Sequence[Candidate], method: str | None = None) -> Candidate:
    pool = [c for c in candidates if method is None or c.method == method]
    if not pool:
        raise ValueError(f"no candidates{f' from {method}' if method else ''}")
    return max(pool, key=lambda c: (c.reward, -sum(c.stage_flops)))


def running_best(candidates: Sequence[Candidate], method: str) -> list[float]:
    """Best reward so far after each of ``method``'s candidates (the search-efficiency curve)."""
    rewards, best_so_far = [], -math.inf
    for candidate in candidates:
        if candidate.method == method:
            best_so_far = max(best_so_far, candidate.reward)
            rewards.append(best_so_far)
    return rewards
