"""How torch's idle OpenMP worker threads wait between ops: set once, before torch is imported.

GNU OpenMP (the runtime in PyTorch's Linux wheels) reads its environment when it loads. Left alone,
an idle worker spins ~3 ms before it sleeps; ``OMP_WAIT_POLICY=ACTIVE`` spins for minutes. Spinning
steals the cores the event loop and the client need between inferences, so the server runs
``PASSIVE`` (idle workers sleep at once) unless the user chose otherwise (docs/BENCHMARKS.md,
"OpenMP waiting": a bounded ~0.1 ms spin was measured too and served no faster, because the
server's inference worker is not the process's main thread, and libgomp's teams of other threads
wake their workers per parallel region anyway).

Serving and profiling share this setting, so the table measures what the server will run.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

WAIT_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
DEFAULT = {"OMP_WAIT_POLICY": "PASSIVE"}


def configure(environ: MutableMapping[str, str] = os.environ) -> None:
    """The server's OpenMP wait setting, unless the user already chose how OpenMP waits."""
    if not any(name in environ for name in WAIT_VARIABLES):
        environ.update(DEFAULT)


def wait_environment(environ: MutableMapping[str, str] = os.environ) -> dict[str, str]:
    """The OpenMP wait variables in effect (to record next to a measurement, or pass to a worker)."""
    return {name: environ[name] for name in WAIT_VARIABLES if name in environ}
