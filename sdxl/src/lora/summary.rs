//! [`LoraSummary`]: what an upload check shows about a parsed LoRA (format,
//! ranks, alphas, the components and modules it changes).

use std::collections::BTreeSet;

use super::update::{Lora, LoraFormat, LoraKind};
use crate::checkpoint::layout::Component;

/// What an upload check shows about a LoRA.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraSummary {
    pub format: LoraFormat,
    /// The distinct ranks, ascending.
    pub ranks: Vec<usize>,
    /// The distinct alphas, ascending.
    pub alphas: Vec<f32>,
    /// The components it changes, in [`Component::ALL`] order.
    pub components: Vec<Component>,
    pub modules: usize,
    /// Of which on convolution weights.
    pub conv_modules: usize,
}

/// Summarises a parsed LoRA.
pub fn summarize(lora: &Lora) -> LoraSummary {
    let ranks: BTreeSet<usize> = lora.updates.iter().map(|u| u.rank).collect();
    let mut alphas: Vec<f32> = lora.updates.iter().map(|u| u.alpha).collect();
    alphas.sort_by(f32::total_cmp);
    alphas.dedup();
    let components: BTreeSet<Component> = lora.updates.iter().map(|u| u.component).collect();
    LoraSummary {
        format: lora.format,
        ranks: ranks.into_iter().collect(),
        alphas,
        components: components.into_iter().collect(),
        modules: lora.updates.len(),
        conv_modules: lora
            .updates
            .iter()
            .filter(|u| matches!(u.kind, LoraKind::Conv { .. }))
            .count(),
    }
}

impl std::fmt::Display for LoraSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let list = |v: Vec<String>| v.join("/");
        write!(
            f,
            "{} LoRA, rank {} (alpha {}), {} modules ({} conv) on {}",
            self.format,
            list(self.ranks.iter().map(|r| r.to_string()).collect()),
            list(self.alphas.iter().map(|a| a.to_string()).collect()),
            self.modules,
            self.conv_modules,
            list(self.components.iter().map(|c| c.to_string()).collect()),
        )
    }
}
