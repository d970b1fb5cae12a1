"""The queue and the worker, with a fake model whose latency and call count we control.

Time is virtual: the scheduler reads a :class:`FakeClock` that moves only when the fake model
"runs" (by its profiled time) or a test advances it, so no outcome depends on how busy the machine
running the tests is.
"""

from __future__ import annotations

import random
import threading
import time

import pytest
import torch

from slimserve.models.schema import SubnetTable
from slimserve.server.latency_model import LatencyModel
from slimserve.server.metrics import Metrics
from slimserve.server.policy import AdaptivePolicy, StaticPolicy
from slimserve.server.refusals import DeadlineMissed, Draining, QueueFull, Refused, Rejected
from slimserve.server.runtime import ServedSubnet
from slimserve.server.scheduler import Job, JobResult, Scheduler
from slimserve.server.settings import Settings
from slimserve.server.telemetry import Telemetry
from tests.helpers import table_dict

TABLE = SubnetTable.model_validate(table_dict(3))
PROFILE = [{1: 1.0, 8: 2.0, 32: 6.0}, {1: 2.0, 8: 5.0, 32: 14.0}, {1: 4.0, 8: 10.0, 32: 30.0}]  # ms


class FakeClock:
    """Virtual seconds, shared by the test thread and the scheduler's worker."""

    def __init__(self) -> None:
        self._now = 1000.0
        self._lock = threading.Lock()

    def __call__(self) -> float:
        with self._lock:
            return self._now

    def advance(self, seconds: float) -> None:
        with self._lock:
            self._now += seconds


class FakeRuntime:
    """Takes its profiled time on the fake clock; records which subnet ran which batch."""

    threads = 1

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.subnets = [
            ServedSubnet(i, row, torch.nn.Identity(), (i + 1) / 3, (1, 1, 1)) for i, row in enumerate(TABLE.subnets)
        ]
        self.calls: list[tuple[int, int]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.warmed_on: list[str] = []  # the threads that warmed themselves, before any call
        self.warm_error: Exception | None = None

    def warm_this_thread(self, max_batch: int) -> float:
        if self.warm_error is not None:
            raise self.warm_error
        assert not self.calls, "warmed after serving"
        self.warmed_on.append(threading.current_thread().name)
        return 0.0

    @property
    def model_calls(self) -> int:
        return len(self.calls)

    def infer(self, subnet: int, images: torch.Tensor) -> torch.Tensor:
        self.gate.wait()
        batch = images.shape[0]
        self.calls.append((subnet, batch))
        self.clock.advance(self.seconds(subnet, batch))
        return self.answers(images)

    @staticmethod
    def seconds(subnet: int, batch: int) -> float:
        """The profile's time, linear between batch 1 and 8."""
        profile = PROFILE[subnet]
        return profile[1] / 1000 + (profile[8] - profile[1]) / 7000 * (batch - 1)

    @staticmethod
    def answers(images: torch.Tensor) -> torch.Tensor:
        """Each image's "probabilities" encode its own first pixel, so answers can be traced to requests."""
        return torch.nn.functional.one_hot(images[:, 0, 0, 0].long() % 10, 10).float()


class Collector:
    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.outcomes: dict[int, list[JobResult | Rejected]] = {}
        self.lock = threading.Lock()
        self.done = threading.Condition(self.lock)

    def job(self, tag: int, budget_s: float, arrival: float | None = None) -> Job:
        def resolve(outcome: JobResult | Rejected) -> None:
            with self.lock:
                self.outcomes.setdefault(tag, []).append(outcome)
                self.done.notify_all()

        image = torch.full((1, 2, 2), tag % 256, dtype=torch.uint8)
        return Job(image=image, arrival=self.clock() if arrival is None else arrival, budget=budget_s, resolve=resolve)

    def wait(self, count: int, timeout: float = 10.0) -> None:
        with self.done:
            assert self.done.wait_for(lambda: len(self.outcomes) >= count, timeout), (
                f"only {len(self.outcomes)} of {count} answered"
            )


def make(
    policy=None, runtime_class: type[FakeRuntime] = FakeRuntime, **settings
) -> tuple[Scheduler, FakeRuntime, Collector]:
    clock = FakeClock()
    runtime = runtime_class(clock)
    config = Settings(max_batch=8, max_queue=64, **settings)
    model = LatencyModel(PROFILE, 8, initial_deviation=0.05)
    scheduler = Scheduler(
        runtime,  # type: ignore[arg-type]
        policy or AdaptivePolicy((0.8, 0.85, 0.9)),
        model,
        config,
        Telemetry(),
        Metrics(),
        clock,
    )
    return scheduler, runtime, Collector(clock)


def wait_until_idle(scheduler: Scheduler, runtime: FakeRuntime, calls: int) -> None:
    """Real-time synchronization only (never a measurement): the worker has taken everything queued."""
    deadline = time.monotonic() + 10
    while (scheduler.depth or runtime.model_calls < calls) and time.monotonic() < deadline:
        time.sleep(0.001)
    assert not scheduler.depth, "the worker did not take the queued jobs"


def test_each_request_is_answered_once_with_its_own_result() -> None:
    scheduler, runtime, collector = make()
    scheduler.start()
    jobs = [collector.job(tag, random.Random(tag).choice([0.005, 0.02, 0.2])) for tag in range(60)]
    for job in jobs:
        scheduler.submit(job)
    collector.wait(60)
    scheduler.stop(5)
    assert all(len(outcomes) == 1 for outcomes in collector.outcomes.values())
    for tag, (outcome,) in collector.outcomes.items():
        if isinstance(outcome, JobResult):
            assert int(outcome.probabilities.argmax()) == tag % 10
    assert sum(batch for _, batch in runtime.calls) == sum(
        isinstance(o[0], JobResult) for o in collector.outcomes.values()
    )


def test_the_worker_warms_its_own_thread_before_start_returns() -> None:
    scheduler, runtime, _collector = make()
    scheduler.start()
    assert runtime.warmed_on == ["slimserve-inference"]  # the thread that runs batches, not the caller's
    scheduler.stop(5)


def test_start_raises_what_warming_the_worker_raised() -> None:
    scheduler, runtime, _collector = make()
    runtime.warm_error = RuntimeError("CUDA out of memory")
    with pytest.raises(RuntimeError, match="CUDA out of memory"):
        scheduler.start()
    assert runtime.model_calls == 0


def test_the_budgets_the_policy_expects_of_new_arrivals_are_what_requests_had_left_when_queued() -> None:
    # A 10 ms budget, 4 ms of it spent in the front end, less the 3 ms safety margin and the answer
    # path (0.3 ms): a request like it arriving during a batch has 2.7 ms left, not 6.7.
    scheduler, _, collector = make(safety_margin_ms=3.0)
    scheduler.submit(collector.job(1, 0.010, arrival=collector.clock() - 0.004))
    budgets = scheduler._context(collector.clock(), 1.0).budgets
    assert budgets is not None and budgets.ascending == (pytest.approx(0.0027),)


def test_a_deadline_spent_in_the_queue_gets_504_without_running_the_model() -> None:
    scheduler, runtime, collector = make()
    scheduler.submit(collector.job(1, 0.010, arrival=collector.clock() - 0.050))  # arrived 50 ms ago
    scheduler.start()
    collector.wait(1)
    scheduler.stop(5)
    (outcome,) = collector.outcomes[1]
    assert isinstance(outcome, DeadlineMissed) and outcome.reason == Refused.DEADLINE
    assert "model was not run" in str(outcome)
    assert runtime.model_calls == 0
    assert scheduler.collateral.misses == 0  # no upgraded batch ran: not the price of an upgrade


def test_an_upgrade_is_charged_its_modelled_extra_time_not_a_stall_that_held_it_up() -> None:
    scheduler, runtime, collector = make()
    runtime.gate.clear()  # the upgraded batch stalls
    scheduler.start()
    scheduler.submit(collector.job(1, 0.200))  # idle server, loose budget: the widest subnet
    wait_until_idle(scheduler, runtime, calls=1)
    scheduler.submit(collector.job(2, 0.020))  # arrives during the stall and misses because of it
    collector.clock.advance(0.040)  # the stall
    runtime.gate.set()
    collector.wait(2)
    scheduler.stop(5)
    assert runtime.calls[0] == (2, 1)
    assert isinstance(collector.outcomes[2][0], DeadlineMissed)
    # Subnet 2 costs a few ms more than subnet 0 as modelled; the request was ~20 ms late: the
    # stall, which would have held up subnet 0 as well, explains its miss - not the upgrade.
    model = scheduler.latency_model
    assert scheduler.collateral.extra_seconds == pytest.approx(model.expected(2, 1) - model.expected(0, 1), rel=0.05)
    assert scheduler.collateral.extra_seconds < 0.015
    assert scheduler.collateral.misses == 0


def test_a_miss_counts_against_upgrades_when_their_delay_exceeds_its_lateness() -> None:
    scheduler, _runtime, collector = make()
    scheduler.post_overhead = 0.001  # 1 ms from result to response
    queued_before = collector.job(1, 0.010)
    deadline = queued_before.deadline
    scheduler._upgrade_delay_total = 0.012  # upgrades added 12 ms of busy time since it was queued
    now = collector.clock()
    # result 2 ms after the deadline, response 3 ms late: explained by the upgrades' 12 ms
    scheduler._count_if_collateral(queued_before, finish=deadline + 0.002, now=now)
    assert scheduler.collateral.misses == 1
    scheduler._count_if_collateral(queued_before, finish=deadline + 0.029, now=now)  # 30 ms late: not explained
    assert scheduler.collateral.misses == 1
    queued_after = collector.job(2, 0.010)
    queued_after.upgrade_delay_mark = 0.012  # queued after those upgrades: they did not delay it
    scheduler._count_if_collateral(queued_after, finish=queued_after.deadline, now=now)
    assert scheduler.collateral.misses == 1


def test_a_result_inside_the_safety_margin_is_no_miss_but_one_sent_after_the_budget_is() -> None:
    scheduler, _runtime, collector = make(safety_margin_ms=3.0)
    scheduler.post_overhead = 0.001
    job = collector.job(1, 0.010)
    scheduler._upgrade_delay_total = 0.012
    now = collector.clock()
    # ready 2.5 ms into the 3 ms margin: sent 1 ms later, 1.5 ms before the budget ends - reported met
    scheduler._count_if_collateral(job, finish=job.deadline - 0.0025, now=now)
    assert scheduler.collateral.misses == 0
    # ready 0.5 ms before the budget ends: sent 0.5 ms after it - reported missed, and the upgrades explain it
    scheduler._count_if_collateral(job, finish=job.deadline - 0.0005, now=now)
    assert scheduler.collateral.misses == 1


def test_reject_mode_refuses_impossible_budgets_at_the_door() -> None:
    scheduler, runtime, collector = make(infeasible_action="reject", safety_margin_ms=0.0)
    with pytest.raises(DeadlineMissed, match="no subnet can answer"):
        scheduler.submit(collector.job(1, 0.0005))
    assert runtime.model_calls == 0


def test_best_effort_runs_impossible_budgets_on_the_fastest_subnet() -> None:
    scheduler, _runtime, collector = make(safety_margin_ms=0.0)
    scheduler.start()
    scheduler.submit(collector.job(1, 0.0008))  # below the fastest subnet's 1 ms
    collector.wait(1)
    scheduler.stop(5)
    (outcome,) = collector.outcomes[1]
    assert isinstance(outcome, JobResult) and outcome.subnet.index == 0  # run, late, on the fastest


def test_a_full_queue_refuses_as_overloaded_with_retry_after() -> None:
    scheduler, runtime, collector = make()
    for tag in range(64):
        scheduler.submit(collector.job(tag, 10.0))
    with pytest.raises(QueueFull) as error:
        scheduler.submit(collector.job(99, 10.0))
    assert error.value.reason == Refused.OVERLOADED and error.value.retry_after >= 1
    scheduler.start()
    collector.wait(64)
    scheduler.stop(5)
    assert runtime.model_calls > 0


def test_draining_refuses_new_work_but_finishes_queued_work() -> None:
    scheduler, runtime, collector = make()
    runtime.gate.clear()
    scheduler.start()
    for tag in range(10):
        scheduler.submit(collector.job(tag, 5.0))
    scheduler.begin_drain()
    with pytest.raises(Draining):
        scheduler.submit(collector.job(50, 5.0))
    runtime.gate.set()
    assert scheduler.stop(5)
    assert sorted(collector.outcomes) == list(range(10))
    assert all(isinstance(o[0], JobResult) for o in collector.outcomes.values())


def test_tight_budgets_get_smaller_subnets_than_loose_ones_under_the_same_load() -> None:
    scheduler, _runtime, collector = make()
    scheduler.start()
    for round_ in range(20):
        scheduler.submit(collector.job(2 * round_, 0.0025))
        scheduler.submit(collector.job(2 * round_ + 1, 0.100))
        collector.wait(2 * round_ + 2)
        collector.clock.advance(0.006)
    scheduler.stop(5)
    tight = [o[0].subnet.index for t, o in collector.outcomes.items() if t % 2 == 0 and isinstance(o[0], JobResult)]
    loose = [o[0].subnet.index for t, o in collector.outcomes.items() if t % 2 == 1 and isinstance(o[0], JobResult)]
    assert sum(tight) / len(tight) < sum(loose) / len(loose)
    assert max(loose) == 2


def test_a_static_policy_always_runs_its_subnet() -> None:
    scheduler, runtime, collector = make(StaticPolicy(1))
    scheduler.start()
    for tag in range(12):
        scheduler.submit(collector.job(tag, 0.05))
    collector.wait(12)
    scheduler.stop(5)
    assert {subnet for subnet, _ in runtime.calls} == {1}


def test_a_failing_model_still_answers_every_request() -> None:
    scheduler, runtime, collector = make()

    def broken(subnet: int, images: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("boom")

    runtime.infer = broken  # type: ignore[method-assign]
    scheduler.start()
    for tag in range(5):
        scheduler.submit(collector.job(tag, 1.0))
    collector.wait(5)
    scheduler.stop(5)
    assert all(
        isinstance(o[0], Rejected) and o[0].reason == Refused.FAILED and "inference failed" in str(o[0])
        for o in collector.outcomes.values()
    )
