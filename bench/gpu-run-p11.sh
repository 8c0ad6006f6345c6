#!/usr/bin/env bash
# P11 on one GPU, in two calls of the device's 10-minute limit, back to back
# on the same machine (the second reuses the first's model folder when warm):
#   bench/gpu-run-p11.sh ours        cold and warm start, FP8's quality (UNet cosine and
#                                    image PSNR against f16), check-kernels, worker bench
#                                    f16 and fp8 with images/s for batch 1..16, the
#                                    cuBLASLt path's A/B, the largest job's memory
#                                    (NCU=1: then ncu of one fp8 UNet forward), fp8 with and
#                                    without the fused quantization (`SDXL_KERNELS=all,quant`)
#   bench/gpu-run-p11.sh diffusers   worker bench f16 and fp8 again, diffusers eager (with
#                                    images/s) and best ($DIFFUSERS_RECIPES, default eager,best),
#                                    and both UNets' cosine to diffusers
#   bench/gpu-run-p11.sh onecall     every table in one call: check-kernels, ours f16 (images/s
#                                    at $THROUGHPUT; with and without `cat`) and fp8 with and without `quant` (`all,quant`), diffusers
#                                    eager and best ($DIFFUSERS_RECIPES, default eager,graphs)
#                                    with images/s, UNet cosines, ncu of one fp8 forward
#   bench/gpu-run-p11.sh cold        cold starts (each with an empty driver cache) with the
#                                    convolution algorithms found and ranked, and with the
#                                    driver cache off (candle's PTX compiled as before, in
#                                    line); worker bench with either choice; check-kernels
#   bench/gpu-run-p11.sh best        worker bench f16, then diffusers best alone (its
#                                    compilation needs most of a call; BEST_RECIPES=graphs
#                                    for the recipe without coordinate-descent tuning)
#   bench/gpu-run-p11.sh fuse        the kernels of the fusion work (vectorized group norm and
#                                    GEGLU, conv bias folded into the norm, 2x upsampling, 8-warp flash
#                                    attention): check-kernels; worker bench of this binary
#                                    with 8 and 4 warps and of the binary before it
#                                    (.device/worker-base.xz) in the same call; diffusers
#                                    eager and compile; both UNets' cosine to diffusers
#   bench/gpu-run-p11.sh fp8         FP8 with the scales in cuBLASLt's product: the outer-vector
#                                    probe (.device/fp8-probe, built from bench/fp8_outer_vec_probe.cu),
#                                    worker bench fp8 of this binary and of the one before it
#                                    (.device/worker-prev.xz), cosine and image PSNR against f16,
#                                    ncu of one FP8 UNet forward
#   bench/gpu-run-p11.sh tf32        the VAE's f32 matrix products in TF32: worker bench and one
#                                    image of this binary and of the one before it
#                                    (.device/worker-prev.xz), their PSNR, ncu of one VAE decode
#   bench/gpu-run-p11.sh nhwc        channels-last activations (SDXL_KERNELS's `nhwc` path):
#                                    check-kernels (the NHWC rows); worker bench with and without
#                                    the path, alternating, in the same call; the same-seed images'
#                                    PSNR; worker bench with the 4x2 flash block, and fp8; diffusers
#                                    eager's UNet output for
#                                    both UNets' cosine; ncu of one UNet forward and one VAE decode
#   bench/gpu-run-p11.sh many        images/s: worker bench --throughput and diffusers eager's
#                                    --throughput in the same call
#   bench/gpu-run-p11.sh wgmma       the Hopper (wgmma) flash attention: check-kernels (every
#                                    block's error and TFLOP/s); worker bench with the default
#                                    blocks (wgmma on 9.0), the mma.sync kernel and the wgmma
#                                    blocks in $BLOCKS, alternating; the same-seed images' PSNR
#                                    and the UNet outputs' cosine, default against mma.sync; ncu
#                                    of one UNet forward; worker bench --throughput
#   bench/gpu-run-p11.sh pipelined   the pipelined wgmma blocks ($PIPELINED, SDXL_FLASH_BLOCK's
#                                    long,short pair) and CUDA graphs, each and both: check-kernels;
#                                    worker bench of the default and each variant, alternating
#                                    twice; UNet cosine and same-seed image PSNR against the
#                                    default; ncu of one pipelined UNet forward; images/s and the
#                                    largest job inside the caps
#   bench/gpu-run-p11.sh graphs      the UNet forward as a CUDA graph (SDXL_KERNELS's `graphs`
#                                    path): worker bench with and without it, alternating; the
#                                    UNet outputs' cosine and the same-seed images' PSNR;
#                                    images/s; the largest job inside the caps (16 x 2048²)
# The worker binary comes xz-compressed in .device/worker.xz (built here with
# `cargo build --release -p worker --features cuda`), diffusers' wheel in .whl/.
# Every result goes to /tmp/p11-$PART, packed at the end into $OUT/p11-$PART.tgz
# (the device returns at most 8 files); the last lines are a summary.
set -uo pipefail
PART=${1:-ours}
DEST=${OUT:-/tmp/p11-out}
OUT=/tmp/p11-$PART
MODEL=${MODEL:-/tmp/sdxl-random}
THROUGHPUT=${THROUGHPUT:-1,2,4,8,16}
mkdir -p "$OUT" "$DEST"
trap pack EXIT
START=$SECONDS
pack() { tar czf "$DEST/p11-$PART.tgz" -C "$OUT" --exclude="big-*.png" . 2>/dev/null; }
# each step packs what the steps before it wrote: a call cut off at its limit still returns them
note() { pack; echo "== [$((SECONDS - START)) s] $*" | tee -a "$OUT/steps.txt"; }
unpack() {  # .device/NAME.xz to /tmp/NAME-cuda, once
  local bin=/tmp/$1-cuda
  if [ ! -x "$bin" ]; then
    python3 -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' \
      ".device/$1.xz" "$bin" && chmod +x "$bin"
  fi
  echo "$bin"
}
WORKER=$(unpack worker)
SP=$(python3 -c 'import site; print(site.getsitepackages()[0])')
export LD_LIBRARY_PATH=/usr/local/nvidia/lib64:$SP/nvidia/cu13/lib:$SP/nvidia/nccl/lib:$SP/nvidia/cudnn/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
export NCCL_NVLS_ENABLE=0
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
  python3 -c 'import torch; print("torch", torch.__version__)'
  "$WORKER" --version; nproc; } > "$OUT/machine-$PART.txt" 2>&1
if [ ! -f "$MODEL/unet/diffusion_pytorch_model.safetensors" ]; then
  note "init-random"
  "$WORKER" init-random --configs sdxl/configs/sdxl-base-1.0 --output "$MODEL" --dtype f16 --device cuda \
    > "$OUT/init-random.log" 2>&1 || echo "init-random failed: $(tail -n 3 "$OUT/init-random.log")"
fi
GEN=(generate --model "$MODEL" --taesd "$MODEL/taesdxl" --device cuda --dtype f16 --ranks 1 --num-images 1
     --width 1024 --height 1024 --steps 20 --seed 7 --prompt "a lighthouse at dawn")
BENCH=(bench --model "$MODEL" --taesd "$MODEL/taesdxl" --device cuda --dtype f16)
# A UNet input for the cosine checks, made here when diffusers does not make it (part `ours`).
make_unet_io() {
  python3 - "$1" <<'PY'
import sys, torch
from safetensors.torch import save_file
g = torch.Generator(device="cpu").manual_seed(0)
save_file({"sample": torch.randn((2, 4, 128, 128), generator=g),
           "encoder_hidden_states": torch.randn((2, 77, 2048), generator=g),
           "text_embeds": torch.randn((2, 1280), generator=g),
           "time_ids": torch.tensor([[1024, 1024, 0, 0, 1024, 1024]] * 2, dtype=torch.float32),
           "timestep": torch.tensor([500.0])}, sys.argv[1])
PY
}
with_diffusers() {  # diffusers from the carried wheel when the machine lacks it; versions noted
  if ! python3 -c 'import diffusers' 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  fi
  python3 -c 'import torch, diffusers, transformers; print("torch", torch.__version__, "diffusers", diffusers.__version__, "transformers", transformers.__version__)' >> "$OUT/machine-$PART.txt" 2>&1
}
cosine() {  # cosine similarity and relative L2 of two unet_out files
  python3 - "$1" "$2" <<'PY'
import sys, json, torch
from safetensors.torch import load_file
a, b = (load_file(p)["unet_out"].double().flatten() for p in sys.argv[1:3])
print(json.dumps({"cosine": torch.nn.functional.cosine_similarity(a, b, dim=0).item(),
                  "relative_l2": ((a - b).norm() / b.norm()).item(), "a": sys.argv[1], "b": sys.argv[2]}))
PY
}

psnr() {  # PSNR (and largest and mean difference) of two 8-bit images: A B LABEL
  python3 - "$1" "$2" "$3" <<'PY'
import sys, json, numpy as np
from PIL import Image
a, b = (np.asarray(Image.open(p).convert("RGB"), dtype=np.float64) for p in sys.argv[1:3])
mse = ((a - b) ** 2).mean()
print(json.dumps({f"psnr_db_{sys.argv[3]}": 10 * np.log10(255.0 ** 2 / mse) if mse > 0 else float("inf"),
                  "max_abs": float(np.abs(a - b).max()), "mean_abs": float(np.abs(a - b).mean())}))
PY
}
ncu_profile() {  # kernel times of one forward under ncu, summed per family: NAME STAGE, then bench flags
  local name=$1 stage=$2; shift 2
  local ncu; ncu=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
  timeout 200 "$ncu" --clock-control none --profile-from-start off --metrics gpu__time_duration.sum --csv --page raw \
    "$WORKER" bench --model "$MODEL" --device cuda --dtype f16 "$@" --profile "$stage" \
    > "/tmp/ncu-$name.csv" 2> "$OUT/ncu-$name.err"
  echo "ncu exit $?"
  python3 bench/ncu_summary.py "/tmp/ncu-$name.csv" > "$OUT/ncu-$name-summary.txt" 2>&1
  head -32 "$OUT/ncu-$name-summary.txt"
}

run_bench() {  # name, binary, then bench flags; keeps the UNet output as /tmp/unet-io.NAME.safetensors
  local name=$1 bin=$2; shift 2
  note "bench: $name"
  timeout 120 "$bin" "${BENCH[@]}" "$@" --unet-io /tmp/unet-io.safetensors --json "$OUT/bench-$name.json" \
    > "$OUT/bench-$name.log" 2>&1
  echo "bench $name exit $?"; grep -E '^\| (UNet|VAE|TAESD|preview|whole)' "$OUT/bench-$name.log"
  cp /tmp/unet-io.candle.safetensors "/tmp/unet-io.$name.safetensors" 2>/dev/null
}

if [ "$PART" = ours ]; then
  # Cold start: a fresh process with an empty driver JIT cache, one 1024² image.
  export CUDA_CACHE_PATH=$(mktemp -d)
  for run in cold warm; do
    note "generate ($run start)"
    /usr/bin/time -f "wall %e s, max RSS %M KB" "$WORKER" "${GEN[@]}" --output "$OUT/$run.png" > "$OUT/$run-start.log" 2>&1
    echo "$run generate exit $?"
  done
  unset CUDA_CACHE_PATH
  note "generate, precision fp8 (same seed)"
  "$WORKER" "${GEN[@]}" --precision fp8 --output "$OUT/fp8.png" > "$OUT/fp8-generate.log" 2>&1
  echo "fp8 generate exit $?"
  psnr "$OUT/warm.png" "$OUT/fp8.png" fp8_vs_f16 | tee "$OUT/fp8-psnr.json"
  note "check-kernels"
  timeout 200 "$WORKER" check-kernels --iters 5 > "$OUT/check-kernels.log" 2>&1
  echo "check-kernels exit $?"
  make_unet_io /tmp/unet-io.safetensors
  note "bench f16 (all paths) with throughput"
  timeout 200 "$WORKER" "${BENCH[@]}" --throughput "$THROUGHPUT" --unet-io /tmp/unet-io.safetensors \
    --json "$OUT/candle-f16.json" > "$OUT/candle-f16.log" 2>&1
  echo "bench f16 exit $?"
  cp /tmp/unet-io.candle.safetensors /tmp/unet-io.f16.safetensors
  note "bench fp8 with throughput"
  timeout 200 "$WORKER" "${BENCH[@]}" --precision fp8 --throughput "$THROUGHPUT" --unet-io /tmp/unet-io.safetensors \
    --json "$OUT/candle-fp8.json" > "$OUT/candle-fp8.log" 2>&1
  echo "bench fp8 exit $?"
  cosine /tmp/unet-io.candle.safetensors /tmp/unet-io.f16.safetensors | tee "$OUT/unet-cosine-fp8-vs-f16.json"
  cp /tmp/unet-io.candle.safetensors /tmp/unet-io.fp8.safetensors
  note "bench fp8 with the fused quantization (A/B: SDXL_KERNELS=all,quant)"
  SDXL_KERNELS=all,quant timeout 100 "$WORKER" "${BENCH[@]}" --precision fp8 \
    --no-image --unet-io /tmp/unet-io.safetensors --json "$OUT/candle-fp8-quant.json" > "$OUT/candle-fp8-quant.log" 2>&1
  echo "bench fp8 quant exit $?"
  cosine /tmp/unet-io.candle.safetensors /tmp/unet-io.fp8.safetensors | tee "$OUT/unet-cosine-fp8-quant-vs-unfused.json"
  note "bench f16 without the cuBLASLt path (A/B)"
  SDXL_KERNELS=attention,conv,norm,geglu,bias timeout 100 "$WORKER" "${BENCH[@]}" --no-image --iters 10 \
    --json "$OUT/candle-f16-no-lt.json" > "$OUT/candle-f16-no-lt.log" 2>&1
  echo "bench no-lt exit $?"
  note "the largest job inside the caps: 16 images of 2048², 2 steps"
  timeout 120 /usr/bin/time -f "wall %e s" "$WORKER" generate --model "$MODEL" --device cuda --dtype f16 --ranks 1 \
    --num-images 16 --width 2048 --height 2048 --steps 2 --seed 1 --prompt "memory" --output "$OUT/big-16.png" \
    > "$OUT/big-job-16.log" 2>&1
  echo "16 x 2048² exit $?"
  if [ -n "${NCU:-}" ]; then  # NCU=1: where one FP8 forward's kernel time goes
    # launch by launch (every path but graphs): the same kernels, one ncu record each
    note "ncu: one UNet forward, fp8"
    SDXL_KERNELS=attention,conv,norm,geglu,bias,lt,nhwc,quant ncu_profile unet-fp8 unet --precision fp8
  fi
  note "done"
  grep -E '^\| (linear|flash|text|layer norm|GEGLU)' "$OUT/check-kernels.log" | head -40; grep -c FAIL "$OUT/check-kernels.log"
  for f in candle-f16 candle-fp8 candle-fp8-quant candle-f16-no-lt; do echo "== $f"; grep '^|' "$OUT/$f.log"; done
  for f in cold-start warm-start fp8-generate big-job-16; do echo "== $f"; tail -n 5 "$OUT/$f.log"; done
fi

if [ "$PART" = onecall ]; then
  # Every table's figures in one call, for a session that may get no second:
  # check-kernels; ours f16 (images/s at $THROUGHPUT), fp8 with and without the
  # fused quantization (`quant`); diffusers eager and best (the `graphs` recipe)
  # with images/s; both UNets' cosine to diffusers; ncu of one FP8 forward if time is left.
  note "check-kernels"
  timeout 120 "$WORKER" check-kernels --iters 5 > "$OUT/check-kernels.log" 2>&1
  echo "check-kernels exit $?, $(grep -c FAIL "$OUT/check-kernels.log") FAIL rows"
  grep -E 'FAIL|^\| (text|layer norm|GEGLU|cat on|conv2d NHWC, input|CUDA graph, an input)' "$OUT/check-kernels.log"
  make_unet_io /tmp/unet-io.safetensors
  note "bench f16 with throughput $THROUGHPUT"
  timeout 150 "$WORKER" "${BENCH[@]}" --throughput "$THROUGHPUT" --unet-io /tmp/unet-io.safetensors \
    --json "$OUT/candle-f16.json" > "$OUT/candle-f16.log" 2>&1
  echo "bench f16 exit $?"; grep '^|' "$OUT/candle-f16.log"
  cp /tmp/unet-io.candle.safetensors /tmp/unet-io.f16.safetensors
  note "bench f16 with the skip connections' cat kernel (A/B: SDXL_KERNELS=all,cat)"
  SDXL_KERNELS=all,cat timeout 60 "$WORKER" "${BENCH[@]}" --no-image --unet-io /tmp/unet-io.safetensors \
    --json "$OUT/candle-f16-cat.json" > "$OUT/candle-f16-cat.log" 2>&1
  echo "bench f16 cat exit $?"; grep -E '^\| UNet' "$OUT/candle-f16-cat.log"
  cosine /tmp/unet-io.candle.safetensors /tmp/unet-io.f16.safetensors | tee "$OUT/unet-cosine-f16-cat-vs-f16.json"
  for v in fp8 fp8-quant; do
    note "bench $v"
    kernels=all; [ $v = fp8-quant ] && kernels=all,quant
    SDXL_KERNELS=$kernels timeout 90 "$WORKER" "${BENCH[@]}" --precision fp8 --no-image --unet-io /tmp/unet-io.safetensors \
      --json "$OUT/candle-$v.json" > "$OUT/candle-$v.log" 2>&1
    echo "bench $v exit $?"; grep -E '^\| (UNet|text)' "$OUT/candle-$v.log"
    cp /tmp/unet-io.candle.safetensors "/tmp/unet-io.$v.safetensors"
    cosine "/tmp/unet-io.$v.safetensors" /tmp/unet-io.f16.safetensors | tee "$OUT/unet-cosine-$v-vs-f16.json"
  done
  cosine /tmp/unet-io.fp8-quant.safetensors /tmp/unet-io.fp8.safetensors | tee "$OUT/unet-cosine-fp8-quant-vs-unfused.json"
  with_diffusers
  left=$(( ${DIFFUSERS_BUDGET:-585} - (SECONDS - START) - 50 ))
  note "diffusers ${DIFFUSERS_RECIPES:-eager,graphs} (limit $left s)"
  timeout "$left" python3 bench/diffusers_reference.py --model "$MODEL" --taesd "$MODEL/taesdxl" --dtype f16 \
    --recipes "${DIFFUSERS_RECIPES:-eager,graphs}" --throughput "$THROUGHPUT" --unet-io /tmp/unet-io-d.safetensors \
    --json "$OUT/diffusers-f16.json" 2>&1 | tee "$OUT/diffusers-f16.log" \
    | grep --line-buffered -E '^(eager|best|graphs|compile) |throughput'
  echo "diffusers exit ${PIPESTATUS[0]}"
  if [ -f /tmp/unet-io-d.safetensors ]; then
    note "UNet cosine against diffusers, f16 and fp8"
    for p in dtype fp8; do
      timeout 40 "$WORKER" "${BENCH[@]}" --precision $p --iters 1 --no-image --unet-io /tmp/unet-io-d.safetensors \
        > "$OUT/unet-io-$p.log" 2>&1
      cosine /tmp/unet-io-d.candle.safetensors /tmp/unet-io-d.diffusers.safetensors | tee "$OUT/unet-cosine-$p-vs-diffusers.json"
    done
  fi
  if [ $(( 585 - (SECONDS - START) )) -gt 100 ]; then
    note "ncu: one UNet forward, fp8"
    SDXL_KERNELS=attention,conv,norm,geglu,bias,lt,nhwc,quant ncu_profile unet-fp8 unet --precision fp8
  fi
  note "done"
fi

if [ "$PART" = cold ]; then
  # Each start a fresh process; a fresh, empty driver cache for each cold one.
  start() {  # name, then env assignments
    local name=$1; shift
    note "generate: $name"
    env "$@" /usr/bin/time -f "wall %e s, max RSS %M KB" "$WORKER" "${GEN[@]}" --output "$OUT/$name.png" \
      > "$OUT/start-$name.log" 2>&1
    echo "$name exit $?: $(grep -E '^stages|^wall' "$OUT/start-$name.log" | tr '\n' ' ')"
  }
  c1=$(mktemp -d); c2=$(mktemp -d)
  start cold-find CUDA_CACHE_PATH="$c1" SDXL_CONV_ALGO=find
  start warm-find CUDA_CACHE_PATH="$c1" SDXL_CONV_ALGO=find
  start cold-heuristic CUDA_CACHE_PATH="$c2" SDXL_CONV_ALGO=heuristic
  start warm-heuristic CUDA_CACHE_PATH="$c2" SDXL_CONV_ALGO=heuristic
  start cold-no-cache CUDA_CACHE_DISABLE=1 SDXL_CONV_ALGO=find
  note "check-kernels"
  CUDA_CACHE_PATH="$c1" timeout 120 "$WORKER" check-kernels --iters 5 > "$OUT/check-kernels.log" 2>&1
  echo "check-kernels exit $?, $(grep -c FAIL "$OUT/check-kernels.log") FAIL rows"
  for algo in find heuristic; do
    note "bench f16, convolution algorithms: $algo"
    CUDA_CACHE_PATH="$c1" SDXL_CONV_ALGO=$algo timeout 150 "$WORKER" "${BENCH[@]}" --json "$OUT/candle-f16-$algo.json" \
      > "$OUT/candle-f16-$algo.log" 2>&1
    echo "bench $algo exit $?"
  done
  note "done"
  for f in candle-f16-find candle-f16-heuristic; do echo "== $f"; grep '^|' "$OUT/$f.log"; done
fi

if [ "$PART" = best ]; then
  if [ -z "${SKIP_OURS:-}" ]; then  # SKIP_OURS=1 when the call has time for diffusers only
    note "bench f16 (this call's figures for the tables)"
    timeout 120 "$WORKER" "${BENCH[@]}" --json "$OUT/same-candle-f16.json" > "$OUT/same-candle-f16.log" 2>&1
    echo "bench f16 exit $?"; grep '^|' "$OUT/same-candle-f16.log"
  fi
  with_diffusers
  note "diffusers best"
  left=$(( ${DIFFUSERS_BUDGET:-585} - (SECONDS - START) - 15 ))
  # each figure shows as it is measured, so a call cut short still reports it
  timeout "$left" python3 bench/diffusers_reference.py --model "$MODEL" --taesd "$MODEL/taesdxl" --dtype f16 \
    --recipes "${BEST_RECIPES:-best}" --json "$OUT/diffusers-best.json" 2>&1 | tee "$OUT/diffusers-best.log" \
    | grep --line-buffered -E '^(best|graphs|autotune|compile) '
  echo "diffusers exit ${PIPESTATUS[0]} (limit $left s)"
  note "done"
fi

if [ "$PART" = fuse ]; then
  BASE=/tmp/worker-base
  python3 -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' \
    .device/worker-base.xz "$BASE" && chmod +x "$BASE" && "$BASE" --version >> "$OUT/machine-$PART.txt" 2>&1
  note "check-kernels"
  timeout 150 "$WORKER" check-kernels --iters 10 > "$OUT/check-kernels.log" 2>&1
  echo "check-kernels exit $?, $(grep -c FAIL "$OUT/check-kernels.log") FAIL rows"
  # printed as the call goes, so a call cut short still reports what it measured
  grep -E 'FAIL|^\| (flash|group norm|GEGLU|upsample)' "$OUT/check-kernels.log"
  make_unet_io /tmp/unet-io.safetensors
  # base, new, new with the 4-warp attention, base again: drift shows as base-vs-base
  run_bench base "$BASE"
  run_bench new "$WORKER"
  SDXL_FLASH_WARPS=4 run_bench new-w4 "$WORKER"
  run_bench base-again "$BASE"
  with_diffusers
  note "diffusers eager and compile (UNet output for the cosine)"
  left=$(( ${DIFFUSERS_BUDGET:-585} - (SECONDS - START) - 30 ))
  timeout "$left" python3 bench/diffusers_reference.py --model "$MODEL" --taesd "$MODEL/taesdxl" --dtype f16 \
    --recipes eager,compile --unet-io /tmp/unet-io.safetensors --json "$OUT/diffusers-f16.json" 2>&1 \
    | tee "$OUT/diffusers-f16.log" | grep --line-buffered -E '^(eager|compile) '
  echo "diffusers exit ${PIPESTATUS[0]} (limit $left s)"
  for name in base new new-w4; do
    cosine "/tmp/unet-io.$name.safetensors" /tmp/unet-io.diffusers.safetensors | tee "$OUT/unet-cosine-$name.json"
  done
  note "done"
fi

if [ "$PART" = diffusers ]; then
  note "bench f16 and fp8 (this call's figures for the tables)"
  timeout 120 "$WORKER" "${BENCH[@]}" --json "$OUT/same-candle-f16.json" > "$OUT/same-candle-f16.log" 2>&1
  echo "bench f16 exit $?"
  timeout 120 "$WORKER" "${BENCH[@]}" --precision fp8 --json "$OUT/same-candle-fp8.json" > "$OUT/same-candle-fp8.log" 2>&1
  echo "bench fp8 exit $?"
  with_diffusers
  note "diffusers eager (+ images/s) and best"
  left=$(( ${DIFFUSERS_BUDGET:-560} - (SECONDS - START) - 70 ))
  timeout "$left" python3 bench/diffusers_reference.py --model "$MODEL" --taesd "$MODEL/taesdxl" --dtype f16 \
    --recipes "${DIFFUSERS_RECIPES:-eager,best}" --throughput 1,4,8 --unet-io /tmp/unet-io-d.safetensors --json "$OUT/diffusers-f16.json" \
    > "$OUT/diffusers-f16.log" 2>&1
  echo "diffusers exit $? (limit $left s)"
  note "UNet cosine against diffusers, f16 and fp8"
  for p in dtype fp8; do
    timeout 60 "$WORKER" "${BENCH[@]}" --precision $p --iters 1 --no-image --unet-io /tmp/unet-io-d.safetensors \
      > "$OUT/unet-io-$p.log" 2>&1
    cosine /tmp/unet-io-d.candle.safetensors /tmp/unet-io-d.diffusers.safetensors | tee "$OUT/unet-cosine-$p-vs-diffusers.json"
  done
  note "done"
  for f in same-candle-f16 same-candle-fp8; do echo "== $f"; grep '^|' "$OUT/$f.log"; done
  grep -E '^\{"label"|throughput' "$OUT/diffusers-f16.log"
fi

if [ "$PART" = fp8 ]; then
  # FP8's A/B: this binary against the one before it (.device/worker-prev.xz), which
  # applied the scales in a pass of its own; the cuBLASLt probe; quality against f16.
  PREV=$(unpack worker-prev)
  note "cuBLASLt FP8 outer-vector probe"
  timeout 120 .device/fp8-probe > "$OUT/fp8-probe.txt" 2>&1
  echo "probe exit $?"; grep -c '| ok |' "$OUT/fp8-probe.txt"; grep 'after the heuristic' "$OUT/fp8-probe.txt"
  make_unet_io /tmp/unet-io.safetensors
  run_bench f16 "$WORKER" --no-image
  run_bench fp8-prev "$PREV" --precision fp8 --no-image
  run_bench fp8 "$WORKER" --precision fp8
  cosine /tmp/unet-io.fp8.safetensors /tmp/unet-io.f16.safetensors | tee "$OUT/unet-cosine-fp8-vs-f16.json"
  cosine /tmp/unet-io.fp8-prev.safetensors /tmp/unet-io.f16.safetensors | tee "$OUT/unet-cosine-fp8-prev-vs-f16.json"
  for p in dtype fp8; do
    note "generate, precision $p"
    "$WORKER" "${GEN[@]}" --precision $p --output "$OUT/gen-$p.png" > "$OUT/gen-$p.log" 2>&1
    echo "generate $p exit $?"
  done
  psnr "$OUT/gen-dtype.png" "$OUT/gen-fp8.png" fp8_vs_f16 | tee "$OUT/fp8-psnr.json"
  note "ncu: one FP8 UNet forward"
  ncu_profile unet-fp8 unet --precision fp8
  note "done"
fi

if [ "$PART" = tf32 ]; then
  PREV=$(unpack worker-prev)
  make_unet_io /tmp/unet-io.safetensors
  run_bench prev "$PREV"
  run_bench new "$WORKER"
  run_bench prev-again "$PREV"
  for name in prev new; do
    bin=$WORKER; [ $name = prev ] && bin=$PREV
    note "generate: $name"
    "$bin" "${GEN[@]}" --output "$OUT/gen-$name.png" > "$OUT/gen-$name.log" 2>&1
    echo "generate $name exit $?"
  done
  psnr "$OUT/gen-prev.png" "$OUT/gen-new.png" new_vs_prev | tee "$OUT/tf32-psnr.json"
  note "ncu: one VAE decode"
  ncu_profile vae vae
  note "done"
fi

if [ "$PART" = nhwc ]; then
  NCHW=attention,conv,norm,geglu,bias,lt  # every path but nhwc
  note "check-kernels"
  timeout 150 "$WORKER" check-kernels --iters 10 > "$OUT/check-kernels.log" 2>&1
  echo "check-kernels exit $?, $(grep -c FAIL "$OUT/check-kernels.log") FAIL rows"
  # printed as the call goes, so a call cut short still reports what it measured
  grep -E 'FAIL|NHWC|fell back|flash' "$OUT/check-kernels.log"
  make_unet_io /tmp/unet-io.safetensors
  SDXL_KERNELS=$NCHW run_bench nchw "$WORKER"
  run_bench nhwc "$WORKER"
  SDXL_KERNELS=$NCHW run_bench nchw-again "$WORKER"
  run_bench nhwc-again "$WORKER"
  SDXL_FLASH_WARPS=4x2 run_bench nhwc-4x2 "$WORKER"
  run_bench fp8 "$WORKER" --precision fp8 --no-image
  for name in nchw nhwc; do
    note "generate: $name"
    kernels=all; [ $name = nchw ] && kernels=$NCHW
    SDXL_KERNELS=$kernels "$WORKER" "${GEN[@]}" --output "$OUT/gen-$name.png" > "$OUT/gen-$name.log" 2>&1
    echo "generate $name exit $?"
  done
  psnr "$OUT/gen-nchw.png" "$OUT/gen-nhwc.png" nhwc_vs_nchw | tee "$OUT/nhwc-psnr.json"
  cosine /tmp/unet-io.nhwc.safetensors /tmp/unet-io.nchw.safetensors | tee "$OUT/unet-cosine-nhwc-vs-nchw.json"
  with_diffusers
  note "diffusers eager (UNet output for the cosine)"
  timeout 150 python3 bench/diffusers_reference.py --model "$MODEL" --taesd "$MODEL/taesdxl" --dtype f16 \
    --recipes eager --unet-io /tmp/unet-io.safetensors --json "$OUT/diffusers-f16.json" 2>&1 \
    | tee "$OUT/diffusers-f16.log" | grep --line-buffered -E '^eager '
  echo "diffusers exit ${PIPESTATUS[0]}"
  for name in nchw nhwc; do
    cosine "/tmp/unet-io.$name.safetensors" /tmp/unet-io.diffusers.safetensors | tee "$OUT/unet-cosine-$name.json"
  done
  note "ncu: one UNet forward, one VAE decode (nhwc)"
  ncu_profile unet-nhwc unet
  ncu_profile vae-nhwc vae
  note "done"
fi

if [ "$PART" = wgmma ]; then
  # default: the block flash_block picks (wgmma on 9.0); mma8: the mma.sync kernel
  note "check-kernels"
  timeout 150 "$WORKER" check-kernels --iters 10 > "$OUT/check-kernels.log" 2>&1
  echo "check-kernels exit $?, $(grep -c FAIL "$OUT/check-kernels.log") FAIL rows"
  grep -E 'FAIL|flash.*(q4096 kv4096|q1024 kv1024).*F16 ' "$OUT/check-kernels.log"
  make_unet_io /tmp/unet-io.safetensors
  run_bench default "$WORKER"
  SDXL_FLASH_BLOCK=8 run_bench mma8 "$WORKER"
  for block in ${BLOCKS:-wg1x128 ws2 ws3 ws2x128}; do
    SDXL_FLASH_BLOCK=$block run_bench $block "$WORKER" --no-image
  done
  run_bench default-again "$WORKER"
  SDXL_FLASH_BLOCK=8 run_bench mma8-again "$WORKER"
  cosine /tmp/unet-io.default.safetensors /tmp/unet-io.mma8.safetensors | tee "$OUT/unet-cosine-default-vs-mma8.json"
  for name in default mma8; do
    note "generate: $name"
    block=; [ $name = mma8 ] && block=8
    SDXL_FLASH_BLOCK=$block "$WORKER" "${GEN[@]}" --output "$OUT/gen-$name.png" > "$OUT/gen-$name.log" 2>&1
    echo "generate $name exit $?"
  done
  psnr "$OUT/gen-mma8.png" "$OUT/gen-default.png" default_vs_mma8 | tee "$OUT/wgmma-psnr.json"
  note "ncu: one UNet forward"
  ncu_profile unet-wgmma unet
  note "worker bench --throughput $THROUGHPUT"
  timeout 200 "$WORKER" "${BENCH[@]}" --no-image --iters 5 --throughput "$THROUGHPUT" \
    --json "$OUT/candle-throughput.json" > "$OUT/candle-throughput.log" 2>&1
  echo "bench exit $?"; grep -iE 'images/s|throughput' "$OUT/candle-throughput.log"
  note "done"
fi

if [ "$PART" = graphs ]; then
  EAGER=attention,conv,norm,geglu,bias,lt,nhwc  # every path but graphs
  GRAPHS=$EAGER,graphs
  make_unet_io /tmp/unet-io.safetensors
  SDXL_KERNELS=$GRAPHS run_bench graphs "$WORKER"
  SDXL_KERNELS=$EAGER run_bench eager "$WORKER"
  SDXL_KERNELS=$GRAPHS run_bench graphs-again "$WORKER"
  SDXL_KERNELS=$EAGER run_bench eager-again "$WORKER"
  cosine /tmp/unet-io.graphs.safetensors /tmp/unet-io.eager.safetensors | tee "$OUT/unet-cosine-graphs-vs-eager.json"
  for name in graphs eager; do
    note "generate: $name"
    kernels=$GRAPHS; [ $name = eager ] && kernels=$EAGER
    SDXL_KERNELS=$kernels "$WORKER" "${GEN[@]}" --output "$OUT/gen-$name.png" > "$OUT/gen-$name.log" 2>&1
    echo "generate $name exit $?"
  done
  psnr "$OUT/gen-eager.png" "$OUT/gen-graphs.png" graphs_vs_eager | tee "$OUT/graphs-psnr.json"
  note "worker bench --throughput $THROUGHPUT"
  SDXL_KERNELS=$GRAPHS timeout 200 "$WORKER" "${BENCH[@]}" --no-image --iters 5 --throughput "$THROUGHPUT" \
    --json "$OUT/candle-throughput.json" > "$OUT/candle-throughput.log" 2>&1
  echo "bench exit $?"; grep -iE 'images/s' "$OUT/candle-throughput.log"
  note "the largest job inside the caps: 16 images of 2048², 2 steps"
  SDXL_KERNELS=$GRAPHS timeout 120 /usr/bin/time -f "wall %e s" "$WORKER" generate --model "$MODEL" --device cuda --dtype f16 --ranks 1 \
    --num-images 16 --width 2048 --height 2048 --steps 2 --seed 1 --prompt "memory" --output "$OUT/big-16.png" \
    > "$OUT/big-job-16.log" 2>&1
  echo "16 x 2048² exit $?"; tail -n 4 "$OUT/big-job-16.log"
  note "done"
fi

if [ "$PART" = pipelined ]; then
  # The pipelined wgmma blocks (FlashAttention-3's order: p v in flight during
  # the next tile's softmax) and CUDA graphs, each and both against the default,
  # alternating, in one process per bench.
  EAGER=attention,conv,norm,geglu,bias,lt,nhwc  # every path but graphs
  PIPELINED=${PIPELINED:-wg1x128p,wg1p}         # SDXL_FLASH_BLOCK: long, short key counts
  variant_env() {  # the environment of variant $1
    case ${1%-again} in
      default) echo "SDXL_KERNELS=$EAGER" ;;
      pipelined) echo "SDXL_KERNELS=$EAGER SDXL_FLASH_BLOCK=$PIPELINED" ;;
      graphs) echo "SDXL_KERNELS=$EAGER,graphs" ;;
      both) echo "SDXL_KERNELS=$EAGER,graphs SDXL_FLASH_BLOCK=$PIPELINED" ;;
    esac
  }
  note "check-kernels"
  timeout 150 "$WORKER" check-kernels --iters 10 > "$OUT/check-kernels.log" 2>&1
  echo "check-kernels exit $?, $(grep -c FAIL "$OUT/check-kernels.log") FAIL rows"
  grep -E 'FAIL|flash.*(q4096 kv4096|q1024 kv1024).*F16 ' "$OUT/check-kernels.log"
  make_unet_io /tmp/unet-io.safetensors
  for round in "" -again; do
    for v in ${VARIANTS:-default pipelined graphs both}; do
      (export $(variant_env $v); run_bench "$v$round" "$WORKER")
    done
  done
  for v in pipelined graphs both; do
    cosine "/tmp/unet-io.$v.safetensors" /tmp/unet-io.default.safetensors | tee "$OUT/unet-cosine-$v-vs-default.json"
  done
  for v in default pipelined graphs; do
    note "generate: $v"
    (export $(variant_env $v); "$WORKER" "${GEN[@]}" --output "$OUT/gen-$v.png" > "$OUT/gen-$v.log" 2>&1
     echo "generate $v exit $?")
  done
  for v in pipelined graphs; do psnr "$OUT/gen-default.png" "$OUT/gen-$v.png" ${v}_vs_default | tee "$OUT/$v-psnr.json"; done
  note "ncu: one UNet forward, pipelined"
  (export $(variant_env pipelined); ncu_profile unet-pipelined unet)
  note "worker bench --throughput $THROUGHPUT (both)"
  (export $(variant_env both); timeout 200 "$WORKER" "${BENCH[@]}" --no-image --iters 5 --throughput "$THROUGHPUT" \
    --json "$OUT/candle-throughput.json" > "$OUT/candle-throughput.log" 2>&1
   echo "bench exit $?")
  grep -iE 'images/s' "$OUT/candle-throughput.log"
  note "the largest job inside the caps: 16 images of 2048², 2 steps (graphs)"
  (export $(variant_env graphs); timeout 120 /usr/bin/time -f "wall %e s" "$WORKER" generate --model "$MODEL" \
    --device cuda --dtype f16 --ranks 1 --num-images 16 --width 2048 --height 2048 --steps 2 --seed 1 \
    --prompt "memory" --output "$OUT/big-16.png" > "$OUT/big-job-16.log" 2>&1
   echo "16 x 2048² exit $?")
  tail -n 4 "$OUT/big-job-16.log"
  note "done"
fi

if [ "$PART" = many ]; then
  note "worker bench --throughput $THROUGHPUT"
  timeout 240 "$WORKER" "${BENCH[@]}" --no-image --iters 5 --throughput "$THROUGHPUT" \
    --json "$OUT/candle-throughput.json" > "$OUT/candle-throughput.log" 2>&1
  echo "bench exit $?"; grep -iE 'images/s|throughput' "$OUT/candle-throughput.log"
  with_diffusers
  note "diffusers eager --throughput 1,4,8"
  left=$(( ${DIFFUSERS_BUDGET:-585} - (SECONDS - START) - 15 ))
  timeout "$left" python3 bench/diffusers_reference.py --model "$MODEL" --taesd "$MODEL/taesdxl" --dtype f16 \
    --recipes eager --throughput 1,4,8 --json "$OUT/diffusers-throughput.json" 2>&1 \
    | tee "$OUT/diffusers-throughput.log" | grep --line-buffered -iE 'images/s|throughput'
  echo "diffusers exit ${PIPESTATUS[0]} (limit $left s)"
  note "done"
fi
