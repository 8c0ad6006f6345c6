#!/usr/bin/env bash
# P4 baseline on one GPU: `worker bench` and the diffusers reference (eager and
# torch.compile) from the same random-weight full-size SDXL, in one dtype, plus
# the cosine similarity of the two UNet outputs on the same inputs.
#   WORKER=/path/to/cuda/worker OUT=/tmp/out DTYPE=f16 bench/gpu-run-p4.sh
# Needs diffusers on the machine (or its wheel in .whl/, installed to /tmp/site).
set -uo pipefail
WORKER=${WORKER:-target/release/worker}
OUT=${OUT:-/tmp/p4-out}
MODEL=${MODEL:-/tmp/sdxl-random}
DTYPE=${DTYPE:-f16}
mkdir -p "$OUT"
if ! python3 -c 'import diffusers' 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c 'import torch, diffusers, transformers; print("torch", torch.__version__, "diffusers", diffusers.__version__, "transformers", transformers.__version__)'
  "$WORKER" --version; } > "$OUT/machine.txt" 2>&1
if [ ! -f "$MODEL/unet/diffusion_pytorch_model.safetensors" ]; then
  "$WORKER" init-random --configs sdxl/configs/sdxl-base-1.0 --output "$MODEL" --dtype f16 --device cuda > /dev/null 2>&1
fi
python3 bench/diffusers_reference.py --model "$MODEL" --taesd "$MODEL/taesdxl" --dtype "$DTYPE" --compile \
  --unet-io /tmp/unet-io.safetensors --json "$OUT/diffusers-$DTYPE.json" > "$OUT/diffusers-$DTYPE.log" 2>&1
echo "diffusers exit $?"
"$WORKER" bench --model "$MODEL" --taesd "$MODEL/taesdxl" --device cuda --dtype "$DTYPE" \
  --unet-io /tmp/unet-io.safetensors --json "$OUT/candle-$DTYPE.json" > "$OUT/candle-$DTYPE.log" 2>&1
echo "candle exit $?"
python3 bench/diffusers_reference.py --compare /tmp/unet-io.safetensors | tee "$OUT/unet-cosine-$DTYPE.json"
grep -v '^\s*$' "$OUT/candle-$DTYPE.log" | grep '^|'
python3 - "$OUT/diffusers-$DTYPE.json" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
for r in d["runs"]:
    print(r["label"], {k: round(v, 2) for k, v in r.items() if k != "label"})
print("load_s", round(d["load_s"], 2), "peak MiB", round(d.get("peak_gpu_memory_mib", 0)))
PY
