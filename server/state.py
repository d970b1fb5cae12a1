"""What the HTTP front end holds: its settings, its clock and a handle on the inference engine."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor

from slimserve.server.admission import FrontEndDelay
from slimserve.server.engine import Answer, SubnetInfo
from slimserve.server.engine_client import EngineHandle
from slimserve.server.refusals import Refused, Rejected
from slimserve.server.schemas import StatusResponse, SubnetsResponse
from slimserve.server.settings import Settings


@dataclass(frozen=True)
class Timing:
    """Where one request's time went, in ms from its arrival (before the body was read)."""

    preprocess_ms: float  # arrival to enqueue: reading, decoding, the hand-off to the engine
    queue_ms: float
    inference_ms: float
    total_ms: float
    budget_ms: float
    met: bool
    batch_size: int

    @classmethod
    def of(cls, answer: Answer, arrival: float, budget_ms: float, now: float) -> Timing:
        total_ms = (now - arrival) * 1000.0
        return cls(
            preprocess_ms=round((answer.enqueued - arrival) * 1000.0, 3),
            queue_ms=round(answer.queued * 1000.0, 3),
            inference_ms=round(answer.inference * 1000.0, 3),
            total_ms=round(total_ms, 3),
            budget_ms=budget_ms,
            met=total_ms <= budget_ms,
            batch_size=answer.batch_size,
        )


@dataclass(frozen=True)
class Classified:
    """An answered request: the engine's answer, its timing, and the subnet that ran."""

    answer: Answer
    timing: Timing
    subnet: SubnetInfo


class ServerState:
    def __init__(self, settings: Settings, engine: EngineHandle, clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self.engine = engine
        self.info = engine.info
        self.clock = clock
        self.replica_id = uuid.uuid4().hex[:8]  # tells replicas apart behind a load balancer
        # Admission by the event loop's lag (fed by server/app.py), only where the loop has the
        # interpreter to itself: with an inference thread, its GIL holds would read as a backlog.
        target = settings.frontend_delay_target_ms / 1000.0
        self.admission = FrontEndDelay(target) if target > 0 and not engine.shares_interpreter else None

    @property
    def model_name(self) -> str:
        return self.info.name

    def health(self) -> tuple[bool, str]:
        """(ready for requests, the readiness status word: ready, draining, failed or loading)."""
        engine = self.engine
        if engine.draining:
            return False, "draining"
        if engine.ready:
            return True, "ready"
        return False, "failed" if engine.load_error else "loading"

    def require_ready(self) -> None:
        """Refuse (with Retry-After) unless the engine takes requests now (checked before reading the body)."""
        ready, status = self.health()
        if status == "draining":
            raise Rejected("server is shutting down", Refused.DRAINING, 1)
        if not ready:
            error = self.engine.load_error
            raise Rejected(f"model failed to load: {error}" if error else "model is loading", Refused.UNAVAILABLE, 1)

    def require_feasible(self, budget_ms: float) -> None:
        """With ``infeasible_action=reject``, refuse before decoding a request no subnet can answer in time."""
        if self.settings.infeasible_action != "reject":
            return
        fastest = self.engine.fastest_seconds()
        if fastest is None:
            return
        margin_ms = self.settings.safety_margin_ms
        if fastest * 1000.0 > budget_ms - margin_ms:
            self.engine.count("deadline")
            raise Rejected(
                f"no subnet can answer within {budget_ms:.1f} ms (fastest predicted {fastest * 1000:.2f} ms)",
                Refused.DEADLINE,
            )

    def shed_retry_after(self) -> int | None:
        """Retry-After seconds if a new inference request must be refused right now: the engine's
        queue is full, or this front end holds a standing queue of its own (server/admission.py)."""
        if not self.engine.ready:
            return None
        if self.admission is not None and self.admission.congested(self.clock()):
            return 1
        return self.engine.shed_retry_after()

    def count_shed(self) -> None:
        self.engine.count("rejected")

    async def classify(self, image: Tensor, arrival: float, budget_ms: float) -> Classified:
        """One image through the engine: the request seam both APIs share. It stamps the answer's
        time, and tells the engine what the client got (its metrics, and the time from result to
        response it learns for the deadline checks). Raises :class:`Rejected` when nothing ran."""
        answer = await self.engine.infer(image, arrival, budget_ms / 1000.0)
        now = self.clock()
        timing = Timing.of(answer, arrival, budget_ms, now)
        self.engine.record_answer(
            answer.subnet, timing.met, timing.total_ms / 1000.0, answer.queued, now - answer.finished
        )
        return Classified(answer, timing, self.info.subnets[answer.subnet])

    async def status(self) -> StatusResponse:
        return await self.engine.status()

    async def subnets(self) -> SubnetsResponse:
        return await self.engine.subnets_view()

    async def metrics_text(self) -> bytes:
        return await self.engine.metrics_text()
