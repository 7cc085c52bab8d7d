#!/usr/bin/env bash
# Times full-size CLIP (random weights) per-frame latency at batch 1 and 8 with the candle
# backend, alternating with a PyTorch reference run (A B A B) so both see the same machine.
#
#   scripts/bench-model.sh [PASSES] [ITERS]
#
# Environment:
#   BENCH_PT   path to a PyTorch reference script taking a tag argument and ITERS from the
#              environment (the peers' bench_pt.py); unset: candle only
#   PYTHON     the interpreter that has torch and transformers (default: python3)
#
# The candle side is built in the dev profile with this crate at opt-level 3 (dependencies
# are already optimised there), which avoids a full release build of every dependency.
set -euo pipefail
cd "$(dirname "$0")/.."
passes="${1:-2}"
iters="${2:-10}"
python="${PYTHON:-python3}"

cargo build --example bench_model --config 'profile.dev.package.free-roam.opt-level=3'
bench=target/debug/examples/bench_model

# Write the model once, outside the timed passes.
"$bench" warmup 1 >/dev/null

for pass in $(seq 1 "$passes"); do
    "$bench" "pass$pass" "$iters"
    if [[ -n "${BENCH_PT:-}" ]]; then
        ITERS="$iters" "$python" "$BENCH_PT" "pass$pass" | grep '^\[torch'
    fi
done
