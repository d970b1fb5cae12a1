"""The real scheduler and policy on a virtual clock: ``slimserve bench simulate``.

On this project's shared 2-core machine two identical load tests differ by about a point of
expected accuracy, so a policy change worth half a point cannot be seen there. Here the
scheduler (deadline-ordered queue, expiry, online latency model, collateral accounting) and the
policy run exactly as served, but a batch takes a modelled time on a virtual clock: the table's
latency for its row and size times ``slowdown``, plus hiccups that arrive at a rate per busy
second (each an exponential number of milliseconds). Every policy meets the same arrivals,
budgets and hiccups (one seed per repeat), so what differs is the policy.

What it leaves out: the front end is fixed times before and after the queue (``front_ms``,
``back_ms``) and outside the server (``outside_ms``); no pausing; plain rows only. A figure from
here says what a policy decides, not what a machine does: check a change under load as well.
"""

from __future__ import annotations

import dataclasses
import math
import random
import statistics
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from pydantic import ValidationError

from slimserve.models.schema import SubnetTable, validation_problems
from slimserve.server.engine import profiled_ms, scheduling
from slimserve.server.latency_model import interpolate_batches
from slimserve.server.metrics import Metrics
from slimserve.server.refusals import Rejected
from slimserve.server.runtime import ServedSubnet
from slimserve.server.scheduler import Job, JobResult, Scheduler
from slimserve.server.settings import Settings
from slimserve.server.telemetry import Telemetry


@dataclass(frozen=True)
class Machine:
    """How long a batch takes: the table's time x ``slowdown``, plus hiccups at ``hiccups_per_s``
    per busy second of ``hiccup_ms`` each on average (exponential), as other processes cause."""

    slowdown: float = 1.0
    hiccups_per_s: float = 0.0
    hiccup_ms: float = 0.0
    front_ms: float = 0.5  # from the arrival stamp until queued: reading and decoding (the server sees it)
    back_ms: float = 0.3  # from the batch's end until the answer leaves (the server learns it)
    outside_ms: float = 1.0  # the client's own time, half before the stamp and half after (never seen)
    outside_jitter_ms: float = 0.0  # mean of an exponential extra on top of outside_ms, per request

    def __post_init__(self) -> None:
        if self.slowdown <= 0 or min(self.hiccups_per_s, self.hiccup_ms, self.front_ms, self.back_ms) < 0:
            raise ValueError("the machine's slowdown must be > 0 and its times and hiccup rate >= 0")
        if self.hiccups_per_s > 0 and self.hiccup_ms <= 0:
            raise ValueError("hiccups need a length: --hiccup-ms > 0 with --hiccups-per-s")
        if min(self.outside_ms, self.outside_jitter_ms) < 0:
            raise ValueError("the time outside the server must be >= 0")


@dataclass(frozen=True)
class Load:
    """Arrivals: ``rate`` per second for ``seconds``, gaps exponential (``cv2`` 1) or gamma with that
    squared coefficient of variation (bursts); budgets drawn from ``mix`` (share, milliseconds)."""

    rate: float
    seconds: float
    mix: tuple[tuple[float, float], ...]
    cv2: float = 1.0

    def __post_init__(self) -> None:
        if min(self.rate, self.seconds, self.cv2) <= 0:
            raise ValueError("rate, seconds and cv2 must be > 0")

    def arrivals(self, rng: random.Random) -> list[tuple[float, float]]:
        """(send time, budget) in seconds, in order of sending."""
        shares, budgets = zip(*self.mix, strict=True)
        sent: list[tuple[float, float]] = []
        time = 0.0
        while True:
            time += rng.gammavariate(1 / self.cv2, self.cv2 / self.rate)
            if time >= self.seconds:
                return sent
            sent.append((time, rng.choices(budgets, shares)[0] / 1000))


def parse_mix(text: str) -> tuple[tuple[float, float], ...]:
    """``30:60,50:100,20:250`` (percent:milliseconds) -> ((30, 60), (50, 100), (20, 250)); a
    ValueError names what is wrong."""
    mix = []
    for part in text.split(","):
        share, colon, budget = part.partition(":")
        try:
            pair = (float(share), float(budget))
        except ValueError:
            pair = (0.0, 0.0)
        if not colon or not all(math.isfinite(v) and v > 0 for v in pair):
            raise ValueError(f"budget mix {text!r}: {part!r} is not percent:milliseconds with both > 0")
        mix.append(pair)
    return tuple(mix)


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class _Runtime:
    """Stands in for ModelRuntime: a batch advances the virtual clock by the machine's time for it."""

    def __init__(
        self, table: SubnetTable, column: str, max_batch: int, machine: Machine, clock: _Clock, rng: random.Random
    ) -> None:
        self.machine, self.clock, self.rng = machine, clock, rng
        widest = max(1, sum(table.subnets[-1].channels))
        self.subnets = [
            ServedSubnet(i, row, torch.nn.Identity(), sum(row.channels) / widest, ())
            for i, row in enumerate(table.subnets)
        ]
        self.ms = [interpolate_batches(row, max_batch) for row in profiled_ms(table.subnets, column)]

    def infer(self, subnet: int, images: torch.Tensor) -> torch.Tensor:
        duration = self.ms[subnet][images.shape[0] - 1] / 1000 * self.machine.slowdown
        hiccups = _poisson(self.rng, self.machine.hiccups_per_s * duration)
        duration += sum(self.rng.expovariate(1000 / self.machine.hiccup_ms) for _ in range(hiccups))
        self.clock.now += duration
        return torch.zeros(images.shape[0], 1)


def _poisson(rng: random.Random, mean: float) -> int:
    count, threshold, product = 0, math.exp(-mean), rng.random()
    while product > threshold:
        count += 1
        product *= rng.random()
    return count


def parse_policy_spec(spec: str) -> Settings:
    """``adaptive``, ``static:s4``, or either with ``+name=value`` server settings, e.g.
    ``adaptive+split-batches=true`` (a ValueError names a setting that does not exist)."""
    base, *overrides = spec.split("+")
    values: dict[str, Any] = {"policy": base}
    for override in overrides:
        name, equals, value = override.partition("=")
        field = name.replace("-", "_")
        if not equals or field not in Settings.model_fields:
            raise ValueError(f"policy {spec!r}: {override!r} is not name=value of a server setting")
        values[field] = value
    try:
        return Settings(**values)
    except ValidationError as error:
        problems = validation_problems(error, "settings")
        raise ValueError(f"policy {spec!r}: {problems}") from None


def simulate(table: SubnetTable, column: str, spec: str, load: Load, machine: Machine, seed: int = 0) -> dict[str, Any]:
    """One run: every request's fate under policy ``spec``; the summary a load test reports."""
    settings = parse_policy_spec(spec)
    rng = random.Random(seed)
    sent = load.arrivals(rng)
    clock = _Clock()
    runtime = _Runtime(table, column, settings.max_batch, machine, clock, random.Random(seed + 1))
    policy, latency_model = scheduling(settings, table.subnets, column)
    scheduler = Scheduler(runtime, policy, latency_model, settings, Telemetry(), Metrics(), clock)  # type: ignore[arg-type]
    outcomes: list[tuple[float, float, float, JobResult | Rejected]] = []  # (sent, budget, way back, outcome)
    image = torch.zeros(1, 1, 1, dtype=torch.uint8)
    jitter = random.Random(seed + 2)
    outside = [
        (machine.outside_ms + (jitter.expovariate(1 / machine.outside_jitter_ms) if machine.outside_jitter_ms else 0))
        / 1000
        for _ in sent
    ]  # per request, half before the arrival stamp and half after the answer leaves
    back = machine.back_ms / 1000
    queued_at = [t + o / 2 + machine.front_ms / 1000 for (t, _), o in zip(sent, outside, strict=True)]
    position = 0
    while position < len(sent) or scheduler.depth:
        if not scheduler.depth and clock.now < queued_at[position]:
            clock.now = queued_at[position]  # idle until the next request is queued
        while position < len(sent) and queued_at[position] <= clock.now:
            sent_at, budget = sent[position]
            half = outside[position] / 2

            def resolve(
                outcome: JobResult | Rejected, sent_at: float = sent_at, budget: float = budget, half: float = half
            ) -> None:
                outcomes.append((sent_at, budget, back + half, outcome))  # the answer's way back: after the batch
                if isinstance(outcome, JobResult):
                    scheduler.observe_post_overhead(back)

            try:
                scheduler.submit(Job(image=image, arrival=sent_at + half, budget=budget, resolve=resolve))
            except Rejected as refusal:
                resolve(refusal)
            position += 1
        scheduler.dispatch()
    return summarize(outcomes)


def summarize(outcomes: Sequence[tuple[float, float, float, JobResult | Rejected]]) -> dict[str, Any]:
    """Attainment, expected effective accuracy (the table accuracy of the row that answered each
    request in budget, over requests sent), each budget's attainment and the rows used."""
    in_budget: list[float] = []
    per_budget: dict[float, list[bool]] = {}
    rows: Counter[str] = Counter()
    for sent_at, budget, way_back, outcome in outcomes:
        met = isinstance(outcome, JobResult) and outcome.finished + way_back <= sent_at + budget
        per_budget.setdefault(budget, []).append(met)
        if isinstance(outcome, JobResult):
            rows[outcome.subnet.row.id] += 1
            if met:
                in_budget.append(outcome.subnet.row.accuracy)
    sent = len(outcomes)
    return {
        "sent": sent,
        "slo_attainment": len(in_budget) / sent if sent else 0.0,
        "expected_effective_accuracy": sum(in_budget) / sent if sent else 0.0,
        "attainment_by_budget_ms": {
            f"{budget * 1000:g}": round(sum(met) / len(met), 4) for budget, met in sorted(per_budget.items())
        },
        "rows": dict(sorted(rows.items())),
    }


def compare(
    table: SubnetTable,
    column: str,
    specs: Sequence[str],
    load: Load,
    machine: Machine,
    repeats: int = 5,
    seed: int = 0,
) -> dict[str, Any]:
    """Every policy on the same ``repeats`` seeds; medians, and each policy's difference from the
    first one seed by seed (paired: same arrivals, same hiccups)."""
    if not specs or repeats < 1:
        raise ValueError("a simulation needs at least one policy and one repeat")
    runs = {spec: [simulate(table, column, spec, load, machine, seed + r) for r in range(repeats)] for spec in specs}
    first = runs[specs[0]]
    summary: dict[str, Any] = {}
    for spec, results in runs.items():
        entry: dict[str, Any] = {}
        for metric in ("slo_attainment", "expected_effective_accuracy"):
            values = [r[metric] for r in results]
            entry[metric] = {"median": statistics.median(values), "min": min(values), "max": max(values)}
            if spec != specs[0]:
                entry[f"{metric}_minus_{specs[0]}"] = [
                    round(r[metric] - f[metric], 5) for r, f in zip(results, first, strict=True)
                ]
        summary[spec] = entry
    return {
        "column": column,
        "load": dataclasses.asdict(load),
        "machine": dataclasses.asdict(machine),
        "repeats": repeats,
        "medians": summary,
        "runs": runs,
    }
