#!/usr/bin/env python3
"""The reference for `worker bench`: the same stages measured with diffusers
on the same GPU, from the same random-weight folder (`worker init-random
--configs sdxl/configs/sdxl-base-1.0`), under each recipe of `--recipes`:

- `eager`: diffusers as it ships (SDPA attention);
- `compile`: the UNet under `torch.compile` (default mode);
- `best`: what diffusers' own speed guide does ("Accelerate inference of
  text-to-image diffusion models"): fused QKV projections, channels-last
  UNet and VAE, the inductor flags `conv_1x1_as_mm`,
  `coordinate_descent_tuning`, `epilogue_fusion=False`,
  `coordinate_descent_check_all_directions`, and the UNet under
  `torch.compile(mode="reduce-overhead", fullgraph=True)` (CUDA graphs);
  with `--compile-decoders` the VAE decode and TAESD too (on an H200 that
  compile gained under 1 % on the VAE, 115.8 against 116.3 ms, and costs
  minutes of autotuning, so by default they run eager, channels-last);
- `autotune`: as `best` with `mode="max-autotune-no-cudagraphs"` (its
  compile takes many minutes: run it in its own process with a time limit);
- `graphs`: as `best` without `coordinate_descent_tuning`, whose kernel
  benchmarking kept `best` compiling past a 10-minute call on an H200.

"diffusers best" in a table is the fastest of the compiled recipes per stage.
Images per second (`--throughput`) are measured under `eager`, before any compile
(each batch size would be a new graph to compile).

    python3 bench/diffusers_reference.py --model /tmp/sdxl --taesd /tmp/sdxl/taesdxl --dtype f16 \
        --json out.json --unet-io unet_io.safetensors --recipes eager,compile,best
    worker bench ... --unet-io unet_io.safetensors       # writes unet_io.candle.safetensors
    python3 bench/diffusers_reference.py --compare unet_io.safetensors

The weights are loaded into diffusers/transformers models built from the
folder's configs (the folder holds only what our pipeline reads: no VAE
encoder, which no stage here runs).
"""
import argparse
import io
import json
import os
import statistics
import time

import torch
from safetensors.torch import load_file, save_file

PROMPT = "a photograph of an astronaut riding a horse on the moon, highly detailed"
NEGATIVE = "blurry, low quality"
DEVICE = "cuda"


def sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def load_weights(model, path, allowed_missing=()):
    sd = load_file(path)
    keys = set(model.state_dict().keys())
    if "embeddings.token_embedding.weight" in sd and "embeddings.token_embedding.weight" not in keys:
        # this transformers nests CLIP under text_model. (as before version 5)
        sd = {("text_model." + k if not k.startswith("text_projection") else k): v for k, v in sd.items()}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    bad = [k for k in missing if not k.startswith(allowed_missing)] if allowed_missing else missing
    assert not unexpected, f"{path}: unexpected keys {unexpected[:5]}"
    assert not bad, f"{path}: missing keys {bad[:5]}"


def build(model_dir, taesd_dir, dtype):
    from diffusers import AutoencoderKL, AutoencoderTiny, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    j = lambda *p: os.path.join(model_dir, *p)
    te1 = CLIPTextModel(CLIPTextConfig.from_pretrained(j("text_encoder")))
    load_weights(te1, j("text_encoder", "model.safetensors"))
    te2 = CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(j("text_encoder_2")))
    load_weights(te2, j("text_encoder_2", "model.safetensors"))
    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(j("unet")))
    load_weights(unet, j("unet", "diffusion_pytorch_model.safetensors"))
    vae = AutoencoderKL.from_config(AutoencoderKL.load_config(j("vae")))
    load_weights(vae, j("vae", "diffusion_pytorch_model.safetensors"), ("encoder.", "quant_conv."))
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=te1, text_encoder_2=te2,
        tokenizer=CLIPTokenizer.from_pretrained(j("tokenizer")),
        tokenizer_2=CLIPTokenizer.from_pretrained(j("tokenizer_2")),
        unet=unet, scheduler=EulerDiscreteScheduler.from_pretrained(j("scheduler")))
    pipe.to(DEVICE, dtype)
    taesd = None
    if taesd_dir:
        taesd = AutoencoderTiny.from_config(AutoencoderTiny.load_config(taesd_dir))
        load_weights(taesd, os.path.join(taesd_dir, "diffusion_pytorch_model.safetensors"), ("encoder.",))
        taesd.to(DEVICE, dtype)
    return pipe, taesd


def timed(fn, iters):
    fn()
    sync()
    xs = []
    for _ in range(max(iters, 1)):
        t = time.perf_counter()
        fn()
        sync()
        xs.append(time.perf_counter() - t)
    return statistics.median(xs)


def apply_recipe(pipe, taesd, recipe, compile_decoders=False):
    """Turns `pipe` into the recipe's form (recipes only add: run them in order)."""
    if recipe == "compile":
        pipe.unet = torch.compile(pipe.unet)
        return
    if recipe in ("best", "autotune", "graphs"):
        import torch._inductor.config as inductor
        inductor.conv_1x1_as_mm = True
        inductor.coordinate_descent_tuning = recipe != "graphs"
        inductor.epilogue_fusion = False
        inductor.coordinate_descent_check_all_directions = True
        unet = getattr(pipe.unet, "_orig_mod", pipe.unet)
        pipe.unet = unet
        pipe.fuse_qkv_projections()
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
        mode = "max-autotune-no-cudagraphs" if recipe == "autotune" else "reduce-overhead"
        pipe.unet = torch.compile(pipe.unet, mode=mode, fullgraph=True)
        if taesd is not None:
            taesd.to(memory_format=torch.channels_last)
        if compile_decoders:
            pipe.vae.decode = torch.compile(pipe.vae.decode, mode=mode, fullgraph=True)
            if taesd is not None:
                taesd.decode = torch.compile(taesd.decode, mode=mode, fullgraph=True)


def measure_throughput(pipe, args, batches, label):
    """Images per second of whole 20-step images, `n` images per call."""
    out = {}
    with torch.inference_mode():
        for n in batches:
            run = lambda: pipe(PROMPT, negative_prompt=NEGATIVE, width=args.width, height=args.height,
                               num_inference_steps=args.steps, guidance_scale=args.guidance_scale,
                               num_images_per_prompt=n, output_type="pt").images
            s = timed(run, 1)
            out[str(n)] = n / s
            print(f"{label} throughput batch {n}: {n / s:.3f} images/s", flush=True)
    return out


def record(out, key, value):
    """Keeps one figure and prints it at once: a compile that runs out of
    time still leaves the figures measured before it."""
    out[key] = value
    print(f"{out['label']} {key}: {value:.4f}", flush=True)


def measure(pipe, taesd, args, dtype, label):
    w, h, steps, g = args.width, args.height, args.steps, args.guidance_scale
    lat = (1, pipe.unet.config.in_channels, h // pipe.vae_scale_factor, w // pipe.vae_scale_factor)
    out = {"label": label}
    with torch.inference_mode():
        record(out, "text_encode_ms", 1000 * timed(lambda: pipe.encode_prompt(PROMPT, device=DEVICE, num_images_per_prompt=1, do_classifier_free_guidance=True, negative_prompt=NEGATIVE), args.iters))
        pe, npe, ppe, nppe = pipe.encode_prompt(PROMPT, device=DEVICE, num_images_per_prompt=1, do_classifier_free_guidance=True, negative_prompt=NEGATIVE)
        ehs = torch.cat([npe, pe]).to(dtype)
        te = torch.cat([nppe, ppe]).to(dtype)
        tid = torch.tensor([[h, w, 0, 0, h, w]] * 2, device=DEVICE, dtype=dtype)
        sample = torch.randn((2,) + lat[1:], device=DEVICE, dtype=dtype)
        # a 0-d tensor on the device, as the pipeline's loop passes it (a Python
        # float makes torch.compile build and run another, slower graph)
        t = torch.tensor(500.0, device=DEVICE)
        unet = lambda: pipe.unet(sample, t, encoder_hidden_states=ehs,
                                 added_cond_kwargs={"text_embeds": te, "time_ids": tid}).sample
        record(out, "unet_step_ms", 1000 * timed(unet, args.iters))
        latents = torch.randn(lat, device=DEVICE, dtype=dtype)
        # what the pipeline does: the VAE in f32 when f16 and force_upcast
        vae_dtype = torch.float32 if dtype == torch.float16 and pipe.vae.config.force_upcast else dtype
        pipe.vae.to(vae_dtype)
        if label in ("best", "autotune", "graphs"):
            latents = latents.to(memory_format=torch.channels_last)
        record(out, "vae_decode_ms", 1000 * timed(lambda: pipe.vae.decode(latents.to(vae_dtype) / pipe.vae.config.scaling_factor).sample, min(args.iters, 5)))
        pipe.vae.to(dtype)
        if taesd is not None:
            record(out, "taesd_decode_ms", 1000 * timed(lambda: taesd.decode(latents).sample, args.iters))
        # text encode to PNG bytes, as `worker bench`'s whole image
        def image():
            pil = pipe(PROMPT, negative_prompt=NEGATIVE, width=w, height=h, num_inference_steps=steps,
                       guidance_scale=g, output_type="pil").images[0]
            pil.save(io.BytesIO(), format="PNG")
        record(out, "image_s", timed(image, args.images))
    return out


def compare(io_path):
    ref = load_file(io_path.replace(".safetensors", ".diffusers.safetensors"))["unet_out"].double().flatten()
    ours = load_file(io_path.replace(".safetensors", ".candle.safetensors"))["unet_out"].double().flatten()
    cos = torch.nn.functional.cosine_similarity(ref, ours, dim=0).item()
    rel = ((ref - ours).norm() / ref.norm()).item()
    print(json.dumps({"unet_cosine_similarity": cos, "unet_relative_l2": rel}))
    return cos


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model")
    ap.add_argument("--taesd")
    ap.add_argument("--dtype", choices=["f16", "bf16", "f32"], default="f16")
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--height", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--guidance-scale", type=float, default=5.0)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--images", type=int, default=3)
    ap.add_argument("--compile", action="store_true", help="the same as --recipes eager,compile")
    ap.add_argument("--recipes", default="eager", help="comma-separated: eager, compile, best, autotune, graphs")
    ap.add_argument("--throughput", default="", help="batch sizes for images/s (e.g. 1,2,4,8,16), under eager (before any compile)")
    ap.add_argument("--compile-decoders", action="store_true", help="best/autotune also compile the VAE decode and TAESD")
    ap.add_argument("--unet-io", help="write random UNet inputs and diffusers' output for the cosine check")
    ap.add_argument("--compare", help="compare diffusers' and candle's UNet outputs for this --unet-io file")
    ap.add_argument("--json")
    ap.add_argument("--device", default="cuda", help="cpu for a smoke test on the tiny fixture")
    args = ap.parse_args()
    global DEVICE
    DEVICE = args.device
    if args.compare:
        compare(args.compare)
        return
    import diffusers
    dtype = {"f16": torch.float16, "bf16": torch.bfloat16, "f32": torch.float32}[args.dtype]
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    pipe, taesd = build(args.model, args.taesd, dtype)
    sync()
    load_s = time.perf_counter() - t
    results = {"machine": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu", "torch": torch.__version__, "diffusers": diffusers.__version__,
               "dtype": args.dtype, "load_s": load_s, "runs": []}
    if args.unet_io:
        g = torch.Generator(device="cpu").manual_seed(0)
        uc = pipe.unet.config
        lat = (2, uc.in_channels, args.height // pipe.vae_scale_factor, args.width // pipe.vae_scale_factor)
        pooled = uc.projection_class_embeddings_input_dim - 6 * uc.addition_time_embed_dim
        io = {"sample": torch.randn(lat, generator=g), "encoder_hidden_states": torch.randn((2, 77, uc.cross_attention_dim), generator=g),
              "text_embeds": torch.randn((2, pooled), generator=g),
              "time_ids": torch.tensor([[args.height, args.width, 0, 0, args.height, args.width]] * 2, dtype=torch.float32),
              "timestep": torch.tensor([500.0])}
        save_file(io, args.unet_io)
        with torch.inference_mode():
            out = pipe.unet(io["sample"].to(DEVICE, dtype), 500.0, encoder_hidden_states=io["encoder_hidden_states"].to(DEVICE, dtype),
                            added_cond_kwargs={"text_embeds": io["text_embeds"].to(DEVICE, dtype),
                                               "time_ids": io["time_ids"].to(DEVICE, dtype)}).sample
        save_file({"unet_out": out.float().cpu()}, args.unet_io.replace(".safetensors", ".diffusers.safetensors"))
    recipes = args.recipes.split(",")
    if args.compile and "compile" not in recipes:
        recipes.append("compile")
    for recipe in recipes:
        t = time.perf_counter()
        apply_recipe(pipe, taesd, recipe, args.compile_decoders)
        run = measure(pipe, taesd, args, dtype, recipe)
        run["recipe_s"] = time.perf_counter() - t
        results["runs"].append(run)
        print(json.dumps(run), flush=True)
        if recipe == "eager" and args.throughput:
            results["throughput"] = measure_throughput(pipe, args, [int(n) for n in args.throughput.split(",")], "eager")
    compiled = [r for r in results["runs"] if r["label"] != "eager"]
    if compiled:
        results["best"] = {k: min(r[k] for r in compiled if k in r)
                           for k in compiled[0] if k not in ("label", "recipe_s")}
    if DEVICE == "cuda":
        results["peak_gpu_memory_mib"] = torch.cuda.max_memory_reserved() / 2**20
    text = json.dumps(results, indent=1)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
