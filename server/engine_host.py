"""The inference process behind ``slimserve serve``: one engine, driven from its main thread.

The front end starts it (server/engine_client.py, ``launch``) with one end of a socket pair per
front-end process and the server's settings. It verifies the bundle and says so (a ``STATE`` frame: ``verified`` with
the model's description, or ``failed`` with the reason), materializes and warms up in a loader
thread while it already answers queries, warms its main thread too (the one that runs batches),
says ``ready``, then loops on its main thread:

    read every frame that has arrived (queue, cancel, count, answer queries)
    -> if requests are queued, run one scheduler dispatch (the same policy as in-process); between
       two steps of a batch, read what has arrived and send what is ready, so a request that cannot
       wait for the batch runs ahead of it (server/scheduler.py)
    -> send the results and the queue's new LOAD in one write

Requests that arrive during a batch wait in the socket buffer and are queued before the next
decision, so the policy sees them exactly as it would have in-process. The main thread matters:
OpenMP keeps a spinning-capable thread team for the process's main thread, and nothing else in
this interpreter competes for the GIL (docs/BENCHMARKS.md, "Threads and OpenMP waiting").

It ignores SIGINT (Ctrl-C reaches the whole process group; the front end decides when to stop),
drains on SIGTERM, and exits when every front end has closed its end.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import selectors
import signal
import socket
import sys
import threading
from collections.abc import Sequence
from typing import Any

import torch

from slimserve.models.schema import BundleError
from slimserve.server import wire
from slimserve.server.engine import Answer, Engine
from slimserve.server.refusals import Rejected
from slimserve.server.settings import Settings

log = logging.getLogger("slimserve.inference")

OUTCOMES = frozenset({"rejected", "invalid", "deadline"})  # what the front end may COUNT
IDLE_POLL_SECONDS = 0.05  # how often an idle loop looks at the loader and at SIGTERM


class Peer:
    """One front-end process: its socket, what it has half-sent, what it is owed."""

    def __init__(self, connection: socket.socket) -> None:
        self.connection = connection
        self.reader = wire.FrameReader()
        self.outbox: list[bytes] = []
        self.live: set[int] = set()  # its requests queued and not cancelled: the ones still owed an answer

    def flush(self) -> bool:
        """Send what is due in one write; False if the front end has gone."""
        if not self.outbox:
            return True
        data = b"".join(self.outbox)
        self.outbox.clear()
        try:
            self.connection.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            return False
        return True


class EngineLoop:
    """The inference process's main loop, serving one or more front-end processes."""

    def __init__(self, engine: Engine, connections: Sequence[socket.socket]) -> None:
        self.engine = engine
        self.peers = {connection.fileno(): Peer(connection) for connection in connections}
        self.terminate = threading.Event()

    def run(self) -> int:
        engine = self.engine
        loader = threading.Thread(target=engine.load, name="slimserve-loader", daemon=True)
        loader.start()
        selector = selectors.DefaultSelector()
        for peer in self.peers.values():
            selector.register(peer.connection, selectors.EVENT_READ, peer)
        announced = draining = False
        try:
            while self.peers:  # until every front end has closed its end: nobody is left to answer
                if not announced and not loader.is_alive():
                    announced = True
                    if engine.warm_this_thread():
                        self._broadcast(wire.state("ready", warmup_seconds=engine.warmup_seconds))
                    else:
                        self._broadcast(wire.state("failed", error=f"model failed to load: {engine.load_error}"))
                    self._report_load()
                if self.terminate.is_set() and not draining:
                    draining = True
                    engine.begin_drain()
                scheduler = engine.scheduler if announced else None
                queued = scheduler is not None and scheduler.depth > 0
                self._read(selector, 0 if queued else IDLE_POLL_SECONDS)
                if scheduler is not None and scheduler.depth > 0:
                    scheduler.dispatch(between_steps=lambda: self._between_steps(selector))
                    self._report_load()
                self._flush(selector)
            return 0
        except wire.ProtocolError as error:
            log.error("stopping: a front end sent a malformed frame (%s)", error)
            return 1
        finally:
            engine.stop(0)
            for peer in self.peers.values():
                peer.connection.close()

    def _read(self, selector: selectors.BaseSelector, timeout: float) -> None:
        for key, _ in selector.select(timeout):
            if not self._receive(key.data):
                self._drop(selector, key.data)

    def _flush(self, selector: selectors.BaseSelector) -> None:
        for peer in list(self.peers.values()):
            if not peer.flush():
                self._drop(selector, peer)

    def _between_steps(self, selector: selectors.BaseSelector) -> None:
        """While a batch is paused: queue what has arrived, send what is ready (answers of requests run
        ahead of the batch), so the policy and the clients see them as if no batch were running."""
        self._read(selector, 0)
        self._flush(selector)

    def _drop(self, selector: selectors.BaseSelector, peer: Peer) -> None:
        """A front end went away: forget what it was owed (its queued requests run unanswered)."""
        if self.peers.pop(peer.connection.fileno(), None) is not None:
            selector.unregister(peer.connection)
            peer.live.clear()
            peer.connection.close()

    def _broadcast(self, frame: bytes) -> None:
        for peer in self.peers.values():
            peer.outbox.append(frame)

    # --- input --------------------------------------------------------------------------------

    def _receive(self, peer: Peer) -> bool:
        """Handle every complete frame that has arrived from ``peer``; False once it has gone."""
        try:
            data = peer.connection.recv(1 << 20)
        except (ConnectionResetError, BrokenPipeError):
            return False
        if not data:
            return False
        for kind, payload in peer.reader.feed(data):
            self._handle(peer, kind, payload)
        return True

    def _handle(self, peer: Peer, kind: int, payload: bytes) -> None:
        engine = self.engine
        if kind == wire.SUBMIT:
            self._submit(peer, wire.Submit.decode(payload))
        elif kind == wire.CANCEL:
            request, _ = wire.decode_id(payload, "CANCEL")
            peer.live.discard(request)
        elif kind == wire.ANSWERED:
            answered = wire.Answered.decode(payload)
            if answered.subnet >= len(engine.info.subnets):
                raise wire.ProtocolError(
                    f"ANSWERED names subnet {answered.subnet}, the table has {len(engine.info.subnets)}"
                )
            engine.record_answer(answered.subnet, answered.met, answered.total, answered.queued, answered.post_overhead)
        elif kind == wire.COUNT:
            outcome = payload.decode(errors="replace")
            if outcome not in OUTCOMES:
                raise wire.ProtocolError(f"COUNT of unknown outcome {outcome[:20]!r}")
            engine.count(outcome)
        elif kind == wire.QUERY:
            query_id, what = wire.decode_query(payload)
            peer.outbox.append(wire.reply(query_id, self._answer_query(what)))
        elif kind == wire.DRAIN:
            engine.begin_drain()
        else:
            raise wire.ProtocolError(f"unknown frame kind {kind}")

    def _submit(self, peer: Peer, submit: wire.Submit) -> None:
        request = submit.request
        image = torch.frombuffer(bytearray(submit.pixels), dtype=torch.uint8).reshape(submit.shape)
        peer.live.add(request)
        try:
            self.engine.submit(
                image,
                submit.arrival,
                submit.budget,
                lambda outcome: self._deliver(peer, request, outcome),
                cancelled=lambda: request not in peer.live,
            )
        except Rejected as rejection:
            self._deliver(peer, request, rejection)

    def _answer_query(self, what: int) -> bytes:
        engine = self.engine
        if what == wire.STATUS:
            return engine.status().model_dump_json().encode()
        if what == wire.SUBNETS:
            try:
                return engine.subnets_view().model_dump_json().encode()
            except Rejected as rejection:
                return json.dumps({"error": str(rejection)}).encode()
        if what == wire.METRICS:
            return engine.metrics_text()
        raise wire.ProtocolError(f"unknown query {what}")

    # --- output -------------------------------------------------------------------------------

    def _deliver(self, peer: Peer, request: int, outcome: Answer | Rejected) -> None:
        if request not in peer.live:
            return  # cancelled while it ran, or its front end is gone
        peer.live.discard(request)
        if isinstance(outcome, Rejected):
            peer.outbox.append(wire.Refusal(request, outcome.reason, outcome.retry_after or 0, str(outcome)).encode())
            return
        peer.outbox.append(
            wire.Result(
                request, outcome.subnet, outcome.batch_size, outcome.enqueued, outcome.queued, outcome.inference,
                outcome.finished, outcome.predicted, outcome.probabilities.contiguous().numpy().tobytes(),
                outcome.stage, outcome.cut_short, outcome.blocks_run, outcome.groups_run,
            ).encode()
        )  # fmt: skip

    def _report_load(self) -> None:
        engine = self.engine
        depth = engine.scheduler.depth if engine.scheduler is not None else 0
        self._broadcast(wire.Load(depth, engine.shed_retry_after() or 0, engine.fastest_seconds() or 0.0).encode())


def lower_priority(increment: int) -> None:
    """Raise this process's niceness by ``increment``. On Linux niceness belongs to each thread (new
    ones inherit their creator's), and importing torch has already started one: renice them all."""
    for task in os.listdir("/proc/self/task"):
        thread = int(task)
        os.setpriority(os.PRIO_PROCESS, thread, os.getpriority(os.PRIO_PROCESS, thread) + increment)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="slimserve's inference process (started by `slimserve serve`)")
    parser.add_argument(
        "--fd", type=int, action="append", required=True, help="socket to a front end (once per front end)"
    )
    parser.add_argument("--settings", required=True, help="the server's settings as JSON")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    connections = [socket.socket(fileno=fd) for fd in args.fd]
    for connection in connections:
        connection.setblocking(True)
    settings = Settings.model_validate_json(args.settings)
    if settings.inference_nice:
        lower_priority(settings.inference_nice)
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True
    )
    try:
        engine = Engine.open(settings)
    except (BundleError, ValueError) as error:
        for connection in connections:
            connection.sendall(wire.state("failed", error=f"cannot serve {settings.bundle}: {error}"))
            connection.close()
        return 1
    for connection in connections:
        connection.sendall(wire.state("verified", info=engine.info.to_json()))
    loop = EngineLoop(engine, connections)

    def on_sigterm(signum: int, frame: Any) -> None:
        loop.terminate.set()

    signal.signal(signal.SIGTERM, on_sigterm)
    return loop.run()


if __name__ == "__main__":
    sys.exit(main())
