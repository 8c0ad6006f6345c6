#!/usr/bin/env python3
"""Predicts, on the CPU, what `--precision fp8` does to the UNet's output:
the full-size SDXL UNet (from `sdxl/configs/sdxl-base-1.0`, random weights
drawn as `worker init-random` draws them: candle's Kaiming-normal weights,
uniform biases) run once in f32 and once with the FP8 recipe of
`sdxl/src/cuda/fp8.rs` emulated — every transformer linear layer's weight
rounded to e4m3 with one scale per output channel, its input rounded to
e4m3 with one scale per token — and the two outputs compared (cosine
similarity, relative L2), as `bench/gpu-run-p11.sh` compares the GPU's.

It separates what FP8 numerics cost from what an implementation costs: if
the emulation and the GPU agree, the kernels are right and the recipe is
what to change. `--keep` leaves layers (by name substring) in f32, to find
the ones that matter; `--per-tensor` uses one scale per tensor instead.

    python3 bench/fp8_emulation.py --size 512
    python3 bench/fp8_emulation.py --size 512 --keep attn1.to_out,ff.net.2
"""
import argparse
import json
import math
import time

import torch

E4M3_MAX = 448.0


def fake_e4m3(x, dim, per_tensor=False):
    """x rounded to e4m3 with scales amax/448 along `dim` (or one scale)."""
    amax = x.abs().amax() if per_tensor else x.abs().amax(dim=dim, keepdim=True)
    scale = torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))
    return (x / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).to(x.dtype) * scale


def candle_init(module):
    """candle's defaults: weights N(0, 2/fan_in), biases U(±1/sqrt(fan_in))."""
    for m in module.modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
            fan_in = m.weight[0].numel()
            torch.nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_in))
            if m.bias is not None:
                bound = 1.0 / math.sqrt(fan_in)
                torch.nn.init.uniform_(m.bias, -bound, bound)


def quantized_layers(unet):
    """The linear layers `with_fp8` quantizes (sdxl/src/unet/attention.rs)."""
    names = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_out.0",
             "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out")
    for name, m in unet.named_modules():
        if isinstance(m, torch.nn.Linear) and name.endswith(names) and "attentions" in name:
            yield name, m


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="sdxl/configs/sdxl-base-1.0/unet/config.json")
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep", default="", help="comma-separated name parts of layers left in f32")
    ap.add_argument("--per-tensor", action="store_true", help="one scale per tensor for weights and inputs")
    args = ap.parse_args()
    from diffusers import UNet2DConditionModel

    torch.manual_seed(args.seed)
    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(args.config)).eval()
    candle_init(unet)
    g = torch.Generator().manual_seed(0)
    lat = args.size // 8
    sample = torch.randn((2, 4, lat, lat), generator=g)
    ehs = torch.randn((2, 77, 2048), generator=g)
    te = torch.randn((2, 1280), generator=g)
    tid = torch.tensor([[args.size, args.size, 0, 0, args.size, args.size]] * 2, dtype=torch.float32)

    def run():
        with torch.inference_mode():
            return unet(sample, 500.0, encoder_hidden_states=ehs,
                        added_cond_kwargs={"text_embeds": te, "time_ids": tid}).sample.double().flatten()

    t = time.perf_counter()
    ref = run()
    keep = [k for k in args.keep.split(",") if k]
    quantized = 0
    for name, m in quantized_layers(unet):
        if any(k in name for k in keep):
            continue
        quantized += 1
        with torch.no_grad():
            m.weight.copy_(fake_e4m3(m.weight, dim=1, per_tensor=args.per_tensor))
        m.register_forward_pre_hook(
            lambda _m, inp: (fake_e4m3(inp[0], dim=-1, per_tensor=args.per_tensor),) + tuple(inp[1:]))
    out = run()
    cos = torch.nn.functional.cosine_similarity(out, ref, dim=0).item()
    rel = ((out - ref).norm() / ref.norm()).item()
    print(json.dumps({"size": args.size, "quantized_layers": quantized, "kept": keep, "per_tensor": args.per_tensor,
                      "cosine": cos, "relative_l2": rel, "seconds": time.perf_counter() - t}))


if __name__ == "__main__":
    main()
