#!/usr/bin/env bash
# The GPU run of issue P3, on a machine with one or more NVIDIA GPUs and the
# CUDA worker binary (built here with --features cuda) at $WORKER:
# full-size SDXL with random weights (from sdxl/configs/sdxl-base-1.0), 1024x1024,
# 20 steps, 2 images on 1 rank over NCCL, with and without previews.
set -uo pipefail
WORKER=${WORKER:-target/release/worker}
OUT=${OUT:-/tmp/p3-out}
MODEL=${MODEL:-/tmp/sdxl-random}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/machine.txt"
if [ ! -f "$MODEL/unet/diffusion_pytorch_model.safetensors" ]; then
  /usr/bin/time -v "$WORKER" init-random --configs sdxl/configs/sdxl-base-1.0 --output "$MODEL" --dtype f16 --device cuda \
    2>&1 | grep -E "safetensors|Elapsed|Maximum resident" | tee "$OUT/init-random.log"
fi
common=(generate --model "$MODEL" --taesd "$MODEL/taesdxl" --device cuda --dtype f16 --ranks 1 --num-images 2
        --width 1024 --height 1024 --steps 20 --seed 7 --prompt "a lighthouse on a cliff at dawn")
# 0 first: it pays the one-time PTX compilation, so the later runs compare fairly
for every in 0 5 0; do
  echo "== previews every $every" | tee -a "$OUT/p3-run.log"
  "$WORKER" "${common[@]}" --preview-every "$every" --save-previews /tmp/p3-previews-$every \
    --output "$OUT/grid-previews-$every.png" 2>&1 | grep -v '^\s*$' | tee -a "$OUT/p3-run.log"
done
ls -la /tmp/p3-previews-5 | tee -a "$OUT/p3-run.log"
cp /tmp/p3-previews-5/step_020.jpg "$OUT/preview-step-20.jpg" 2>/dev/null
cp /tmp/p3-previews-5/step_000.jpg "$OUT/preview-step-0.jpg" 2>/dev/null
rm -f "$OUT/grid-previews-0.png"
# The tiny fixture on the GPU: the reference image in f32 (direct path), and
# the rank path over NCCL against the CPU's image of the same seed.
F=tests/fixtures/sdxl-reference
"$WORKER" generate --model $F/tiny-sdxl --prompt "a cat wearing a hat" --width 128 --height 128 --steps 4 \
  --init-noise $F/noise_0.safetensors --device cuda --dtype f32 --output "$OUT/tiny-cuda-f32.png" 2>&1 | tail -1 | tee -a "$OUT/p3-run.log"
"$WORKER" generate --model $F/tiny-sdxl --prompt "a red apple" --width 64 --height 64 --steps 3 --seed 11 \
  --device cuda --dtype f32 --ranks 1 --num-images 2 --output "$OUT/tiny-cuda-ranks.png" 2>&1 | tail -1 | tee -a "$OUT/p3-run.log"
