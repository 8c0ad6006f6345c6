//! CLIP's byte-level BPE tokenizer, as transformers' `CLIPTokenizer` builds it.
//!
//! From `tokenizer.json` when the folder has one, otherwise assembled from
//! `vocab.json` + `merges.txt`: NFC, whitespace runs folded to one space,
//! lower-casing, CLIP's word-splitting pattern, byte-level encoding and BPE with
//! the `</w>` end-of-word suffix. Ids are wrapped in `<|startoftext|>` …
//! `<|endoftext|>`, truncated and padded to `model_max_length` (77) with the
//! folder's own pad token (`tokenizer_2` of SDXL pads with `!`).

use serde::Deserialize;
use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::{Lowercase, Replace, Sequence as NormalizerSequence, NFC};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreTokenizerSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

use super::source::ModelSource;
use super::ModelError;

/// CLIP's pattern for splitting text into words before BPE.
const CLIP_SPLIT_PATTERN: &str = r"'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

/// The subset of `tokenizer_config.json` that decides special tokens and length.
#[derive(Debug, Clone, Deserialize)]
struct TokenizerConfig {
    #[serde(default = "default_bos")]
    bos_token: TokenSpec,
    #[serde(default = "default_eos")]
    eos_token: TokenSpec,
    #[serde(default)]
    pad_token: Option<TokenSpec>,
    #[serde(default = "default_eos")]
    unk_token: TokenSpec,
    #[serde(default = "default_max_length")]
    model_max_length: f64,
}

/// A special token, written either as a string or as an `AddedToken` object.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum TokenSpec {
    Text(String),
    Object { content: String },
}

impl TokenSpec {
    fn text(&self) -> &str {
        match self {
            TokenSpec::Text(s) | TokenSpec::Object { content: s } => s,
        }
    }
}

fn default_bos() -> TokenSpec {
    TokenSpec::Text("<|startoftext|>".into())
}
fn default_eos() -> TokenSpec {
    TokenSpec::Text("<|endoftext|>".into())
}
fn default_max_length() -> f64 {
    77.0
}

/// A CLIP tokenizer that gives fixed-length id sequences.
pub struct ClipTokenizer {
    tokenizer: Tokenizer,
    bos_id: u32,
    eos_id: u32,
    pad_id: u32,
    max_length: usize,
}

impl std::fmt::Debug for ClipTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClipTokenizer")
            .field("bos_id", &self.bos_id)
            .field("eos_id", &self.eos_id)
            .field("pad_id", &self.pad_id)
            .field("max_length", &self.max_length)
            .finish()
    }
}

impl ClipTokenizer {
    /// Loads the tokenizer in `folder` (`tokenizer` or `tokenizer_2`) of a model.
    pub fn load(source: &ModelSource, folder: &str) -> Result<Self, ModelError> {
        let err = |message: String| ModelError::Tokenizer {
            component: folder.to_string(),
            message,
        };
        let config_rel = format!("{folder}/tokenizer_config.json");
        let config = match source.read_optional(&config_rel)? {
            Some(_) => source.read_json::<TokenizerConfig>(&config_rel)?,
            None => serde_json::from_str::<TokenizerConfig>("{}").map_err(|e| err(e.to_string()))?,
        };
        let tokenizer = match source.read_optional(&format!("{folder}/tokenizer.json"))? {
            Some(bytes) => Tokenizer::from_bytes(&bytes).map_err(|e| err(format!("tokenizer.json: {e}")))?,
            None => {
                let vocab = source.read(&format!("{folder}/vocab.json"))?;
                let merges = source.read(&format!("{folder}/merges.txt"))?;
                build_clip_bpe(&vocab, &merges, config.unk_token.text()).map_err(err)?
            }
        };
        // transformers registers every special token of the config as an added
        // token, matched in the raw text before BPE: `tokenizer_2`'s pad token `!`
        // therefore splits "!!!" into three `!`, unlike `tokenizer`.
        let mut tokenizer = tokenizer;
        let mut specials: Vec<&str> = vec![
            config.bos_token.text(),
            config.eos_token.text(),
            config.unk_token.text(),
        ];
        if let Some(pad) = &config.pad_token {
            specials.push(pad.text());
        }
        let added: Vec<AddedToken> = specials.iter().map(|t| AddedToken::from(t.to_string(), true)).collect();
        tokenizer.add_special_tokens(added).map_err(|e| err(e.to_string()))?;
        let id = |token: &str| {
            tokenizer
                .token_to_id(token)
                .ok_or_else(|| err(format!("token {token:?} is not in the vocabulary")))
        };
        let bos_id = id(config.bos_token.text())?;
        let eos_id = id(config.eos_token.text())?;
        let pad_id = match &config.pad_token {
            Some(pad) => id(pad.text())?,
            None => eos_id,
        };
        // transformers writes a huge sentinel when a tokenizer has no limit; CLIP has 77.
        let max_length = if config.model_max_length >= 1.0 && config.model_max_length < 1e6 {
            config.model_max_length as usize
        } else {
            77
        };
        Ok(Self {
            tokenizer,
            bos_id,
            eos_id,
            pad_id,
            max_length,
        })
    }

    /// The id sequence the SDXL pipeline feeds its text encoder: start token,
    /// at most `max_length - 2` text tokens, end token, padding.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, ModelError> {
        let encoding = self.tokenizer.encode(text, false).map_err(|e| ModelError::Tokenizer {
            component: "tokenizer".into(),
            message: e.to_string(),
        })?;
        let body = encoding.get_ids();
        let keep = body.len().min(self.max_length.saturating_sub(2));
        let mut ids = Vec::with_capacity(self.max_length);
        ids.push(self.bos_id);
        ids.extend_from_slice(&body[..keep]);
        ids.push(self.eos_id);
        ids.resize(self.max_length, self.pad_id);
        Ok(ids)
    }

    pub fn max_length(&self) -> usize {
        self.max_length
    }
}

/// `merges.txt` as the tokenizers crate reads it: a pair per line, an
/// optional `#version` first line, blank lines skipped.
fn parse_merges(text: &str) -> Result<Vec<(String, String)>, String> {
    text.lines()
        .enumerate()
        .filter(|(i, line)| !(line.is_empty() || *i == 0 && line.starts_with("#version")))
        .map(|(i, line)| {
            line.split_once(' ')
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .ok_or_else(|| format!("merges.txt line {}: not a pair: {line:?}", i + 1))
        })
        .collect()
}

/// Assembles CLIP's tokenizer pipeline from the slow tokenizer's two files.
fn build_clip_bpe(vocab: &[u8], merges: &[u8], unk: &str) -> Result<Tokenizer, String> {
    let vocab: std::collections::HashMap<String, u32> =
        serde_json::from_slice(vocab).map_err(|e| format!("vocab.json: {e}"))?;
    let merges = parse_merges(std::str::from_utf8(merges).map_err(|e| format!("merges.txt: {e}"))?)?;
    let bpe = BPE::builder()
        .vocab_and_merges(vocab.into_iter().collect::<tokenizers::models::bpe::Vocab>(), merges)
        .unk_token(unk.to_string())
        .end_of_word_suffix("</w>".to_string())
        .build()
        .map_err(|e| format!("building the BPE model: {e}"))?;
    let mut tokenizer = Tokenizer::new(bpe);
    let whitespace = Replace::new(
        tokenizers::normalizers::replace::ReplacePattern::Regex(r"\s+".into()),
        " ",
    )
    .map_err(|e| e.to_string())?;
    tokenizer
        .with_normalizer(Some(NormalizerSequence::new(vec![
            NFC.into(),
            whitespace.into(),
            Lowercase.into(),
        ])))
        .map_err(|e| e.to_string())?;
    let split = Split::new(
        SplitPattern::Regex(CLIP_SPLIT_PATTERN.into()),
        SplitDelimiterBehavior::Removed,
        true,
    )
    .map_err(|e| e.to_string())?;
    tokenizer.with_pre_tokenizer(Some(PreTokenizerSequence::new(vec![
        split.into(),
        ByteLevel::new(false, true, false).into(),
    ])));
    Ok(tokenizer)
}
