"""The front end's handle on the inference engine: in this process, or in a process of its own.

Routes see one interface, :class:`EngineHandle`; which one they hold is decided where the server
is assembled:

* :class:`LocalEngine` - the engine in the HTTP process, its scheduler on a worker thread. What
  ``create_app`` builds by default: tests (with an injected clock), Ray Serve replicas,
  ``uvicorn --factory server.app:create_app``.
* :class:`RemoteEngine` - the engine in its own process (server/engine_host.py), reached over a
  socket pair with the frames of server/wire.py. What ``slimserve serve`` runs: HTTP parsing and
  image decoding keep their interpreter and core, inference gets its own. :func:`launch` starts
  it and waits until the bundle is verified, so a bad bundle fails before the port is served.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import socket
import subprocess
import sys
import threading
from typing import Any, Protocol

import torch
from torch import Tensor

from slimserve.models import openmp
from slimserve.server import wire
from slimserve.server.engine import Answer, Engine, ModelInfo
from slimserve.server.refusals import Refused, Rejected
from slimserve.server.schemas import StatusResponse, SubnetsResponse
from slimserve.server.settings import Settings

log = logging.getLogger(__name__)

QUERY_TIMEOUT_SECONDS = 5.0
EXIT_WAIT_SECONDS = 5.0


class EngineHandle(Protocol):
    info: ModelInfo

    @property
    def ready(self) -> bool: ...
    @property
    def draining(self) -> bool: ...
    @property
    def load_error(self) -> str | None: ...
    @property
    def alive(self) -> bool:
        """False once the engine can never answer again (its process exited): restart the server."""
        ...

    @property
    def shares_interpreter(self) -> bool:
        """True when inference runs in this process: its threads then hold the GIL the event loop
        needs, so the loop's lag says nothing about a backlog of requests (server/admission.py)."""
        ...

    async def start(self, wait_until_ready: bool = False) -> None: ...
    def begin_drain(self) -> None: ...
    async def stop(self, timeout: float) -> None: ...
    async def infer(self, image: Tensor, arrival: float, budget_s: float) -> Answer:
        """The answer for one uint8 ``[C, H, W]`` image; raises Rejected (with its reason)."""
        ...

    def shed_retry_after(self) -> int | None: ...
    def fastest_seconds(self) -> float | None: ...
    def record_answer(self, subnet: int, met: bool, total: float, queued: float, post_overhead: float) -> None: ...
    def count(self, outcome: str) -> None: ...
    async def status(self) -> StatusResponse: ...
    async def subnets_view(self) -> SubnetsResponse: ...
    async def metrics_text(self) -> bytes: ...


class LocalEngine:
    """The engine in this process; its scheduler's worker thread runs the batches."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.info = engine.info
        self._loader: threading.Thread | None = None

    @property
    def ready(self) -> bool:
        return self.engine.ready

    @property
    def draining(self) -> bool:
        return self.engine.draining

    @property
    def load_error(self) -> str | None:
        return self.engine.load_error

    @property
    def alive(self) -> bool:
        return True  # it lives and dies with this process

    @property
    def shares_interpreter(self) -> bool:
        return True

    async def start(self, wait_until_ready: bool = False) -> None:
        """Load in the background (``/livez`` answers and ``/readyz`` says 503 meanwhile)."""
        self._loader = threading.Thread(target=self._load, name="slimserve-loader", daemon=True)
        self._loader.start()
        if wait_until_ready:
            await asyncio.to_thread(self._loader.join)
            if self.engine.load_error:
                raise RuntimeError(self.engine.load_error)

    def _load(self) -> None:
        engine = self.engine
        engine.load()
        if engine.scheduler is None:
            return
        try:
            engine.scheduler.start()  # returns once its worker thread has warmed itself
        except Exception as error:
            engine.fail("warming the inference thread", error)
            return
        engine.mark_ready()

    def begin_drain(self) -> None:
        self.engine.begin_drain()

    async def stop(self, timeout: float) -> None:
        if not await asyncio.to_thread(self.engine.stop, timeout):
            log.warning("inference worker still busy after %.1f s of draining", timeout)

    async def infer(self, image: Tensor, arrival: float, budget_s: float) -> Answer:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Answer | Rejected] = loop.create_future()

        def settle(outcome: Answer | Rejected) -> None:
            if not future.done():
                future.set_result(outcome)

        def deliver(outcome: Answer | Rejected) -> None:  # on the worker thread
            loop.call_soon_threadsafe(settle, outcome)

        self.engine.submit(image, arrival, budget_s, deliver, future.cancelled)
        outcome = await future
        if isinstance(outcome, Rejected):
            raise outcome
        return outcome

    def shed_retry_after(self) -> int | None:
        return self.engine.shed_retry_after()

    def fastest_seconds(self) -> float | None:
        return self.engine.fastest_seconds()

    def record_answer(self, subnet: int, met: bool, total: float, queued: float, post_overhead: float) -> None:
        self.engine.record_answer(subnet, met, total, queued, post_overhead)

    def count(self, outcome: str) -> None:
        self.engine.count(outcome)

    async def status(self) -> StatusResponse:
        return self.engine.status()

    async def subnets_view(self) -> SubnetsResponse:
        return self.engine.subnets_view()

    async def metrics_text(self) -> bytes:
        return self.engine.metrics_text()


class EngineStartError(RuntimeError):
    """The inference process could not start serving; the message says why, in one line."""


class _Connection(asyncio.Protocol):
    def __init__(self, owner: RemoteEngine) -> None:
        self.owner = owner

    def data_received(self, data: bytes) -> None:
        for kind, payload in self.owner.reader.feed(data):
            self.owner.handle(kind, payload)

    def connection_lost(self, exc: Exception | None) -> None:
        self.owner.lost()


class RemoteEngine:
    """The engine in its own process. Requests and queries are frames; the process's ``LOAD``
    reports keep a copy of the queue's state here, so a full queue is shed without asking."""

    def __init__(
        self,
        connection: socket.socket,
        process: subprocess.Popen[bytes] | None,
        info: ModelInfo,
        reader: wire.FrameReader,
        early: list[tuple[int, bytes]],
    ) -> None:
        """``process``: the inference process, for the front end that owns it (reaps it on stop);
        None in the other front-end processes, which only close their socket."""
        self.info = info
        self.process = process
        self.reader = reader
        self._socket: socket.socket | None = connection
        self._early = early  # frames that arrived with the handshake
        self._transport: asyncio.Transport | None = None
        self._ids = itertools.count(1)
        self._requests: dict[int, asyncio.Future[Answer]] = {}
        self._queries: dict[int, asyncio.Future[bytes]] = {}
        self._ready_event: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready = False
        self._draining = False
        self._load_error: str | None = None
        self.load = wire.Load(0, 0, 0.0)

    @property
    def ready(self) -> bool:
        return self._ready and not self._draining

    @property
    def draining(self) -> bool:
        return self._draining

    @property
    def load_error(self) -> str | None:
        return self._load_error

    @property
    def shares_interpreter(self) -> bool:
        return False

    @property
    def alive(self) -> bool:
        not_started = self._loop is None
        return not_started or self._transport is not None

    # --- lifecycle ----------------------------------------------------------------------------

    def detach(self) -> None:
        """Close this handle's socket unused: another front-end process serves through it."""
        if self._socket is not None:
            self._socket.close()
            self._socket = None

    async def start(self, wait_until_ready: bool = False) -> None:
        loop = self._loop = asyncio.get_running_loop()
        self._ready_event = asyncio.Event()
        assert self._socket is not None
        self._socket.setblocking(False)
        transport, _ = await loop.create_unix_connection(lambda: _Connection(self), sock=self._socket)
        self._transport = transport
        for kind, payload in self._early:
            self.handle(kind, payload)
        self._early = []
        if wait_until_ready:
            await self._ready_event.wait()
            if self._load_error:
                raise RuntimeError(self._load_error)

    def begin_drain(self) -> None:
        """Refuse new requests from now on; may be called from a signal handler."""
        self._draining = True
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._send, wire.frame(wire.DRAIN))

    async def stop(self, timeout: float) -> None:
        """Drain: answer what is in flight (up to ``timeout`` s), then close and reap the process."""
        self._draining = True
        self._send(wire.frame(wire.DRAIN))
        waiting = list(self._requests.values())
        if waiting:
            _, late = await asyncio.wait(waiting, timeout=timeout)
            if late:
                log.warning("%d requests still in the inference process after %.1f s of draining", len(late), timeout)
        if self._transport is not None:
            self._transport.close()
        if self.process is None:
            return
        try:
            await asyncio.to_thread(self.process.wait, EXIT_WAIT_SECONDS)
        except subprocess.TimeoutExpired:
            log.warning("the inference process did not exit within %.0f s; killing it", EXIT_WAIT_SECONDS)
            self.process.kill()
            await asyncio.to_thread(self.process.wait)

    def lost(self) -> None:
        """The process closed its end (it exited, or crashed): fail everything still waiting on it."""
        self._transport = None
        if not self._draining:
            code = self.process.poll() if self.process is not None else None
            self._load_error = "the inference process exited" + (f" with status {code}" if code is not None else "")
            log.error("%s; answering 503 until the server is restarted", self._load_error)
        self._ready = False
        for future in self._requests.values():
            if not future.done():
                future.set_exception(Rejected("the inference process stopped before answering"))
        for query in self._queries.values():
            if not query.done():
                query.set_exception(Rejected("the inference process stopped"))
        self._requests.clear()
        self._queries.clear()
        if self._ready_event is not None:
            self._ready_event.set()

    # --- frames -------------------------------------------------------------------------------

    def _send(self, data: bytes) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(data)

    def handle(self, kind: int, payload: bytes) -> None:
        if kind == wire.RESULT:
            result = wire.Result.decode(payload)
            future = self._requests.pop(result.request, None)
            if future is not None and not future.done():
                probabilities = torch.frombuffer(bytearray(result.probabilities), dtype=torch.float32)
                answer = Answer(
                    probabilities, result.subnet, result.batch_size, result.enqueued, result.queued,
                    result.inference, result.finished, result.predicted, result.stage, result.cut_short,
                    result.blocks_run, result.groups_run,
                )  # fmt: skip
                future.set_result(answer)
        elif kind == wire.REJECTED:
            refused = wire.Refusal.decode(payload)
            future = self._requests.pop(refused.request, None)
            if future is not None and not future.done():
                future.set_exception(Rejected(refused.message, Refused(refused.reason), refused.retry_after or None))
        elif kind == wire.REPLY:
            query_id, body = wire.decode_id(payload, "REPLY")
            query = self._queries.pop(query_id, None)
            if query is not None and not query.done():
                query.set_result(body)
        elif kind == wire.LOAD:
            self.load = wire.Load.decode(payload)
        elif kind == wire.STATE:
            message = wire.decode_state(payload)
            if message["phase"] == "ready":
                self._ready = True
            elif message["phase"] == "failed":
                self._load_error = str(message.get("error"))
            if message["phase"] in ("ready", "failed") and self._ready_event is not None:
                self._ready_event.set()
        else:
            raise wire.ProtocolError(f"unknown frame kind {kind} from the inference process")

    # --- requests -----------------------------------------------------------------------------

    async def infer(self, image: Tensor, arrival: float, budget_s: float) -> Answer:
        if self._transport is None:
            raise Rejected(self._load_error or "the inference process is not connected")
        request = next(self._ids)
        future: asyncio.Future[Answer] = asyncio.get_running_loop().create_future()
        self._requests[request] = future
        channels, height, width = image.shape
        self._send(wire.Submit(request, arrival, budget_s, (channels, height, width), image.numpy().tobytes()).encode())
        try:
            return await future
        except asyncio.CancelledError:
            if self._requests.pop(request, None) is not None:
                self._send(wire.cancel(request))
            raise

    def shed_retry_after(self) -> int | None:
        return self.load.full_retry_after or None

    def fastest_seconds(self) -> float | None:
        return self.load.fastest or None

    def record_answer(self, subnet: int, met: bool, total: float, queued: float, post_overhead: float) -> None:
        self._send(wire.Answered(subnet, met, total, queued, post_overhead).encode())

    def count(self, outcome: str) -> None:
        self._send(wire.count(outcome))

    async def _query(self, what: int) -> bytes:
        if self._transport is None:
            raise Rejected(self._load_error or "the inference process is not connected")
        query_id = next(self._ids)
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._queries[query_id] = future
        self._send(wire.query(query_id, what))
        try:
            return await asyncio.wait_for(future, QUERY_TIMEOUT_SECONDS)
        except TimeoutError:
            self._queries.pop(query_id, None)
            raise Rejected(f"the inference process did not answer within {QUERY_TIMEOUT_SECONDS:.0f} s") from None

    async def status(self) -> StatusResponse:
        status = StatusResponse.model_validate_json(await self._query(wire.STATUS))
        return status.model_copy(update={"draining": status.draining or self._draining})

    async def subnets_view(self) -> SubnetsResponse:
        reply = await self._query(wire.SUBNETS)
        refused: dict[str, Any] = json.loads(reply)
        if "error" in refused:
            raise Rejected(refused["error"], Refused.UNAVAILABLE, 1)
        return SubnetsResponse.model_validate(refused)

    async def metrics_text(self) -> bytes:
        return await self._query(wire.METRICS)


def launch(settings: Settings) -> list[RemoteEngine]:
    """Start the inference process and wait until it has verified the bundle.

    Returns one handle per front-end process (``settings.frontend_processes``), each on its own socket; the
    first owns the process.

    Raises:
        EngineStartError: it could not (bad bundle or policy, or it died), with the reason.
    """
    pairs = [socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(settings.frontend_processes)]
    # -P: the working directory is not put on sys.path, so a `server` folder there cannot shadow ours.
    command = [sys.executable, "-P", "-m", "slimserve.server.engine_host", "--settings", settings.model_dump_json()]
    for _, back in pairs:
        command += ["--fd", str(back.fileno())]
    environment = openmp.inference_environment(os.environ, settings.inference_openmp_spin)
    process = subprocess.Popen(command, pass_fds=[back.fileno() for _, back in pairs], env=environment)
    for _, back in pairs:
        back.close()
    handles = []
    for index, (front, _) in enumerate(pairs):
        try:
            info, reader, early = _verified(front, process)
        except EngineStartError:
            for other, _ in pairs:
                other.close()
            raise
        handles.append(RemoteEngine(front, process if index == 0 else None, info, reader, early))
    return handles


def _verified(front: socket.socket, process: subprocess.Popen[bytes]) -> tuple[ModelInfo, wire.FrameReader, list]:
    """Read one socket until the inference process says verified (or failed, or exits)."""
    reader = wire.FrameReader()
    frames: list[tuple[int, bytes]] = []
    while True:
        data = front.recv(1 << 16)
        if not data:
            code = process.wait()
            raise EngineStartError(f"the inference process exited with status {code} before it verified the bundle")
        frames += reader.feed(data)
        for index, (kind, payload) in enumerate(frames):
            if kind != wire.STATE:
                continue
            message = wire.decode_state(payload)
            if message["phase"] == "failed":
                process.wait(EXIT_WAIT_SECONDS)
                raise EngineStartError(str(message.get("error")))
            if message["phase"] == "verified":
                return ModelInfo.from_json(message["info"]), reader, frames[index + 1 :]
