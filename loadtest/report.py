"""From per-request records to the numbers that decide whether the server did its job.

* SLO attainment: answered (200) within the budget, as measured by the client / all sent.
* Effective accuracy: answered correctly *and* within budget / all sent (Model-Switching, HotCloud
  '20). ``expected_effective_accuracy`` is the same with the table's accuracy of the subnet used
  instead of this sample's correctness: free of sampling noise, and comparable with the oracle.
* Served accuracy: correct / answered.
* Oracle bound: for each request, the table accuracy of the most accurate subnet whose measured
  batch-1 latency plus the measured server overhead fits its budget (0 if none does) - what a
  perfect scheduler could deliver at zero load.
"""

from __future__ import annotations

import csv
import dataclasses
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from slimserve.loadtest.workload import batch_one_p50

LAG_LIMIT_MS = 5.0  # a run whose p99 send lag exceeds this is flagged: the generator fell behind


@dataclass(frozen=True)
class Record:
    scheduled_s: float
    sent_s: float
    latency_ms: float
    status: int
    budget_ms: float
    label: int
    predicted: int | None
    subnet: str | None
    width: float | None
    expected_accuracy: float | None
    inference_ms: float | None
    batch_size: int | None
    # where the server says the time went (None from a peer, or a record made before they were kept)
    server_total_ms: float | None = None  # its arrival stamp to its response, as the server measures
    preprocess_ms: float | None = None  # arrival stamp to queued: body, decoding, hand-off
    queue_ms: float | None = None

    @property
    def server_other_ms(self) -> float | None:
        """The server's total less its front end, queue and inference: a batch paused for others, the
        answer's way back to the client's connection (None where a part is not recorded)."""
        total, front, queue, inference = self.server_total_ms, self.preprocess_ms, self.queue_ms, self.inference_ms
        if total is None or front is None or queue is None or inference is None:
            return None
        return total - front - queue - inference

    @property
    def late(self) -> bool:
        """Answered, but after the budget."""
        return self.answered and self.latency_ms > self.budget_ms

    @property
    def answered(self) -> bool:
        return self.status == 200

    @property
    def met(self) -> bool:
        return self.answered and self.latency_ms <= self.budget_ms

    @property
    def correct(self) -> bool:
        return self.answered and self.predicted == self.label


def _optional(row: dict[str, str], key: str, kind: type) -> Any:
    value = row.get(key, "")
    return kind(value) if value not in ("", None) else None


def read_records(path: Path) -> list[Record]:
    with path.open(newline="") as handle:
        return [
            Record(
                scheduled_s=float(row["scheduled_s"]),
                sent_s=float(row["sent_s"]),
                latency_ms=float(row["latency_ms"]) if row["latency_ms"] else math.inf,
                status=int(row["status"]) if row["status"] else 0,
                budget_ms=float(row["budget_ms"]),
                label=int(row["label"]),
                predicted=_optional(row, "predicted", int),
                subnet=row.get("subnet") or None,
                width=_optional(row, "width", float),
                expected_accuracy=_optional(row, "expected_accuracy", float),
                inference_ms=_optional(row, "inference_ms", float),
                batch_size=_optional(row, "batch_size", int),
                server_total_ms=_optional(row, "server_total_ms", float),
                preprocess_ms=_optional(row, "preprocess_ms", float),
                queue_ms=_optional(row, "queue_ms", float),
            )
            for row in csv.DictReader(handle)
        ]


RECORD_FIELDS = tuple(Record.__dataclass_fields__)


def write_records(path: Path, records: list[Record]) -> None:
    """Records as the CSV that :func:`read_records` reads (what the Locust generator also writes)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=RECORD_FIELDS)
        writer.writeheader()
        for record in records:
            row = {k: ("" if v is None else v) for k, v in dataclasses.asdict(record).items()}
            row["latency_ms"] = "" if not math.isfinite(record.latency_ms) else record.latency_ms
            row["status"] = record.status or ""
            writer.writerow(row)


def _percentile(values: list[float], q: float) -> float | None:
    finite = [v for v in values if math.isfinite(v)]
    return round(float(np.percentile(finite, q)), 3) if finite else None


def summarize(
    records: list[Record], duration_s: float, scheduled: int | None = None, client_cpu_percent: float | None = None
) -> dict[str, Any]:
    """Every metric of one run. ``scheduled`` (requests the schedule held) catches silent drops."""
    sent = len(records)
    if sent == 0:
        raise ValueError("no requests were recorded")
    answered = [r for r in records if r.answered]
    met = [r for r in records if r.met]
    statuses = Counter(r.status for r in records)
    lag = [(r.sent_s - r.scheduled_s) * 1000.0 for r in records]
    lag_p99 = _percentile(lag, 99) or 0.0
    subnets = Counter(r.subnet for r in answered)
    widths = [r.width for r in answered if r.width is not None]
    batches = [r.batch_size for r in answered if r.batch_size]
    return {
        "sent": sent,
        "scheduled": scheduled if scheduled is not None else sent,
        "status_counts": {str(k): v for k, v in sorted(statuses.items())},
        "slo_attainment": round(len(met) / sent, 5),
        "effective_accuracy": round(sum(r.correct for r in met) / sent, 5),
        "expected_effective_accuracy": round(sum(r.expected_accuracy or 0.0 for r in met) / sent, 5),
        "served_accuracy": round(sum(r.correct for r in answered) / len(answered), 5) if answered else None,
        "latency_ms": {f"p{q}": _percentile([r.latency_ms for r in answered], q) for q in (50, 95, 99)},
        "goodput_per_s": round(len(met) / duration_s, 3),
        "offered_per_s": round(sent / duration_s, 3),
        "shed_rate": round((statuses.get(503, 0) + statuses.get(504, 0)) / sent, 5),
        "connection_errors": statuses.get(0, 0),
        "mean_width": round(float(np.mean(widths)), 4) if widths else None,
        "mean_batch": round(float(np.mean(batches)), 3) if batches else None,
        "subnet_mix": {k: round(v / len(answered), 4) for k, v in sorted(subnets.items()) if k},
        "send_lag_ms": {"p50": _percentile(lag, 50), "p99": lag_p99, "max": round(max(lag), 3)},
        "client_cpu_percent": client_cpu_percent,
        "generator_behind": lag_p99 > LAG_LIMIT_MS,
        "late": where_time_went([r for r in records if r.late]),
        "answered_outside_server_ms_p50": _percentile(outside_server(answered), 50),
    }


def median_known(values: Sequence[float | None]) -> float | None:
    """Median of the values that were recorded (None: none was)."""
    return _percentile([v for v in values if v is not None], 50)


def outside_server(records: list[Record]) -> list[float]:
    """End to end minus what the server measured: the client, the network, and the time before the
    server's arrival stamp (socket queues, a front end waiting for a core), which no policy sees."""
    return [r.latency_ms - r.server_total_ms for r in records if r.server_total_ms is not None]


def where_time_went(late: list[Record]) -> dict[str, Any]:
    """Medians over the answers that came after their budget: how long they took, and of that how much
    outside the server, in its front end, in its queue, in inference and in the rest of the server
    (None where not recorded). Each is a median of its own: they do not add up to the total."""
    median = median_known
    return {
        "count": len(late),
        "latency_ms": median([r.latency_ms for r in late]),
        "outside_server_ms": median(outside_server(late)),
        "preprocess_ms": median([r.preprocess_ms for r in late]),
        "queue_ms": median([r.queue_ms for r in late]),
        "inference_ms": median([r.inference_ms for r in late]),
        "server_other_ms": median([r.server_other_ms for r in late]),
    }


def oracle_accuracy(records: list[Record], table_path: Path, overhead_ms: float, column: str | None = None) -> float:
    """Mean over all sent requests of the best table accuracy whose batch-1 latency + overhead fits,
    latency from ``column``: the one the servers predict from (a GPU's on a GPU; default: the primary)."""
    options = sorted(batch_one_p50(table_path, column))
    total = 0.0
    for record in records:
        fitting = [accuracy for latency, accuracy in options if latency + overhead_ms <= record.budget_ms]
        total += max(fitting, default=0.0)
    return round(total / len(records), 5)


def server_overhead_ms(records: list[Record]) -> float:
    """Median end-to-end latency minus inference time: HTTP, decoding, queueing at light load, client."""
    gaps = [r.latency_ms - r.inference_ms for r in records if r.answered and r.inference_ms is not None]
    if not gaps:
        raise ValueError("no answered requests to measure the overhead from")
    return round(float(np.median(gaps)), 3)


def per_second(records: list[Record], duration_s: float) -> dict[str, list[float | None]]:
    """Time series for plots: offered rate, p99 latency and mean width per second of the run."""
    seconds = max(1, math.ceil(duration_s))
    bins: list[list[Record]] = [[] for _ in range(seconds)]
    for record in records:
        bins[min(seconds - 1, int(record.scheduled_s))].append(record)
    return {
        "rate": [float(len(b)) for b in bins],
        "p99_ms": [_percentile([r.latency_ms for r in b if r.answered], 99) for b in bins],
        "mean_width": [
            float(np.mean([r.width for r in b if r.width is not None])) if any(r.width for r in b) else None
            for b in bins
        ],
        "attainment": [sum(r.met for r in b) / len(b) if b else None for b in bins],
    }
