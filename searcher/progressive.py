"""Progressive subnet search (Yang, He, Cao, Fan, TNNLS 2022), as a pure algorithm.

Start from the full network. At each step, try shrinking every unit by one step (a whole number of
channel groups) and, where depth is elastic, dropping the last running block of every stage (its
inner unit goes to 0); score each candidate by *accuracy lost per unit of cost saved*; keep the
best; repeat until every unit is at its minimum and every droppable block is gone. The result is a
path of nested, non-uniform subnets from the largest to the smallest.

When accuracy along the path has dropped by more than a threshold since the last fine-tune, a
``finetune`` callback gets the subnets found so far (selective fine-tuning) and the current
subnet is re-scored on the updated network.

A walk can stop and go on: ``on_step`` sees the path and the counts after every step, and a walk
given a path already walked (``resume``) continues from its last point as if it had never stopped
(the fine-tune reference is the last fine-tuned point, or the start).

Like once-for-all's ``EvolutionFinder``, the search takes its accuracy and cost functions as
arguments, so it is tested with synthetic functions and no network at all.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

Subnet = tuple[int, ...]


@dataclass(frozen=True)
class PathPoint:
    subnet: Subnet
    accuracy: float  # as measured when the point was reached (the network may be fine-tuned later)
    cost: float
    finetuned: bool = False  # a fine-tune ran right before this point was scored


@dataclass(frozen=True)
class SearchStats:
    evaluations: int
    finetunes: int


def shrink_candidates(
    current: Subnet, minimum: Subnet, steps: Sequence[int], blocks: Sequence[Sequence[int]] = ()
) -> list[tuple[int, Subnet]]:
    """``(unit, subnet)`` for every unit that can still shrink, by its step, clamped to the minimum,
    then for every stage that can still lose a block: its last running block dropped (unit -> 0)."""
    candidates = []
    for unit, (channels, floor, step) in enumerate(zip(current, minimum, steps, strict=True)):
        if channels > floor:
            shrunk = list(current)
            shrunk[unit] = max(floor, channels - step)
            candidates.append((unit, tuple(shrunk)))
    for stage in blocks:
        running = [unit for unit in stage if current[unit]]
        if running:
            dropped = list(current)
            dropped[running[-1]] = 0
            candidates.append((running[-1], tuple(dropped)))
    return candidates


def path_end(minimum: Subnet, blocks: Sequence[Sequence[int]] = ()) -> Subnet:
    """Where the path stops: every unit at its minimum, every droppable block dropped."""
    droppable = {unit for stage in blocks for unit in stage}
    return tuple(0 if unit in droppable else floor for unit, floor in enumerate(minimum))


def progressive_search(
    start: Subnet,
    minimum: Subnet,
    steps: Sequence[int],
    accuracy: Callable[[Subnet], float],
    cost: Callable[[Subnet], float],
    *,
    blocks: Sequence[Sequence[int]] = (),
    finetune: Callable[[list[Subnet]], None] | None = None,
    finetune_threshold: float = 0.01,
    on_step: Callable[[list[PathPoint], SearchStats], None] | None = None,
    resume: tuple[Sequence[PathPoint], SearchStats] | None = None,
) -> tuple[list[PathPoint], SearchStats]:
    """Walk from ``start`` to :func:`path_end`; returns the path (start first) and counts.

    Args:
        start, minimum: Channel tuples; ``minimum[u] <= start[u]`` for every unit (the narrowest
            width each unit shrinks to while its block runs).
        steps: Channels removed from each unit per step (a multiple of the channel group).
        blocks: Per stage, the inner units of its droppable blocks in block order; the last running
            one may be dropped at any step. Empty for a network of fixed depth.
        accuracy: Higher is better (e.g. top-1 on the search split after BN recalibration).
        cost: Lower is better (measured or predicted latency; FLOPs as a fallback).
        finetune: Called with the path's subnets when accuracy fell ``finetune_threshold`` below
            its value at the last fine-tune (or the start).
        on_step: Called with the path so far and the counts after each step (to save progress).
        resume: A path this walk already took (starting at ``start``) and its counts: go on from there.
    """
    if len(start) != len(minimum) or len(steps) != len(start):
        raise ValueError("start, minimum and steps need one entry per unit")
    if any(m > s for m, s in zip(minimum, start, strict=True)) or any(step <= 0 for step in steps):
        raise ValueError("minimum must not exceed start in any unit, and steps must be positive")
    if resume is None:
        path = [PathPoint(start, accuracy(start), cost(start))]
        evaluations, finetunes = 1, 0
    else:
        path, evaluations, finetunes = list(resume[0]), resume[1].evaluations, resume[1].finetunes
        if not path or path[0].subnet != start:
            raise ValueError("a resumed path must begin at the start subnet")
    current = path[-1]
    reference = next((p for p in reversed(path) if p.finetuned), path[0]).accuracy
    end = path_end(minimum, blocks)
    while current.subnet != end:
        best: tuple[float, float, PathPoint] | None = None
        for _, subnet in shrink_candidates(current.subnet, minimum, steps, blocks):
            candidate = PathPoint(subnet, accuracy(subnet), cost(subnet))
            evaluations += 1
            saved = current.cost - candidate.cost
            lost = current.accuracy - candidate.accuracy
            # a candidate that saves nothing is taken only if nothing else is left
            score = lost / saved if saved > 0 else math.inf
            key = (score, -saved, candidate)
            if best is None or key[:2] < best[:2]:
                best = key
        assert best is not None
        current = best[2]
        if finetune is not None and reference - current.accuracy > finetune_threshold:
            finetune([point.subnet for point in path] + [current.subnet])
            finetunes += 1
            current = PathPoint(current.subnet, accuracy(current.subnet), current.cost, finetuned=True)
            evaluations += 1
            reference = current.accuracy
        path.append(current)
        if on_step is not None:
            on_step(path, SearchStats(evaluations, finetunes))
    return path, SearchStats(evaluations, finetunes)
