#!/usr/bin/env python3
"""Generates tests/fixtures/sampler-reference/: what diffusers' eight samplers do, for the Rust tests.

For each sampler (built as `Class.from_config(config, **overrides)`, the way
the pipeline names them) and each test config (the tiny SDXL model's
scheduler config and variants of it), it records:

* the schedule for 1, 4, 20, 30 and 50 steps: `timesteps`, `sigmas` (where
  the class has them), `init_noise_sigma`, `order`;
* step trajectories (1, 4 and 20 steps) run the way the SDXL pipelines run
  them: latents = randn * init_noise_sigma, then per step
  `scale_model_input(latents, t)` and `step(model_output, t, latents, ...)`
  with `t` taken from `scheduler.timesteps`; every randn draw of a step is
  replaced by a given noise tensor, and the steps that drew are recorded and
  checked against the rule the Rust port predicts;
* img2img runs mirroring StableDiffusionXLImg2ImgPipeline.get_timesteps and
  prepare_latents (strength 0.6 and 0.75 over 20 steps): set_begin_index,
  add_noise at the first timestep, then the remaining steps;
* add_noise at the first, a third of the way and the last step index of 20.

Inputs (latents, one model output and one noise per step index, an image
latent and its noise) come from torch.randn with a fixed seed, rounded to
values float16 holds exactly (inputs.safetensors stores them in half the
space; the runs use them as float32).

To keep the files small (a few hundred KB in all) each recorded tensor is
stored as a strided subset of its elements (every 48th: both batch entries,
every channel, varied positions) plus its float64 sum: one row of
`<config>/subset` and one entry of `<config>/sum` per tensor, whose row
numbers reference.json gives. The schedules of all step counts are
concatenated in `<config>/timesteps` and `<config>/sigmas`. The final sample
of the tiny config's 20-step and img2img runs is stored whole.

A config that diffusers refuses for a class (when built, or at its first
step, or whose samples are not finite) is recorded as an error, which the
port must reproduce by refusing it; a txt2img run that diffusers crashes in
(a duplicated first timestep) is recorded as crashed and not compared.

Run from the crate root:  python3 scripts/make_sampler_reference.py
"""

import json
import os
import sys

import numpy as np
import torch
from safetensors.numpy import save_file

import diffusers
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    LCMScheduler,
    UniPCMultistepScheduler,
)
from diffusers.schedulers import (
    scheduling_ddim,
    scheduling_dpmsolver_multistep,
    scheduling_euler_ancestral_discrete,
    scheduling_euler_discrete,
    scheduling_lcm,
)

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "sampler-reference")
SHAPE = (2, 4, 8, 8)
STRIDE = 48
SCHEDULE_STEPS = [1, 4, 20, 30, 50]
TRAJECTORY_STEPS = [1, 4, 20]
IMG2IMG_STEPS = 20
STRENGTHS = [0.6, 0.75]

SAMPLERS = {
    "euler": (EulerDiscreteScheduler, {}),
    "euler_a": (EulerAncestralDiscreteScheduler, {}),
    "ddim": (DDIMScheduler, {}),
    "dpmpp_2m": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpmpp_2m_karras": (
        DPMSolverMultistepScheduler,
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
    ),
    "dpmpp_2m_sde_karras": (
        DPMSolverMultistepScheduler,
        {"algorithm_type": "sde-dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
    ),
    "unipc": (UniPCMultistepScheduler, {}),
    "lcm": (LCMScheduler, {}),
}

# Variants of the tiny config: each a dict of keys replaced in it.
VARIANTS = {
    "tiny": {},
    "trailing_vpred": {"timestep_spacing": "trailing", "prediction_type": "v_prediction"},
    "linspace_linear_offset0": {
        "timestep_spacing": "linspace",
        "steps_offset": 0,
        "beta_schedule": "linear",
        "beta_start": 0.0001,
        "beta_end": 0.02,
    },
    "zero_snr_sigma_min": {
        "rescale_betas_zero_snr": True,
        "timestep_spacing": "trailing",
        "prediction_type": "v_prediction",
        "final_sigmas_type": "sigma_min",
    },
    "cosine_sample": {"beta_schedule": "squaredcos_cap_v2", "prediction_type": "sample"},
    "karras_range": {
        "use_karras_sigmas": True,
        "sigma_min": 0.05,
        "sigma_max": 10.0,
        "timestep_spacing": "linspace",
        "steps_offset": 0,
    },
    "exponential_sigma_min": {"use_exponential_sigmas": True, "final_sigmas_type": "sigma_min"},
    # Solver options, each read by some classes: DPM-Solver heun with
    # euler_at_final and lambda clipping; UniPC order 3 with a disabled
    # corrector; DDIM and LCM without set_alpha_to_one; LCM's distillation
    # schedule (so 30 and 50 steps are refused); Euler's log-linear sigmas.
    "solver_options": {
        "timestep_spacing": "trailing",
        "solver_order": 3,
        "solver_type": "heun",
        "lower_order_final": False,
        "euler_at_final": True,
        "lambda_min_clipped": -2.0,
        "final_sigmas_type": "sigma_min",
        "disable_corrector": [1],
        "clip_sample": False,
        "set_alpha_to_one": False,
        "interpolation_type": "log_linear",
        "original_inference_steps": 25,
        "timestep_scaling": 5.0,
    },
    # UniPC's noise-prediction mode with bh1, Euler's continuous timesteps,
    # clipping at 2.5 for DDIM and LCM.
    "eps_mode_bh1": {
        "timestep_spacing": "linspace",
        "prediction_type": "v_prediction",
        "timestep_type": "continuous",
        "solver_type": "bh1",
        "predict_x0": False,
        "clip_sample": True,
        "clip_sample_range": 2.5,
        "final_sigmas_type": "sigma_min",
    },
    # UniPC's last step to a zero sigma is infinite without lower_order_final
    # and NaN in noise-prediction mode: diffusers runs it, the port refuses it.
    "unipc_degenerate": {"lower_order_final": False, "predict_x0": False},
}

# Variants that only some samplers are tested with (the others would repeat "tiny").
VARIANT_SAMPLERS = {"unipc_degenerate": ["unipc"]}

# The modules whose randn draws a step may make.
RANDN_MODULES = [
    scheduling_ddim,
    scheduling_dpmsolver_multistep,
    scheduling_euler_ancestral_discrete,
    scheduling_euler_discrete,
    scheduling_lcm,
]


def expected_draw(name, i, n):
    """The Rust port's `step_needs_noise(i)` for a schedule of n steps."""
    if name in ("euler_a", "dpmpp_2m_sde_karras"):
        return True
    if name == "lcm":
        return i != n - 1
    return False


class NoiseFeed:
    """Stands in for randn_tensor: hands out the noise of the current step."""

    def __init__(self, noises):
        self.noises = noises
        self.index = None
        self.draws = []

    def __call__(self, shape, generator=None, device=None, dtype=None, layout=None):
        assert self.index is not None, "randn drawn outside a step"
        assert tuple(shape) == SHAPE, shape
        assert not self.draws or self.draws[-1] != self.index, "two draws in one step"
        self.draws.append(self.index)
        return self.noises[self.index].to(dtype=dtype)


class Rows:
    """The recorded tensors of one config: a strided subset of each one's
    elements (one row each) and its float64 sum."""

    def __init__(self):
        self.subsets, self.sums = [], []

    def add(self, tensors):
        """Records the tensors; returns the row of the first."""
        first = len(self.subsets)
        for t in tensors:
            flat = t.detach().to(torch.float32).reshape(-1).numpy()
            self.subsets.append(np.ascontiguousarray(flat[::STRIDE]))
            self.sums.append(flat.astype(np.float64).sum())
        return first

    def save(self, store, cname):
        store[f"{cname}/subset"] = np.stack(self.subsets)
        store[f"{cname}/sum"] = np.array(self.sums)


def build(cls, overrides, config, steps):
    sched = cls.from_config(config, **overrides)
    sched.set_timesteps(steps)
    return sched


def step_kwargs(sched):
    """What the pipeline's prepare_extra_step_kwargs passes (eta=0.0, generator=None)."""
    import inspect

    params = set(inspect.signature(sched.step).parameters.keys())
    kwargs = {}
    if "eta" in params:
        kwargs["eta"] = 0.0
    if "generator" in params:
        kwargs["generator"] = None
    return kwargs


def run_steps(name, sched, feed, inputs, latents, first, rows, record_scale):
    """The denoising loop from step index `first`; records every step."""
    n = len(sched.timesteps)
    feed.draws = []
    kwargs = step_kwargs(sched)
    identity = True
    scaled, samples = [], []
    for k, t in enumerate(sched.timesteps[first:]):
        i = first + k
        model_input = sched.scale_model_input(latents, t)
        scaled.append(model_input)
        identity &= torch.equal(model_input, latents)
        feed.index = i
        latents = sched.step(inputs["model_outputs"][i], t, latents, **kwargs, return_dict=False)[0]
        feed.index = None
        samples.append(latents)
    if not all(torch.isfinite(x).all() for x in samples):
        raise ValueError("diffusers' samples are not finite")
    run = {"sample_row": rows.add(samples)}
    if record_scale:
        run["scaled_row"] = rows.add(scaled)
    else:
        assert identity, f"{name}: scale_model_input is not the identity"
    expected = [i for i in range(first, n) if expected_draw(name, i, n)]
    assert feed.draws == expected, f"{name} {key}: draws {feed.draws}, predicted {expected}"
    run["draws"] = list(feed.draws)
    return latents, run


def sampler_reference(name, configs, inputs, feed):
    cls, overrides = SAMPLERS[name]
    record_scale = name in ("euler", "euler_a")
    meta, store = {}, {}
    for cname, config in configs.items():
        if name not in VARIANT_SAMPLERS.get(cname, [name]):
            continue
        try:
            meta[cname] = config_reference(name, cls, overrides, cname, config, inputs, feed, store, record_scale)
        except (ValueError, NotImplementedError) as e:
            # diffusers refuses this config for this class, when it is built
            # or at its first step: the port must refuse it when it is built.
            feed.index = None
            meta[cname] = {"error": f"{type(e).__name__}: {e}"}
            for k in [k for k in store if k.startswith(cname + "/")]:
                del store[k]
    return meta, store


def config_reference(name, cls, overrides, cname, config, inputs, feed, store, record_scale):
    entry = {"schedules": {}, "runs": {}}
    rows = Rows()
    timesteps, sigmas = [], []
    for steps in SCHEDULE_STEPS:
        try:
            sched = build(cls, overrides, config, steps)
        except ValueError as e:
            if steps in TRAJECTORY_STEPS:
                raise
            # This many steps is refused (LCM beyond original_inference_steps).
            entry["schedules"][str(steps)] = {"error": f"{type(e).__name__}: {e}"}
            continue
        ts = sched.timesteps
        rec = {
            "integer_timesteps": not torch.is_floating_point(ts),
            "init_noise_sigma": float(sched.init_noise_sigma),
            "order": int(sched.order),
            "len": len(ts),
        }
        # float32 holds diffusers' timesteps exactly (int64 below 2**24, or float32).
        assert torch.equal(ts.to(torch.float32).to(ts.dtype), ts)
        timesteps.append(ts.to(torch.float32).numpy())
        rec["has_sigmas"] = hasattr(sched, "sigmas")
        if rec["has_sigmas"]:
            sigmas.append(sched.sigmas.to(torch.float32).numpy())
            rec["sigmas_len"] = len(sched.sigmas)
        entry["schedules"][str(steps)] = rec
    store[f"{cname}/timesteps"] = np.concatenate(timesteps)
    if sigmas:
        store[f"{cname}/sigmas"] = np.concatenate(sigmas)

    final_whole = cname == "tiny"
    for steps in TRAJECTORY_STEPS:
        sched = build(cls, overrides, config, steps)
        latents = inputs["latents"] * sched.init_noise_sigma
        key = f"txt2img/{steps}"
        try:
            latents, run = run_steps(name, sched, feed, inputs, latents, 0, rows, record_scale)
        except IndexError as e:
            # A duplicated first timestep (e.g. the cosine schedule with Karras
            # sigmas): without a begin index diffusers starts at its second
            # occurrence and runs off the end of the sigmas on the last step.
            feed.index = None
            entry["runs"][key] = {"steps": steps, "t_start": 0, "crashed": f"{type(e).__name__}: {e}"}
            continue
        if final_whole and steps == 20:
            store[f"{cname}/{key}/final"] = latents.numpy()
        entry["runs"][key] = {"steps": steps, "t_start": 0, **run}

    for strength in STRENGTHS:
        steps = IMG2IMG_STEPS
        sched = build(cls, overrides, config, steps)
        # StableDiffusionXLImg2ImgPipeline.get_timesteps (denoising_start None).
        init_timestep = min(int(steps * strength), steps)
        t_start = max(steps - init_timestep, 0)
        timesteps = sched.timesteps[t_start * sched.order :]
        if hasattr(sched, "set_begin_index"):
            sched.set_begin_index(t_start * sched.order)
        latent_timestep = timesteps[:1].repeat(SHAPE[0])
        latents = sched.add_noise(inputs["image_latents"], inputs["image_noise"], latent_timestep)
        key = f"img2img/{strength}"
        start_row = rows.add([latents])
        latents, run = run_steps(name, sched, feed, inputs, latents, t_start * sched.order, rows, record_scale)
        if final_whole:
            store[f"{cname}/{key}/final"] = latents.numpy()
        entry["runs"][key] = {"steps": steps, "t_start": t_start, "start_row": start_row, **run}

    noisy = []
    # The schedule can be shorter than asked (DPM-Solver's lambda clipping).
    n = len(build(cls, overrides, config, IMG2IMG_STEPS).timesteps)
    indices = [0, n // 3, n - 1]
    for i in indices:
        sched = build(cls, overrides, config, IMG2IMG_STEPS)
        if hasattr(sched, "set_begin_index"):
            sched.set_begin_index(i)
        t = sched.timesteps[i : i + 1].repeat(SHAPE[0])
        noisy.append(sched.add_noise(inputs["image_latents"], inputs["image_noise"], t))
    entry["add_noise"] = {"steps": IMG2IMG_STEPS, "indices": indices, "row": rows.add(noisy)}
    rows.save(store, cname)
    return entry


def main():
    assert diffusers.__version__ == "0.42.1", diffusers.__version__
    torch.set_num_threads(1)
    diffusers.utils.logging.set_verbosity_error()
    with open(os.path.join(OUT, "tiny_scheduler_config.json")) as f:
        tiny = json.load(f)
    configs = {name: {**tiny, **changes} for name, changes in VARIANTS.items()}
    gen = torch.Generator().manual_seed(20240601)
    shapes = {
        "latents": SHAPE,
        "model_outputs": (IMG2IMG_STEPS, *SHAPE),
        "noises": (IMG2IMG_STEPS, *SHAPE),
        "image_latents": SHAPE,
        "image_noise": SHAPE,
    }
    inputs = {k: torch.randn(shape, generator=gen).half().float() for k, shape in shapes.items()}
    save_file({k: v.half().numpy() for k, v in inputs.items()}, os.path.join(OUT, "inputs.safetensors"))
    feed = NoiseFeed(inputs["noises"])
    for module in RANDN_MODULES:
        module.randn_tensor = feed

    index = {
        "diffusers": diffusers.__version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "stride": STRIDE,
        "configs": VARIANTS,
        "samplers": {},
    }
    for name in SAMPLERS:
        meta, store = sampler_reference(name, configs, inputs, feed)
        save_file(store, os.path.join(OUT, f"{name}.safetensors"))
        index["samplers"][name] = meta
        errors = [c for c, m in meta.items() if "error" in m]
        print(f"{name}: {len(store)} arrays, refused configs: {errors}", file=sys.stderr)
    with open(os.path.join(OUT, "reference.json"), "w") as f:
        json.dump(index, f, indent=None, sort_keys=True, separators=(",", ":"))
        f.write("\n")


if __name__ == "__main__":
    main()
