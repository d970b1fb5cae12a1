"""Run things the load test needs as separate processes: slimserve servers and headless Locust.

Locust monkey-patches its process with gevent, and a server must not share a process with its
load generator, so both run as subprocesses of the command that orchestrates them.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loadtest.report import read_records, summarize

LOCUSTFILE = Path(__file__).with_name("locustfile.py")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class ServerProcess:
    """``slimserve serve`` on a loopback port, stopped with SIGTERM (so it drains) on exit."""

    bundle: Path
    policy: str
    port: int = 0
    extra_env: Mapping[str, str | None] | None = None  # None removes a variable the parent has
    process: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None
    _log: Any = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 120.0) -> ServerProcess:
        self.port = self.port or free_port()
        env = dict(os.environ)
        for name, value in (self.extra_env or {}).items():
            if value is None:
                env.pop(name, None)
            else:
                env[name] = value
        command = [sys.executable, "-m", "server.cli", "serve", "--bundle", str(self.bundle), "--policy", self.policy,
                   "--port", str(self.port), "--log-level", "warning"]  # fmt: skip
        self._log = open(self.log_path, "wb") if self.log_path else None  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            command, env=env, stdout=self._log or subprocess.DEVNULL, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"server for policy {self.policy} exited with {self.process.returncode} (log: {self.log_path})"
                )
            if http_status(f"{self.url}/readyz") == 200:
                return self
            time.sleep(0.2)
        self.stop()
        raise TimeoutError(f"server for policy {self.policy} not ready after {timeout:.0f} s")

    def stop(self, timeout: float = 30.0) -> int | None:
        try:
            if self.process is None or self.process.poll() is not None:
                return self.process.returncode if self.process else None
            self.process.send_signal(signal.SIGTERM)
            try:
                return self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                return self.process.wait()
        finally:
            if self._log is not None:
                self._log.close()
                self._log = None

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


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


def run_locust(host: str, workload: Workload, results_csv: Path, timeout: float | None = None) -> dict[str, Any]:
    """One headless open-loop run against ``host``; returns its summary (see ``loadtest.report``)."""
    results_csv.parent.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--host", host,
        "--loglevel", "WARNING", "--only-summary", "--run-time", f"{int(workload.duration + 90)}s",
        "--arrival", workload.arrival, "--rate", str(workload.rate), "--duration", str(workload.duration),
        "--cv2", str(workload.cv2), "--trace-csv", workload.trace_csv, "--budget-mix", workload.budget_mix,
        "--images", str(workload.images), "--workload-seed", str(workload.seed), "--results-csv", str(results_csv),
        "--malformed-share", str(workload.malformed),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout or workload.duration + 180)
    if not results_csv.exists():
        raise RuntimeError(f"locust wrote no results (exit {result.returncode}):\n{result.stderr[-3000:]}")
    meta = json.loads(results_csv.with_suffix(".meta.json").read_text())
    records = read_records(results_csv)
    summary = summarize(records, workload.duration, meta["scheduled"], meta["client_cpu_percent"])
    summary["workload"] = workload.__dict__
    return summary
