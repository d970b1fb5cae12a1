"""Locust load generator for slimserve: open-loop arrivals, real images, a latency budget per request.

Use it directly (web UI)::

    locust -f loadtest/locustfile.py --host http://127.0.0.1:8000 --arrival gamma --rate 100 --duration 60

or headless through ``slimserve loadtest run`` / ``slimserve loadtest compare``, which also
compute the report. One Locust user plays a precomputed schedule of send times (see
``loadtest/arrivals.py``) and fires each request in its own greenlet without waiting for earlier
replies, so the offered load does not drop when the server slows down. The shape class only
starts that one user and ends the test when the schedule is played out; the *rate* shapes (step,
spike, trace) live in the schedule, because changing Locust's user count is a closed loop.

Every response is recorded (``--results-csv``): send lag, end-to-end latency, status, budget, label,
predicted class, subnet and server timings.
"""

from __future__ import annotations

import base64
import csv
import json
import time
from pathlib import Path
from typing import Any

import gevent
import numpy as np
import psutil
from gevent.pool import Group
from locust import LoadTestShape, constant, events, task
from locust.contrib.fasthttp import FastHttpUser

from slimserve.loadtest.arrivals import ARRIVALS, read_trace, schedule
from slimserve.loadtest.workload import BudgetMix, test_images

FIELDS = (
    "index", "scheduled_s", "sent_s", "latency_ms", "status", "budget_ms", "label", "predicted",
    "subnet", "width", "expected_accuracy", "server_total_ms", "preprocess_ms", "queue_ms", "inference_ms",
    "batch_size", "error",
)  # fmt: skip
DONE = {"finished": False}


@events.init_command_line_parser.add_listener
def _arguments(parser) -> None:
    group = parser.add_argument_group("slimserve workload")
    group.add_argument("--arrival", choices=ARRIVALS, default="poisson", help="arrival process")
    group.add_argument("--rate", type=float, default=50.0, help="mean requests per second (peak for step/spike)")
    group.add_argument("--duration", type=float, default=30.0, help="seconds of arrivals")
    group.add_argument("--cv2", type=float, default=4.0, help="gamma arrivals: squared coefficient of variation")
    group.add_argument(
        "--trace-csv", default="loadtest/traces/azure_functions_like.csv", help="trace arrivals: per-second rates"
    )
    group.add_argument("--budget-mix", default="30:10,50:25,20:100", help="percent:milliseconds pairs")
    group.add_argument("--images", type=int, default=2000, help="distinct test images to cycle through")
    group.add_argument("--workload-seed", type=int, default=0, help="seed of arrivals, budgets and image order")
    group.add_argument("--results-csv", default="loadtest-results.csv", help="where every response is recorded")
    group.add_argument(
        "--malformed-share", type=float, default=0.0, help="share of requests sent with a body that is not an image"
    )
    group.add_argument(
        "--body-format",
        choices=("raw", "json"),
        default="raw",
        help='raw: the encoded image as the body; json: {"image": "<base64>"} (LitServe\'s endpoints take JSON)',
    )


class OpenLoopShape(LoadTestShape):
    """One user for as long as the schedule runs (plus a grace period for the last replies)."""

    def tick(self) -> tuple[int, float] | None:
        assert self.runner is not None and self.runner.environment.parsed_options is not None
        options = self.runner.environment.parsed_options
        if DONE["finished"] or self.get_run_time() > options.duration + 60:
            return None
        return (1, 1)


class OpenLoopClient(FastHttpUser):
    wait_time = constant(0)
    concurrency = 512  # connections this user may hold: enough that the pool never throttles the schedule
    network_timeout = 60.0
    connection_timeout = 10.0

    @task
    def play(self) -> None:
        options = self.environment.parsed_options
        trace = read_trace(Path(options.trace_csv)) if options.arrival == "trace" else None
        times = schedule(options.arrival, options.rate, options.duration, options.workload_seed, options.cv2, trace)
        rng = np.random.default_rng(options.workload_seed + 1)
        budgets = BudgetMix.parse(options.budget_mix).draw(len(times), rng)
        images, labels = test_images(options.images)
        if options.body_format == "json":  # encoded once, before the clock starts
            images = [json.dumps({"image": base64.b64encode(image).decode()}).encode() for image in images]
        content_type = "application/json" if options.body_format == "json" else "image/png"
        order = rng.integers(0, len(images), len(times))
        malformed = rng.random(len(times)) < options.malformed_share
        records: list[dict] = []
        process = psutil.Process()
        process.cpu_percent(None)
        cpu_started = time.perf_counter()
        group = Group()
        start = time.perf_counter() + 0.2
        for index, offset in enumerate(times):
            delay = start + offset - time.perf_counter()
            if delay > 0:
                gevent.sleep(delay)
            item = int(order[index])
            body = b"not an image: " + rng.bytes(64) if malformed[index] else images[item]
            group.spawn(
                self.send, records, index, start, offset, body, int(labels[item]), float(budgets[index]), content_type
            )
        group.join(timeout=60)
        elapsed = time.perf_counter() - cpu_started
        self.write(options.results_csv, records, process.cpu_percent(None), elapsed, len(times))
        DONE["finished"] = True
        self.environment.runner.quit()

    def send(
        self,
        records: list[dict],
        index: int,
        start: float,
        offset: float,
        image: bytes,
        label: int,
        budget: float,
        content_type: str,
    ) -> None:
        sent = time.perf_counter()
        record: dict[str, Any] = {
            "index": index,
            "scheduled_s": round(offset, 6),
            "sent_s": round(sent - start, 6),
            "budget_ms": budget,
            "label": label,
        }
        headers = {"X-Latency-Budget-Ms": f"{budget:g}", "Content-Type": content_type}
        body: Any = image  # FastHttpSession sends bytes as they are (its annotation says str)
        with self.client.post(
            "/v1/classify", data=body, headers=headers, name=f"/v1/classify {budget:g}ms", catch_response=True
        ) as response:
            record["latency_ms"] = round((time.perf_counter() - sent) * 1000.0, 4)
            record["status"] = response.status_code
            if response.status_code == 200:
                body = response.json()
                record.update(
                    predicted=body["class_index"],
                    subnet=body["subnet"]["id"],
                    width=body["subnet"]["width"],
                    expected_accuracy=body["subnet"]["expected_accuracy"],
                    server_total_ms=body["timing"]["total_ms"],
                    # where a miss lost its time; a peer's answer does not say (None)
                    preprocess_ms=body["timing"].get("preprocess_ms"),
                    queue_ms=body["timing"].get("queue_ms"),
                    inference_ms=body["timing"]["inference_ms"],
                    batch_size=body["timing"]["batch_size"],
                )
                if record["latency_ms"] > budget:
                    response.failure(f"over budget ({record['latency_ms']:.1f} > {budget:g} ms)")
            else:
                if response.status_code == 0:  # no HTTP answer: keep the exception, it names the cause
                    error = getattr(response, "error", None)
                    record["error"] = f"{type(error).__name__}: {error}"[:200]
                response.failure(f"HTTP {response.status_code}")
        records.append(record)

    @staticmethod
    def write(path: str, records: list[dict], cpu_percent: float, elapsed: float, scheduled: int) -> None:
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        with target.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=FIELDS)
            writer.writeheader()
            for record in sorted(records, key=lambda r: r["index"]):
                writer.writerow(record)
        meta = {
            "client_cpu_percent": round(cpu_percent, 1),
            "client_seconds": round(elapsed, 2),
            "scheduled": scheduled,
            "recorded": len(records),
        }
        target.with_suffix(".meta.json").write_text(json.dumps(meta) + "\n")
