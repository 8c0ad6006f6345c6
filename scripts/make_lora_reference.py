"""Reference merged weights for the LoRA tests, made by diffusers itself.

Loads the tiny SDXL folder in float32, merges the fixture LoRAs the way a user
would (`load_lora_weights`, `set_adapters`, `fuse_lora`, `unload_lora_weights`)
and saves every weight the merge changed, under `{component}.{diffusers key}`
(text-encoder keys `text_model.`-prefixed), to tests/fixtures/lora-reference/:

  lora_kohya_0.8.safetensors        kohya LoRA at 0.8
  lora_kohya_0.8_peft_0.5.safetensors  kohya at 0.8 and the PEFT LoRA at 0.5

To stay small, each file keeps every 6th changed weight (in sorted order), and
lists the names of all changed weights in its metadata (`changed`, one per
line). The Rust test checks that its updates touch exactly those weights, and
`base + Σ scale · delta` against the stored ones. Run from the crate
root: python3 scripts/lora_reference.py [REFERENCE_DIR] [FEATURES_DIR]
(needs torch, diffusers, transformers, peft; CPU is enough).
"""

import os
import sys

import torch
from diffusers import StableDiffusionXLPipeline
from safetensors.torch import save_file

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
REFERENCE = sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "tests", "fixtures", "sdxl-reference")
FEATURES = sys.argv[2] if len(sys.argv) > 2 else os.path.join(ROOT, "tests", "fixtures", "sdxl-features")
OUT = os.path.join(ROOT, "tests", "fixtures", "lora-reference")
COMPONENTS = ["unet", "text_encoder", "text_encoder_2"]


def canonical(component, key):
    if component != "unet" and key.split(".")[0] in ("embeddings", "encoder", "final_layer_norm"):
        return "text_model." + key
    return key


def weights(pipe):
    out = {}
    for c in COMPONENTS:
        for k, v in getattr(pipe, c).state_dict().items():
            out[f"{c}.{canonical(c, k)}"] = v.detach().clone().float()
    return out


def merged(adapters):
    pipe = StableDiffusionXLPipeline.from_pretrained(os.path.join(REFERENCE, "tiny-sdxl"), torch_dtype=torch.float32)
    base = weights(pipe)
    for name, _ in adapters:
        pipe.load_lora_weights(os.path.join(FEATURES, f"lora_{name}.safetensors"), adapter_name=name)
    pipe.set_adapters([n for n, _ in adapters], [s for _, s in adapters])
    pipe.fuse_lora(components=COMPONENTS, lora_scale=1.0)
    pipe.unload_lora_weights()
    after = weights(pipe)
    assert set(after) == set(base), "the merge changed the key set"
    changed = sorted(k for k, v in after.items() if not torch.equal(v, base[k]))
    kept = {k: after[k].contiguous() for k in changed[::6]}
    print(f"{adapters}: {len(changed)} weights changed, {len(kept)} kept")
    return kept, {"changed": "\n".join(changed)}


def save(adapters, name):
    tensors, metadata = merged(adapters)
    save_file(tensors, os.path.join(OUT, name), metadata=metadata)


os.makedirs(OUT, exist_ok=True)
save([("kohya", 0.8)], "lora_kohya_0.8.safetensors")
save([("kohya", 0.8), ("peft", 0.5)], "lora_kohya_0.8_peft_0.5.safetensors")
