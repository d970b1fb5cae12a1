"""The exit rule of a multi-stage network, and its calibration: pure numbers, no model.

An input leaves after stage ``s`` when the top softmax probability of stage ``s`` reaches that
stage's threshold; the last stage answers everything left. Thresholds are calibrated on a split
held out of training (the search split, never the test split) for a target accuracy: the
cheapest thresholds whose exits keep the accuracy at or above the target.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

NEVER = float("inf")  # a threshold no confidence reaches: that stage never answers early


@dataclass(frozen=True)
class ExitOutcome:
    """What a set of thresholds does on a labelled split."""

    thresholds: tuple[float, ...]
    accuracy: float
    mean_cost: float  # in the unit of the stage costs given (FLOPs or ms)
    exit_share: tuple[float, ...]  # fraction of inputs answered by each stage


def exit_stage(confidence: ArrayLike, thresholds: Sequence[float]) -> NDArray[np.int64]:
    """Per input, the stage that answers it: the first whose confidence reaches its threshold.

    Args:
        confidence: ``[stages, inputs]`` top softmax probability of each stage.
        thresholds: One per stage but the last.
    """
    conf = np.asarray(confidence, dtype=np.float64)
    stages = conf.shape[0]
    if len(thresholds) != stages - 1:
        raise ValueError(f"{stages} stages need {stages - 1} thresholds, got {len(thresholds)}")
    answered = np.full(conf.shape[1], stages - 1, dtype=np.int64)
    pending = np.ones(conf.shape[1], dtype=bool)
    for stage, threshold in enumerate(thresholds):
        leaves = pending & (conf[stage] >= threshold)
        answered[leaves] = stage
        pending &= ~leaves
    return answered


def evaluate_exits(
    confidence: ArrayLike, correct: ArrayLike, cumulative_cost: Sequence[float], thresholds: Sequence[float]
) -> ExitOutcome:
    """Accuracy, mean cost and exit shares of ``thresholds``.

    ``correct`` is ``[stages, inputs]`` (stage's top-1 right or not); ``cumulative_cost[s]`` is the
    cost of an input that leaves after stage ``s`` (every stage up to ``s`` ran).
    """
    right = np.asarray(correct, dtype=bool)
    stages = exit_stage(confidence, thresholds)
    inputs = right.shape[1]
    accuracy = float(right[stages, np.arange(inputs)].mean())
    cost = float(np.asarray(cumulative_cost, dtype=np.float64)[stages].mean())
    share = tuple(float(x) for x in np.bincount(stages, minlength=right.shape[0]) / inputs)
    return ExitOutcome(tuple(float(t) for t in thresholds), accuracy, cost, share)


def calibrate_thresholds(
    confidence: ArrayLike,
    correct: ArrayLike,
    cumulative_cost: Sequence[float],
    target_accuracy: float,
    grid: int = 40,
) -> ExitOutcome:
    """The cheapest thresholds (on this split) whose accuracy is at least ``target_accuracy``.

    Candidates per stage are ``grid`` quantiles of that stage's confidences plus :data:`NEVER`,
    searched exhaustively (stages - 1 thresholds; keep ``grid ** (stages - 1)`` modest). When no
    candidate reaches the target, every input runs to the last stage.
    """
    conf = np.asarray(confidence, dtype=np.float64)
    right = np.asarray(correct, dtype=bool)
    if conf.shape != right.shape or conf.ndim != 2 or conf.shape[0] < 2:
        raise ValueError(
            f"confidence and correct must both be [stages >= 2, inputs], got {conf.shape} and {right.shape}"
        )
    if len(cumulative_cost) != conf.shape[0]:
        raise ValueError(f"{conf.shape[0]} stages need {conf.shape[0]} cumulative costs, got {len(cumulative_cost)}")
    quantiles = np.linspace(0.0, 1.0, grid)
    candidates = [sorted({*np.quantile(conf[s], quantiles).tolist(), NEVER}) for s in range(conf.shape[0] - 1)]
    best = evaluate_exits(conf, right, cumulative_cost, [NEVER] * (conf.shape[0] - 1))
    for thresholds in itertools.product(*candidates):
        outcome = evaluate_exits(conf, right, cumulative_cost, thresholds)
        if outcome.accuracy >= target_accuracy and outcome.mean_cost < best.mean_cost:
            best = outcome
    return best
