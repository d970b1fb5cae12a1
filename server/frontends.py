"""Run the HTTP front end: one uvicorn process, or several sharing the listening socket.

Each front-end process parses HTTP, decodes images and sheds load on its own event loop and core,
and talks to the one inference process over its own socket (server/engine_client.py, ``launch``).
Extra front ends are forked from the first once the bundle is verified and before anything has
started a thread; the kernel hands each new connection to one of them. The first front end owns
the inference process and forwards SIGTERM/SIGINT to the others, so all of them drain together,
and reaps them before it returns.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from collections.abc import Sequence
from socket import socket
from typing import Any

import uvicorn

from slimserve.server.app import create_app
from slimserve.server.engine_client import EngineHandle, RemoteEngine
from slimserve.server.http_protocol import http_implementation
from slimserve.server.settings import Settings

log = logging.getLogger(__name__)

REAP_GRACE_SECONDS = 5.0


def serve(
    settings: Settings,
    listener: socket,
    engine: EngineHandle | None,
    children: Sequence[int] = (),
    forked: bool = False,
) -> None:
    """One front end on ``listener`` until SIGTERM/SIGINT (forwarded to ``children``) and the drain.

    ``forked``: a front end forked by another. It ignores a repeated signal: a Ctrl-C reaches the
    whole process group *and* is forwarded by the first front end, and uvicorn reads a second
    signal as "skip the drain".
    """
    app = create_app(settings, engine=engine)
    state = app.state.slimserve
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_keep_alive=int(max(1, settings.keep_alive_seconds)),
        timeout_graceful_shutdown=int(max(1, settings.drain_seconds)),
        limit_concurrency=settings.max_connections,
        http=http_implementation(settings.http_parser, settings.max_header_bytes),
        h11_max_incomplete_event_size=settings.max_header_bytes,
        access_log=False,  # per-request logs cost more than the model's smallest subnet on 2 cores
    )

    class DrainingServer(uvicorn.Server):
        """Flip readiness to 503 the moment SIGTERM arrives, before uvicorn stops accepting."""

        def handle_exit(self, sig: int, frame: Any) -> None:
            if forked and self.should_exit:
                return
            state.engine.begin_drain()
            for child in children:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child, sig)
            super().handle_exit(sig, frame)

    DrainingServer(config).run(sockets=[listener])


def serve_all(settings: Settings, listener: socket, engines: Sequence[RemoteEngine]) -> None:
    """``len(engines)`` front-end processes: this one with ``engines[0]``, forked ones with the rest."""
    children: list[int] = []
    for index, engine in enumerate(engines[1:], start=1):
        pid = os.fork()
        if pid == 0:  # the child: keep only its own socket to the inference process
            for other_index, other in enumerate(engines):
                if other_index != index:
                    other.detach()
            status = 0
            try:
                serve(settings, listener, engine, forked=True)
            except KeyboardInterrupt:
                pass  # uvicorn re-raises the Ctrl-C it drained on
            except BaseException:
                log.exception("front end %d failed", index)
                status = 1
            os._exit(status)
        children.append(pid)
    for engine in engines[1:]:
        engine.detach()  # the children hold these; the inference process sees their close, not ours
    try:
        serve(settings, listener, engines[0], children)
    finally:
        reap(children, settings.drain_seconds + REAP_GRACE_SECONDS)


def reap(children: Sequence[int], timeout: float) -> None:
    """Wait for the forked front ends to exit; kill what is still running after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    waiting = set(children)
    while waiting and time.monotonic() < deadline:
        for child in list(waiting):
            with contextlib.suppress(ChildProcessError):
                if os.waitpid(child, os.WNOHANG)[0] == 0:
                    continue
            waiting.discard(child)
        time.sleep(0.05)
    for child in waiting:
        log.warning("front end %d did not exit within %.0f s; killing it", child, timeout)
        with contextlib.suppress(ProcessLookupError, ChildProcessError):
            os.kill(child, signal.SIGKILL)
            os.waitpid(child, 0)
