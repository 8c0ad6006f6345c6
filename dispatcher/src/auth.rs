//! API keys: who may call `/v1/*`, and whose jobs each caller sees.
//!
//! Keys come from `SDXL_API_KEYS` and/or the file `SDXL_API_KEYS_FILE`, one
//! entry per line (or comma-separated in the variable):
//!
//! ```text
//! # name:key[:admin]      the key in clear, hashed when loaded
//! alice:3c5f0d8e1b...
//! ops:sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08:admin
//! ```
//!
//! Only SHA-256 digests are kept in memory (a file may hold nothing but
//! digests), and a presented key is hashed and compared with every digest in
//! constant time, so neither the comparison nor the loop reveals how much of
//! a key matched. With no key configured the server is open (development):
//! every caller is the admin `anonymous`, and the dispatcher says so at start.

use std::path::Path;

use anyhow::{bail, Context};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// Who is calling.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The key's name: the owner of the jobs it submits.
    pub name: String,
    /// Sees and cancels every job.
    pub admin: bool,
}

impl Caller {
    /// The caller of an open server.
    pub fn anonymous() -> Self {
        Caller {
            name: "anonymous".into(),
            admin: true,
        }
    }

    /// Whether this caller may see a job owned by `owner`.
    pub fn may_see(&self, owner: Option<&str>) -> bool {
        self.admin || owner == Some(self.name.as_str())
    }
}

struct Entry {
    digest: [u8; 32],
    caller: Caller,
}

/// The configured keys (digests only).
#[derive(Default)]
pub struct ApiKeys {
    entries: Vec<Entry>,
}

impl std::fmt::Debug for ApiKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.entries.iter().map(|e| e.caller.name.as_str()).collect();
        f.debug_struct("ApiKeys").field("names", &names).finish()
    }
}

fn digest(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

fn parse_hex(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 || !s.is_ascii() {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

/// One `name:key[:admin]` or `name:sha256:<hex>[:admin]` entry. Errors name
/// the entry by its position and key name, never by its key.
fn parse_entry(entry: &str, origin: &str) -> anyhow::Result<Entry> {
    let (name, rest) = entry
        .split_once(':')
        .with_context(|| format!("{origin}: expected `name:key` or `name:key:admin`"))?;
    let name = name.trim();
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '@'))
    {
        bail!("{origin}: the key name must be letters, digits, `-`, `_`, `.` or `@`, got `{name}`");
    }
    let (secret, admin) = match rest.strip_suffix(":admin") {
        Some(secret) => (secret, true),
        None => (rest, false),
    };
    let secret = secret.trim();
    let digest = match secret.strip_prefix("sha256:") {
        Some(hex) => parse_hex(hex)
            .with_context(|| format!("{origin} (key `{name}`): `sha256:` must be followed by 64 hex digits"))?,
        None if secret.len() < 16 => {
            bail!("{origin} (key `{name}`): a key must be at least 16 characters")
        }
        None => digest(secret),
    };
    Ok(Entry {
        digest,
        caller: Caller {
            name: name.to_string(),
            admin,
        },
    })
}

impl ApiKeys {
    /// Loads the keys of the variable (`inline`) and of the file.
    pub fn load(inline: Option<&str>, file: Option<&Path>) -> anyhow::Result<Self> {
        let mut keys = ApiKeys::default();
        if let Some(inline) = inline {
            for (i, entry) in inline.split([',', '\n']).map(str::trim).enumerate() {
                if !entry.is_empty() {
                    keys.push(parse_entry(entry, &format!("SDXL_API_KEYS entry {}", i + 1))?)?;
                }
            }
        }
        if let Some(path) = file {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading the API key file {}", path.display()))?;
            for (i, line) in text.lines().enumerate() {
                let line = line.trim();
                if !line.is_empty() && !line.starts_with('#') {
                    keys.push(parse_entry(line, &format!("{} line {}", path.display(), i + 1))?)?;
                }
            }
        }
        Ok(keys)
    }

    fn push(&mut self, entry: Entry) -> anyhow::Result<()> {
        if self.entries.iter().any(|e| e.caller.name == entry.caller.name) {
            bail!("API key name `{}` is given twice", entry.caller.name);
        }
        self.entries.push(entry);
        Ok(())
    }

    /// No keys: every caller is [`Caller::anonymous`].
    pub fn is_open(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// The caller a presented key belongs to.
    pub fn authenticate(&self, presented: &str) -> Option<Caller> {
        let presented = digest(presented);
        let mut found: Option<&Entry> = None;
        // Every digest is compared (no early exit).
        for entry in &self.entries {
            if bool::from(entry.digest.ct_eq(&presented)) {
                found = Some(entry);
            }
        }
        found.map(|e| e.caller.clone())
    }

    /// The caller of a request, from its `Authorization` header value.
    pub fn caller(&self, authorization: Option<&str>) -> Option<Caller> {
        if self.is_open() {
            return Some(Caller::anonymous());
        }
        let value = authorization?.trim();
        let (scheme, token) = value.split_once(' ')?;
        if !scheme.eq_ignore_ascii_case("bearer") {
            return None;
        }
        self.authenticate(token.trim())
    }
}

/// `sha256:<hex>` of a key, for key files that hold no key in clear
/// (`dispatcher hash-key`).
pub fn hashed(key: &str) -> String {
    let hex: String = digest(key).iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALICE: &str = "alice-key-0123456789";
    const BOB: &str = "bob-key-9876543210ab";

    fn keys() -> ApiKeys {
        let inline = format!("alice:{ALICE}, ops:{}:admin", hashed("ops-key-abcdefghijkl"));
        ApiKeys::load(Some(&inline), None).unwrap()
    }

    #[test]
    fn keys_authenticate_their_caller_only() {
        let keys = keys();
        assert_eq!(
            keys.caller(Some(&format!("Bearer {ALICE}"))),
            Some(Caller {
                name: "alice".into(),
                admin: false
            })
        );
        assert!(keys.caller(Some("bearer ops-key-abcdefghijkl")).unwrap().admin);
        assert_eq!(keys.caller(Some(&format!("Bearer {BOB}"))), None);
        assert_eq!(keys.caller(Some(ALICE)), None, "no scheme");
        assert_eq!(keys.caller(Some(&format!("Basic {ALICE}"))), None);
        assert_eq!(keys.caller(None), None);
        assert_eq!(keys.caller(Some("Bearer ")), None);
    }

    #[test]
    fn an_open_server_has_one_admin_caller() {
        let open = ApiKeys::load(None, None).unwrap();
        assert!(open.is_open());
        assert_eq!(open.caller(None), Some(Caller::anonymous()));
    }

    #[test]
    fn a_key_file_with_comments_and_digests() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys");
        std::fs::write(
            &path,
            format!(
                "# team keys\n\nbob:{}\ncarol:{}:admin\n",
                hashed(BOB),
                "carol-key-000000000"
            ),
        )
        .unwrap();
        let keys = ApiKeys::load(Some(&format!("alice:{ALICE}")), Some(&path)).unwrap();
        assert_eq!(keys.len(), 3);
        assert_eq!(keys.authenticate(BOB).unwrap().name, "bob");
        assert!(keys.authenticate("carol-key-000000000").unwrap().admin);
    }

    #[test]
    fn bad_entries_are_refused_without_showing_the_key() {
        for (entry, words) in [
            ("no-colon-here-at-all", "expected `name:key`"),
            ("al ice:0123456789abcdef", "key name"),
            ("bob:short", "at least 16"),
            ("bob:sha256:abc", "64 hex digits"),
            ("a:0123456789abcdef,a:fedcba9876543210", "given twice"),
        ] {
            let e = ApiKeys::load(Some(entry), None).unwrap_err().to_string();
            assert!(e.contains(words), "{entry}: {e}");
            assert!(!e.contains("0123456789abcdef") && !e.contains("short"), "{e}");
        }
    }

    #[test]
    fn ownership() {
        let alice = Caller {
            name: "alice".into(),
            admin: false,
        };
        assert!(alice.may_see(Some("alice")));
        assert!(!alice.may_see(Some("bob")));
        assert!(!alice.may_see(None));
        assert!(Caller::anonymous().may_see(Some("bob")));
    }
}
