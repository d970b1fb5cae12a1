"""Peer policies: ``litserve:<id>`` and ``ray:<id>`` name a static row served by another stack.

A policy may carry its batching knobs: ``litserve:s0@8x2`` = ``max_batch_size`` 8 and a 2 ms
batch timeout. Without them a peer gets :data:`TUNED`, the knobs that won the sweep recorded in
docs/results/peers-tuning/ (docs/BENCHMARKS.md, "Against LitServe and Ray Serve").
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass

STACKS = ("litserve", "ray")
# (max batch, batch timeout ms) per stack, from the tuning sweep
TUNED = {"litserve": (8, 0.0), "ray": (8, 0.0)}
_POLICY = re.compile(r"^(?P<stack>[a-z]+):(?P<subnet>[^@\s]+)(?:@(?P<batch>\d+)x(?P<timeout>\d+(?:\.\d+)?))?$")


@dataclass(frozen=True)
class PeerPolicy:
    stack: str
    subnet: str
    max_batch: int
    batch_timeout_ms: float

    @classmethod
    def parse(cls, policy: str) -> PeerPolicy | None:
        """The peer a policy names, None for slimserve's own policies; ValueError if malformed."""
        stack = policy.partition(":")[0]
        if stack not in STACKS:
            return None
        match = _POLICY.match(policy)
        if match is None or int(match["batch"] or 1) < 1:
            raise ValueError(
                f"peer policy {policy!r}: expected {stack}:<subnet id> or {stack}:<subnet id>@<max batch>x<timeout ms>, "
                f"e.g. {stack}:s0@8x2"
            )
        batch, timeout = TUNED[stack]
        if match["batch"]:
            batch, timeout = int(match["batch"]), float(match["timeout"])
        return cls(stack, match["subnet"], batch, timeout)

    @property
    def body(self) -> str:
        """How the load generator must send the image: LitServe's endpoints take JSON, not raw bytes."""
        return "json" if self.stack == "litserve" else "raw"

    def command(self, bundle: str, port: int, request_timeout_s: float) -> list[str]:
        return [
            sys.executable, "-m", "slimserve", "--log-level", "WARNING", "peer", self.stack, "--bundle", bundle,
            "--subnet", self.subnet, "--port", str(port), "--max-batch", str(self.max_batch),
            "--batch-timeout-ms", f"{self.batch_timeout_ms:g}", "--request-timeout-s", f"{request_timeout_s:g}",
        ]  # fmt: skip


def request_timeout_s(budgets_ms: tuple[float, ...]) -> float:
    """A peer's request timeout: the loosest budget of the mix. A later answer is a miss anyway, and
    LitServe then drops what waited longer in its queue instead of computing it: the shedding a
    user who knows their SLO would configure."""
    return max(budgets_ms) / 1000.0
