//! Every sampler against diffusers 0.42.1, from the reference that
//! `scripts/make_sampler_reference.py` wrote to `tests/reference/`: for the
//! tiny SDXL scheduler config and its variants, the schedules of 1, 4, 20,
//! 30 and 50 steps, txt2img trajectories of 1, 4 and 20 steps, img2img runs
//! (strength 0.6 and 0.75 over 20 steps) and `add_noise`.
//!
//! Tolerances: integer timesteps exactly, fractional ones within 1e-4
//! relative; sigmas within 1e-6 relative (5e-6 under
//! `rescale_betas_zero_snr`, see below); every recorded sample element within
//! 1e-5, absolute while the run's magnitude stays below 1 and relative to the
//! largest magnitude the run has reached so far above it (float32 has no
//! 1e-5 resolution at the 15 to 4096 that Euler latents start at, and an
//! error made there is carried forward).
//!
//! Why not bit-exact: torch's float32 (and float64) `sqrt`, `exp`, `log` on
//! the CPU go through MKL's vector maths, within one ulp but not correctly
//! rounded (about one sqrt in six differs from IEEE's), and numpy's float32
//! `log` likewise. The port computes the same expressions in the same order
//! with IEEE operations, so each scalar can be an ulp apart; the zero-SNR
//! rescale magnifies torch's sqrt error in its small sigmas to a few 1e-6.
//!
//! The reference stores each recorded tensor as every `stride`-th element plus
//! its sum; the tiny config's final samples are stored whole. A config
//! diffusers refuses for a class must be refused here too.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, IndexOp, Tensor};
use serde_json::Value;

use sdxl::scheduler::{build, Sampler, SamplerKind, SchedulerConfig};

const SAMPLE_TOLERANCE: f32 = 1e-5;

fn reference_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/sampler-reference")
}

fn load_tensors(name: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(reference_dir().join(name), &Device::Cpu).unwrap()
}

struct Reference {
    index: Value,
    inputs: HashMap<String, Tensor>,
}

impl Reference {
    fn load() -> Self {
        let text = std::fs::read_to_string(reference_dir().join("reference.json")).unwrap();
        let index: Value = serde_json::from_str(&text).unwrap();
        let inputs = load_tensors("inputs.safetensors")
            .into_iter()
            .map(|(k, v)| (k, v.to_dtype(DType::F32).unwrap()))
            .collect();
        Self { index, inputs }
    }

    /// The tiny config with the variant's keys replaced.
    fn config(&self, variant: &str) -> SchedulerConfig {
        let text = std::fs::read_to_string(reference_dir().join("tiny_scheduler_config.json")).unwrap();
        let mut config: serde_json::Map<String, Value> = serde_json::from_str(&text).unwrap();
        for (k, v) in self.index["configs"][variant].as_object().unwrap() {
            config.insert(k.clone(), v.clone());
        }
        serde_json::from_value(Value::Object(config)).unwrap()
    }

    fn input(&self, name: &str) -> &Tensor {
        &self.inputs[name]
    }

    fn stride(&self) -> usize {
        self.index["stride"].as_u64().unwrap() as usize
    }
}

fn usize_of(v: &Value) -> usize {
    v.as_u64().unwrap_or_else(|| panic!("not an index: {v}")) as usize
}

fn f32s(t: &Tensor) -> Vec<f32> {
    t.flatten_all()
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// Within 1e-5 of diffusers, relative to the magnitude `scale` where that
/// exceeds 1.
fn close(got: f32, want: f32, scale: f32) -> bool {
    (got - want).abs() <= SAMPLE_TOLERANCE * scale.max(1.0)
}

/// The largest magnitude in the tensor.
fn magnitude(values: &[f32]) -> f32 {
    values.iter().fold(0.0f32, |m, v| m.max(v.abs()))
}

/// The recorded tensors of one sampler and config: subset rows and sums.
struct Rows {
    subset: Vec<Vec<f32>>,
    sum: Vec<f64>,
    stride: usize,
}

impl Rows {
    fn new(tensors: &HashMap<String, Tensor>, config: &str, stride: usize) -> Self {
        let subset = tensors[&format!("{config}/subset")].to_vec2().unwrap();
        let sum = tensors[&format!("{config}/sum")].to_vec1().unwrap();
        Self { subset, sum, stride }
    }

    /// Checks `got` against recorded row `row`; `scale` is the magnitude the
    /// tolerance is relative to (at least `got`'s own).
    fn check(&self, row: usize, got: &Tensor, scale: f32, what: &str) {
        let values = f32s(got);
        let picked: Vec<f32> = values.iter().step_by(self.stride).copied().collect();
        let want = &self.subset[row];
        let scale = scale.max(magnitude(&values));
        assert_eq!(picked.len(), want.len(), "{what}: element count");
        for (k, (&g, &w)) in picked.iter().zip(want).enumerate() {
            assert!(
                close(g, w, scale),
                "{what}: element {} is {g}, diffusers {w}",
                k * self.stride
            );
        }
        let sum: f64 = values.iter().map(|&v| v as f64).sum();
        let tol = (SAMPLE_TOLERANCE * scale.max(1.0)) as f64 * values.len() as f64;
        assert!(
            (sum - self.sum[row]).abs() <= tol,
            "{what}: sum {sum}, diffusers {}",
            self.sum[row]
        );
    }
}

fn check_whole(got: &Tensor, want: &Tensor, scale: f32, what: &str) {
    let want = f32s(want);
    let scale = scale.max(magnitude(&want));
    for (k, (g, w)) in f32s(got).into_iter().zip(want).enumerate() {
        assert!(close(g, w, scale), "{what}: element {k} is {g}, diffusers {w}");
    }
}

fn check_schedule(
    kind: SamplerKind,
    variant: &str,
    config: &SchedulerConfig,
    entry: &Value,
    tensors: &HashMap<String, Tensor>,
) {
    let timesteps: Vec<f32> = tensors[&format!("{variant}/timesteps")].to_vec1().unwrap();
    let sigmas: Option<Vec<f32>> = tensors.get(&format!("{variant}/sigmas")).map(|t| t.to_vec1().unwrap());
    let (mut t_at, mut s_at) = (0, 0);
    let sigma_tolerance = if config.rescale_betas_zero_snr { 5e-6 } else { 1e-6 };
    for steps in [1usize, 4, 20, 30, 50] {
        let what = format!("{kind} {variant} {steps} steps");
        let rec = &entry["schedules"][steps.to_string()];
        if let Some(error) = rec.get("error") {
            assert!(
                build(kind, config, steps).is_err(),
                "{what}: diffusers refuses it ({error})"
            );
            continue;
        }
        let s = build(kind, config, steps).unwrap_or_else(|e| panic!("{what}: {e}"));
        let len = usize_of(&rec["len"]);
        let want_t = &timesteps[t_at..t_at + len];
        t_at += len;
        assert_eq!(s.len(), len, "{what}: number of timesteps");
        if rec["integer_timesteps"].as_bool().unwrap() {
            assert_eq!(s.timesteps(), want_t, "{what}: timesteps");
        } else {
            for (k, (&g, &w)) in s.timesteps().iter().zip(want_t).enumerate() {
                assert!(
                    (g - w).abs() <= 1e-4 * w.abs().max(1.0),
                    "{what}: timestep {k} is {g}, diffusers {w}"
                );
            }
        }
        let want_sigma = rec["init_noise_sigma"].as_f64().unwrap() as f32;
        assert!(
            (s.init_noise_sigma() - want_sigma).abs() <= 1e-6 * want_sigma,
            "{what}: init_noise_sigma {} vs {want_sigma}",
            s.init_noise_sigma()
        );
        assert_eq!(s.order(), usize_of(&rec["order"]), "{what}: order");
        if rec["has_sigmas"].as_bool().unwrap() {
            let n = usize_of(&rec["sigmas_len"]);
            let want = &sigmas.as_ref().unwrap()[s_at..s_at + n];
            s_at += n;
            let got = s.sigmas().unwrap_or_else(|| panic!("{what}: no sigmas"));
            assert_eq!(got.len(), n, "{what}: number of sigmas");
            for (k, (&g, &w)) in got.iter().zip(want).enumerate() {
                assert!(
                    (g - w).abs() <= sigma_tolerance * w.abs(),
                    "{what}: sigma {k} is {g}, diffusers {w}"
                );
            }
        } else {
            assert!(s.sigmas().is_none(), "{what}: diffusers has no sigmas");
        }
    }
}

/// Runs steps `t_start..` from `start` the way the pipeline does, checking
/// each scaled input and sample against the recorded rows. Returns the last
/// sample and the largest magnitude the run reached.
fn run_steps(
    reference: &Reference,
    s: &mut dyn Sampler,
    start: Tensor,
    run: &Value,
    rows: &Rows,
    what: &str,
) -> (Tensor, f32) {
    let t_start = usize_of(&run["t_start"]);
    let draws: Vec<usize> = run["draws"].as_array().unwrap().iter().map(usize_of).collect();
    let sample_row = usize_of(&run["sample_row"]);
    let scaled_row = run.get("scaled_row").map(usize_of);
    let mut scale = magnitude(&f32s(&start));
    let mut x = start;
    for (k, i) in (t_start..s.len()).enumerate() {
        let what = format!("{what} step {i}");
        assert_eq!(
            s.step_needs_noise(i),
            draws.contains(&i),
            "{what}: whether it draws noise"
        );
        let model_input = s.scale_model_input(&x, i).unwrap();
        match scaled_row {
            Some(row) => rows.check(row + k, &model_input, scale, &format!("{what} scale_model_input")),
            None => assert_eq!(
                f32s(&model_input),
                f32s(&x),
                "{what}: scale_model_input is the identity"
            ),
        }
        let model_output = reference.input("model_outputs").i(i).unwrap();
        let noise = reference.input("noises").i(i).unwrap();
        let noise = s.step_needs_noise(i).then_some(&noise);
        x = s.step(&model_output, i, &x, noise).unwrap();
        rows.check(sample_row + k, &x, scale, &what);
        scale = scale.max(magnitude(&f32s(&x)));
    }
    (x, scale)
}

fn check_sampler(kind: SamplerKind) {
    let reference = Reference::load();
    let tensors = load_tensors(&format!("{}.safetensors", kind.name()));
    let entries = reference.index["samplers"][kind.name()].as_object().unwrap();
    assert!(entries.len() >= 9, "{kind}: the reference covers the configs");
    for (variant, entry) in entries {
        let config = reference.config(variant);
        if let Some(error) = entry.get("error") {
            for steps in [1, 4, 20, 30, 50] {
                assert!(
                    build(kind, &config, steps).is_err(),
                    "{kind} {variant}: diffusers refuses it ({error}), the port builds it"
                );
            }
            continue;
        }
        check_schedule(kind, variant, &config, entry, &tensors);
        let rows = Rows::new(&tensors, variant, reference.stride());
        for (name, run) in entry["runs"].as_object().unwrap() {
            let what = format!("{kind} {variant} {name}");
            if run.get("crashed").is_some() {
                // diffusers itself fails here (a duplicated first timestep
                // without a begin index); the port runs every index instead.
                continue;
            }
            let steps = usize_of(&run["steps"]);
            let t_start = usize_of(&run["t_start"]);
            let mut s = build(kind, &config, steps).unwrap();
            let start = if name.starts_with("img2img") {
                s.set_begin_index(t_start);
                let start = s
                    .add_noise(
                        reference.input("image_latents"),
                        reference.input("image_noise"),
                        t_start,
                    )
                    .unwrap();
                rows.check(usize_of(&run["start_row"]), &start, 0.0, &format!("{what} start"));
                start
            } else {
                let latents = reference.input("latents");
                latents.affine(s.init_noise_sigma() as f64, 0.0).unwrap()
            };
            let (last, scale) = run_steps(&reference, s.as_mut(), start, run, &rows, &what);
            if let Some(want) = tensors.get(&format!("{variant}/{name}/final")) {
                check_whole(&last, want, scale, &format!("{what} final sample"));
            }
        }
        let add_noise = &entry["add_noise"];
        let s = build(kind, &config, usize_of(&add_noise["steps"])).unwrap();
        let first_row = usize_of(&add_noise["row"]);
        for (k, i) in add_noise["indices"]
            .as_array()
            .unwrap()
            .iter()
            .map(usize_of)
            .enumerate()
        {
            let noisy = s
                .add_noise(reference.input("image_latents"), reference.input("image_noise"), i)
                .unwrap();
            rows.check(
                first_row + k,
                &noisy,
                0.0,
                &format!("{kind} {variant} add_noise at {i}"),
            );
        }
    }
}

macro_rules! sampler_tests {
    ($($name:ident => $kind:expr),* $(,)?) => {
        $(
            #[test]
            fn $name() {
                check_sampler($kind);
            }
        )*
    };
}

sampler_tests! {
    euler_matches_diffusers => SamplerKind::Euler,
    euler_ancestral_matches_diffusers => SamplerKind::EulerAncestral,
    ddim_matches_diffusers => SamplerKind::Ddim,
    dpmpp_2m_matches_diffusers => SamplerKind::DpmPp2m,
    dpmpp_2m_karras_matches_diffusers => SamplerKind::DpmPp2mKarras,
    dpmpp_2m_sde_karras_matches_diffusers => SamplerKind::DpmPp2mSdeKarras,
    unipc_matches_diffusers => SamplerKind::UniPc,
    lcm_matches_diffusers => SamplerKind::Lcm,
}

#[test]
fn the_reference_covers_every_sampler() {
    let reference = Reference::load();
    let samplers = reference.index["samplers"].as_object().unwrap();
    for kind in SamplerKind::ALL {
        assert!(samplers.contains_key(kind.name()), "{kind}");
    }
    assert_eq!(reference.index["diffusers"], "0.42.1");
}
