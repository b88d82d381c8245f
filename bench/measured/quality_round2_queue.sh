#!/usr/bin/env bash
# Round 2, after quality_round2_code.sh's first three commands (badam, misa3, uni_bot3):
# ablations of misa-3% at its best lr (3e-4), the prose task at the code task's best lrs,
# then the rest of the code task's methods. Each command writes its own folder.
set -u
cd "$(dirname "$0")/../.."
while pgrep -f "bench.quality --preset cpu" >/dev/null; do sleep 10; done
q() { out=$1; shift; python -m bench.quality --preset cpu --no-progress --out "bench/results/round2/$out" "$@"; }
q ablations --ablations "momentum none" "momentum proof" "no sweep" "scores raw" "scores unscaled" "no debias" \
  "dense embeddings" --ablation-lr 3e-4
q prose_misa --tasks prose --methods misa-3% --lrs misa=3e-4
q prose_lora --tasks prose --methods lora-r16 --lrs lora=2e-3
q prose_uniform --tasks prose --methods uniform-3% bottomk-3% --lrs misa=1e-3
q prose_badam --tasks prose --methods badam --lrs badam=1e-3
q adamw --methods adamw --lrs adamw=2e-5,5e-5,1e-4
q galore --methods galore --lrs galore=3e-4,1e-3,3e-3
q topk3 --methods topk-3% --lrs misa=3e-4,1e-3
q delta1 --methods misa-1% uniform-1% --lrs misa=3e-4,1e-3
