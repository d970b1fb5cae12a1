"""The search algorithm alone, on synthetic accuracy and cost functions with a known optimum."""

import itertools

import pytest

from slimserve.searcher.progressive import PathPoint, SearchStats, path_end, progressive_search, shrink_candidates

MAXIMUM = (64, 32, 128)
MINIMUM = (16, 8, 32)
STEPS = (16, 8, 32)
LOSS_WEIGHT = (3.0, 0.25, 1.0)  # unit 1 is cheap to cut, unit 0 is expensive
COST_PER_CHANNEL = (0.05, 0.02, 0.01)


def accuracy(subnet: tuple[int, ...]) -> float:
    # separable and convex: every further cut of a unit hurts more than the previous one
    return 0.95 - sum(w * ((m - c) / m) ** 2 for w, m, c in zip(LOSS_WEIGHT, MAXIMUM, subnet, strict=True))


def cost(subnet: tuple[int, ...]) -> float:
    return sum(k * c for k, c in zip(COST_PER_CHANNEL, subnet, strict=True))


def all_subnets():
    ranges = [range(lo, hi + 1, step) for lo, hi, step in zip(MINIMUM, MAXIMUM, STEPS, strict=True)]
    return list(itertools.product(*ranges))


def test_path_runs_from_full_to_minimum_one_step_at_a_time() -> None:
    path, stats = progressive_search(MAXIMUM, MINIMUM, STEPS, accuracy, cost)
    assert path[0].subnet == MAXIMUM and path[-1].subnet == MINIMUM
    assert len(path) == 1 + sum((a - b) // s for a, b, s in zip(MAXIMUM, MINIMUM, STEPS, strict=True))
    for before, after in itertools.pairwise(path):
        changed = [i for i, (a, b) in enumerate(zip(before.subnet, after.subnet, strict=True)) if a != b]
        assert len(changed) == 1 and before.subnet[changed[0]] - after.subnet[changed[0]] == STEPS[changed[0]]
    assert stats.finetunes == 0


def test_every_path_point_is_optimal_for_its_cost() -> None:
    # on a separable convex problem, the greedy loss-per-cost path lies on the optimal frontier
    path, _ = progressive_search(MAXIMUM, MINIMUM, STEPS, accuracy, cost)
    everything = all_subnets()
    for point in path:
        best_at_cost = max(accuracy(s) for s in everything if cost(s) <= point.cost + 1e-12)
        assert point.accuracy == pytest.approx(best_at_cost, abs=1e-12)


def test_cheap_to_cut_unit_is_cut_first() -> None:
    path, _ = progressive_search(MAXIMUM, MINIMUM, STEPS, accuracy, cost)
    assert path[1].subnet == (64, 24, 128)  # unit 1: least loss per cost saved
    assert path[-2].subnet[0] == 32  # the expensive-to-cut unit 0 goes last


def test_finetune_runs_when_accuracy_drops_past_the_threshold_and_rescoring_follows() -> None:
    boost = {"value": 0.0}
    calls: list[list[tuple[int, ...]]] = []

    def tuned_accuracy(subnet):
        return accuracy(subnet) + boost["value"]

    def finetune(found):
        calls.append(found)
        boost["value"] += 0.001

    path, stats = progressive_search(
        MAXIMUM, MINIMUM, STEPS, tuned_accuracy, cost, finetune=finetune, finetune_threshold=0.1
    )
    assert stats.finetunes == len(calls) > 0
    assert all(found[0] == MAXIMUM for found in calls)  # gets the subnets found so far, the full net first
    tuned = [p for p in path if p.finetuned]
    assert len(tuned) == len(calls)
    # each fine-tune happened only after a drop of more than the threshold since the last one
    reference = path[0].accuracy
    for point in path[1:]:
        if point.finetuned:
            assert reference - accuracy(point.subnet) > 0.1 - 0.01
            reference = point.accuracy


class Crash(Exception):
    pass


class Network:
    """What a fine-tune changes (each adds 0.001 to every accuracy); the search saves it with the path."""

    def __init__(self, finetunes: int = 0) -> None:
        self.finetunes = finetunes

    def accuracy(self, subnet: tuple[int, ...]) -> float:
        return accuracy(subnet) + 0.001 * self.finetunes

    def finetune(self, found: list[tuple[int, ...]]) -> None:
        self.finetunes += 1


def test_a_walk_stopped_midway_and_resumed_from_what_on_step_saw_takes_the_same_path() -> None:
    def walk(network: Network, **options: object):
        return progressive_search(
            MAXIMUM, MINIMUM, STEPS, network.accuracy, cost, finetune=network.finetune, finetune_threshold=0.05,
            **options,  # type: ignore[arg-type]
        )  # fmt: skip

    whole, whole_stats = walk(Network())
    # stop right after a fine-tune that the next step does not repeat: resumed with the wrong
    # reference (the start's accuracy), that step would fine-tune again
    stop = next(i for i in range(1, len(whole) - 1) if whole[i].finetuned and not whole[i + 1].finetuned)
    saved = []

    def save_then_crash(path, stats) -> None:
        saved.append((list(path), stats))
        if len(path) == stop + 1:
            raise Crash

    with pytest.raises(Crash):
        walk(Network(), on_step=save_then_crash)
    path, stats = saved[-1]
    assert 0 < stats.finetunes < whole_stats.finetunes
    resumed, resumed_stats = walk(Network(stats.finetunes), resume=(path, stats))
    assert resumed == whole and resumed_stats == whole_stats


def test_a_resumed_path_must_begin_at_the_start() -> None:
    with pytest.raises(ValueError, match="begin at the start"):
        progressive_search(
            MAXIMUM, MINIMUM, STEPS, accuracy, cost, resume=([PathPoint(MINIMUM, 0.5, 1.0)], SearchStats(1, 0))
        )


def test_candidates_are_clamped_to_the_minimum() -> None:
    assert shrink_candidates((24, 8), (16, 8), (16, 8)) == [(0, (16, 8))]


def test_only_the_last_running_block_of_a_stage_may_be_dropped() -> None:
    # units: stream, block0, block1, block2; blocks 1 and 2 droppable
    blocks = [(2, 3)]
    assert shrink_candidates((16, 8, 8, 8), (8, 8, 8, 8), (8, 8, 8, 8), blocks) == [
        (0, (8, 8, 8, 8)),
        (3, (16, 8, 8, 0)),
    ]
    assert shrink_candidates((8, 8, 8, 0), (8, 8, 8, 8), (8, 8, 8, 8), blocks) == [(2, (8, 8, 0, 0))]
    assert path_end((8, 8, 8, 8), blocks) == (8, 8, 0, 0)


def test_the_path_drops_a_block_when_that_is_the_cheapest_loss_per_cost() -> None:
    # a stream unit and two blocks; the last block is nearly useless but costs a lot
    def deep_accuracy(subnet):
        stream, first, second = subnet
        narrowing = 0.2 * (32 - stream) / 32 + 0.1 * (32 - first) / 32
        return 0.9 - narrowing - (0.001 if second == 0 else 0.01 * (32 - second) / 32)

    def deep_cost(subnet):
        stream, first, second = subnet
        return stream * 0.01 + first * 0.02 + second * 0.05

    path, _ = progressive_search((32, 32, 32), (8, 8, 8), (8, 8, 8), deep_accuracy, deep_cost, blocks=[(2,)])
    assert path[1].subnet == (32, 32, 0)  # dropped at once, not narrowed first
    assert path[-1].subnet == (8, 8, 0)
    assert all(p.subnet[2] in (0, 32) for p in path)


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="one entry per unit"):
        progressive_search((8, 8), (8,), (8, 8), accuracy, cost)
    with pytest.raises(ValueError, match="must not exceed"):
        progressive_search((8, 8), (16, 8), (8, 8), accuracy, cost)
