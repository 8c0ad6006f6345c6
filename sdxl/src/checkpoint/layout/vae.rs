//! The weight keys of diffusers' `AutoencoderKL`, encoder and decoder, from
//! `vae/config.json`.
//!
//! The encoder (`encoder.*`, `quant_conv`) is listed although today's model
//! only decodes: single files carry it, and img2img will need it.

use super::keys::ComponentKeys;
use super::unet::{push_resnet, ResnetPlan};
use crate::config::{expect_one_of, VaeConfig};
use crate::ModelError;

const FILE: &str = "vae/config.json";

/// The VAE's shape parameters.
#[derive(Debug, Clone)]
pub struct VaePlan {
    pub in_channels: usize,
    pub out_channels: usize,
    pub latent_channels: usize,
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: usize,
    pub mid_attention: bool,
    pub quant_conv: bool,
    pub post_quant_conv: bool,
}

impl VaePlan {
    pub fn new(c: &VaeConfig) -> Result<Self, ModelError> {
        for t in &c.down_block_types {
            expect_one_of(FILE, "down_block_types", t, &["DownEncoderBlock2D"])?;
        }
        for t in &c.up_block_types {
            expect_one_of(FILE, "up_block_types", t, &["UpDecoderBlock2D"])?;
        }
        let n = c.block_out_channels.len();
        if n == 0 {
            return Err(ModelError::config(FILE, "`block_out_channels` is empty"));
        }
        for (key, len) in [
            ("down_block_types", c.down_block_types.len()),
            ("up_block_types", c.up_block_types.len()),
        ] {
            if len != 0 && len != n {
                return Err(ModelError::config(
                    FILE,
                    format!("`{key}` has {len} entries, `block_out_channels` {n}"),
                ));
            }
        }
        Ok(Self {
            in_channels: c.in_channels,
            out_channels: c.out_channels,
            latent_channels: c.latent_channels,
            block_out_channels: c.block_out_channels.clone(),
            layers_per_block: c.layers_per_block,
            mid_attention: c.mid_block_add_attention,
            quant_conv: c.use_quant_conv,
            post_quant_conv: c.use_post_quant_conv,
        })
    }

    /// The number of resolution levels (`len(block_out_channels)`).
    pub fn levels(&self) -> usize {
        self.block_out_channels.len()
    }

    /// Every VAE weight with its shape.
    pub fn keys(&self) -> ComponentKeys {
        let mut k = ComponentKeys::default();
        let boc = &self.block_out_channels;
        let n = boc.len();
        let top = boc[n - 1];
        let latent = self.latent_channels;
        let resnet = |k: &mut ComponentKeys, prefix: String, i: usize, o: usize| {
            push_resnet(
                k,
                &prefix,
                ResnetPlan {
                    in_channels: i,
                    out_channels: o,
                },
                None,
            )
        };

        // Encoder: image → 2 × latent channels (mean and log-variance).
        k.push_wb("encoder.conv_in", vec![boc[0], self.in_channels, 3, 3], boc[0]);
        let mut out_ch = boc[0];
        for (i, &ch) in boc.iter().enumerate() {
            let in_ch = out_ch;
            out_ch = ch;
            for j in 0..self.layers_per_block {
                let input = if j == 0 { in_ch } else { out_ch };
                resnet(&mut k, format!("encoder.down_blocks.{i}.resnets.{j}"), input, out_ch);
            }
            if i + 1 < n {
                k.push_wb(
                    &format!("encoder.down_blocks.{i}.downsamplers.0.conv"),
                    vec![out_ch, out_ch, 3, 3],
                    out_ch,
                );
            }
        }
        self.push_mid(&mut k, "encoder.mid_block", top);
        k.push_norm("encoder.conv_norm_out", top);
        k.push_wb("encoder.conv_out", vec![2 * latent, top, 3, 3], 2 * latent);
        if self.quant_conv {
            k.push_wb("quant_conv", vec![2 * latent, 2 * latent, 1, 1], 2 * latent);
        }

        // Decoder: latents → image, widest level first.
        if self.post_quant_conv {
            k.push_wb("post_quant_conv", vec![latent, latent, 1, 1], latent);
        }
        k.push_wb("decoder.conv_in", vec![top, latent, 3, 3], top);
        self.push_mid(&mut k, "decoder.mid_block", top);
        let mut out_ch = top;
        for (i, &ch) in boc.iter().rev().enumerate() {
            let prev = out_ch;
            out_ch = ch;
            for j in 0..self.layers_per_block + 1 {
                let input = if j == 0 { prev } else { out_ch };
                resnet(&mut k, format!("decoder.up_blocks.{i}.resnets.{j}"), input, out_ch);
            }
            if i + 1 < n {
                k.push_wb(
                    &format!("decoder.up_blocks.{i}.upsamplers.0.conv"),
                    vec![out_ch, out_ch, 3, 3],
                    out_ch,
                );
            }
        }
        k.push_norm("decoder.conv_norm_out", boc[0]);
        k.push_wb(
            "decoder.conv_out",
            vec![self.out_channels, boc[0], 3, 3],
            self.out_channels,
        );
        k
    }

    /// `UNetMidBlock2D`: resnet, single-head attention (linear q/k/v/out with
    /// biases), resnet.
    fn push_mid(&self, k: &mut ComponentKeys, prefix: &str, c: usize) {
        let plan = ResnetPlan {
            in_channels: c,
            out_channels: c,
        };
        push_resnet(k, &format!("{prefix}.resnets.0"), plan, None);
        if self.mid_attention {
            let a = format!("{prefix}.attentions.0");
            k.push_norm(&format!("{a}.group_norm"), c);
            for proj in ["to_q", "to_k", "to_v", "to_out.0"] {
                k.push_wb(&format!("{a}.{proj}"), vec![c, c], c);
            }
        }
        push_resnet(k, &format!("{prefix}.resnets.1"), plan, None);
    }
}
