"""Admission in the front end: shed new requests while its own backlog makes them late (CoDel's rule).

Under overload the queue that grows first can be the front end's own: requests that were read
and stamped wait their turn in the event loop, behind hundreds of others, before they are handed
to the engine. The engine's queue then stays short and sheds nothing, while every request reaches
it already past its deadline, so goodput falls to nearly zero (docs/BENCHMARKS.md, "Overload").

The signal is the event loop's lag: a timer due every 10 ms fires late by as long as the loop's
run queue takes to get through, which is the wait every request's next step sees. (The time from
a request's arrival to its hand-off would also count its own work - parsing a large JSON tensor,
receiving a slow upload - and shed healthy traffic.) CoDel (Nichols and Jacobson, 2012) tells a
standing queue from a burst by the *smallest* delay over an interval: a burst drains within the
interval and leaves one short wait, a standing queue does not. While the smallest lag of the last
interval exceeded the target, new requests are refused (503 + Retry-After, after their body is
read); a short interval admits again.

:class:`FrontEndDelay` is pure arithmetic on a clock the caller passes; :func:`sample_loop_lag`
feeds it from the running loop.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable

LAG_PERIOD_SECONDS = 0.01


class FrontEndDelay:
    """Is the front end holding a standing queue right now?"""

    def __init__(self, target: float, interval: float = 0.1) -> None:
        if target <= 0 or interval <= 0:
            raise ValueError("target and interval must be positive")
        self.target, self.interval = target, interval
        self._window_start = -math.inf
        self._window_min = math.inf
        self._congested = False

    def _roll(self, now: float) -> None:
        if now - self._window_start >= self.interval:
            # An empty window proves nothing is stuck: admit again.
            self._congested = math.isfinite(self._window_min) and self._window_min > self.target
            self._window_start = now
            self._window_min = math.inf

    def observe(self, now: float, delay: float) -> None:
        """At ``now``, something that should have run ran ``delay`` seconds late."""
        self._roll(now)
        self._window_min = min(self._window_min, delay)

    def congested(self, now: float) -> bool:
        """True while the last complete interval's smallest delay exceeded the target."""
        self._roll(now)
        return self._congested


async def sample_loop_lag(gate: FrontEndDelay, clock: Callable[[], float], period: float = LAG_PERIOD_SECONDS) -> None:
    """Forever: sleep ``period``, tell ``gate`` how late the loop woke this task."""
    while True:
        due = clock() + period
        await asyncio.sleep(period)
        now = clock()
        gate.observe(now, max(0.0, now - due))
