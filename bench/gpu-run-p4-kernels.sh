#!/usr/bin/env bash
# P4 kernel round on one GPU: correctness and micro-timings of every fast path
# (`worker check-kernels`), the stage timings with all of them and with each
# one alone (SDXL_KERNELS), and a per-kernel profile of one UNet forward with
# Nsight Compute (kernel durations only, clocks left alone).
#   WORKER=/path/to/cuda/worker OUT=/tmp/out DTYPE=f16 bench/gpu-run-p4-kernels.sh
set -uo pipefail
WORKER=${WORKER:-target/release/worker}
OUT=${OUT:-/tmp/p4-out}
MODEL=${MODEL:-/tmp/sdxl-random}
DTYPE=${DTYPE:-f16}
mkdir -p "$OUT"
if [ ! -f "$MODEL/unet/diffusion_pytorch_model.safetensors" ]; then
  "$WORKER" init-random --configs sdxl/configs/sdxl-base-1.0 --output "$MODEL" --dtype f16 --device cuda > /dev/null 2>&1
fi
"$WORKER" check-kernels > "$OUT/check-kernels.log" 2>&1
echo "check-kernels exit $?"
for k in all ${ABLATIONS-none attention conv norm}; do
  SDXL_KERNELS=$k timeout 200 "$WORKER" bench --model "$MODEL" --taesd "$MODEL/taesdxl" --device cuda --dtype "$DTYPE" \
    --iters 5 --images 1 $([ "$k" = all ] || echo --no-image) --json "$OUT/bench-$DTYPE-$k.json" > "$OUT/bench-$DTYPE-$k.log" 2>&1
  echo "bench $k exit $?"
done
if [ -n "${PROFILE-1}" ]; then
  NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
  for stage in unet vae; do
    timeout 300 "$NCU" --clock-control none --profile-from-start off --metrics gpu__time_duration.sum --csv --page raw \
      "$WORKER" bench --model "$MODEL" --device cuda --dtype "$DTYPE" --profile $stage > "$OUT/ncu-$stage-$DTYPE.csv" 2> "$OUT/ncu-$stage-$DTYPE.err"
    echo "ncu $stage exit $?"
    python3 bench/ncu_summary.py "$OUT/ncu-$stage-$DTYPE.csv" > "$OUT/ncu-$stage-$DTYPE-summary.txt" 2>&1
  done
fi
cat "$OUT/check-kernels.log" | grep -E '^\||error|Error' | head -40
for f in "$OUT"/bench-*.log; do echo "== $f"; grep '^|' "$f" | grep -E 'UNet|VAE|whole|text|TAESD|load'; grep -iE '^error|panick' "$f" | head -3; done
for stage in unet vae; do [ -f "$OUT/ncu-$stage-$DTYPE-summary.txt" ] && head -${SUMMARY_LINES:-30} "$OUT/ncu-$stage-$DTYPE-summary.txt"; done
