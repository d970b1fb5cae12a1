"""What an upgrade costs in missed deadlines, learned online: the price the adaptive policy pays for width.

Running a wider subnet than the fastest keeps the worker busy longer. The requests queued behind
that batch and the ones arriving while it runs can miss their deadlines because of it (the batch
itself running late is a risk the policy prices per batch, from the spread of measured batch
times: ``LatencyModel.overrun_probability``). How often that happens depends on what no model here
predicts well - bursts, the budget mix, the noise of a shared machine - so it is measured instead:

    collateral rate = misses explained by the delay upgrades imposed on the request
                      / seconds of extra busy time upgrades added

(explained: the request waited - or ran - longer because of upgrades than it was late by, so
without them it would have made it; the scheduler decides that). Both are counted over roughly
the last ``tau`` seconds. The policy prices a candidate upgrade at ``rate x its extra seconds x
the accuracy a miss forfeits`` and upgrades only when the accuracy it gains is worth more. ``prior_seconds`` of miss-free upgrading are assumed so that one early miss
does not read as a certainty, and because old evidence fades, the price falls back towards zero
when upgrades stop - so the policy probes again once the pressure is gone. Pure arithmetic: the
worker thread owns the instance.
"""

from __future__ import annotations

import math


class CollateralRate:
    """Deadline misses per second of extra busy time that upgrades added, recently."""

    def __init__(self, tau: float = 10.0, prior_seconds: float = 0.25) -> None:
        if tau <= 0 or prior_seconds <= 0:
            raise ValueError("tau and prior_seconds must be positive")
        self.tau, self.prior_seconds = tau, prior_seconds
        self.misses = 0.0  # decayed count
        self.extra_seconds = 0.0  # decayed sum
        self._last = 0.0

    def _decay_to(self, now: float) -> None:
        if now > self._last:
            factor = math.exp(-(now - self._last) / self.tau)
            self.misses *= factor
            self.extra_seconds *= factor
            self._last = now

    def record_upgrade(self, now: float, extra_seconds: float) -> None:
        """An upgraded batch ended at ``now``, having taken ``extra_seconds`` more than the fastest subnet would."""
        self._decay_to(now)
        self.extra_seconds += max(0.0, extra_seconds)

    def record_miss(self, now: float) -> None:
        """A request missed a deadline it would have met without the delay upgrades imposed on it."""
        self._decay_to(now)
        self.misses += 1.0

    def rate(self, now: float) -> float:
        """Expected misses per second of extra busy time."""
        self._decay_to(now)
        return self.misses / (self.extra_seconds + self.prior_seconds)
