"""What the HTTP front end holds: its settings, its clock and a handle on the inference engine."""

from __future__ import annotations

import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from torch import Tensor

from slimserve.server.admission import FrontEndDelay
from slimserve.server.engine import Answer
from slimserve.server.engine_client import EngineHandle
from slimserve.server.errors import ApiError
from slimserve.server.scheduler import Rejected
from slimserve.server.settings import Settings

T = TypeVar("T")


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
        """503 + Retry-After unless the engine takes requests now (checked before reading the body)."""
        ready, status = self.health()
        if status == "draining":
            raise ApiError(503, "server is shutting down", {"Retry-After": "1"})
        if not ready:
            error = self.engine.load_error
            raise ApiError(503, f"model failed to load: {error}" if error else "model is loading", {"Retry-After": "1"})

    def require_feasible(self, budget_ms: float) -> None:
        """With ``infeasible_action=reject``, 504 before decoding a request no subnet can answer in time."""
        if self.settings.infeasible_action != "reject":
            return
        fastest = self.engine.fastest_seconds()
        if fastest is None:
            return
        margin_ms = self.settings.safety_margin_ms
        if fastest * 1000.0 > budget_ms - margin_ms:
            self.engine.count("deadline")
            raise ApiError(
                504, f"no subnet can answer within {budget_ms:.1f} ms (fastest predicted {fastest * 1000:.2f} ms)"
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

    async def run(self, image: Tensor, arrival: float, budget_ms: float) -> Answer:
        """One image through the engine."""
        return await self.ask(self.engine.infer(image, arrival, budget_ms / 1000.0))

    async def status(self) -> dict[str, Any]:
        return await self.ask(self.engine.status())

    async def subnets(self) -> dict[str, Any]:
        return await self.ask(self.engine.subnets_view())

    async def metrics_text(self) -> bytes:
        return await self.ask(self.engine.metrics_text())

    @staticmethod
    async def ask(call: Awaitable[T]) -> T:
        """Await an engine call; its refusals become API errors with their status and Retry-After."""
        try:
            return await call
        except Rejected as rejection:
            headers = {"Retry-After": str(rejection.retry_after)} if rejection.retry_after else None
            raise ApiError(rejection.status, str(rejection), headers) from None
