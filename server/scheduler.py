"""The deadline-ordered queue and the inference worker that drains it.

Requests are queued earliest-deadline-first. Every dispatch takes the whole queue into account:
it refuses requests whose deadline already passed (without running the model), asks the
policy for (subnet, batch size), runs the batch, feeds the measured latency back into the latency
model, and resolves each request exactly once. Dispatches run either on the scheduler's own worker
thread (:meth:`Scheduler.start`, inference in the HTTP process) or on the main thread of a separate
inference process, which calls :meth:`Scheduler.dispatch` itself (server/engine_host.py).
"""

from __future__ import annotations

import bisect
import functools
import itertools
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from slimserve.server.collateral import CollateralRate
from slimserve.server.latency_model import ArrivalRate, LatencyModel
from slimserve.server.metrics import Metrics
from slimserve.server.policy import Context, Decision, Pending, Policy, RecentBudgets, fastest_fallback
from slimserve.server.refusals import DeadlineMissed, Draining, QueueFull, Refused, Rejected
from slimserve.server.runtime import ModelRuntime, ServedSubnet
from slimserve.server.settings import Settings
from slimserve.server.telemetry import Telemetry, load_factor

log = logging.getLogger(__name__)

RECENT_BUDGETS = 256  # requests whose budgets the adaptive policy expects of the next arrivals


@dataclass(frozen=True)
class JobResult:
    probabilities: Tensor  # [classes]
    subnet: ServedSubnet
    batch_size: int
    queued: float  # seconds from enqueue to dispatch
    inference: float  # seconds the batch took
    finished: float  # scheduler clock when the result was ready
    predicted: float  # seconds the policy expected the batch to take
    stage: int = -1  # multi-stage bundles: the stage (0-based) that answered; -1 otherwise
    cut_short: bool = False  # answered at an earlier stage because the next would have missed the deadline
    blocks_run: int = -1  # gated bundles: residual blocks whose branch ran for this image; -1 otherwise
    groups_run: float = -1.0  # gated bundles: share of the blocks' channel groups computed for it


Resolve = Callable[[JobResult | Rejected], None]


@dataclass
class Job:
    """One queued request. ``resolve`` is called exactly once, from the worker thread."""

    image: Tensor  # uint8 [C, H, W]
    arrival: float  # scheduler clock when the request arrived (before reading and decoding the body)
    budget: float  # seconds
    resolve: Resolve
    cancelled: Callable[[], bool] = lambda: False
    enqueued: float = 0.0
    pending: Pending = field(default_factory=lambda: Pending(0.0, 0.0))
    sequence: int = 0
    upgrade_delay_mark: float = 0.0  # the scheduler's upgrade delay total when this job was queued

    @property
    def deadline(self) -> float:
        return self.arrival + self.budget


class Scheduler:
    """Owns the queue, the policy, the latency model and the worker thread."""

    def __init__(
        self,
        runtime: ModelRuntime,
        policy: Policy,
        latency_model: LatencyModel,
        settings: Settings,
        telemetry: Telemetry,
        metrics: Metrics,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.runtime, self.policy, self.latency_model = runtime, policy, latency_model
        self.settings, self.telemetry, self.metrics, self.clock = settings, telemetry, metrics, clock
        self.arrivals = ArrivalRate()
        self.collateral = CollateralRate()
        # Extra busy seconds that batches on wider-than-fastest subnets have added since start-up;
        # a job notes it when queued, so at a miss the difference is the delay upgrades imposed on it.
        self._upgrade_delay_total = 0.0
        # what recent requests had left when queued: budget less the safety margin and the front end's time
        self._recent_budgets: deque[float] = deque(maxlen=RECENT_BUDGETS)
        self.post_overhead = 0.0003  # seconds from result to response sent, learned (EWMA)
        self.busy_fraction = 0.0  # share of recent wall time spent in inference (EWMA)
        self._queue: list[Job] = []
        self._condition = threading.Condition()
        self._sequence = itertools.count()
        self._draining = False
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._last_end = clock()  # when the last batch ended, for the busy fraction
        self.dispatches = 0
        # on a GPU a batch is ~1 ms and each step would need a sync (+15-18%): nothing worth pausing
        self.pausable = settings.pause_batches and settings.device == "cpu"
        # what the policy may count on: a plain row's batch runs a step at a time (one step elsewhere)
        self._pause_steps = (
            tuple(max(1, len(subnet.segments)) for subnet in runtime.subnets)
            if self.pausable and settings.count_pauses
            else None
        )

    # --- called from the event loop -------------------------------------------------------

    @property
    def depth(self) -> int:
        return len(self._queue)

    @property
    def full(self) -> bool:
        """No room for another request: new ones get 503 + Retry-After."""
        return len(self._queue) >= self.settings.max_queue

    @property
    def draining(self) -> bool:
        return self._draining

    def load(self) -> float:
        sample = self.telemetry.latest
        return load_factor(
            sample, self.settings.load_sensitivity, self.busy_fraction if sample.gpu_percent is not None else None
        )

    def submit(self, job: Job) -> None:
        """Queue a job or raise :class:`Rejected`: queue full, draining, or (with ``reject``) a deadline no subnet can meet."""
        now = self.clock()
        margin = self.settings.safety_margin_ms / 1000.0 + self.post_overhead
        job.enqueued = now
        job.pending = Pending(deadline=job.deadline - margin, budget=max(job.budget - margin, 0.0))
        with self._condition:
            if self._draining:
                raise Draining()
            if self.full:
                raise QueueFull(len(self._queue), self.retry_after())
            if (
                self.settings.infeasible_action == "reject"
                and now + self.latency_model.predict(0, 1, self.load()) > job.pending.deadline
            ):
                raise DeadlineMissed(
                    f"no subnet can answer within {job.budget * 1000:.1f} ms (fastest predicted "
                    f"{self.latency_model.predict(0, 1, self.load()) * 1000:.2f} ms after queueing)"
                )
            job.sequence = next(self._sequence)
            job.upgrade_delay_mark = self._upgrade_delay_total
            self._recent_budgets.append(max(job.pending.deadline - now, 0.0))
            bisect.insort(self._queue, job, key=lambda j: (j.pending.deadline, j.sequence))
            self.arrivals.record(now)
            self.metrics.queue_depth.set(len(self._queue))
            self._condition.notify()

    def retry_after(self) -> int:
        """Seconds until the current backlog should be gone, served by the fastest subnet in full batches."""
        per_item = self.latency_model.predict(0, self.settings.max_batch, self.load()) / self.settings.max_batch
        return max(1, math.ceil(len(self._queue) * per_item))

    def observe_post_overhead(self, seconds: float) -> None:
        if 0 <= seconds < 1:
            self.post_overhead += 0.05 * (seconds - self.post_overhead)

    # --- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        """Start the worker thread; return once it has warmed itself to serve (raise what warming raised)."""
        warmed = threading.Event()
        failure: list[Exception] = []
        self._thread = threading.Thread(
            target=self._run, args=(warmed, failure), name="slimserve-inference", daemon=True
        )
        self._thread.start()
        warmed.wait()
        if failure:
            raise failure[0]

    def begin_drain(self) -> None:
        """Refuse new requests; keep serving the queued ones."""
        with self._condition:
            self._draining = True

    def stop(self, timeout: float) -> bool:
        """Drain the queue (up to ``timeout`` seconds), then stop the worker. True if it stopped."""
        self.begin_drain()
        with self._condition:
            self._stopping = True
            self._condition.notify_all()
        if self._thread is None:
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()

    # --- the worker -----------------------------------------------------------------------

    def _run(self, warmed: threading.Event, failure: list[Exception]) -> None:
        try:
            self.runtime.warm_this_thread(self.settings.max_batch)
        except Exception as error:
            failure.append(error)
            return
        finally:
            warmed.set()
        while True:
            with self._condition:
                while not self._queue and not self._stopping:
                    self._condition.wait()
                if not self._queue:
                    return
            self.dispatch()

    def dispatch(self, between_steps: Callable[[], None] | None = None) -> None:
        """One round on the caller's thread: answer the jobs that can no longer be served, then run
        the batch the policy picks. The worker thread loops on it; an inference process calls it
        from its own loop (server/engine_host.py) between reading requests, and passes
        ``between_steps``: called while a batch is paused between two steps, so that requests that
        arrived meanwhile are queued (and urgent ones answered) before the batch resumes."""
        with self._condition:
            now = self.clock()
            dropped = self._take_expired(now)
            decision = None
            batch: list[Job] = []
            load = self.load()
            if self._queue:
                decision = self.policy.decide([job.pending for job in self._queue], self._context(now, load))
                batch = self._queue[: decision.batch]
                del self._queue[: decision.batch]
            self.metrics.queue_depth.set(len(self._queue))
        for job, reason, earliest_finish in dropped:
            self._count_if_collateral(job, finish=earliest_finish, now=now)
            self._resolve(job, DeadlineMissed(reason), "deadline")
        if decision is not None:
            self._run_batch(decision, batch, load, between_steps, pausable=self.pausable)

    def _context(self, now: float, load: float) -> Context:
        collateral_rate = self.collateral.rate(now)
        self.metrics.collateral_rate.set(collateral_rate)
        return Context(
            now,
            functools.partial(self.latency_model.predict, load_factor=load),
            self.settings.max_batch,
            self.arrivals.rate(now),
            RecentBudgets.of(self._recent_budgets) if self._recent_budgets else None,
            collateral_rate,
            functools.partial(self.latency_model.overrun_probability, load_factor=load),
            functools.partial(self.latency_model.expected, load_factor=load),
            self._pause_steps,
        )

    def _run_batch(
        self,
        decision: Decision,
        batch: list[Job],
        load: float,
        between_steps: Callable[[], None] | None = None,
        pausable: bool = False,
    ) -> None:
        """Run one batch and resolve each of its jobs. A pausable plain row runs a step at a time and
        lets urgent requests run in between (:meth:`_run_urgent`); the time they take is not its own."""
        started = self.clock()
        paused = 0.0
        subnet = self.runtime.subnets[decision.subnet]
        stages: list[int] = [-1] * len(batch)
        cut_short: list[bool] = [False] * len(batch)
        blocks_run: list[int] = [-1] * len(batch)
        groups_run: list[float] = [-1.0] * len(batch)
        try:
            images = torch.stack([job.image for job in batch])
            if subnet.gated:
                gated = self.runtime.infer_gated(decision.subnet, images)
                probabilities, blocks_run, groups_run = (
                    gated.probabilities,
                    gated.blocks_run.tolist(),
                    gated.groups_run.tolist(),
                )
            elif subnet.last_stage is not None:
                check = self._deadline_check(batch, load) if self.settings.anytime else None
                exits = self.runtime.infer_with_exits(decision.subnet, images, check)
                probabilities, stages, cut_short = exits.probabilities, exits.stage.tolist(), exits.cut_short.tolist()
                for stage, short in zip(stages, cut_short, strict=True):
                    reason = "anytime" if short else "last" if stage == subnet.last_stage else "confident"
                    self.metrics.exits.labels(str(stage + 1), reason).inc()
            elif pausable and len(subnet.segments) > 1:
                progress = self.runtime.begin(decision.subnet, images)
                protected = min(job.pending.deadline for job in batch)
                while True:
                    progress.step()
                    if progress.finished:
                        break
                    if between_steps is not None:
                        between_steps()
                    remaining = decision.predicted * (progress.total - progress.done) / progress.total
                    paused += self._run_urgent(remaining, protected, load, between_steps)
                probabilities = progress.probabilities
            else:
                probabilities = self.runtime.infer(decision.subnet, images)
        except Exception as error:  # a failed batch must still answer every request in it
            log.exception("inference failed for a batch of %d on subnet %d", len(batch), decision.subnet)
            for job in batch:
                self._resolve(job, Rejected(f"inference failed: {type(error).__name__}", Refused.FAILED), "error")
            return
        finished = self.clock()
        elapsed = finished - started - paused
        self.latency_model.observe(decision.subnet, len(batch), elapsed, load)
        self.busy_fraction += 0.05 * (
            min(1.0, elapsed / max(finished - self._last_end, 1e-9)) - self.busy_fraction
        )  # busy / wall since the last batch ended (a batch run during a pause ended after this one began)
        self._last_end = finished
        self.dispatches += 1
        # The model's difference, not the measured one: a stall during a wide batch (another
        # process, the allocator) would have stalled the fastest subnet too.
        extra = (
            max(
                0.0,
                self.latency_model.expected(decision.subnet, len(batch), load)
                - self.latency_model.expected(0, len(batch), load),
            )
            if decision.subnet > 0
            else 0.0
        )
        self.metrics.record_batch(subnet, len(batch), elapsed, decision.predicted)
        for job, row, stage, short, blocks, groups in zip(
            batch, probabilities, stages, cut_short, blocks_run, groups_run, strict=True
        ):
            # Counted before this batch's own extra time: a batch overrunning its own deadline is
            # the risk the policy prices per batch (overrun probability), not collateral.
            self._count_if_collateral(job, finish=finished, now=finished)
            result = JobResult(
                row, subnet, len(batch), started - job.enqueued, elapsed, finished, decision.predicted, stage, short,
                blocks, groups,
            )  # fmt: skip
            self._resolve(job, result, "ok")
        if extra > 0:
            self._upgrade_delay_total += extra
            self.collateral.record_upgrade(finished, extra)

    def _run_urgent(
        self, remaining: float, protected: float, load: float, between_steps: Callable[[], None] | None
    ) -> float:
        """While a batch is paused with ``remaining`` seconds to go: run the queued requests that would
        miss waiting for it, if they can still make it and the paused batch still meets ``protected``
        (its earliest deadline) afterwards. Returns the seconds that took (0 if nothing ran)."""
        with self._condition:
            now = self.clock()
            decision, urgent = self._urgent(now, remaining, protected, load)
            if decision is None:
                return 0.0
            chosen = {id(job) for job in urgent}
            self._queue = [job for job in self._queue if id(job) not in chosen]
            self.metrics.queue_depth.set(len(self._queue))
        self.metrics.pauses.inc()
        self._run_batch(decision, urgent, load)
        if between_steps is not None:
            between_steps()  # their answers go out now, not when the paused batch ends
        return self.clock() - now

    def _urgent(self, now: float, remaining: float, protected: float, load: float) -> tuple[Decision | None, list[Job]]:
        """(What to run now, on which jobs) for :meth:`_run_urgent`, or (None, []); the lock is held."""
        predict = functools.partial(self.latency_model.predict, load_factor=load)
        alone = predict(0, 1)
        waiting = now + remaining + alone
        # The earliest deadlines first: those that would miss after the paused batch, but not yet now.
        urgent: list[Job] = []
        for job in self._queue:
            if job.pending.deadline >= waiting or len(urgent) == self.settings.max_batch:
                break
            if not job.cancelled() and now + alone <= job.pending.deadline:
                urgent.append(job)
        if not urgent:
            return None, []
        pending, context = [job.pending for job in urgent], self._context(now, load)
        decision = self.policy.decide(pending, context)
        if not decision.meets_head_deadline or now + decision.predicted + remaining > protected:
            decision = fastest_fallback(pending, context)
            if not decision.meets_head_deadline or now + decision.predicted + remaining > protected:
                return None, []
        return decision, urgent[: decision.batch]

    def _deadline_check(self, batch: list[Job], load: float) -> Callable[[Tensor, int], Tensor]:
        """For a multi-stage batch: which rows still going may run ``stage`` and keep their deadline.

        A row that may not is answered with the stage it reached (anytime) rather than late.
        """
        deadlines = torch.tensor([job.pending.deadline for job in batch], dtype=torch.float64)

        def may_continue(rows: Tensor, stage: int) -> Tensor:
            finish = self.clock() + self.runtime.stage_seconds(stage, len(rows)) * load
            return deadlines[rows] >= finish

        return may_continue

    def _count_if_collateral(self, job: Job, finish: float, now: float) -> None:
        """Count a miss as an upgrade's cost if, without the delay upgrades imposed on it, it would have made it.

        ``finish``: when the job's result was (or, dropped, could at the earliest have been) ready.
        A miss is judged as the response reports it (``met``: total <= budget): the result plus the
        learned time to send it, against the budget - not against the deadline less the safety
        margin, which is a planning reserve: a result that used it still reached the client in time
        as far as the server can tell, and counting it raised the price of width under bursts.
        A first-order counterfactual: the request waited (or ran) that much longer because wider
        subnets ran; a hiccup that made it later than that would have made it miss anyway.
        """
        lateness = finish + self.post_overhead - job.deadline
        if lateness > 0 and self._upgrade_delay_total - job.upgrade_delay_mark > lateness:
            self.collateral.record_miss(now)

    def _take_expired(self, now: float) -> list[tuple[Job, str, float]]:
        """Remove jobs whose client left, whose deadline passed, or (``reject``) that cannot make it.
        Each dropped job comes with the earliest time its result could have been ready."""
        dropped: list[tuple[Job, str, float]] = []
        kept: list[Job] = []
        fastest = self.latency_model.predict(0, 1, self.load())
        for job in self._queue:
            if job.cancelled():
                continue  # the client is gone; nobody to answer
            if job.deadline <= now:
                dropped.append(
                    (job, f"deadline of {job.budget * 1000:.1f} ms passed while queued; the model was not run", now)
                )
            elif self.settings.infeasible_action == "reject" and now + fastest > job.pending.deadline:
                dropped.append(
                    (
                        job,
                        f"no subnet can answer within the remaining {max(0.0, job.deadline - now) * 1000:.1f} ms",
                        now + fastest,
                    )
                )
            else:
                kept.append(job)
        self._queue = kept
        return dropped

    def _resolve(self, job: Job, outcome: JobResult | Rejected, label: str) -> None:
        try:
            job.resolve(outcome)
        except Exception:
            log.exception("could not deliver a %s result", label)
