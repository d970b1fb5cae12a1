#!/bin/bash
# The asyncio client pinned apart from the server (server on core 0, client on core 1), then the
# same compare unpinned, back to back (run on 2026-12-05 at b0e06ac, from the repository root).
set -euo pipefail
C="--trace poisson --rates 20,100,250 --duration 15 --repeats 3 --generator asyncio --budget-mix 30:8,50:15,20:50 --policies adaptive,static:s0,static:s2"
taskset -c 1 slimserve loadtest compare $C --server-cpus 0 --out-dir runs/res14/pinned --raw-dir runs/res14/raw-pinned
slimserve loadtest compare $C --out-dir runs/res14/unpinned --raw-dir runs/res14/raw-unpinned
