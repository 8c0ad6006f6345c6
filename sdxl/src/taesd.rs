//! The decoder of diffusers' `AutoencoderTiny` (the architecture of
//! `madebyollin/taesdxl`): a cheap latent-to-image decode for previews.
//! Keys are `decoder.layers.N…`, counting activations and upsamplers as
//! `nn.Sequential` does.

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

use super::config::{expect_one_of, TinyVaeConfig};
use super::nn::{conv2d_same, conv2d_same_no_bias, to_layer_layout, upsample_nearest, Activation, Conv2d};
use super::ModelError;

/// `AutoencoderTinyBlock`: three convolutions, a skip, and a ReLU on the sum.
#[derive(Debug)]
struct TinyBlock {
    convs: [Conv2d; 3],
    skip: Option<Conv2d>,
    act: Activation,
}

impl TinyBlock {
    fn new(c_in: usize, c_out: usize, act: Activation, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            convs: [
                conv2d_same(c_in, c_out, 3, vb.pp("conv.0"))?,
                conv2d_same(c_out, c_out, 3, vb.pp("conv.2"))?,
                conv2d_same(c_out, c_out, 3, vb.pp("conv.4"))?,
            ],
            skip: if c_in != c_out {
                Some(conv2d_same_no_bias(c_in, c_out, 1, vb.pp("skip"))?)
            } else {
                None
            },
            act,
        })
    }

    /// On CUDA each ReLU (and the skip's add) happens in the pass that adds
    /// the convolution's bias.
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let conv_act = |conv: &Conv2d, xs: &Tensor| -> Result<Tensor> {
            match self.act {
                Activation::Relu => conv.forward_relu(xs, None),
                act => act.forward(&conv.forward(xs)?),
            }
        };
        let h = conv_act(&self.convs[0], xs)?;
        let h = conv_act(&self.convs[1], &h)?;
        let skip = match &self.skip {
            Some(conv) => conv.forward(xs)?,
            None => xs.clone(),
        };
        self.convs[2].forward_relu(&h, Some(&skip))
    }
}

#[derive(Debug)]
enum Layer {
    Conv(Conv2d),
    Act(Activation),
    Block(Box<TinyBlock>),
    Upsample(usize),
}

/// `DecoderTiny`.
#[derive(Debug)]
pub struct TinyDecoder {
    layers: Vec<Layer>,
    scaling_factor: f64,
    /// The decode's CUDA graphs, one per input shape (the `graphs` path):
    /// a preview is ~40 small kernels whose launches cost as much as they do.
    #[cfg(feature = "cuda")]
    graphs: crate::cuda::graph::Graphs,
}

impl TinyDecoder {
    pub fn new(c: &TinyVaeConfig, vb: VarBuilder) -> std::result::Result<Self, ModelError> {
        let file = "taesd config.json";
        expect_one_of(file, "upsample_fn", &c.upsample_fn, &["nearest"])?;
        let act = Activation::from_name(&c.act_fn).ok_or_else(|| ModelError::Config {
            file: file.into(),
            message: format!(
                "`act_fn` = {:?} is not supported (supported: relu, silu, gelu)",
                c.act_fn
            ),
        })?;
        let channels = c
            .decoder_block_out_channels
            .clone()
            .or_else(|| c.block_out_channels.clone())
            .ok_or_else(|| ModelError::Config {
                file: file.into(),
                message: "`decoder_block_out_channels` is missing".into(),
            })?;
        if channels.len() != c.num_decoder_blocks.len() || channels.is_empty() {
            return Err(ModelError::Config {
                file: file.into(),
                message: format!(
                    "`decoder_block_out_channels` ({}) and `num_decoder_blocks` ({}) must have the same, non-zero length",
                    channels.len(),
                    c.num_decoder_blocks.len()
                ),
            });
        }
        let build = || -> Result<Vec<Layer>> {
            let dec = vb.pp("decoder.layers");
            let mut layers = vec![
                Layer::Conv(conv2d_same(c.latent_channels, channels[0], 3, dec.pp("0"))?),
                Layer::Act(act),
            ];
            let last = channels.len() - 1;
            for (i, (&ch, &blocks)) in channels.iter().zip(&c.num_decoder_blocks).enumerate() {
                for _ in 0..blocks {
                    let idx = layers.len();
                    layers.push(Layer::Block(Box::new(TinyBlock::new(
                        ch,
                        ch,
                        act,
                        dec.pp(idx.to_string()),
                    )?)));
                }
                if i != last {
                    layers.push(Layer::Upsample(c.upsampling_scaling_factor));
                }
                let idx = layers.len().to_string();
                layers.push(Layer::Conv(if i == last {
                    conv2d_same(ch, c.out_channels, 3, dec.pp(idx))?
                } else {
                    conv2d_same_no_bias(ch, ch, 3, dec.pp(idx))?
                }));
            }
            Ok(layers)
        };
        let layers = build().map_err(|error| ModelError::Weights {
            component: "taesd".into(),
            error: super::without_backtrace(error),
        })?;
        Ok(Self {
            layers,
            scaling_factor: c.scaling_factor,
            #[cfg(feature = "cuda")]
            graphs: Default::default(),
        })
    }

    /// How many pixels a latent pixel becomes.
    pub fn upscale(&self) -> usize {
        self.layers
            .iter()
            .map(|l| if let Layer::Upsample(f) = l { *f } else { 1 })
            .product()
    }

    /// `AutoencoderTiny.decode`: UNet-space latents (divided by this model's
    /// own scaling factor first) to an image in [-1, 1], the VAE's range.
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        return self.graphs.run(&[latents], |x| self.decode_body(&x[0]));
        #[cfg(not(feature = "cuda"))]
        self.decode_body(latents)
    }

    fn decode_body(&self, latents: &Tensor) -> Result<Tensor> {
        let mut xs = (latents / self.scaling_factor)?;
        xs = ((xs / 3.0)?.tanh()? * 3.0)?;
        for layer in &self.layers {
            xs = match layer {
                Layer::Conv(conv) => conv.forward(&xs)?,
                Layer::Act(act) => act.forward(&xs)?,
                // channels-last from the first block on, where the CUDA path keeps it
                Layer::Block(block) => block.forward(&to_layer_layout(&xs)?)?,
                Layer::Upsample(f) => {
                    let (_, _, h, w) = xs.dims4()?;
                    upsample_nearest(&xs, h * f, w * f)?
                }
            };
        }
        // the layers end in [0, 1]; diffusers maps that to [-1, 1] like the VAE
        (xs * 2.0)? - 1.0
    }
}
