"""How torch's idle OpenMP worker threads wait between ops: set once, before torch is imported.

GNU OpenMP (the runtime in PyTorch's Linux wheels) reads its environment when it loads. Left alone,
an idle worker spins ~3 ms before it sleeps; ``OMP_WAIT_POLICY=ACTIVE`` spins for minutes. Spinning
steals the cores the event loop and the client need between inferences, so the server runs
``PASSIVE`` (idle workers sleep at once) unless the user chose otherwise (docs/BENCHMARKS.md,
"Threads and OpenMP waiting"). A bounded ~0.1 ms spin pays only on a process's main thread
(libgomp's teams of other threads wake their workers per parallel region anyway), which is where
the inference process runs its batches: :func:`inference_environment` gives it one when asked
(setting ``inference_openmp_spin``). It stays off by default: with a table profiled that way it
paid at light and moderate load but cost the one-thread rows under heavy load (docs/RESULTS.md,
"The inference process's spin, profiled as served").

Serving and profiling share this setting, so the table measures what the server will run; to
serve with the spin, profile in the environment it gives into a column of its own
(``GOMP_SPINCOUNT=10000 OMP_PROC_BIND=true slimserve profile --bundle B --column cpu-2t-spin
--write``) and serve from that column (setting ``latency_column``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, MutableMapping

WAIT_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
DEFAULT = {"OMP_WAIT_POLICY": "PASSIVE"}
DEFAULTED = "SLIMSERVE_OPENMP_DEFAULTED"  # set with DEFAULT: the wait setting is ours, not the user's


def configure(environ: MutableMapping[str, str] = os.environ) -> None:
    """The server's OpenMP wait setting, unless the user already chose how OpenMP waits."""
    if not any(name in environ for name in WAIT_VARIABLES):
        environ.update(DEFAULT)
        environ[DEFAULTED] = "1"


def inference_environment(environ: Mapping[str, str], spin: int) -> dict[str, str]:
    """The environment of the inference process, whose forward passes run on its main thread.

    There, unlike on any other thread, idle workers that spin a little before they sleep let two
    threads share a batch: the widest demo row ran batches of 2-4 1.2-1.6x faster with
    ``GOMP_SPINCOUNT=10000`` (~0.1 ms) than sleeping at once, and at batch 1 1.25x faster than one
    thread (docs/BENCHMARKS.md, "Threads and OpenMP waiting"). With ``spin`` > 0 and the wait
    setting ours, not the user's, the workers spin ``spin`` iterations before they sleep, each
    thread bound to its own core; otherwise the environment is passed on as it is.
    """
    child = dict(environ)
    if spin > 0 and child.get(DEFAULTED) == "1":
        _spin(child, spin)
    return child


def _spin(environ: MutableMapping[str, str], spin: int) -> None:
    # Bound threads: unbound, a worker woken after 20 ms of idleness seemed to land on the core where
    # the main thread spins waiting for it: the fastest row's pass took 8.9 ms on two threads, bound
    # 0.7 (docs/BENCHMARKS.md, "Threads and OpenMP waiting").
    environ.pop("OMP_WAIT_POLICY", None)
    environ["GOMP_SPINCOUNT"] = str(spin)
    environ.setdefault("OMP_PROC_BIND", "true")


def wait_environment(environ: MutableMapping[str, str] = os.environ) -> dict[str, str]:
    """The OpenMP wait variables in effect (to record next to a measurement, or pass to a worker)."""
    return {name: environ[name] for name in WAIT_VARIABLES if name in environ}
