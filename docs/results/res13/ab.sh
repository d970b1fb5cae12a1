#!/bin/bash
# A/B of where the latency budget starts, run on 2026-12-05: OLD = a worktree at 6dc9b17 (the budget
# starts when the app's task runs), NEW = one at the change (when the protocol began reading the
# request). Each round runs OLD then NEW with the same seed; static:s0 is the in-run control.
#   git worktree add --detach /tmp/old 6dc9b17 && OLD=/tmp/old NEW=$PWD docs/results/res13/ab.sh
set -euo pipefail
: "${OLD:?a worktree of the old commit}" "${NEW:?a worktree of the new one}"
SLIMSERVE="${SLIMSERVE:-$NEW/.venv/bin/slimserve}"
C="loadtest compare --trace poisson --rates 100,250 --duration 15 --repeats 3 --generator asyncio --budget-mix 30:8,50:15,20:50 --policies adaptive,static:s0"
for round in 1 2; do
  for side in old new; do
    tree=$OLD; [ "$side" = new ] && tree=$NEW
    (cd "$tree" && PYTHONPATH="$tree" "$SLIMSERVE" $C --seed 100$round \
      --out-dir "$NEW/docs/results/res13/ab-$side-$round" --raw-dir "$NEW/runs/res13/ab-$side-$round")
  done
done
