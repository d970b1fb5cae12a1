"""Why a request was not run: the serving path's domain errors.

The scheduler, the engine and the front end's engine handles raise :class:`Rejected` with a
:class:`Refused` reason; they know nothing of HTTP. The one mapping to HTTP statuses is
:data:`slimserve.server.errors.HTTP_STATUS`. A reason crosses the process boundary as its number
(server/wire.py), so the values are part of that protocol.
"""

from __future__ import annotations

import enum


class Refused(enum.IntEnum):
    UNAVAILABLE = 1  # the model is loading or failed to load, or the inference process is gone
    OVERLOADED = 2  # the queue is full, or the front end holds a standing queue
    DRAINING = 3  # shutting down: send it elsewhere
    DEADLINE = 4  # the deadline passed before the model ran, or no subnet can meet it
    FAILED = 5  # the model raised while running the batch


class Rejected(Exception):
    """A request that gets no result, why, and when to try again (seconds; None: no advice)."""

    def __init__(self, message: str, reason: Refused = Refused.UNAVAILABLE, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.retry_after = retry_after


class QueueFull(Rejected):
    def __init__(self, depth: int, retry_after: int) -> None:
        super().__init__(
            f"server overloaded: {depth} requests queued; retry after {retry_after} s", Refused.OVERLOADED, retry_after
        )


class Draining(Rejected):
    def __init__(self) -> None:
        super().__init__("server is shutting down; send the request to another replica", Refused.DRAINING, 1)


class DeadlineMissed(Rejected):
    def __init__(self, message: str) -> None:
        super().__init__(message, Refused.DEADLINE)
