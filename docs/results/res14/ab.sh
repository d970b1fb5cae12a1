#!/bin/bash
# A/B of starting the budget at the accept for a connection's first request already waiting there
# (run on 2026-12-05): OLD = a worktree at b0e06ac (the budget starts at the protocol's first read),
# NEW = one at the change. Three rounds, the sides' order alternating, each pair with one seed;
# static:s0 is the in-run control.
#   git worktree add --detach /tmp/old b0e06ac && OLD=/tmp/old NEW=$PWD docs/results/res14/ab.sh
set -euo pipefail
: "${OLD:?a worktree of the old commit}" "${NEW:?a worktree of the new one}"
OUT="${OUT:-$NEW}"
SLIMSERVE="${SLIMSERVE:-$NEW/.venv/bin/slimserve}"
C="loadtest compare --trace poisson --rates 100,250 --duration 15 --repeats 3 --generator asyncio --budget-mix 30:8,50:15,20:50 --policies adaptive,static:s0"
for round in 1 2 3; do
  order="old new"; [ "$round" = 2 ] && order="new old"
  for side in $order; do
    tree=$OLD; [ "$side" = new ] && tree=$NEW
    (cd "$tree" && PYTHONPATH="$tree" "$SLIMSERVE" $C --seed 200$round \
      --out-dir "$OUT/docs/results/res14/ab-$side-$round" --raw-dir "$OUT/runs/res14/ab-$side-$round")
  done
done
