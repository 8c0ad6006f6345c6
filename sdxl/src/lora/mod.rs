//! LoRA files parsed into per-weight low-rank updates keyed by diffusers names.
//!
//! Formats, detected per key (a file may mix them):
//! - kohya (sd-scripts, and most Civitai files): `lora_unet_…`, `lora_te1_…`,
//!   `lora_te2_…` (`lora_te_…` for a lone text encoder) with `.lora_down.weight`,
//!   `.lora_up.weight` and `.alpha`; UNet modules named by SGM paths
//!   (`input_blocks_4_1_…`) or by diffusers paths (`down_blocks_1_…`).
//! - PEFT / diffusers: `unet.….lora_A.weight`, `….lora_B.weight`, prefixes
//!   `unet.`, `text_encoder.`, `text_encoder_2.` (or none for a UNet-only file);
//!   optional `….alpha`.
//! - older diffusers: `…attn1.processor.to_q_lora.down.weight`,
//!   `….lora.down.weight`, `….lora_linear_layer.down.weight`.
//!
//! LoCon (LoRA on 3×3 convolutions, kohya's `conv_dim`) is plain LoRA with a
//! convolutional `down` and is supported. LoHa, LoKr, DoRA, (IA)³, OFT, GLoRA
//! and Tucker-decomposed LoCon are refused with the key and the type named.
//!
//! Alpha: `LoraUpdate::alpha` is the file's alpha as stored (the rank when the
//! file has none, or 0, as sd-scripts and diffusers do); it is *not* folded
//! into `up`. The update to add is [`delta`]: `scale · alpha/rank · up @ down`.

mod delta;
mod header;
mod names;
mod parse;
mod summary;
mod update;

pub use self::delta::{delta, fit};
pub use self::header::{inspect_header, LoraHeader};
pub use self::names::{is_lora_target, KohyaTable};
pub use self::parse::{parse_lora, parse_lora_file};
pub use self::summary::{summarize, LoraSummary};
pub use self::update::{Lora, LoraError, LoraFormat, LoraKind, LoraUpdate};
