"""S2DNAS multi-stage networks: the served form equals the trained form, later stages reuse earlier ones."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from slimserve.models.bn_calibration import calibrate_bn
from slimserve.models.families import create_supernet
from slimserve.models.flops import count_flops
from slimserve.models.multistage import InvalidPlanError, MultiStageResNet, StagePlan, fraction_plan
from slimserve.models.ops import CalibratingNorm, FrozenStatsNorm

ARGS = {"depth": 14, "base_channels": 16, "in_channels": 1, "image_size": 28, "group_size": 4}


def base_and_images():
    torch.manual_seed(0)
    base = create_supernet("cifar_resnet", **ARGS)
    images = torch.randn(24, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    return base, images


def calibrated(model: MultiStageResNet, images: torch.Tensor):
    norm = CalibratingNorm()
    with torch.no_grad():
        model(images, norm)
    return norm.stats


PLANS = {
    "concat everywhere": ([(0.25, 0.5)] * 3, [True] * 3),
    "no concat": ([(0.25, 0.5)] * 3, [False] * 3),
    "mixed": ([(0.25, 0.75), (0.5, 0.75), (0.25, 0.5)], [False, True, False]),
}


@pytest.mark.parametrize("name", list(PLANS))
@pytest.mark.parametrize("depths", [(2, 2, 2), (1, 2, 1)])
def test_each_served_stage_equals_the_trained_networks_stage(name: str, depths: tuple[int, ...]) -> None:
    base, images = base_and_images()
    subnet = base.space.with_depths(base.space.largest(), depths)
    fractions, concat = PLANS[name]
    model = MultiStageResNet(base, subnet, fraction_plan(base, subnet, fractions, concat))
    stats = calibrated(model, images)
    with torch.no_grad():
        expected = model(images, FrozenStatsNorm(stats))
    staged = model.materialize(stats)
    state = None
    for stage in range(3):
        logits, state = staged.run_stage(images, state)
        torch.testing.assert_close(logits, expected[stage], atol=1e-4, rtol=1e-4)
    assert state.stages_run == 3
    torch.testing.assert_close(staged(images), expected[-1], atol=1e-4, rtol=1e-4)


def measured_flops(function) -> int:
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        function()
    return int(counter.get_total_flops())


@pytest.mark.parametrize("name", list(PLANS))
def test_a_later_stage_costs_only_its_own_slices(name: str) -> None:
    base, images = base_and_images()
    subnet = base.space.largest()
    fractions, concat = PLANS[name]
    plan = fraction_plan(base, subnet, fractions, concat)
    model = MultiStageResNet(base, subnet, plan)
    staged = model.materialize(calibrated(model, images))
    one = images[:1]
    _, first = staged.run_stage(one)
    _, second = staged.run_stage(one, first)
    costs = [
        measured_flops(lambda: staged.run_stage(one)),
        measured_flops(lambda: staged.run_stage(one, first)),
        measured_flops(lambda: staged.run_stage(one, second)),
    ]
    assert costs == [staged.stage_flops(s) for s in range(3)]
    # Stage 2 from scratch would run a network as wide as stages 1 and 2 together: reuse is cheaper.
    two_stage_widths = tuple(plan.ends(u)[1] for u in range(len(subnet)))
    scratch = base.materialize(two_stage_widths, calibrate_bn(base, two_stage_widths, images))
    assert costs[1] < count_flops(scratch, (1, 28, 28)) - costs[0] / 2
    # Without concat, each stage is a thin network of its own: the three together cost less than the static one.
    static = base.materialize(subnet, calibrate_bn(base, subnet, images))
    if not any(concat):
        assert sum(costs) < count_flops(static, (1, 28, 28))


def test_continuing_a_subset_of_the_batch_gives_the_same_rows() -> None:
    base, images = base_and_images()
    subnet = base.space.largest()
    model = MultiStageResNet(base, subnet, fraction_plan(base, subnet, *PLANS["mixed"]))
    staged = model.materialize(calibrated(model, images))
    _, state = staged.run_stage(images)
    everyone, _ = staged.run_stage(images, state)
    rows = torch.tensor([3, 7, 8, 20])
    some, _ = staged.run_stage(images[rows], state.select(rows))
    torch.testing.assert_close(some, everyone[rows])


def test_classifiers_start_from_the_static_classifier() -> None:
    base, _ = base_and_images()
    subnet = base.space.largest()
    plan = fraction_plan(base, subnet, *PLANS["no concat"])
    model = MultiStageResNet(base, subnet, plan)
    last = model.classifiers[-1]
    torch.testing.assert_close(last.weight, base.fc.weight)
    assert [head.in_features for head in model.classifiers] == list(plan.ends(base.last_stream_unit))


def test_fraction_plan_splits_in_whole_groups_and_gives_every_stage_one() -> None:
    base, _ = base_and_images()
    subnet = base.space.largest()
    plan = fraction_plan(base, subnet, [(0.01, 0.02)] * 3, [True] * 3)
    for unit, split in zip(base.space.units, plan.splits, strict=True):
        assert sum(split) == unit.max_channels
        assert all(c >= 4 and c % 4 == 0 for c in split)
    assert StagePlan.from_json(plan.to_json()) == plan


def test_plans_that_do_not_fit_are_refused_with_the_place_named() -> None:
    base, _ = base_and_images()
    subnet = base.space.largest()
    plan = fraction_plan(base, subnet, *PLANS["mixed"])
    bad = list(plan.splits)
    bad[1] = (8, 8, 0)
    with pytest.raises(InvalidPlanError, match=r"stage0\.block0\.mid"):
        MultiStageResNet(base, subnet, StagePlan(tuple(bad), plan.concat))
    with pytest.raises(InvalidPlanError, match="concat for 2 blocks"):
        MultiStageResNet(base, subnet, StagePlan(plan.splits, plan.concat[:2]))
    with pytest.raises(InvalidPlanError, match="increasing"):
        fraction_plan(base, subnet, [(0.5, 0.25)] * 3, [True] * 3)
    with pytest.raises(InvalidPlanError, match="'splits'"):
        StagePlan.from_json({"splits": "8-8", "concat": []})


def test_with_exits_each_image_gets_the_answer_of_the_stage_its_confidence_picks() -> None:
    from slimserve.models.early_exit import exit_stage

    base, images = base_and_images()
    subnet = base.space.largest()
    model = MultiStageResNet(base, subnet, fraction_plan(base, subnet, *PLANS["mixed"]))
    staged = model.materialize(calibrated(model, images))
    every, state = [], None
    for _ in range(3):
        logits, state = staged.run_stage(images, state)
        every.append(logits)
    confidence = torch.stack([torch.softmax(x, 1).amax(1) for x in every])
    thresholds = [float(confidence[0].median()), float(confidence[1].quantile(0.3))]
    expected_stage = torch.from_numpy(exit_stage(confidence.numpy(), thresholds))
    assert 0 < int((expected_stage == 0).sum()) < len(images)  # some leave early, some go on
    exits = staged.run_with_exits(images, thresholds)
    assert exits.stage.tolist() == expected_stage.tolist()
    for row in range(len(images)):
        stage = int(exits.stage[row])
        torch.testing.assert_close(exits.logits[row], every[stage][row], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(exits.confidence[row], confidence[stage, row], atol=1e-5, rtol=1e-5)
    assert not exits.cut_short.any()
    assert staged.run_with_exits(images, [float("inf")] * 2).stage.tolist() == [2] * len(images)
    capped = staged.run_with_exits(images, [float("inf")] * 2, last=1)
    assert capped.stage.tolist() == [1] * len(images)
    torch.testing.assert_close(capped.logits, every[1], atol=1e-5, rtol=1e-5)


def test_rows_whose_deadline_forbids_the_next_stage_answer_with_the_stage_they_reached() -> None:
    base, images = base_and_images()
    subnet = base.space.largest()
    model = MultiStageResNet(base, subnet, fraction_plan(base, subnet, *PLANS["mixed"]))
    staged = model.materialize(calibrated(model, images))
    asked = []

    def only_even_rows_may_go_on(rows: torch.Tensor, stage: int) -> torch.Tensor:
        asked.append((rows.tolist(), stage))
        return rows % 2 == 0

    exits = staged.run_with_exits(images, [float("inf")] * 2, may_continue=only_even_rows_may_go_on)
    assert exits.stage.tolist() == [2 if row % 2 == 0 else 0 for row in range(len(images))]
    assert exits.cut_short.tolist() == [row % 2 == 1 for row in range(len(images))]
    assert asked == [(list(range(len(images))), 1), (list(range(0, len(images), 2)), 2)]
