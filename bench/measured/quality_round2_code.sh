#!/usr/bin/env bash
# Round 2 of the CPU quality subset (code task, preset cpu: 40 steps of 4 x 128 tokens, 3 seeds):
# the methods and learning-rate edges round 1 left out. Each command writes its own folder.
set -u
cd "$(dirname "$0")/../.."
q() { out=$1; shift; python -m bench.quality --preset cpu --no-progress --out "bench/results/round2/$out" "$@"; }
q badam --methods badam --lrs badam=1e-4,3e-4,1e-3
q misa3 --methods misa-3% --lrs misa=1e-4,3e-4
q uni_bot3 --methods uniform-3% bottomk-3% --lrs misa=1e-3,3e-3
q adamw --methods adamw --lrs adamw=2e-5,5e-5,1e-4
q galore --methods galore --lrs galore=3e-4,1e-3,3e-3
q topk3 --methods topk-3% --lrs misa=3e-4,1e-3
q lora --methods lora-r16 --lrs lora=1e-3,2e-3,5e-3
q delta1 --methods misa-1% uniform-1% --lrs misa=3e-4,1e-3
