#!/usr/bin/env bash
# Times full-size CLIP (random weights) per-frame latency at batch 1 and 8 with the candle
# backend, alternating with a PyTorch reference run (A B A B) so both see the same machine.
#
#   scripts/bench-model.sh [PASSES] [ITERS]
#
# Environment:
#   BENCH_KIND     clip (default) or blip: full-size BLIP captioning, 20 new tokens, against
#                  scripts/bench-blip-pt.py (run when BENCH_PT is set; use few ITERS);
#                  siglip or owlvit: the whole infer path at batch 1 and 4, against
#                  scripts/bench-presence-pt.py (run when BENCH_PT is set);
#                  yoloworld: the letterbox of a 720p frame (to 640x384) and the network at
#                  batch 1 and 4, for each of BENCH_SIZES (default "n s m") in f32 then
#                  bf16, 2 threads, each run followed by scripts/bench-yoloworld-pt.py
#                  (Ultralytics, f32 or bf16 autocast) when PYTHON has ultralytics
#   CARGO_FEATURES extra features for the candle side; the build is the fast one for this
#                  machine (scripts/lib.sh use_fast_build: mkl on x86_64), unless
#                  FREE_ROAM_PLAIN_BUILD=1
#   DTYPE          auto (default), f32 or bf16 for the candle side's image tower
#   BENCH_PT_DTYPE f32 or bf16: for clip, also run scripts/bench-clip-pt.py (PyTorch, bf16
#                  under autocast) alternately with the candle side; for siglip and owlvit,
#                  the precision scripts/bench-presence-pt.py runs in
#   BENCH_PT       path to a PyTorch reference script taking a tag argument and ITERS from the
#                  environment (the peers' bench_pt.py); unset: candle only
#   PYTHON         the interpreter that has torch and transformers (default: python3)
#
# The candle side is built in the release profile: the dev profile keeps debug assertions
# on in the (otherwise optimised) dependencies, which slows candle's kernels several times.
set -euo pipefail
cd "$(dirname "$0")/.."
passes="${1:-2}"
iters="${2:-10}"
python="${PYTHON:-python3}"

. scripts/lib.sh
use_fast_build
# --workspace: the same feature set as the other builds, so their dependencies are reused.
cargo build --release --workspace --example bench_model ${FEATURES:+--features "$FEATURES"}
# An mkl build loads MKL's OpenMP runtime from there (docs/models.md).
if [[ -n "${MKLROOT:-}" ]]; then
    export LD_LIBRARY_PATH="$MKLROOT/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
bench=target/release/examples/bench_model

kind="${BENCH_KIND:-clip}"
if [[ "$kind" == yoloworld ]]; then
    export RAYON_NUM_THREADS=2 MKL_NUM_THREADS=2 OMP_NUM_THREADS=2
    # OpenMP threads (PyTorch's, and MKL's under candle) that spin while they wait run
    # tens of times slower when another process holds one of the cores: waiting threads
    # sleep instead, on both sides.
    export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
    # One random model per scale, written once; both sides load it.
    sizes="${BENCH_SIZES:-n s m}"
    for size in $sizes; do
        dir="${TMPDIR:-/tmp}/free-roam-bench-$kind-$size"
        [[ -f "$dir/model.safetensors" ]] || BENCH_SIZE=$size "$bench" warmup 1 >/dev/null
    done
    torch=0
    "$python" -c 'import ultralytics' 2>/dev/null && torch=1 || say "no ultralytics in $python: candle side only"
    for pass in $(seq 1 "$passes"); do
        for size in $sizes; do
            dir="${TMPDIR:-/tmp}/free-roam-bench-$kind-$size"
            for dtype in f32 bf16; do
                DTYPE=$dtype "$bench" "pass$pass-$size" "$iters" "$dir"
                if [[ $torch == 1 ]]; then
                    "$python" scripts/bench-yoloworld-pt.py "$dir" "pass$pass-$size" "$iters" \
                        "$dtype" | grep '^\[torch'
                fi
            done
        done
    done
    exit 0
fi
if [[ "$kind" != clip ]]; then
    # Both sides load the same full-size random model from one folder; the first run
    # writes it.
    dir="${TMPDIR:-/tmp}/free-roam-bench-$kind-full"
    [[ -f "$dir/model.safetensors" ]] || "$bench" warmup 1 >/dev/null
    pt=scripts/bench-presence-pt.py
    for pass in $(seq 1 "$passes"); do
        "$bench" "pass$pass" "$iters" "$dir"
        if [[ -n "${BENCH_PT:-}" && "$kind" == blip ]]; then
            "$python" scripts/bench-blip-pt.py "$dir" "pass$pass" "$iters" | grep '^\[torch'
        elif [[ -n "${BENCH_PT:-}" ]]; then
            "$python" "$pt" "$kind" "$dir" "pass$pass" "$iters" "${BENCH_PT_DTYPE:-f32}" \
                | grep '^\[torch'
        fi
    done
    exit 0
fi

# Write the model once, outside the timed passes.
"$bench" warmup 1 >/dev/null

for pass in $(seq 1 "$passes"); do
    "$bench" "pass$pass" "$iters"
    if [[ -n "${BENCH_PT:-}" ]]; then
        ITERS="$iters" "$python" "$BENCH_PT" "pass$pass" | grep '^\[torch'
    fi
    if [[ -n "${BENCH_PT_DTYPE:-}" ]]; then
        ITERS="$iters" "$python" scripts/bench-clip-pt.py "pass$pass" "$BENCH_PT_DTYPE" \
            | grep '^\[torch'
    fi
done
