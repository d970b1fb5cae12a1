"""Run things the load test needs as separate processes: slimserve servers and headless Locust.

Locust monkey-patches its process with gevent, and a server must not share a process with its
load generator, so both run as subprocesses of the command that orchestrates them.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, NoReturn

from slimserve.loadtest.peers import PeerPolicy
from slimserve.loadtest.report import read_records, summarize, write_records

LOCUSTFILE = Path(__file__).with_name("locustfile.py")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


_FLAG = re.compile(r"[a-z][a-z0-9-]*(=[^+\s]+)?")


def variant(policy: str) -> tuple[str, list[str]]:
    """A slimserve policy and the ``slimserve serve`` flags of its variant: ``adaptive+no-pause-batches``
    -> ``("adaptive", ["--no-pause-batches"])``, ``adaptive+safety-margin-ms=5`` -> ``(..., ["--safety-margin-ms",
    "5"])``: an ablation served side by side with the default, in the same interleaved run."""
    base, *flags = policy.split("+")
    command: list[str] = []
    for flag in flags:
        if not _FLAG.fullmatch(flag):
            raise ValueError(
                f"policy {policy!r}: {flag!r} is not a serve flag (name or name=value, e.g. no-pause-batches)"
            )
        name, _, value = flag.partition("=")
        command += [f"--{name}", value] if value else [f"--{name}"]
    return base, command


class ServerStartError(RuntimeError):
    """A server under test that exited or never became ready; the message quotes its log's last line."""


def last_line(log: IO[bytes]) -> str | None:
    """The last non-empty line written to a server's log (argparse's complaint, a traceback's last line).
    Read with pread: the server shares the file's offset and may still be writing."""
    size = os.fstat(log.fileno()).st_size
    tail = os.pread(log.fileno(), 4096, max(0, size - 4096)).decode(errors="replace")
    lines = [line.strip() for line in tail.splitlines() if line.strip()]
    return lines[-1] if lines else None


@dataclass
class ServerProcess:
    """A server under test on a loopback port: ``slimserve serve --policy P``, or a peer stack for
    ``litserve:<id>`` / ``ray:<id>`` (see ``loadtest.peers``). It runs in a session of its own,
    optionally pinned to ``cpus``; stop() sends SIGTERM (slimserve drains) and then kills whatever
    of its process group is left (a peer's workers)."""

    bundle: Path
    policy: str
    port: int = 0
    extra_env: Mapping[str, str | None] | None = None  # None removes a variable the parent has
    cpus: tuple[int, ...] | None = None  # cores for the server and every process it starts
    request_timeout_s: float = 30.0  # peers only: see loadtest.peers.request_timeout_s
    process: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None
    _log: Any = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def peer(self) -> PeerPolicy | None:
        return PeerPolicy.parse(self.policy)

    @property
    def body(self) -> str:
        """How the load generator sends images to this server ("raw" or "json")."""
        return self.peer.body if self.peer else "raw"

    def command(self) -> tuple[list[str], str]:
        """The command line and the path that answers 200 once the server can classify."""
        if self.peer is not None:
            return self.peer.command(str(self.bundle), self.port, self.request_timeout_s), "/health"
        policy, flags = variant(self.policy)
        return [sys.executable, "-m", "slimserve", "serve", "--bundle", str(self.bundle), "--policy", policy,
                "--port", str(self.port), "--log-level", "warning", *flags], "/readyz"  # fmt: skip

    def start(self, timeout: float = 120.0) -> ServerProcess:
        self.port = self.port or free_port()
        env = dict(os.environ)
        for name, value in (self.extra_env or {}).items():
            if value is None:
                env.pop(name, None)
            else:
                env[name] = value
        command, ready_path = self.command()
        # without a log path the output still goes to a file, so a failed start can say why
        self._log = open(self.log_path, "w+b") if self.log_path else tempfile.TemporaryFile()  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            command,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=pin(self.cpus),
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self._fail(f"exited with status {self.process.returncode}")
            if http_status(f"{self.url}{ready_path}") == 200:
                return self
            time.sleep(0.2)
        self._fail(f"was not ready after {timeout:.0f} s")

    def _fail(self, what: str) -> NoReturn:
        reason = last_line(self._log) if self._log is not None else None
        self.stop()
        where = f" (log: {self.log_path})" if self.log_path else ""
        raise ServerStartError(f"server for policy {self.policy} {what}" + (f": {reason}" if reason else "") + where)

    def stop(self, timeout: float = 30.0) -> int | None:
        try:
            if self.process is None:
                return None
            if self.process.poll() is None:
                self.process.send_signal(signal.SIGTERM)
                try:
                    self.process.wait(timeout)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait()
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.process.pid, signal.SIGKILL)  # what the server left behind, if anything
            return self.process.returncode
        finally:
            if self._log is not None:
                self._log.close()
                self._log = None

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def pin(cpus: tuple[int, ...] | None) -> Callable[[], None] | None:
    """A ``preexec_fn`` that pins the child (and everything it starts) to ``cpus``."""
    if not cpus:
        return None
    chosen = set(cpus)
    return lambda: os.sched_setaffinity(0, chosen)


def http_status(url: str, timeout: float = 2.0) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return int(error.code)
    except (urllib.error.URLError, OSError):
        return None


def fetch_json(url: str, timeout: float = 5.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.loads(response.read())


def served_column(url: str) -> str | None:
    """The latency column a slimserve server at ``url`` predicts from (``/v1/subnets``: a GPU's on a
    GPU); None from anything that does not say (a peer stack, a server not up)."""
    try:
        payload = fetch_json(f"{url}/v1/subnets")
    except (OSError, ValueError):  # refused, HTTP error, timeout, not JSON
        return None
    column = payload.get("device_profile") if isinstance(payload, dict) else None
    return column if isinstance(column, str) else None


@dataclass(frozen=True)
class Workload:
    arrival: str = "poisson"
    rate: float = 50.0
    duration: float = 30.0
    cv2: float = 4.0
    trace_csv: str = "loadtest/traces/azure_functions_like.csv"
    budget_mix: str = "30:10,50:25,20:100"
    images: int = 2000
    seed: int = 0
    malformed: float = 0.0  # share of requests whose body is not an image (expected answer: 400)


def run_locust(
    host: str,
    workload: Workload,
    results_csv: Path,
    timeout: float | None = None,
    body: str = "raw",
    cpus: tuple[int, ...] | None = None,
) -> dict[str, Any]:
    """One headless open-loop run against ``host``; returns its summary (see ``loadtest.report``).

    ``body``: "raw" (the encoded image, as slimserve and Ray take it) or "json" (base64 in
    ``{"image": ...}``, as LitServe takes it); ``cpus``: cores to pin the generator to."""
    results_csv.parent.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--host", host,
        "--loglevel", "WARNING", "--only-summary", "--run-time", f"{int(workload.duration + 90)}s",
        "--arrival", workload.arrival, "--rate", str(workload.rate), "--duration", str(workload.duration),
        "--cv2", str(workload.cv2), "--trace-csv", workload.trace_csv, "--budget-mix", workload.budget_mix,
        "--images", str(workload.images), "--workload-seed", str(workload.seed), "--results-csv", str(results_csv),
        "--malformed-share", str(workload.malformed), "--body-format", body,
    ]  # fmt: skip
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=timeout or workload.duration + 180, preexec_fn=pin(cpus)
    )
    if not results_csv.exists():
        raise RuntimeError(f"locust wrote no results (exit {result.returncode}):\n{result.stderr[-3000:]}")
    meta = json.loads(results_csv.with_suffix(".meta.json").read_text())
    records = read_records(results_csv)
    summary = summarize(records, workload.duration, meta["scheduled"], meta["client_cpu_percent"])
    summary["workload"] = workload.__dict__
    summary["client_cpus"] = list(cpus) if cpus else None
    return summary


def run_fresh(host: str, workload: Workload, results_csv: Path, body: str = "raw") -> dict[str, Any]:
    """The same open-loop run with the asyncio generator instead of Locust (a new connection per
    request, loadtest/fresh_connections.py), in this process; records go to ``results_csv``."""
    from slimserve.loadtest import fresh_connections
    from slimserve.loadtest.arrivals import read_trace

    trace = read_trace(Path(workload.trace_csv)) if workload.arrival == "trace" else None
    run = fresh_connections.run(host, workload.rate, workload.duration, workload.budget_mix, seed=workload.seed,
                                arrival=workload.arrival, images=workload.images, cv2=workload.cv2, trace=trace,
                                body_format=body)  # fmt: skip
    write_records(results_csv, run.records)
    summary = summarize(run.records, workload.duration, run.scheduled, run.client_cpu_percent)
    summary["workload"] = workload.__dict__
    summary["client_cpus"] = None
    summary["connection_error_kinds"] = run.errors
    return summary
