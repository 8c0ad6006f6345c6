#!/usr/bin/env bash
# P4 correctness on the GPU: the tiny fixture's golden UNet call (diffusers, f32)
# against our UNet on CUDA in f32, f16 and bf16, with all fast paths and with
# none (SDXL_KERNELS), as cosine similarity and relative L2 error.
#   WORKER=/path/to/cuda/worker OUT=/tmp/out bench/gpu-run-p4-tiny.sh
set -uo pipefail
WORKER=${WORKER:-target/release/worker}
OUT=${OUT:-/tmp/p4-out}
MODEL=tests/fixtures/sdxl-reference/tiny-sdxl
mkdir -p "$OUT"
for dtype in f32 f16 bf16; do
  for k in all none; do
    dir=/tmp/tiny-$dtype-$k
    python3 bench/tiny_unet_io.py "$dir"
    SDXL_KERNELS=$k "$WORKER" bench --model "$MODEL" --device cuda --dtype $dtype --width 64 --height 64 --steps 2 \
      --iters 2 --images 1 --no-image --unet-io "$dir/unet-io.safetensors" > "$OUT/tiny-$dtype-$k.log" 2>&1 || { echo "$dtype $k: bench failed"; tail -3 "$OUT/tiny-$dtype-$k.log"; continue; }
    echo "$dtype kernels=$k $(python3 bench/diffusers_reference.py --compare "$dir/unet-io.safetensors")"
  done
done | tee "$OUT/tiny-unet.txt"
