//! What kind of file a user handed us, before anything is loaded: pickles are
//! refused, and a safetensors header is read for its key names and shapes
//! without touching the tensor data.
//!
//! PyTorch's `.ckpt`/`.pt`/`.pth`/`.bin` files are Python pickles (bare, or
//! inside a zip archive since torch 1.6). Unpickling runs whatever code the
//! file names, so a checkpoint from the internet is never opened as one; the
//! user is told to convert it to safetensors (which holds only tensors).

use std::io::Read;
use std::path::Path;

/// Why a file cannot be read as a safetensors file.
#[derive(Debug, Clone, thiserror::Error, PartialEq)]
pub enum FileError {
    #[error(
        "{path} is a PyTorch pickle checkpoint: loading a pickle can run arbitrary code, so it is refused; \
         convert it to .safetensors first"
    )]
    Pickle { path: String },
    #[error("{path}: not a readable safetensors file: {message}")]
    NotSafetensors { path: String, message: String },
}

/// A file's tensor names, each with its shape.
pub type KeyShapes = Vec<(String, Vec<usize>)>;

/// Extensions PyTorch pickles are saved under.
const PICKLE_EXTENSIONS: [&str; 5] = ["ckpt", "pt", "pth", "bin", "pkl"];

/// The largest header accepted (safetensors itself caps it at 100 MB).
const MAX_HEADER: u64 = 100_000_000;

/// Whether the first bytes of a file are a pickle or a zip archive (torch's
/// format since 1.6).
pub fn is_pickle_bytes(head: &[u8]) -> bool {
    // Pickle protocols 2–5 start with PROTO (0x80) and the version byte.
    let pickle = matches!(head, [0x80, 2..=5, ..]);
    let zip = head.starts_with(b"PK\x03\x04");
    pickle || zip
}

/// Refuses pickles, by extension or by content.
pub fn check_not_pickle(path: &Path) -> Result<(), FileError> {
    let shown = path.display().to_string();
    let ext = path.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase);
    if ext.as_deref().is_some_and(|e| PICKLE_EXTENSIONS.contains(&e)) {
        return Err(FileError::Pickle { path: shown });
    }
    let mut head = [0u8; 4];
    let n = std::fs::File::open(path)
        .and_then(|mut f| f.read(&mut head))
        .map_err(|e| FileError::NotSafetensors {
            path: shown.clone(),
            message: e.to_string(),
        })?;
    if is_pickle_bytes(&head[..n]) {
        return Err(FileError::Pickle { path: shown });
    }
    Ok(())
}

/// The `(name, shape)` of every tensor in a safetensors file, read from its
/// header only (8-byte little-endian length, then JSON). Pickles are refused.
pub fn read_safetensors_keys(path: &Path) -> Result<KeyShapes, FileError> {
    check_not_pickle(path)?;
    let bad = |message: String| FileError::NotSafetensors {
        path: path.display().to_string(),
        message,
    };
    let mut file = std::fs::File::open(path).map_err(|e| bad(e.to_string()))?;
    let mut len = [0u8; 8];
    file.read_exact(&mut len).map_err(|e| bad(e.to_string()))?;
    let len = u64::from_le_bytes(len);
    if len > MAX_HEADER {
        return Err(bad(format!("header of {len} bytes is too large")));
    }
    let mut header = vec![0u8; len as usize];
    file.read_exact(&mut header).map_err(|e| bad(e.to_string()))?;
    parse_header(&header).map_err(bad)
}

/// Parses a safetensors JSON header into `(name, shape)` pairs, sorted by name.
fn parse_header(header: &[u8]) -> Result<KeyShapes, String> {
    #[derive(serde::Deserialize)]
    struct Entry {
        shape: Vec<usize>,
    }
    let map: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(header).map_err(|e| format!("bad header: {e}"))?;
    let mut keys = map
        .into_iter()
        .filter(|(k, _)| k != "__metadata__")
        .map(|(k, v)| {
            let entry: Entry = serde_json::from_value(v).map_err(|e| format!("bad header entry `{k}`: {e}"))?;
            Ok((k, entry.shape))
        })
        .collect::<Result<Vec<_>, String>>()?;
    keys.sort();
    Ok(keys)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pickle_magic() {
        assert!(is_pickle_bytes(&[0x80, 0x02, 0x8a, 0x0a]));
        assert!(is_pickle_bytes(b"PK\x03\x04rest"));
        // A safetensors file starts with its header length.
        assert!(!is_pickle_bytes(&[0x58, 0x02, 0, 0]));
        assert!(!is_pickle_bytes(&[]));
    }

    #[test]
    fn header_parsing() {
        let header = br#"{"__metadata__":{"format":"pt"},"b":{"dtype":"F16","shape":[2,3],"data_offsets":[0,12]},"a":{"dtype":"F32","shape":[],"data_offsets":[12,16]}}"#;
        let keys = parse_header(header).unwrap();
        assert_eq!(keys, vec![("a".to_string(), vec![]), ("b".to_string(), vec![2, 3])]);
    }
}
