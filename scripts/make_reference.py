#!/usr/bin/env python3
"""Make a reference fixture folder in the format of tests/fixtures/sdxl-reference.

A tiny random-weight SDXL (and TAESD) is built with diffusers/transformers,
saved in diffusers layout, and every stage's golden output is computed in
float32 from exactly the stored weights. Use it to check the Rust pipeline on
other sizes, storage dtypes, negative prompts and architectures:

    pip install torch diffusers transformers safetensors pillow
    python3 scripts/make_reference.py --out /tmp/ref-96x160 --width 96 --height 160 \
        --negative-prompt "" --storage float32 --arch alt
    SDXL_REFERENCE_DIR=/tmp/ref-96x160 cargo test -p worker --test parity --test generate_cli

The tokenizer files and the configs are taken from the template folder (the
project's own fixture by default); `--arch alt` changes every width, head and
layer count so nothing can lean on the template's numbers.
"""
import argparse
import json
import os
import shutil

import numpy as np
import torch
from diffusers import AutoencoderKL, AutoencoderTiny, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from PIL import Image
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_TEMPLATE = os.path.join(HERE, "..", "tests", "fixtures", "sdxl-reference")


def load_json(path):
    with open(path) as f:
        return json.load(f)


def alt_architecture(cfg):
    """Other widths, head counts, layer counts and group counts everywhere."""
    te1, te2, unet, vae, taesd = cfg["text_encoder"], cfg["text_encoder_2"], cfg["unet"], cfg["vae"], cfg["taesd"]
    te1.update(hidden_size=12, num_attention_heads=3, num_hidden_layers=2, intermediate_size=20, projection_dim=12)
    te2.update(hidden_size=20, num_attention_heads=4, num_hidden_layers=4, intermediate_size=28, projection_dim=24,
               eos_token_id=49407)
    unet.update(block_out_channels=[16, 24, 32], attention_head_dim=[1, 3, 4], transformer_layers_per_block=[1, 1, 3],
                layers_per_block=1, cross_attention_dim=32, addition_time_embed_dim=4,
                projection_class_embeddings_input_dim=6 * 4 + 24, norm_num_groups=8)
    vae.update(block_out_channels=[8, 16, 16], down_block_types=["DownEncoderBlock2D"] * 3,
               up_block_types=["UpDecoderBlock2D"] * 3, norm_num_groups=4, layers_per_block=1, scaling_factor=0.2)
    taesd.update(decoder_block_out_channels=[12, 12, 12, 12], num_decoder_blocks=[2, 1, 2, 1])  # DecoderTiny needs one width


def randomize(module, generator):
    # Default inits leave many zeros (biases, norms); draw every tensor so
    # each weight matters to the outputs.
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("weight") and p.dim() == 1:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=generator))
            else:
                fan_in = p[0].numel() if p.dim() > 1 else 16
                p.copy_(0.6 * torch.randn(p.shape, generator=generator) / max(fan_in, 1) ** 0.5)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--template", default=DEFAULT_TEMPLATE)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--height", type=int, default=128)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--guidance-scale", type=float, default=5.0)
    ap.add_argument("--negative-prompt", default="blurry, low quality")
    ap.add_argument("--storage", choices=["float16", "float32", "bfloat16"], default="float16")
    ap.add_argument("--arch", choices=["template", "alt"], default="template")
    ap.add_argument("--spacing", choices=["leading", "trailing", "linspace"], default=None)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    tmpl = args.template
    tmodel = os.path.join(tmpl, "tiny-sdxl")
    cfg = {
        "text_encoder": load_json(os.path.join(tmodel, "text_encoder", "config.json")),
        "text_encoder_2": load_json(os.path.join(tmodel, "text_encoder_2", "config.json")),
        "unet": load_json(os.path.join(tmodel, "unet", "config.json")),
        "vae": load_json(os.path.join(tmodel, "vae", "config.json")),
        "taesd": load_json(os.path.join(tmpl, "tiny-taesdxl", "config.json")),
        "scheduler": load_json(os.path.join(tmodel, "scheduler", "scheduler_config.json")),
    }
    if args.arch == "alt":
        alt_architecture(cfg)
    if args.spacing:
        cfg["scheduler"]["timestep_spacing"] = args.spacing
    strip = lambda d: {k: v for k, v in d.items() if not k.startswith("_") and k not in ("architectures", "dtype", "transformers_version")}

    gen = torch.Generator().manual_seed(args.seed)
    te1 = CLIPTextModel(CLIPTextConfig(**strip(cfg["text_encoder"])))
    te2 = CLIPTextModelWithProjection(CLIPTextConfig(**strip(cfg["text_encoder_2"])))
    unet = UNet2DConditionModel.from_config(cfg["unet"])
    vae = AutoencoderKL.from_config(cfg["vae"])
    taesd = AutoencoderTiny.from_config(cfg["taesd"])
    storage = getattr(torch, args.storage)
    for m in (te1, te2, unet, vae, taesd):
        randomize(m, gen)
        # Round through the storage dtype so goldens use exactly the stored values.
        m.to(storage).to(torch.float32).eval()
    scheduler = EulerDiscreteScheduler.from_config(cfg["scheduler"])
    tok1 = CLIPTokenizer.from_pretrained(os.path.join(tmodel, "tokenizer"))
    tok2 = CLIPTokenizer.from_pretrained(os.path.join(tmodel, "tokenizer_2"))
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=tok1, tokenizer_2=tok2,
                                     unet=unet, scheduler=scheduler, force_zeros_for_empty_prompt=True)

    out = args.out
    if os.path.exists(out):
        shutil.rmtree(out)
    os.makedirs(out)
    model_dir = os.path.join(out, "tiny-sdxl")
    for m in (te1, te2, unet, vae):
        m.to(storage)
    pipe.save_pretrained(model_dir, safe_serialization=True)
    taesd.to(storage).save_pretrained(os.path.join(out, "tiny-taesdxl"), safe_serialization=True)
    for m in (te1, te2, unet, vae, taesd):
        m.to(torch.float32)

    golden = load_json(os.path.join(tmpl, "golden.json"))
    prompts = golden["prompts"]
    negative = args.negative_prompt
    w, h, steps = args.width, args.height, args.steps
    tensors = {}
    with torch.no_grad():
        neg = negative if negative else None
        pe, npe, ppe, nppe = pipe.encode_prompt(prompts, negative_prompt=[neg] * len(prompts) if neg else None,
                                                do_classifier_free_guidance=True)
        tensors.update(prompt_embeds=pe, negative_prompt_embeds=npe, pooled_prompt_embeds=ppe,
                       negative_pooled_prompt_embeds=nppe)
        vae_sf = 2 ** (len(vae.config.block_out_channels) - 1)
        lat_shape = (1, unet.config.in_channels, h // vae_sf, w // vae_sf)
        sample = torch.randn(lat_shape, generator=gen)
        ehs = pe[:1]
        time_ids = torch.tensor([[h, w, 0, 0, h, w]], dtype=torch.float32)
        t = 500.0
        tensors.update(unet_in_sample=sample, unet_in_encoder_hidden_states=ehs, unet_in_text_embeds=ppe[:1],
                       unet_in_time_ids=time_ids,
                       unet_out=unet(sample, t, encoder_hidden_states=ehs,
                                     added_cond_kwargs={"text_embeds": ppe[:1], "time_ids": time_ids}).sample)
        latents = torch.randn(lat_shape, generator=gen) * 3
        tensors["vae_in_latents"] = latents
        tensors["vae_out"] = vae.decode(latents / vae.config.scaling_factor).sample
        tensors["taesd_out"] = taesd.decode(latents / taesd.config.scaling_factor).sample
        noise = torch.randn((len(prompts),) + lat_shape[1:], generator=gen)
        result = pipe(prompts, negative_prompt=[neg] * len(prompts) if neg else None, width=w, height=h,
                      num_inference_steps=steps, guidance_scale=args.guidance_scale, latents=noise,
                      output_type="latent")
        final = result.images
        tensors.update(pipeline_in_noise=noise, pipeline_out_latents=final)
        img = vae.decode(final / vae.config.scaling_factor).sample
        img = (img / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
        img_u8 = (img * 255).round().astype("uint8")
        tensors["pipeline_out_images_u8"] = torch.from_numpy(img_u8)
    save_file({k: v.detach().clone().contiguous() for k, v in tensors.items()}, os.path.join(out, "golden.safetensors"))
    for i in range(len(prompts)):
        save_file({"init_noise": noise[i:i + 1].contiguous()}, os.path.join(out, f"noise_{i}.safetensors"))
        Image.fromarray(img_u8[i]).save(os.path.join(out, f"pipeline_out_{i}.png"))

    sched = {}
    for n in (1, 4, 20, 30, 50):
        s = EulerDiscreteScheduler.from_config(cfg["scheduler"])
        s.set_timesteps(n)
        sched[str(n)] = {"timesteps": s.timesteps.tolist(), "sigmas": s.sigmas.tolist(),
                         "init_noise_sigma": float(s.init_noise_sigma)}
    cases = []
    for case in golden["tokenizer_cases"]:
        text = case["text"]
        cases.append({"text": text,
                      "ids_1": tok1(text, padding="max_length", max_length=77, truncation=True).input_ids,
                      "ids_2": tok2(text, padding="max_length", max_length=77, truncation=True).input_ids})
    meta = {"variant": f"{args.arch}-{w}x{h}-{args.storage}-neg={negative!r}", "height": h, "width": w, "steps": steps,
            "guidance_scale": args.guidance_scale, "prompts": prompts, "negative_prompt": negative,
            "model_dir": "tiny-sdxl", "taesd_dir": "tiny-taesdxl", "tokenizer_cases": cases,
            "scheduler": sched, "unet_timestep": 500.0}
    with open(os.path.join(out, "golden.json"), "w") as f:
        json.dump(meta, f, indent=1)
    print(f"wrote {out}: {meta['variant']}")


if __name__ == "__main__":
    main()
