//! The query of `GET /v1/jobs` (`state`, `limit`, `cursor`), read from the
//! raw strings so that a bad value is a 422 naming the parameter, the value
//! and what is allowed, as a bad request field is (and not axum's 400).

use std::collections::HashMap;

use common::job_index::Cursor;
use common::status::JobState;

pub const DEFAULT_LIMIT: usize = 20;
pub const MAX_LIMIT: usize = 100;
const STATES: &str = "queued, running, succeeded, failed, cancelled";

/// One variant per parameter; the message names it, the value and the rule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ListQueryError {
    #[error("`state` must be one of {STATES}, got `{0}`")]
    State(String),
    #[error("`limit` must be a whole number between 1 and {MAX_LIMIT}, got `{0}`")]
    Limit(String),
    #[error("`cursor` must be the `next_cursor` of an earlier page, got `{0}`")]
    Cursor(String),
}

impl ListQueryError {
    /// The parameter at fault, for the body's `field`.
    pub fn field(&self) -> &'static str {
        match self {
            ListQueryError::State(_) => "state",
            ListQueryError::Limit(_) => "limit",
            ListQueryError::Cursor(_) => "cursor",
        }
    }
}

/// A valid listing query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListQuery {
    pub state: Option<JobState>,
    pub limit: usize,
    pub after: Option<Cursor>,
}

impl ListQuery {
    /// From the query's parameters; other parameters are ignored. An empty
    /// `cursor` is the first page (a client's loop may start with one); an
    /// empty `state` or `limit` is refused as any other value outside the
    /// document's enum and range.
    pub fn parse(params: &HashMap<String, String>) -> Result<ListQuery, ListQueryError> {
        let given = |name: &str| params.get(name).map(String::as_str);
        let state = given("state")
            .map(|s| s.parse().map_err(|_| ListQueryError::State(s.to_string())))
            .transpose()?;
        let limit = match given("limit") {
            None => DEFAULT_LIMIT,
            Some(raw) => raw
                .parse::<usize>()
                .ok()
                .filter(|n| (1..=MAX_LIMIT).contains(n))
                .ok_or_else(|| ListQueryError::Limit(raw.to_string()))?,
        };
        let after = given("cursor")
            .filter(|c| !c.is_empty())
            .map(|c| Cursor::decode(c).map_err(|_| ListQueryError::Cursor(c.to_string())))
            .transpose()?;
        Ok(ListQuery { state, limit, after })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(pairs: &[(&str, &str)]) -> Result<ListQuery, ListQueryError> {
        ListQuery::parse(&pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect())
    }

    #[test]
    fn defaults_and_good_values() {
        assert_eq!(
            parse(&[]),
            Ok(ListQuery {
                state: None,
                limit: 20,
                after: None
            })
        );
        assert_eq!(parse(&[("cursor", ""), ("other", "x")]).unwrap().after, None);
        let q = parse(&[("state", "succeeded"), ("limit", "100")]).unwrap();
        assert_eq!((q.state, q.limit), (Some(JobState::Succeeded), 100));
        let cursor = common::job_index::member(chrono::Utc::now(), uuid::Uuid::nil());
        let token = base64::Engine::encode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, cursor);
        assert!(parse(&[("cursor", &token)]).unwrap().after.is_some());
    }

    #[test]
    fn bad_values_name_the_parameter_the_value_and_what_is_allowed() {
        for (pairs, field, words) in [
            (
                &[("state", "done")][..],
                "state",
                "one of queued, running, succeeded, failed, cancelled, got `done`",
            ),
            (&[("limit", "0")], "limit", "between 1 and 100, got `0`"),
            (&[("limit", "101")], "limit", "got `101`"),
            (&[("limit", "-1")], "limit", "got `-1`"),
            (&[("limit", "2.5")], "limit", "whole number"),
            (&[("limit", "")], "limit", "got ``"),
            (&[("state", "")], "state", "got ``"),
            (
                &[("cursor", "abc")],
                "cursor",
                "`next_cursor` of an earlier page, got `abc`",
            ),
        ] {
            let e = parse(pairs).unwrap_err();
            assert_eq!(e.field(), field, "{pairs:?}");
            assert!(e.to_string().contains(words), "{e}");
        }
    }
}
