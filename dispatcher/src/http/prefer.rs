//! The `Prefer` request header (RFC 7240), for the one preference the API
//! honours: `wait[=N]` on a submit, "answer when the job has ended, if it
//! does within N seconds" (as Replicate's API does). Every other preference,
//! and a `wait` whose value is not a number, is ignored, as the RFC asks.

use axum::http::header::HeaderMap;

/// The longest a submit waits, and the wait of a bare `Prefer: wait`.
pub const MAX_WAIT_SECS: u64 = 60;

/// The `wait` preference of `headers`, clamped to [`MAX_WAIT_SECS`]; `None`
/// when there is none (or it is malformed). Every `Prefer` header counts, in
/// order, and only the first `wait` is considered (RFC 7240 §2).
pub fn wait(headers: &HeaderMap) -> Option<u64> {
    let first = headers
        .get_all("prefer")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| split_outside_quotes(v, ','))
        .find_map(|preference| {
            // The preference's own `name[=value]` comes before any `;` parameter.
            let head = split_outside_quotes(preference, ';').next()?;
            let (name, value) = match head.split_once('=') {
                Some((n, v)) => (n.trim(), Some(unquote(v.trim()))),
                None => (head.trim(), None),
            };
            name.eq_ignore_ascii_case("wait").then_some(value)
        })?;
    match first {
        None | Some("") => Some(MAX_WAIT_SECS),
        Some(v) if v.bytes().all(|b| b.is_ascii_digit()) => {
            Some(v.parse::<u64>().unwrap_or(MAX_WAIT_SECS).min(MAX_WAIT_SECS))
        }
        Some(_) => None,
    }
}

/// The `Preference-Applied` value for a wait of `secs`.
pub fn applied(secs: u64) -> String {
    format!("wait={secs}")
}

/// `s` split on `sep` where it is not inside a quoted string (a `\` escapes
/// the next character there), the empty pieces left out.
fn split_outside_quotes(s: &str, sep: char) -> impl Iterator<Item = &str> {
    let mut pieces = Vec::new();
    let (mut start, mut quoted, mut escaped) = (0, false, false);
    for (i, c) in s.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            c if c == sep && !quoted => {
                pieces.push(&s[start..i]);
                start = i + c.len_utf8();
            }
            _ => {}
        }
    }
    pieces.push(&s[start..]);
    pieces.into_iter().filter(|p| !p.trim().is_empty())
}

fn unquote(v: &str) -> &str {
    v.strip_prefix('"').and_then(|v| v.strip_suffix('"')).unwrap_or(v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn prefer(values: &[&str]) -> Option<u64> {
        let mut headers = HeaderMap::new();
        for v in values {
            headers.append("prefer", HeaderValue::from_str(v).unwrap());
        }
        wait(&headers)
    }

    #[test]
    fn wait_is_read_as_rfc_7240_writes_it() {
        assert_eq!(prefer(&[]), None);
        assert_eq!(prefer(&["wait"]), Some(60));
        assert_eq!(prefer(&["wait=5"]), Some(5));
        assert_eq!(prefer(&["WAIT = 5"]), Some(5));
        assert_eq!(prefer(&["wait=\"7\""]), Some(7));
        assert_eq!(prefer(&["wait=600"]), Some(60), "clamped to the maximum");
        assert_eq!(prefer(&["wait=0"]), Some(0));
        assert_eq!(prefer(&["respond-async, wait=3"]), Some(3));
        assert_eq!(prefer(&["return=minimal; foo=\"a,wait=9\", wait=4"]), Some(4));
        assert_eq!(prefer(&["handling=lenient", "wait=2;x=y"]), Some(2));
        assert_eq!(prefer(&["wait=1", "wait=9"]), Some(1), "only the first counts");
    }

    #[test]
    fn other_and_malformed_preferences_are_ignored() {
        assert_eq!(prefer(&["respond-async"]), None);
        assert_eq!(prefer(&["waiting=5"]), None);
        assert_eq!(prefer(&["wait=soon"]), None);
        assert_eq!(prefer(&["wait=-1"]), None);
        assert_eq!(prefer(&["wait=1.5"]), None);
        assert_eq!(prefer(&[""]), None);
    }
}
