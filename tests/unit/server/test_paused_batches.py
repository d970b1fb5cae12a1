"""A running batch paused between its steps so that a request that cannot wait for it runs first.

The model side is checked on a real (tiny, untrained) bundle: run step by step, a row answers
exactly what it answers whole. The scheduler side uses the fake model and clock of
test_scheduler.py, extended with steps: a request "arrives" while the batch is paused (the hook an
inference process uses to read its socket), so every outcome is decided by virtual time alone.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from slimserve.models.bundle import load_bundle
from slimserve.models.registry import segments_of
from slimserve.server.policy import StaticPolicy
from slimserve.server.runtime import ModelRuntime, ServedSubnet
from slimserve.server.scheduler import Job, JobResult
from tests.helpers import make_tiny_bundle
from tests.unit.server.test_scheduler import FakeClock, FakeRuntime, make

STEPS = 10


def test_a_plain_module_is_one_step() -> None:
    module = torch.nn.Identity()
    assert segments_of(module) == (module,)


def test_a_row_run_step_by_step_answers_what_it_answers_whole(tmp_path: Path) -> None:
    bundle = load_bundle(make_tiny_bundle(tmp_path, resolutions=(None, 20, None)))
    runtime = ModelRuntime(bundle, threads=1)
    images = torch.randint(0, 256, (3, *runtime.input_shape), dtype=torch.uint8)
    for subnet in runtime.subnets:
        assert len(subnet.segments) == sum(subnet.depths) + 2  # stem, each residual block, head
        progress = runtime.begin(subnet.index, images)
        with pytest.raises(RuntimeError, match="has run 0 of its"):
            _ = progress.probabilities
        while not progress.finished:
            progress.step()
        torch.testing.assert_close(progress.probabilities, runtime.infer(subnet.index, images), rtol=0, atol=0)


# --- the scheduler


class SteppedRuntime(FakeRuntime):
    """The fake model, each row in :data:`STEPS` equal steps; ``on_step`` runs after each step."""

    def __init__(self, clock: FakeClock) -> None:
        super().__init__(clock)
        self.subnets = [
            ServedSubnet(s.index, s.row, s.module, s.width, s.depths, segments=(torch.nn.Identity(),) * STEPS)
            for s in self.subnets
        ]
        self.steps_run: list[tuple[int, int]] = []  # (subnet, batch) per step

    def begin(self, subnet: int, images: torch.Tensor) -> _Progress:
        return _Progress(self, subnet, images)


class _Progress:
    def __init__(self, runtime: SteppedRuntime, subnet: int, images: torch.Tensor) -> None:
        self.runtime, self.subnet, self.images = runtime, subnet, images
        self.total, self.done = STEPS, 0
        self.step_seconds = FakeRuntime.seconds(subnet, images.shape[0]) / STEPS

    @property
    def finished(self) -> bool:
        return self.done == self.total

    def step(self) -> None:
        self.runtime.clock.advance(self.step_seconds)
        self.runtime.steps_run.append((self.subnet, self.images.shape[0]))
        self.done += 1
        if self.finished:
            self.runtime.calls.append((self.subnet, self.images.shape[0]))

    @property
    def probabilities(self) -> torch.Tensor:
        return FakeRuntime.answers(self.images)


def stepped(policy=None, **settings):
    return make(policy, SteppedRuntime, **settings)


def arrives_at_step(step: int, submit):
    """The hook an inference process passes: here it delivers one request when the batch pauses at ``step``."""
    pauses = {"count": 0}

    def between_steps() -> None:
        pauses["count"] += 1
        if pauses["count"] == step:
            submit()

    return between_steps


def result(collector, tag: int) -> JobResult:
    (outcome,) = collector.outcomes[tag]
    assert isinstance(outcome, JobResult), outcome
    return outcome


def test_a_tight_request_arriving_mid_batch_runs_first_and_the_batch_resumes_on_time() -> None:
    scheduler, runtime, collector = stepped(StaticPolicy(2))  # s2: 4.4 ms predicted at batch 1, 0.4 ms a step
    loose = collector.job(1, budget_s=0.050)
    scheduler.submit(loose)
    arrived: list[Job] = []  # 1.7 ms after the 3.3 ms margin; 3.1 ms more of the batch would make it miss

    def tight_arrives() -> None:
        arrived.append(collector.job(2, budget_s=0.005))
        scheduler.submit(arrived[0])

    scheduler.dispatch(arrives_at_step(3, tight_arrives))
    first, second = result(collector, 2), result(collector, 1)
    assert first.finished < second.finished  # answered before the batch it arrived during
    assert first.finished <= arrived[0].deadline and second.finished <= loose.deadline
    assert first.subnet.index == 0  # s2 no longer fits it; the fastest row does
    assert runtime.steps_run == [(2, 1)] * STEPS and runtime.calls == [(0, 1), (2, 1)]
    assert second.inference == pytest.approx(0.004)  # the paused batch's own time, not the urgent one's
    assert scheduler.metrics.pauses._value.get() == 1


def test_without_pausing_the_same_request_waits_for_the_batch_and_misses() -> None:
    scheduler, runtime, collector = stepped(StaticPolicy(2), pause_batches=False)
    scheduler.submit(collector.job(1, budget_s=0.050))
    scheduler.dispatch(lambda: pytest.fail("a batch that may not pause has no steps to pause between"))
    tight = collector.job(2, budget_s=0.005, arrival=1000.0012)  # arrived 1.2 ms into the 4 ms batch
    scheduler.submit(tight)
    scheduler.dispatch()
    assert runtime.steps_run == [] and result(collector, 2).finished > tight.deadline


def test_a_gpu_server_runs_every_batch_whole() -> None:
    scheduler, runtime, collector = stepped(StaticPolicy(2), device="cuda:0")
    scheduler.submit(collector.job(1, budget_s=0.050))
    scheduler.dispatch(lambda: pytest.fail("a GPU batch has no steps to pause between"))
    assert runtime.steps_run == [] and runtime.calls == [(2, 1)]


def test_a_request_that_can_wait_for_the_batch_does_not_pause_it() -> None:
    scheduler, runtime, collector = stepped(StaticPolicy(2))
    scheduler.submit(collector.job(1, budget_s=0.050))
    scheduler.dispatch(arrives_at_step(3, lambda: scheduler.submit(collector.job(2, budget_s=0.040))))
    assert runtime.calls == [(2, 1)]  # only the first batch ran in this dispatch
    assert scheduler.depth == 1 and scheduler.metrics.pauses._value.get() == 0


def test_no_pause_that_would_make_the_paused_batch_miss() -> None:
    scheduler, _runtime, collector = stepped(StaticPolicy(2))
    first = collector.job(1, budget_s=0.0085)  # 5.2 ms after the margin: 4.4 ms predicted, 0.8 ms spare
    scheduler.submit(first)
    # At the third pause 3.1 ms of it remain; running the urgent one (1.1 ms) first would make `first` late.
    scheduler.dispatch(arrives_at_step(3, lambda: scheduler.submit(collector.job(2, budget_s=0.005))))
    assert result(collector, 1).finished <= first.deadline
    assert 2 not in collector.outcomes and scheduler.depth == 1


def test_an_adaptive_server_gives_the_urgent_request_the_widest_row_that_still_fits() -> None:
    scheduler, _runtime, collector = stepped()
    scheduler.submit(collector.job(1, budget_s=0.050))  # alone and loose: the widest row (4 ms)
    arrived: list[Job] = []  # 2.9 ms after the margin: s1 (2.2 ms predicted) fits, s2 does not

    def tight_arrives() -> None:
        arrived.append(collector.job(2, budget_s=0.0062))
        scheduler.submit(arrived[0])

    scheduler.dispatch(arrives_at_step(2, tight_arrives))
    assert result(collector, 1).subnet.index == 2
    assert result(collector, 2).subnet.index == 1 and result(collector, 2).finished <= arrived[0].deadline


def test_counting_pauses_gives_a_loose_request_the_wide_row_that_tight_arrivals_would_forbid() -> None:
    def row_for_a_loose_request(**settings) -> int:
        scheduler, runtime, collector = stepped(**settings)
        for tag in range(20):  # tight requests at 50 req/s, each with 1.7 ms left when queued
            scheduler.submit(collector.job(tag, budget_s=0.005))
            scheduler.dispatch()
            runtime.clock.advance(0.020)
        scheduler.submit(collector.job(99, budget_s=0.050))
        scheduler.dispatch()
        return result(collector, 99).subnet.index

    # Whole, s2's 4 ms batch would make 83% of the tight requests arriving during it miss (they wait
    # out the rest of it, then 1 ms on s0, with 1.7 ms left): at ~16 req/s that is 0.053 misses,
    # priced 3 x 0.8 each, more than s2's 0.1 gain, so the loose request gets s1 (2 ms). Paused, an
    # arrival waits at most one 0.4 ms step, and s2 costs nobody a miss.
    assert row_for_a_loose_request() == 1
    assert row_for_a_loose_request(count_pauses=True) == 2
    assert row_for_a_loose_request(count_pauses=True, pause_batches=False) == 1  # nothing to count on
