"""Which subnet runs next, on how many queued requests: pure decision logic, no I/O.

Every policy sees the same inputs: the queue (earliest deadline first) and a :class:`Context` -
the clock, a latency prediction for (subnet, batch size), the batch limit, the recent arrival
rate and how tight recent budgets were. Subnets are
indexed as in the table: 0 is the fastest, the last is the most accurate. Nothing here imports
torch or FastAPI, so every rule is tested with plain numbers.

``adaptive`` (the default) is in the spirit of SuperServe's SlackFit. It considers running subnet
``s`` on the ``b`` earliest-deadline requests, and keeps only configurations that (a) finish
before the earliest of those deadlines; (b) leave every other queued request schedulable by the
fastest subnet afterwards; and (c) use a subnet that could keep up with the current arrival rate
at its best batch size without exceeding a target utilization. Among those it maximizes the
*net* accuracy: what the batch gains over the fastest subnet, minus the price of the misses its
extra busy time is expected to cause others - predicted from the arrival rate and the recent
budgets (requests that arrive while the batch runs and cannot wait out the rest of it:
:func:`blocked_misses`) or measured by the scheduler (the collateral rate, ``server/collateral.py``),
whichever is higher, each miss weighed ``miss_penalty`` times the fastest subnet's accuracy. A
table whose subnets differ by half a point of accuracy buys little with an upgrade, while a miss
forfeits all of it, so under pressure upgrades stop paying and the policy serves like the fastest
subnet; at light load a wide batch that a tight request only rarely lands in still pays. A batch
is a prefix of the queue on one row, so a tight head would take the looser requests behind it down
to its row; :meth:`AdaptivePolicy.split` weighs a smaller first batch against that, counting the
best next batch for the requests left out and pricing the time a second batch adds. The
server can pause a running batch for a request that would miss waiting for it
(server/scheduler.py); with ``count_pauses`` (a setting) the predicted price counts an arrival
as waiting for one step rather than the whole batch (:func:`blocking_wait`), and the measured
collateral rate is what catches the misses pausing fails to save - on a CPU the front end decoding
that request shares the cores the batch keeps busy. When nothing passes, it runs the fastest subnet on the
largest batch that meets the head deadline; when not even that meets, the head request is
already lost and the fastest subnet drains it (with the savable requests behind it riding along
when the queue is too deep to serve them separately).
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import itertools
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

# (subnet index, batch size) -> predicted latency in seconds, on the same clock as deadlines
Predictor = Callable[[int, int], float]


@dataclass(frozen=True)
class Pending:
    """What a policy may know about a queued request."""

    deadline: float  # seconds on the scheduler's clock; the queue is sorted by it
    budget: float  # seconds, as the client sent it (only the queue-blind policy looks at it)


@dataclass(frozen=True)
class RecentBudgets:
    """Recent requests' budgets (seconds, after the safety margin), ascending, with prefix sums so
    that :meth:`share_missed` costs two binary searches, not a pass over them."""

    ascending: tuple[float, ...]
    prefix: tuple[float, ...]

    @classmethod
    def of(cls, budgets: Iterable[float]) -> RecentBudgets:
        ascending = tuple(sorted(budgets))
        return cls(ascending, tuple(itertools.accumulate(ascending, initial=0.0)))

    def share_missed(self, wait: float, after: float) -> float:
        """Share of requests that a batch of ``wait`` seconds makes miss: each arrives at a uniformly
        random moment of it, waits out the rest, then needs ``after`` seconds. With budget ``b`` that
        is a miss with probability ``(wait + after - b) / wait``, clamped to [0, 1]; budgets of at
        most ``after`` miss whatever runs, so they are not counted as caused by the batch."""
        if not self.ascending or wait <= 0:
            return 0.0
        low = bisect.bisect_right(self.ascending, after)
        high = bisect.bisect_left(self.ascending, wait + after)
        caused = (high - low) * (wait + after) - (self.prefix[high] - self.prefix[low])
        return caused / wait / len(self.ascending)


@dataclass(frozen=True)
class Context:
    """What a policy knows at one dispatch besides the queue."""

    now: float  # seconds, on the deadlines' clock
    predict: Predictor
    max_batch: int
    arrival_rate: float = 0.0  # recent requests per second
    budgets: RecentBudgets | None = None  # of recent requests (None: unknown)
    collateral_rate: float = 0.0  # expected misses per second of extra busy time an upgrade adds
    # (subnet, batch size, seconds available) -> probability the batch takes longer (None: 0 when
    # the prediction fits, as the guards check)
    overrun: Callable[[int, int, float], float] | None = None
    # mean batch time without the tail margin (None: ``predict``); expectations such as the price of
    # blocking use it, deadlines are checked against ``predict``
    expect: Predictor | None = None
    # per table row, the steps a batch runs in when the server pauses between them for requests that
    # would miss waiting (server/scheduler.py); None: the price of blocking assumes whole batches
    pause_steps: Sequence[int] | None = None

    def mean(self, subnet: int, batch: int) -> float:
        """Mean seconds a batch takes: what an expected count (of arrivals, of misses) is made of."""
        return (self.expect or self.predict)(subnet, batch)


@dataclass(frozen=True)
class Decision:
    subnet: int  # table index
    batch: int  # run the first `batch` requests of the queue
    predicted: float  # seconds
    meets_head_deadline: bool


class Policy(Protocol):
    @property
    def name(self) -> str: ...

    def decide(self, queue: Sequence[Pending], context: Context) -> Decision:
        """Which subnet runs on how many of the first requests of ``queue`` (earliest deadline first)."""
        ...


def candidate_batches(limit: int) -> list[int]:
    """Batch sizes worth trying: powers of two up to ``limit``, plus ``limit`` itself."""
    sizes = [1]
    while sizes[-1] * 2 <= limit:
        sizes.append(sizes[-1] * 2)
    if sizes[-1] != limit:
        sizes.append(limit)
    return sizes


def largest_batch_meeting(subnet: int, now: float, deadline: float, predict: Predictor, limit: int) -> int:
    """Largest ``b <= limit`` with ``now + predict(subnet, b) <= deadline`` (0 if none); latency grows with b."""
    low, high = 0, limit
    while low < high:
        middle = (low + high + 1) // 2
        if now + predict(subnet, middle) <= deadline:
            low = middle
        else:
            high = middle - 1
    return low


def rest_schedulable(start: float, rest: Sequence[Pending], predict: Predictor, max_batch: int) -> bool:
    """Can the fastest subnet, from ``start``, serve ``rest`` (EDF order) in full batches, all on time?

    A greedy check: each chunk of up to ``max_batch`` requests, shrunk until it meets its first
    deadline. It is a sufficient condition, cheap enough to run for every candidate.
    """
    position, clock = 0, start
    while position < len(rest):
        size = largest_batch_meeting(0, clock, rest[position].deadline, predict, min(max_batch, len(rest) - position))
        if size == 0:
            return False
        clock += predict(0, size)
        position += size
    return True


def sustainable(subnet: int, arrival_rate: float, predict: Predictor, max_batch: int, utilization: float) -> bool:
    """Could ``subnet`` keep up with ``arrival_rate`` at its most efficient batch size?"""
    if arrival_rate <= 0:
        return True
    return any(arrival_rate * predict(subnet, b) <= utilization * b for b in candidate_batches(max_batch))


def blocked_misses(duration: float, context: Context, wait: float | None = None) -> float:
    """Expected misses among the requests that arrive while a batch of ``duration`` runs: each waits
    out the rest of it - or, where the server pauses the batch for it, the rest of the ``wait``
    seconds the step running then takes - then runs on the fastest subnet together with the others
    that came meanwhile (``rate x duration`` of them, on average)."""
    if context.budgets is None or context.arrival_rate <= 0:
        return 0.0
    arrivals = context.arrival_rate * duration
    backlog = min(context.max_batch, 1 + math.ceil(arrivals))
    return arrivals * context.budgets.share_missed(duration if wait is None else wait, context.mean(0, backlog))


def blocking_wait(subnet: int, batch: int, context: Context, available: float) -> float:
    """The longest a request arriving while this batch runs waits for it: the whole batch, or one of
    its steps where the server pauses it (:attr:`Context.pause_steps`) and the batch, finishing with
    ``available`` seconds to its earliest deadline, leaves time for the fastest subnet in a pause
    (the server pauses only while the paused batch still meets that deadline)."""
    duration = context.mean(subnet, batch)
    steps = context.pause_steps[subnet] if context.pause_steps else 1
    if steps <= 1 or available - context.predict(subnet, batch) < context.predict(0, 1):
        return duration
    return duration / steps


@dataclass(frozen=True)
class AdaptivePolicy:
    """Deadline-, queue-, load- and risk-aware subnet choice (see the module docstring).

    Among the configurations that pass the guards, it maximizes the *net accuracy gained over the
    fastest subnet, summed over the batch*::

        batch x (accuracy[subnet] x P(in time) - accuracy[0] x P0(in time))
            -  miss_penalty x max(collateral rate x extra seconds, extra blocked misses) x accuracy[0]

    where P(in time) is the chance the batch does not overrun the time to its earliest deadline
    (``Context.overrun``, from the measured spread of batch times: a row that fills a tight budget
    to the edge pays for the hiccups that would make it late), *extra seconds* is how much longer
    the batch keeps the worker busy than the fastest subnet would, *extra blocked misses* is
    :func:`blocked_misses` of the batch minus that of the fastest subnet's, and a miss it causes
    others is priced at ``miss_penalty`` times the accuracy the fastest subnet would have delivered.
    Upgrading eight queued requests a little beats upgrading one a lot, and with one request queued,
    no budgets seen and no misses observed this is simply the most accurate subnet that fits.

    Example:
        >>> latency = lambda subnet, batch: (1 + subnet) * (0.002 + 0.001 * batch)
        >>> AdaptivePolicy((0.90, 0.92, 0.93)).decide([Pending(0.010, 0.010)], Context(0.0, latency, 8)).subnet
        2
    """

    accuracies: tuple[float, ...]  # expected top-1 per table row, fastest first
    utilization: float = 0.85  # target share of time the worker is busy, headroom for bursts
    miss_penalty: float = 3.0  # a miss caused costs this many times the fastest subnet's accuracy
    split_batches: bool = False  # weigh leaving the looser requests of a batch to the next one (split)
    name: str = "adaptive"

    def net_gain(self, subnet: int, batch: int, context: Context, available: float = math.inf) -> float:
        """Expected accuracy gained over the fastest subnet on ``batch`` requests with ``available``
        seconds to the earliest deadline (each row's accuracy times its chance not to overrun),
        minus the price of the misses its extra busy time is expected to cause others: predicted
        (:func:`blocked_misses`) or measured (the collateral rate), whichever is higher. Busy time
        is the mean (:meth:`Context.mean`): the tail is priced once, as the overrun chance, not
        again through a margin that grows with the machine's noise (docs/RESULTS.md, 2026-12-05)."""
        kept, kept_fastest = 1.0, 1.0
        if context.overrun is not None:
            kept = 1.0 - context.overrun(subnet, batch, available)
            kept_fastest = 1.0 - context.overrun(0, batch, available)
        gained = batch * (self.accuracies[subnet] * kept - self.accuracies[0] * kept_fastest)
        waits = (blocking_wait(subnet, batch, context, available), blocking_wait(0, batch, context, available))
        return gained - self.blocking_cost(context.mean(subnet, batch), context.mean(0, batch), context, waits)

    def gain_bound(self, subnet: int, batch: int, context: Context, available: float) -> float:
        """At least :meth:`net_gain`: the batch as if it could not overrun, blocking nobody (the
        price of blocking is never negative). Cheap, so candidates that cannot win are skipped."""
        kept_fastest = 1.0 if context.overrun is None else 1.0 - context.overrun(0, batch, available)
        return batch * (self.accuracies[subnet] - self.accuracies[0] * kept_fastest)

    def blocking_cost(
        self, duration: float, baseline: float, context: Context, waits: tuple[float, float] | None = None
    ) -> float:
        """The price of keeping the worker busy ``duration`` seconds instead of ``baseline``: the
        misses it is expected to cause others, predicted (:func:`blocked_misses`, an arrival waiting
        at most ``waits`` seconds for each, where the server pauses: :func:`blocking_wait`) or
        measured (the collateral rate, which sees what pausing failed to save), whichever is higher,
        each weighed ``miss_penalty`` x the fastest accuracy."""
        wait, baseline_wait = waits if waits is not None else (None, None)
        measured = context.collateral_rate * max(0.0, duration - baseline)
        predicted = blocked_misses(duration, context, wait) - blocked_misses(baseline, context, baseline_wait)
        return self.miss_penalty * max(measured, predicted) * self.accuracies[0]

    def decide(self, queue: Sequence[Pending], context: Context) -> Decision:
        # One decision asks for the same predictions and overrun chances many times over.
        overrun = None if context.overrun is None else functools.cache(context.overrun)
        expect = None if context.expect is None else functools.cache(context.expect)
        context = dataclasses.replace(context, predict=functools.cache(context.predict), overrun=overrun, expect=expect)
        now, predict, max_batch, rate = context.now, context.predict, context.max_batch, context.arrival_rate
        limit = min(len(queue), max_batch)
        head = queue[0].deadline
        rows = [s for s in range(len(self.accuracies)) if sustainable(s, rate, predict, max_batch, self.utilization)]
        best: tuple[float, int, int] | None = None  # (net gain, subnet, batch)
        # Widest rows first: an upgrade found early lets the rest skip what cannot beat it (the
        # fastest row, gaining 0, entirely); the choice is the maximum whatever the order.
        for subnet in reversed(rows):
            if subnet == 0 and best is not None:
                break
            fits = largest_batch_meeting(subnet, now, head, predict, limit)
            if not fits:
                continue
            for batch in sorted(candidate_batches(fits), reverse=True):
                if best is not None and self.gain_bound(subnet, batch, context, head - now) < best[0]:
                    continue
                duration = predict(subnet, batch)
                if not rest_schedulable(now + duration, queue[batch:], predict, max_batch):
                    continue  # guard (b); a smaller batch finishes sooner and may leave the rest feasible
                gain = 0.0 if subnet == 0 else self.net_gain(subnet, batch, context, head - now)
                if subnet > 0 and gain <= 0:
                    continue  # an upgrade that does not pay for its risk
                key = (gain, subnet, batch)
                if best is None or key > best:
                    best = key
                if subnet == 0:
                    break  # the fastest subnet gains nothing by itself: its largest passing batch is best
        if best is None:
            return fastest_fallback(queue, context)
        _, subnet, batch = best
        if self.split_batches and batch > 1:
            subnet, batch = self.split(queue, context, rows, best)
        return Decision(subnet, batch, predict(subnet, batch), True)

    def split(
        self, queue: Sequence[Pending], context: Context, rows: Sequence[int], chosen: tuple[float, int, int]
    ) -> tuple[int, int]:
        """(subnet, batch) once a next batch is counted, for ``chosen`` (net gain, subnet, batch).

        The chosen batch runs the requests behind the head on the head's row. Those from the first
        one that could run on a wider row after the head ran alone on the fastest one (the
        requests before it could not gain) may instead be left to a next batch, and the smaller
        first batch may afford a wider row itself (on a CPU a batch's time grows with its size).
        That is worth it when the smaller batch's net gain plus :meth:`follow_up`'s for the
        requests left out beats the whole batch's, after the price of the time two batches take
        over one on the fastest row (on a GPU, where a batch of 8 costs what a batch of 1 does,
        about one batch's time; on a CPU less)."""
        now, predict, head = context.now, context.predict, queue[0].deadline
        gain, subnet, batch = chosen
        wider = [predict(row, 1) for row in rows if row > subnet]
        if not wider:
            return subnet, batch
        deadlines = [pending.deadline for pending in queue[1:batch]]
        size = 1 + bisect.bisect_left(deadlines, now + predict(0, 1) + min(wider))
        if size >= batch:
            return subnet, batch
        first: tuple[float, int, float] | None = None  # (net gain, subnet, duration) of the smaller batch
        for row in rows:
            duration = predict(row, size)
            if row < subnet or now + duration > head:
                continue
            if not rest_schedulable(now + duration, queue[size:], predict, context.max_batch):
                continue
            row_gain = 0.0 if row == 0 else self.net_gain(row, size, context, head - now)
            if first is None or row_gain > first[0]:
                first = (row_gain, row, duration)
        if first is None:
            return subnet, batch
        first_gain, first_subnet, duration = first
        follow_gain, follow_batch = self.follow_up(queue[size:], batch - size, now + duration, context, rows)
        mean = context.mean
        two_batches = mean(0, size) + (mean(0, follow_batch) if follow_batch else 0.0)
        split_gain = first_gain + follow_gain - self.blocking_cost(two_batches, mean(0, batch), context)
        return (first_subnet, size) if split_gain > gain else (subnet, batch)

    def follow_up(
        self, rest: Sequence[Pending], limit: int, start: float, context: Context, rows: Sequence[int]
    ) -> tuple[float, int]:
        """(net gain, batch size) of the best next batch of at most ``limit`` requests of ``rest``,
        starting at ``start``: each row on the largest such batch that meets the first deadline and
        leaves the requests after it schedulable (guard (b)); (0, n) for the fastest row, (0, 0)
        when nothing passes (those requests are then not counted)."""
        predict, max_batch = context.predict, context.max_batch
        best = (0.0, 0)
        if not rest:
            return best
        deadline = rest[0].deadline
        for subnet in rows:
            size = largest_batch_meeting(subnet, start, deadline, predict, min(len(rest), limit, max_batch))
            if not size:
                continue
            duration = predict(subnet, size)
            if not rest_schedulable(start + duration, rest[size:], predict, max_batch):
                continue
            gain = 0.0 if subnet == 0 else self.net_gain(subnet, size, context, deadline - start)
            best = max(best, (gain, size))
        return best


def fastest_fallback(queue: Sequence[Pending], context: Context) -> Decision:
    """The fastest subnet on the largest batch that still meets the head deadline.

    If none does, the head is lost anyway: batch every request that is already lost and drain them
    quickly. When the requests behind them could not all be served on time afterwards (overload),
    the batch is filled up to the limit, as a static policy drains: a full batch costs far less
    per request than several small ones, and throughput is what clears a backlog. (Filling it only
    up to what still met the first savable deadline kept batches small in a backlog: after a
    hiccup at 300 req/s the server stayed ~100 ms behind for the rest of the run while static:s0,
    draining full batches, recovered within a second.)
    """
    now, predict, max_batch = context.now, context.predict, context.max_batch
    limit = min(len(queue), max_batch)
    fits = largest_batch_meeting(0, now, queue[0].deadline, predict, limit)
    if fits:
        return Decision(0, fits, predict(0, fits), True)
    alone = now + predict(0, 1)
    lost = max(1, bisect.bisect_left([p.deadline for p in queue[:limit]], alone))
    batch = lost
    if lost < limit and not rest_schedulable(now + predict(0, lost), queue[lost:], predict, max_batch):
        batch = limit
    return Decision(0, batch, predict(0, batch), False)


@dataclass(frozen=True)
class StaticPolicy:
    """Always one subnet, still deadline-aware in its batching (the baseline the load test compares)."""

    subnet: int
    name: str = "static"

    def decide(self, queue: Sequence[Pending], context: Context) -> Decision:
        limit = min(len(queue), context.max_batch)
        fits = largest_batch_meeting(self.subnet, context.now, queue[0].deadline, context.predict, limit)
        batch = fits or limit  # nothing fits: the head is late whatever we do, so drain fast
        return Decision(self.subnet, batch, context.predict(self.subnet, batch), fits > 0)


@dataclass(frozen=True)
class LargestThatFitsPolicy:
    """Per-request greedy, blind to the queue: the most accurate subnet whose latency fits the head
    request's *budget* (not its remaining slack), batched while the batch still fits that budget."""

    subnet_count: int
    name: str = "largest-that-fits"

    def decide(self, queue: Sequence[Pending], context: Context) -> Decision:
        predict, limit, head = context.predict, min(len(queue), context.max_batch), queue[0]
        for subnet in range(self.subnet_count - 1, -1, -1):
            fits = largest_batch_meeting(subnet, 0.0, head.budget, predict, limit)
            if fits:
                duration = predict(subnet, fits)
                return Decision(subnet, fits, duration, context.now + duration <= head.deadline)
        return Decision(0, 1, predict(0, 1), context.now + predict(0, 1) <= head.deadline)


def parse_policy(
    spec: str,
    subnet_ids: Sequence[str],
    accuracies: Sequence[float],
    utilization: float = 0.85,
    miss_penalty: float = 3.0,
    split_batches: bool = False,
) -> Policy:
    """``adaptive``, ``largest-that-fits`` or ``static:<subnet id>``; a clear error otherwise."""
    if spec == "adaptive":
        return AdaptivePolicy(tuple(accuracies), utilization, miss_penalty, split_batches)
    if spec == "largest-that-fits":
        return LargestThatFitsPolicy(len(subnet_ids))
    if spec.startswith("static:"):
        wanted = spec.removeprefix("static:")
        if wanted not in subnet_ids:
            raise ValueError(f"policy {spec!r}: no subnet {wanted!r} in the table (ids: {', '.join(subnet_ids)})")
        return StaticPolicy(list(subnet_ids).index(wanted), name=spec)
    raise ValueError(f"unknown policy {spec!r}: use adaptive, largest-that-fits or static:<subnet id>")
