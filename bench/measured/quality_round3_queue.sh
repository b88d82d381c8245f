#!/usr/bin/env bash
# Round 3 of the CPU quality subset (preset cpu: 40 steps of 4 x 128 tokens, 3 seeds), after
# rounds 1 and 2: the code task's remaining methods (top-k at 3%, delta=1%, GaLore, full
# AdamW, LoRA's lr sweep), the T / eta / max_logit ablations of misa-3% at its best lr
# (3e-4), then the prose task's remaining methods at the code task's best lrs.
# Each command writes its own folder; copy its quality.json to bench/measured/round3_<name>.json.
set -u
cd "$(dirname "$0")/../.."
q() { out=$1; shift; python -m bench.quality --preset cpu --no-progress --out "bench/results/round3/$out" "$@"; }
q topk3 --methods topk-3% --lrs misa=3e-4,1e-3
q delta1 --methods misa-1% uniform-1% --lrs misa=3e-4,1e-3
q galore --methods galore --lrs galore=3e-4,1e-3,3e-3
q adamw --methods adamw --lrs adamw=2e-5,5e-5,1e-4
q lora --methods lora-r16 --lrs lora=5e-4,1e-3,5e-3
q ablations --ablations "T=10" "eta=0.3" "eta=3" "max_logit=1" "max_logit=20" --ablation-lr 3e-4
q prose_strategies --tasks prose --methods uniform-3% bottomk-3% topk-3% --lrs misa=1e-3
q prose_misa_lr --tasks prose --methods misa-3% --lrs misa=1e-3
q prose_badam --tasks prose --methods badam --lrs badam=1e-3
q prose_adamw --tasks prose --methods adamw --lrs adamw=5e-5
q prose_galore --tasks prose --methods galore --lrs galore=3e-4
q prose_delta1 --tasks prose --methods misa-1% uniform-1% --lrs misa=1e-3
