"""The S2DNAS search's decision logic: the controller, random decisions, plans, candidate records."""

import random

import pytest
import torch

from slimserve.models.early_exit import ExitOutcome
from slimserve.models.families import create_supernet
from slimserve.searcher.s2dnas import (
    FRACTIONS,
    Candidate,
    Controller,
    Decisions,
    S2DNASConfig,
    best,
    random_decisions,
    running_best,
)
from slimserve.searcher.s2dnas_run import _candidate_from_json, _candidate_json


def test_policy_gradient_moves_the_controller_to_the_rewarded_choices() -> None:
    controller = Controller(network_stages=3, stages=3, choices=len(FRACTIONS), config=S2DNASConfig(seed=1))
    for _ in range(80):
        decisions, log_prob = controller.sample()
        # Reward: concat in network stage 1, and the first cut of stage 0 at the smallest share.
        reward = float(decisions.concat[1]) + float(decisions.cuts[0][0] == 0)
        controller.update(log_prob, reward)
    likely = controller.most_likely()
    assert likely.concat[1] is True
    assert likely.cuts[0][0] == 0
    assert torch.softmax(controller.concat_logits[1], 0)[1] > 0.8


def test_random_decisions_cover_the_space_reproducibly() -> None:
    draws = [random_decisions(random.Random(3), 3, 3, 6) for _ in range(2)]
    assert draws[0] == draws[1]
    many = {random_decisions(random.Random(seed), 3, 3, 6) for seed in range(50)}
    assert len(many) == 50
    assert len({d.concat for d in many}) == 8  # every concat pattern drawn
    assert {i for d in many for cuts in d.cuts for i in cuts} == set(range(6))  # every share drawn


def test_decisions_become_a_plan_with_sorted_cuts() -> None:
    base = create_supernet("cifar_resnet", depth=8, base_channels=32, in_channels=1, image_size=28)
    subnet = base.space.largest()
    decisions = Decisions(cuts=((3, 1), (0, 0), (5, 2)), concat=(True, False, True))
    plan = decisions.plan(base, subnet, FRACTIONS)
    assert plan.stages == 3
    assert plan.splits[0] == (8, 8, 16)  # stage0, 32 channels: shares 0.25 / 0.5 -> 8, 16 cumulative
    assert plan.splits[2] == (8, 8, 48)  # stage1, 64 channels: 0.125, 0.125 -> nudged to one group each
    assert plan.concat == (True, False, True)
    assert decisions.describe(FRACTIONS).startswith("stage0 0.25/0.5 concat, stage1 0.125/0.125,")


def candidate(method: str, reward: float) -> Candidate:
    base = create_supernet("cifar_resnet", depth=8, base_channels=32, in_channels=1, image_size=28)
    decisions = Decisions(cuts=((1, 3),) * 3, concat=(True,) * 3)
    return Candidate(
        method,
        decisions,
        decisions.plan(base, base.space.largest(), FRACTIONS),
        reward,
        ExitOutcome((0.9, float("inf")), 0.91, 1e6, (0.5, 0.0, 0.5)),
        (0.8, 0.85, 0.9),
        (1, 2, 3),
    )


def test_best_and_search_curves() -> None:
    pool = [candidate("controller", 0.5), candidate("random", 0.7), candidate("controller", 0.6)]
    assert best(pool).reward == 0.7
    assert best(pool, "controller").reward == 0.6
    assert running_best(pool, "controller") == [0.5, 0.6]
    with pytest.raises(ValueError, match="no candidates from other"):
        best(pool, "other")


def test_a_candidate_survives_its_json_record() -> None:
    original = candidate("random", 0.42)
    assert _candidate_from_json(_candidate_json(original, FRACTIONS)) == original
