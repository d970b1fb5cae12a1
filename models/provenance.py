"""How an artifact was made: the command, the seed and the versions, recorded in every output."""

from __future__ import annotations

import platform
import shlex
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from slimserve.models.openmp import wait_environment


def _git_commit() -> str | None:
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=Path(__file__).parent
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout.strip() or None if result.returncode == 0 else None


def provenance(seed: int) -> dict[str, Any]:
    import numpy
    import torch

    return {
        "command": shlex.join(["slimserve", *sys.argv[1:]]),
        "seed": seed,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "git_commit": _git_commit(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
        # How idle OpenMP threads wait: latency of small subnets depends on it several-fold.
        "openmp_wait": wait_environment(),
    }
