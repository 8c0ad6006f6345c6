#!/usr/bin/env python3
"""Make golden outputs of diffusers' tiled VAE decode (AutoencoderKL after
`enable_tiling()`) for sdxl/tests/vae_tiling.rs, in the format of
tests/fixtures/vae-tiling:

    pip install torch diffusers transformers safetensors pillow
    python3 scripts/make_vae_tiling_reference.py                   # rewrites tests/fixtures/vae-tiling
    python3 scripts/make_vae_tiling_reference.py --out /tmp/tiling --latent 40x28 --arch alt
    SDXL_TILING_DIR=/tmp/tiling cargo test -p sdxl --test vae_tiling

A folder holds `tiling.json` (the cases: tile sizes, tensor names, how many
tiles diffusers decoded) and `tiling.safetensors` (for each case the latents
`z` given to `vae.decode`, already divided by the scaling factor, and the
image it returned, float32). Its `vae` key is the VAE folder, relative to
the fixture folder: the project's tiny VAE (tests/fixtures/sdxl-reference/
tiny-sdxl/vae) for the project's fixture, a copy of it in `vae/` for any
other folder, or with `--arch alt` a random VAE of three blocks (4× upscale,
other widths and `sample_size`) stored in float32.

The cases: diffusers' default tiles for the VAE (`--latent`, default 16x24,
larger than one 16-latent tile); 8-latent tiles over a 13x11 latent (short
last tiles, blends cut short by them); 8-latent tiles overlapping by half;
and the untiled decode of the 13x11 latent. Every tiled case is checked to
be tiled (diffusers' decoder ran once per tile, and the result differs from
the untiled decode) before it is written.
"""
import argparse
import json
import os
import shutil

import diffusers
import torch
from diffusers import AutoencoderKL
from safetensors.torch import save_file

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURES = os.path.join(HERE, "..", "tests", "fixtures")
DEFAULT_OUT = os.path.join(FIXTURES, "vae-tiling")
TINY_VAE = os.path.join(FIXTURES, "sdxl-reference", "tiny-sdxl", "vae")


def size(text):
    h, w = text.lower().split("x")
    return int(h), int(w)


def random_alt_vae(seed):
    """A VAE unlike the tiny fixture's: three blocks, other widths and sample size."""
    vae = AutoencoderKL(
        block_out_channels=[8, 12, 16],
        down_block_types=["DownEncoderBlock2D"] * 3,
        up_block_types=["UpDecoderBlock2D"] * 3,
        layers_per_block=1,
        norm_num_groups=4,
        latent_channels=4,
        sample_size=64,
        scaling_factor=0.2,
    )
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in vae.named_parameters():
            if name.endswith("weight") and p.dim() == 1:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                fan_in = p[0].numel() if p.dim() > 1 else 16
                p.copy_(0.6 * torch.randn(p.shape, generator=g) / max(fan_in, 1) ** 0.5)
    return vae


def decode(vae, z, tiles):
    """vae.decode(z) with tiling set as `tiles` (None: untiled); returns the
    image and how many times the decoder ran."""
    calls = []
    hook = vae.decoder.register_forward_hook(lambda *_: calls.append(1))
    try:
        if tiles is None:
            vae.disable_tiling()
        else:
            vae.enable_tiling()
            vae.tile_latent_min_size, vae.tile_sample_min_size, vae.tile_overlap_factor = tiles
        with torch.no_grad():
            image = vae.decode(z).sample
    finally:
        hook.remove()
    return image, len(calls)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=DEFAULT_OUT)
    ap.add_argument("--latent", type=size, default=(16, 24), help="HxW latents for the default-tile case")
    ap.add_argument("--arch", choices=["template", "alt"], default="template")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    if args.arch == "alt":
        vae = random_alt_vae(args.seed)
        vae.save_pretrained(os.path.join(out, "vae"), safe_serialization=True)
        vae_rel = "vae"
    elif out == os.path.abspath(DEFAULT_OUT):
        vae_rel = os.path.relpath(TINY_VAE, out)
    else:
        shutil.copytree(TINY_VAE, os.path.join(out, "vae"), dirs_exist_ok=True)
        vae_rel = "vae"
    vae = AutoencoderKL.from_pretrained(os.path.join(out, vae_rel), torch_dtype=torch.float32).eval()
    vae64 = AutoencoderKL.from_pretrained(os.path.join(out, vae_rel), torch_dtype=torch.float64).eval()
    scale = 2 ** (len(vae.config.block_out_channels) - 1)
    defaults = (vae.tile_latent_min_size, vae.tile_sample_min_size, vae.tile_overlap_factor)

    g = torch.Generator().manual_seed(args.seed)

    def latents(h, w):
        return torch.randn((1, vae.config.latent_channels, h, w), generator=g) / vae.config.scaling_factor

    small = (8, 8 * scale, 0.25)
    half = (8, 8 * scale, 0.5)
    odd = latents(13, 11)
    cases = [
        ("default", latents(*args.latent), defaults),
        ("small_tiles", odd, small),
        ("half_overlap", latents(12, 12), half),
        ("untiled", odd, None),
    ]
    tensors, entries, stored = {}, [], {}
    untiled_odd, _ = decode(vae, odd, None)
    for name, z, tiles in cases:
        image, calls = decode(vae, z, tiles)
        h, w = z.shape[2:]
        assert image.shape[2:] == (h * scale, w * scale), (name, image.shape)
        # one latent tensor may serve two cases: stored once, under the first one's name
        latents_key = stored.setdefault(id(z), f"{name}_z")
        entry = {"name": name, "latents": latents_key, "image": f"{name}_image", "tiled": tiles is not None,
                 "decoder_calls": calls}
        if tiles is not None:
            t, s, f = tiles
            step = int(t * (1 - f))
            expected = len(range(0, h, step)) * len(range(0, w, step))
            assert calls == expected > 1, f"{name}: diffusers decoded {calls} tiles, expected {expected}"
            if z is odd:
                diff = (image - untiled_odd).abs().max().item()
                assert diff > 1e-3, f"{name}: the tiled decode equals the untiled one ({diff})"
            entry.update(tile_latent_min_size=t, tile_sample_min_size=s, tile_overlap_factor=f,
                         config_defaults=tiles == defaults)
        else:
            assert calls == 1
        # float64 against float32: the rounding noise a faithful port lands in
        image64, _ = decode(vae64, z.double(), tiles)
        entry["f64_max_abs_diff"] = (image64 - image.double()).abs().max().item()
        tensors[entry["latents"]] = z.contiguous()
        tensors[entry["image"]] = image.contiguous()
        entries.append(entry)
        print(f"{name}: latents {h}x{w} -> {tuple(image.shape[2:])}, {calls} decoder calls, "
              f"f64 vs f32 {entry['f64_max_abs_diff']:.1e}")

    save_file(tensors, os.path.join(out, "tiling.safetensors"))
    meta = {
        "diffusers_version": diffusers.__version__,
        "torch_version": torch.__version__,
        "vae": vae_rel,
        "scale_factor": scale,
        "cases": entries,
    }
    with open(os.path.join(out, "tiling.json"), "w") as f:
        json.dump(meta, f, indent=2)
        f.write("\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
