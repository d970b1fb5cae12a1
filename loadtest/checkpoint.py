"""A comparison's finished runs on disk, written after every run, so that a failed run, a stop or a
lost machine costs at most the run in progress, and ``slimserve loadtest compare --resume`` does
only what is left.

What a resumed comparison must share with the first start is checked, not assumed: the
*identity* (bundle, trace, policies, durations, budgets, client, pinning) must match field by
field, and the *setup* the first start measured (the server overhead, the budget mix derived from
it, the servers' safety margin) is reused, so every run of one report is scored the same way.
Rates and repeats may grow: finished runs are looked up by (policy, rate, repeat).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

RunKey = tuple[str, float, int]  # (policy, rate in req/s, repeat)

log = logging.getLogger(__name__)


class ResumeError(ValueError):
    """A checkpoint that cannot be read, or that belongs to another comparison; the message says which."""


@dataclass
class Checkpoint:
    path: Path
    identity: dict[str, Any]  # JSON values only, so that a stored one compares equal
    setup: dict[str, Any] = field(default_factory=dict)
    runs: dict[RunKey, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def open(cls, path: Path, identity: dict[str, Any], resume: bool) -> Checkpoint:
        """The runs already finished when resuming; an empty checkpoint (overwriting any) otherwise."""
        if not resume:
            if path.exists():
                log.warning("starting over: %s will be replaced (--resume would have kept its runs)", path)
            return cls(path, identity)
        if not path.exists():
            raise ResumeError(f"nothing to resume: {path} does not exist (run without --resume to start)")
        try:
            data = json.loads(path.read_text())
            stored = data["identity"]
            runs = {(r["policy"], float(r["rate"]), int(r["repeat"])): r["summary"] for r in data["runs"]}
            setup = dict(data["setup"])
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise ResumeError(
                f"{path}: not a readable checkpoint ({error!r}); run without --resume to start over"
            ) from None
        differs = sorted(k for k in identity.keys() | stored.keys() if identity.get(k) != stored.get(k))
        if differs:
            changes = "; ".join(f"{k}: {stored.get(k)!r} there, {identity.get(k)!r} now" for k in differs)
            raise ResumeError(
                f"{path} is from another comparison ({changes}); run without --resume to start over"
            ) from None
        return cls(path, identity, setup, runs)

    def remember_setup(self, **values: Any) -> None:
        self.setup.update(values)
        self.save()

    def record(self, key: RunKey, summary: dict[str, Any]) -> None:
        self.runs[key] = summary
        self.save()

    def save(self) -> None:
        """Atomically: a stop while writing leaves the previous checkpoint, never half of one."""
        runs = [{"policy": p, "rate": r, "repeat": k, "summary": s} for (p, r, k), s in self.runs.items()]
        temporary = self.path.with_name(self.path.name + ".tmp")
        temporary.write_text(json.dumps({"identity": self.identity, "setup": self.setup, "runs": runs}, indent=1))
        os.replace(temporary, self.path)
