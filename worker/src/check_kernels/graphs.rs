//! CUDA graphs (the `graphs` path) against the same work launch by launch
//! (`worker check-kernels`): the text encoders at SDXL's sizes with random
//! weights and token ids that change between calls, so the warm-up, the
//! recording and the replays each see other inputs; and a graph's input
//! reused from one call to the next (as the UNet's context keys and values
//! are at every step), which a replay does not copy again.

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};
use sdxl::accel::Accel;
use sdxl::clip::{ClipOutput, ClipTextModel};
use sdxl::config::ClipTextConfig;
use sdxl::cuda::graph::Graphs;

use super::{errors, median_ms, CheckKernelsArgs, Row};

/// Weights drawn as CLIP initializes them (N(0, 0.02); layer norms at
/// identity), so 32 layers keep their activations finite.
struct RandomClip;

impl SimpleBackend for RandomClip {
    fn get(&self, s: Shape, name: &str, _: Init, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        if name.contains("layer_norm") {
            let value = if name.ends_with("weight") { 1f32 } else { 0f32 };
            return Tensor::full(value, s, dev)?.to_dtype(dtype);
        }
        Tensor::randn(0f32, 0.02, s, dev)?.to_dtype(dtype)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("{name}: the random CLIP weights need a shape")
    }

    fn contains_tensor(&self, _: &str) -> bool {
        true
    }
}

/// SDXL's two text encoders (CLIP ViT-L's text tower for the penultimate
/// state only, OpenCLIP bigG's with the pooled output), each over a
/// negative prompt and a prompt of 77 tokens in one batch, as the pipeline
/// encodes them: the batch against each text alone, and the graph's
/// outputs against launch-by-launch ones for the same ids; the times of
/// each.
pub(super) fn check_text_encoders(dev: &Device, args: &CheckKernelsArgs, rows: &mut Vec<Row>) -> anyhow::Result<()> {
    let dtype = DType::F16;
    for (name, hidden, layers, heads, act, pooled) in [
        ("CLIP-L", 768usize, 12usize, 12usize, "quick_gelu", false),
        ("CLIP-bigG", 1280, 32, 20, "gelu", true),
    ] {
        let config: ClipTextConfig = serde_json::from_value(serde_json::json!({
            "vocab_size": 49408,
            "hidden_size": hidden,
            "intermediate_size": 4 * hidden,
            "num_hidden_layers": layers,
            "num_attention_heads": heads,
            "max_position_embeddings": 77,
            "hidden_act": act,
            "projection_dim": hidden,
        }))?;
        let vb = VarBuilder::from_backend(Box::new(RandomClip), dtype, dev.clone());
        let model = ClipTextModel::new(&config, pooled, vb)?;
        // three calls' ids, each a negative prompt and a prompt as the
        // pipeline encodes them (the largest id of a row is its pooled position)
        let row = |p: u32| -> Vec<u32> { (0..77u32).map(|i| (p * 7919 + i * 104_729) % 49_407).collect() };
        let prompts: Vec<Vec<Vec<u32>>> = (1..=3u32).map(|p| vec![row(p), row(p + 3)]).collect();
        let outputs = |out: ClipOutput| -> Vec<Tensor> { std::iter::once(out.penultimate).chain(out.pooled).collect() };

        let accel = Accel::current();
        Accel { graphs: false, ..accel }.install();
        let eager = prompts
            .iter()
            .map(|ids| Ok(outputs(model.forward(ids, dev, pooled)?)))
            .collect::<anyhow::Result<Vec<_>>>()?;
        // the two texts in one batch against each alone
        let (mut rel, mut max) = (0f32, 0f32);
        for (ids, batched) in prompts.iter().zip(&eager) {
            for (b, text) in ids.iter().enumerate() {
                let alone = outputs(model.forward(std::slice::from_ref(text), dev, pooled)?);
                for (got, want) in batched.iter().zip(&alone) {
                    let (r, m) = errors(&got.narrow(0, b, 1)?, want)?;
                    (rel, max) = (rel.max(r), max.max(m));
                }
            }
        }
        let candle_ms = median_ms(dev, args.iters, || {
            Ok(model.forward(&prompts[0], dev, pooled)?.penultimate)
        })?;
        let one_ms = median_ms(dev, args.iters, || {
            Ok(model.forward(&prompts[0][..1], dev, pooled)?.penultimate)
        })?;
        rows.push(Row {
            kernel: format!("text encoder {name}, two texts in one batch (candle ms: one at a time, twice)"),
            shape: format!("b2 n77 d{hidden} {layers} layers"),
            dtype,
            rel,
            max,
            fast_ms: candle_ms,
            candle_ms: 2.0 * one_ms,
        });
        Accel { graphs: true, ..accel }.install();
        // warm-up, recording, then replays, each call with other ids than the one before
        let (mut rel, mut max) = (0f32, 0f32);
        for (ids, want) in prompts.iter().zip(&eager).chain(prompts.iter().zip(&eager)) {
            for (got, want) in outputs(model.forward(ids, dev, pooled)?).iter().zip(want) {
                let (r, m) = errors(got, want)?;
                (rel, max) = (rel.max(r), max.max(m));
            }
        }
        let fast_ms = median_ms(dev, args.iters, || {
            Ok(model.forward(&prompts[1], dev, pooled)?.penultimate)
        })?;
        accel.install();
        rows.push(Row {
            kernel: format!("text encoder {name}, CUDA graph (candle ms: launch by launch)"),
            shape: format!("b2 n77 d{hidden} {layers} layers"),
            dtype,
            rel,
            max,
            fast_ms,
            candle_ms,
        });
    }
    Ok(())
}

/// A graph of `x∘w + x` over calls that change `x` and keep `w` (the
/// tensor itself, as a denoising loop keeps the UNet's context keys and
/// values), then change `w` and go back to the first: each replay's output
/// against the same product launch by launch. A replay that skipped a copy
/// it needed, or read a stale buffer, shows as a large error.
pub(super) fn check_input_reuse(dev: &Device, args: &CheckKernelsArgs, rows: &mut Vec<Row>) -> anyhow::Result<()> {
    let dtype = DType::F16;
    let n = 512;
    let draw = |seed: f32| -> candle_core::Result<Tensor> {
        (Tensor::randn(0f32, 1.0, (n, n), dev)? * (0.05 + 0.01 * seed as f64))?.to_dtype(dtype)
    };
    let xs = (0..4)
        .map(|i| draw(i as f32))
        .collect::<candle_core::Result<Vec<_>>>()?;
    let ws = (0..2)
        .map(|i| draw(10.0 + i as f32))
        .collect::<candle_core::Result<Vec<_>>>()?;
    let forward = |x: &[Tensor]| (&x[0] * &x[1])? + &x[0];
    // warm-up and recording with w0, replays keeping w0, a new w1, w0 again
    let calls = [(0, 0), (1, 0), (2, 0), (3, 0), (0, 1), (1, 1), (2, 0), (3, 1)];
    let graphs = Graphs::default();
    let accel = Accel::current();
    Accel { graphs: true, ..accel }.install();
    let (mut rel, mut max) = (0f32, 0f32);
    for (x, w) in calls {
        let got = graphs.run(&[&xs[x], &ws[w]], forward)?;
        let want = forward(&[xs[x].clone(), ws[w].clone()])?;
        let (r, m) = errors(&got, &want)?;
        (rel, max) = (rel.max(r), max.max(m));
    }
    if graphs.recorded() == 0 {
        anyhow::bail!("the graph was not recorded (see the log): the check would compare launches with launches");
    }
    let fast_ms = median_ms(dev, args.iters, || graphs.run(&[&xs[1], &ws[0]], forward))?;
    accel.install();
    let candle_ms = median_ms(dev, args.iters, || forward(&[xs[1].clone(), ws[0].clone()]))?;
    rows.push(Row {
        kernel: "CUDA graph, an input kept between calls not copied again (candle ms: launch by launch)".into(),
        shape: format!("x∘w + x, {n}×{n}, {} calls", calls.len()),
        dtype,
        rel,
        max,
        fast_ms,
        candle_ms,
    });
    Ok(())
}
