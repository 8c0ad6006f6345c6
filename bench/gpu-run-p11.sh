#!/usr/bin/env bash
# P11 on one GPU, in parts (each under the device's 10-minute call):
#   bench/gpu-run-p11.sh ours        cold start, check-kernels, worker bench (+ throughput)
#   bench/gpu-run-p11.sh diffusers   diffusers eager / compile / best, throughput, UNet cosine
#   bench/gpu-run-p11.sh same        one call for the comparison tables: cold and warm
#                                    starts, worker bench, diffusers eager and compile
# The worker binary comes xz-compressed in .device/worker.xz (built here with
# `cargo build --release -p worker --features cuda`), diffusers' wheel in .whl/.
# Results go to $OUT (default /tmp/p11-out).
set -uo pipefail
PART=${1:-ours}
OUT=${OUT:-/tmp/p11-out}
MODEL=${MODEL:-/tmp/sdxl-random}
DTYPE=${DTYPE:-f16}
THROUGHPUT=${THROUGHPUT:-1,2,4,8,16}
mkdir -p "$OUT"
WORKER=/tmp/worker-cuda
if [ ! -x "$WORKER" ]; then
  python3 -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' .device/worker.xz "$WORKER"
  chmod +x "$WORKER"
fi
SP=$(python3 -c 'import site; print(site.getsitepackages()[0])')
export LD_LIBRARY_PATH=/usr/local/nvidia/lib64:$SP/nvidia/cu13/lib:$SP/nvidia/nccl/lib:$SP/nvidia/cudnn/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
export NCCL_NVLS_ENABLE=0
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
  python3 -c 'import torch; print("torch", torch.__version__)'
  "$WORKER" --version; nproc; } > "$OUT/machine.txt" 2>&1
if [ ! -f "$MODEL/unet/diffusion_pytorch_model.safetensors" ]; then
  /usr/bin/time -v "$WORKER" init-random --configs sdxl/configs/sdxl-base-1.0 --output "$MODEL" --dtype f16 --device cuda \
    > "$OUT/init-random.log" 2>&1
fi

if [ "$PART" = ours ]; then
  # Cold start: an empty driver JIT cache, a fresh process, one 1024² image.
  export CUDA_CACHE_PATH=$(mktemp -d)
  /usr/bin/time -f "wall %e s, max RSS %M KB" "$WORKER" generate --model "$MODEL" --taesd "$MODEL/taesdxl" \
    --device cuda --dtype "$DTYPE" --ranks 1 --num-images 1 --width 1024 --height 1024 --steps 20 --seed 7 \
    --prompt "a lighthouse at dawn" --output "$OUT/cold.png" > "$OUT/cold-start.log" 2>&1
  echo "cold generate exit $?"
  # The same with the cache the first run filled (a restart on the same machine).
  /usr/bin/time -f "wall %e s, max RSS %M KB" "$WORKER" generate --model "$MODEL" --taesd "$MODEL/taesdxl" \
    --device cuda --dtype "$DTYPE" --ranks 1 --num-images 1 --width 1024 --height 1024 --steps 20 --seed 7 \
    --prompt "a lighthouse at dawn" --output "$OUT/warm.png" > "$OUT/warm-start.log" 2>&1
  echo "warm generate exit $?"
  unset CUDA_CACHE_PATH
  timeout 120 "$WORKER" check-kernels > "$OUT/check-kernels.log" 2>&1
  echo "check-kernels exit $?"
  # Memory: the largest job inside the caps, 16 images of 2048² on one rank.
  for n in ${BIG_IMAGES:-1 16}; do
    RUST_BACKTRACE=1 timeout 200 /usr/bin/time -f "wall %e s" "$WORKER" generate --model "$MODEL" --device cuda --dtype "$DTYPE" --ranks 1 \
      --num-images "$n" --width 2048 --height 2048 --steps 2 --seed 1 --prompt "memory" --output "$OUT/big-$n.png" \
      > "$OUT/big-job-$n.log" 2>&1
    echo "$n x 2048² exit $?"
  done
  "$WORKER" bench --model "$MODEL" --taesd "$MODEL/taesdxl" --device cuda --dtype "$DTYPE" \
    --throughput "$THROUGHPUT" --json "$OUT/candle-$DTYPE.json" \
    > "$OUT/candle-$DTYPE.log" 2>&1
  echo "bench exit $?"
  grep '^|' "$OUT/candle-$DTYPE.log"
  for f in "$OUT"/cold-start.log "$OUT"/warm-start.log "$OUT"/big-job-*.log; do echo "== $f"; tail -n 4 "$f"; done
fi

if [ "$PART" = same ]; then
  export CUDA_CACHE_PATH=$(mktemp -d)
  for run in cold warm; do
    /usr/bin/time -f "wall %e s, max RSS %M KB" "$WORKER" generate --model "$MODEL" --taesd "$MODEL/taesdxl" \
      --device cuda --dtype "$DTYPE" --ranks 1 --num-images 1 --width 1024 --height 1024 --steps 20 --seed 7 \
      --prompt "a lighthouse at dawn" --output "$OUT/$run.png" > "$OUT/$run-start.log" 2>&1
    echo "$run generate exit $?"; tail -n 4 "$OUT/$run-start.log"
  done
  unset CUDA_CACHE_PATH
  "$WORKER" bench --model "$MODEL" --taesd "$MODEL/taesdxl" --device cuda --dtype "$DTYPE" \
    --json "$OUT/candle-$DTYPE.json" > "$OUT/candle-$DTYPE.log" 2>&1
  echo "bench exit $?"; grep '^|' "$OUT/candle-$DTYPE.log"
  if ! python3 -c 'import diffusers' 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  fi
  python3 -c 'import torch, diffusers, transformers; print("torch", torch.__version__, "diffusers", diffusers.__version__, "transformers", transformers.__version__)' >> "$OUT/machine.txt" 2>&1
  timeout ${DIFFUSERS_TIMEOUT:-330} python3 bench/diffusers_reference.py --model "$MODEL" --taesd "$MODEL/taesdxl" --dtype "$DTYPE" \
    --recipes eager,compile --json "$OUT/diffusers-$DTYPE.json" > "$OUT/diffusers-$DTYPE.log" 2>&1
  echo "diffusers exit $?"; grep -E '^\{"label"' "$OUT/diffusers-$DTYPE.log"
fi

if [ "$PART" = diffusers ]; then
  if ! python3 -c 'import diffusers' 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  fi
  python3 -c 'import torch, diffusers, transformers; print("torch", torch.__version__, "diffusers", diffusers.__version__, "transformers", transformers.__version__)' >> "$OUT/machine.txt" 2>&1
  timeout 420 python3 bench/diffusers_reference.py --model "$MODEL" --taesd "$MODEL/taesdxl" --dtype "$DTYPE" \
    --recipes eager,compile,best --unet-io /tmp/unet-io.safetensors --json "$OUT/diffusers-$DTYPE.json" \
    > "$OUT/diffusers-$DTYPE.log" 2>&1
  echo "diffusers exit $?"
  timeout 150 python3 bench/diffusers_reference.py --model "$MODEL" --taesd "$MODEL/taesdxl" --dtype "$DTYPE" \
    --recipes eager --iters 1 --images 1 --throughput 1,4,8 --json "$OUT/diffusers-throughput-$DTYPE.json" \
    > "$OUT/diffusers-throughput-$DTYPE.log" 2>&1
  echo "diffusers throughput exit $?"
  "$WORKER" bench --model "$MODEL" --device cuda --dtype "$DTYPE" --iters 2 --images 0 --no-image \
    --unet-io /tmp/unet-io.safetensors > "$OUT/candle-unet-io.log" 2>&1
  python3 bench/diffusers_reference.py --compare /tmp/unet-io.safetensors | tee "$OUT/unet-cosine-$DTYPE.json"
  grep -E '^\{"label"|throughput' "$OUT/diffusers-$DTYPE.log" "$OUT/diffusers-throughput-$DTYPE.log"
fi
