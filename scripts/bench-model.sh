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
# The candle side is built in the release profile: the dev profile keeps debug assertions
# on in the (otherwise optimised) dependencies, which slows candle's kernels several times.
set -euo pipefail
cd "$(dirname "$0")/.."
passes="${1:-2}"
iters="${2:-10}"
python="${PYTHON:-python3}"

cargo build --release --example bench_model
bench=target/release/examples/bench_model

# Write the model once, outside the timed passes.
"$bench" warmup 1 >/dev/null

for pass in $(seq 1 "$passes"); do
    "$bench" "pass$pass" "$iters"
    if [[ -n "${BENCH_PT:-}" ]]; then
        ITERS="$iters" "$python" "$BENCH_PT" "pass$pass" | grep '^\[torch'
    fi
done
