//! The index of jobs for `GET /v1/jobs`: which jobs a key submitted, newest
//! first, a page at a time.
//!
//! Two sorted sets per prefix, `{prefix}:jobs:all` and one per owner
//! `{prefix}:jobs:owner:{name}` ([`Names`]), every score 0 and every member
//! `{created_at ms, 15 digits}:{id}`: members then sort by creation time
//! (lexically, hence the zero padding), ties between two jobs of one
//! millisecond broken by the id, so that `ZRANGE … BYLEX REV` from an
//! exclusive bound (the cursor: the last member a page scanned) pages with
//! no job shown twice and none skipped, whatever is added meanwhile. A
//! member is added when the `queued` record is created; members older than
//! twice the status TTL are trimmed on each add (a record lives a TTL from
//! its *last* write, which may come well after its creation), and members
//! whose record has expired are dropped when a listing meets them.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use chrono::{DateTime, Utc};
use redis::AsyncCommands;
use uuid::Uuid;

use crate::names::Names;
use crate::status::{JobState, JobStatus};
use crate::status_store::{StatusStore, StatusStoreError};

/// Members read (and records fetched with one `MGET`) per round trip.
const BATCH: usize = 128;

/// At most this many members are scanned for one page: a `state` filter
/// that matches little would otherwise read the whole index in one request.
/// A page cut short this way has fewer jobs than asked and a `next_cursor`.
pub const MAX_SCAN: usize = 1024;

/// Which jobs a listing covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope<'a> {
    /// Every job (an admin key; an open server's caller).
    All,
    /// The jobs of the API key of this name.
    Owner(&'a str),
}

/// A position in an index: the member after which the next page starts.
/// Clients see it base64url-encoded ([`Cursor::encode`]), as an opaque token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor(String);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a cursor of this server: `{0}`")]
pub struct BadCursor(pub String);

impl Cursor {
    pub fn encode(&self) -> String {
        URL_SAFE_NO_PAD.encode(&self.0)
    }

    /// A cursor from [`Cursor::encode`]; anything else is refused (it would
    /// be an arbitrary bound handed to Redis).
    pub fn decode(token: &str) -> Result<Cursor, BadCursor> {
        let bad = || BadCursor(token.to_string());
        let bytes = URL_SAFE_NO_PAD.decode(token).map_err(|_| bad())?;
        let member = String::from_utf8(bytes).map_err(|_| bad())?;
        parse_member(&member).ok_or_else(bad)?;
        Ok(Cursor(member))
    }
}

/// The index member of a job created at `created_at`.
pub fn member(created_at: DateTime<Utc>, id: Uuid) -> String {
    format!("{:015}:{id}", created_at.timestamp_millis().max(0))
}

/// The creation time (ms) and id of a member, if it is one.
fn parse_member(member: &str) -> Option<(u64, Uuid)> {
    let (millis, id) = member.split_once(':')?;
    if millis.len() != 15 || !millis.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((millis.parse().ok()?, id.parse().ok()?))
}

/// One page of a listing.
#[derive(Debug, Clone, PartialEq)]
pub struct Page {
    pub jobs: Vec<JobStatus>,
    /// Where the next page starts; `None` when the index has no more
    /// (matching) job.
    pub next: Option<Cursor>,
}

/// The job index, on the status store's connection.
#[derive(Clone)]
pub struct JobIndex {
    store: StatusStore,
}

impl JobIndex {
    pub fn new(store: StatusStore) -> Self {
        JobIndex { store }
    }

    fn names(&self) -> &Names {
        self.store.names()
    }

    fn key(&self, scope: Scope<'_>) -> String {
        match scope {
            Scope::All => self.names().all_jobs_index(),
            Scope::Owner(owner) => self.names().owner_jobs_index(owner),
        }
    }

    /// Lists a new job in `{prefix}:jobs:all` and in its owner's index, and
    /// trims what is older than twice the status TTL (one transaction).
    pub async fn add(&self, status: &JobStatus) -> Result<(), StatusStoreError> {
        let keep = 2 * self.store.ttl();
        let keep_ms = u64::try_from(keep.as_millis()).unwrap_or(u64::MAX).max(1);
        let cutoff = (Utc::now().timestamp_millis().max(0) as u64).saturating_sub(keep_ms);
        let below = format!("({cutoff:015}");
        let entry = member(status.created_at, status.id);
        let mut keys = vec![self.key(Scope::All)];
        keys.extend(status.owner.as_deref().map(|o| self.key(Scope::Owner(o))));
        let mut pipe = redis::pipe();
        pipe.atomic();
        for key in &keys {
            pipe.cmd("ZADD").arg(key).arg(0).arg(&entry).ignore();
            pipe.cmd("ZREMRANGEBYLEX").arg(key).arg("-").arg(&below).ignore();
            pipe.cmd("PEXPIRE").arg(key).arg(keep_ms).ignore();
        }
        self.store
            .run(|mut c| {
                let pipe = pipe.clone();
                async move { pipe.query_async::<()>(&mut c).await }
            })
            .await
    }

    /// Up to `limit` jobs of `scope`, newest first, after `after` (the start
    /// when `None`), only those in `state` if given.
    pub async fn page(
        &self,
        scope: Scope<'_>,
        state: Option<JobState>,
        limit: usize,
        after: Option<&Cursor>,
    ) -> Result<Page, StatusStoreError> {
        let key = self.key(scope);
        let limit = limit.max(1);
        let mut bound = after.map_or_else(|| "+".to_string(), |c| format!("({}", c.0));
        let mut jobs = Vec::new();
        let mut last_listed: Option<String> = None;
        let mut scanned = 0;
        loop {
            let mut range = redis::cmd("ZRANGE");
            range
                .arg(&key)
                .arg(&bound)
                .arg("-")
                .arg("BYLEX")
                .arg("REV")
                .arg("LIMIT")
                .arg(0)
                .arg(BATCH);
            let members: Vec<String> = self
                .store
                .run(|mut c| {
                    let range = range.clone();
                    async move { range.query_async(&mut c).await }
                })
                .await?;
            let Some(last) = members.last().cloned() else {
                return Ok(Page { jobs, next: None });
            };
            let records = self.records(&members).await?;
            let mut stale = Vec::new();
            for (member, raw) in members.iter().zip(records) {
                scanned += 1;
                let status = match raw.map(|raw| serde_json::from_str::<JobStatus>(&raw)) {
                    None => {
                        stale.push(member.clone());
                        continue;
                    }
                    Some(Err(e)) => {
                        tracing::warn!(member = %member, error = %e, "skipping an undecodable status record");
                        continue;
                    }
                    Some(Ok(status)) => status,
                };
                if state.is_some_and(|s| s != status.state) {
                    continue;
                }
                if jobs.len() == limit {
                    // One more match: there is a next page, and it starts
                    // after the last job of this one.
                    self.drop_stale(&key, stale).await;
                    return Ok(Page {
                        jobs,
                        next: last_listed.map(Cursor),
                    });
                }
                jobs.push(status);
                last_listed = Some(member.clone());
            }
            self.drop_stale(&key, stale).await;
            if members.len() < BATCH {
                return Ok(Page { jobs, next: None });
            }
            if scanned >= MAX_SCAN {
                // Every member up to `last` was looked at: start after it.
                return Ok(Page {
                    jobs,
                    next: Some(Cursor(last)),
                });
            }
            bound = format!("({last}");
        }
    }

    /// The records of `members`, in order (`None`: expired, or not a member
    /// of ours).
    async fn records(&self, members: &[String]) -> Result<Vec<Option<String>>, StatusStoreError> {
        let keys: Vec<Option<String>> = members
            .iter()
            .map(|m| parse_member(m).map(|(_, id)| self.names().status_key(id)))
            .collect();
        let present: Vec<String> = keys.iter().flatten().cloned().collect();
        if present.is_empty() {
            return Ok(vec![None; members.len()]);
        }
        let mut fetched: std::vec::IntoIter<Option<String>> = self
            .store
            .run(|mut c| {
                let present = present.clone();
                async move {
                    let mut mget = redis::cmd("MGET");
                    mget.arg(present);
                    mget.query_async::<Vec<Option<String>>>(&mut c).await
                }
            })
            .await?
            .into_iter();
        Ok(keys
            .iter()
            .map(|k| k.as_ref().and_then(|_| fetched.next().flatten()))
            .collect())
    }

    /// Removes members whose record has expired; best effort (the next
    /// listing meets them again).
    async fn drop_stale(&self, key: &str, stale: Vec<String>) {
        if stale.is_empty() {
            return;
        }
        let result = self
            .store
            .run(|mut c| {
                let (key, stale) = (key.to_string(), stale.clone());
                async move { c.zrem::<_, _, i64>(key, stale).await }
            })
            .await;
        if let Err(e) = result {
            tracing::warn!(error = %e, "could not drop expired jobs from the index");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn members_sort_by_creation_time_then_id() {
        let early = Utc.timestamp_millis_opt(999).unwrap();
        let late = Utc.timestamp_millis_opt(1_000).unwrap();
        let (a, b) = (Uuid::from_u128(1), Uuid::from_u128(2));
        let m = member(early, b);
        assert_eq!(m, format!("000000000000999:{b}"));
        assert!(member(early, b) < member(late, a), "time first, despite the ids");
        assert!(member(late, a) < member(late, b), "then the id");
        assert_eq!(parse_member(&m), Some((999, b)));
    }

    #[test]
    fn a_cursor_round_trips_and_nothing_else_decodes() {
        let cursor = Cursor(member(Utc::now(), Uuid::new_v4()));
        let token = cursor.encode();
        assert!(token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'));
        assert_eq!(Cursor::decode(&token), Ok(cursor));
        let encode = |s: &str| URL_SAFE_NO_PAD.encode(s);
        for bad in [
            "".to_string(),
            "not base64!".to_string(),
            encode("+"),
            encode("12:00000000-0000-0000-0000-000000000000"),
            encode("00000000000099x:00000000-0000-0000-0000-000000000000"),
            encode("000000000000999:not-a-uuid"),
        ] {
            assert_eq!(Cursor::decode(&bad), Err(BadCursor(bad.clone())), "{bad}");
        }
    }

    /// Against the real Redis (127.0.0.1:6379, or `REDIS_URL`), in a prefix
    /// of its own; skipped with a message when no Redis answers.
    #[tokio::test]
    async fn pages_are_exact_when_jobs_share_a_millisecond_and_expired_ones_go() {
        let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
        let names = Names::new("unused", format!("unit:{}", Uuid::new_v4().simple()));
        let Ok(store) = StatusStore::connect(&url, names, std::time::Duration::from_secs(60)).await else {
            eprintln!("skipped: no Redis at {url}");
            return;
        };
        let index = JobIndex::new(store.clone());
        let request = crate::rules::JobRequest::from_json(br#"{"prompt":"x","seed":1}"#).unwrap();
        let job = crate::rules::validate(&request, || 1).unwrap();
        let now = Utc::now();
        // 2 of Bob's, then 5 of Alice's in one millisecond, the last one succeeded.
        let mut alice = Vec::new();
        for i in 0..7 {
            let mut status = JobStatus::queued(Uuid::new_v4(), job.clone(), now);
            status.owner = Some(if i < 2 { "bob" } else { "alice" }.to_string());
            if i == 6 {
                status.state = JobState::Succeeded;
            }
            assert!(store.create(&status).await.unwrap());
            index.add(&status).await.unwrap();
            if i >= 2 {
                alice.push(status);
            }
        }
        alice.sort_by_key(|s| std::cmp::Reverse(member(s.created_at, s.id)));
        let mut seen = Vec::new();
        let mut after = None;
        let mut sizes = Vec::new();
        loop {
            let page = index
                .page(Scope::Owner("alice"), None, 2, after.as_ref())
                .await
                .unwrap();
            sizes.push(page.jobs.len());
            seen.extend(page.jobs);
            match page.next {
                Some(next) => after = Some(Cursor::decode(&next.encode()).unwrap()),
                None => break,
            }
        }
        assert_eq!(sizes, [2, 2, 1]);
        assert_eq!(seen, alice, "newest first, none twice, none skipped");
        let all = index.page(Scope::All, None, 100, None).await.unwrap();
        assert_eq!((all.jobs.len(), all.next), (7, None));
        let queued = index
            .page(Scope::Owner("alice"), Some(JobState::Queued), 100, None)
            .await
            .unwrap();
        assert_eq!(queued.jobs.len(), 4);
        let done = index
            .page(Scope::Owner("alice"), Some(JobState::Succeeded), 1, None)
            .await
            .unwrap();
        assert_eq!((done.jobs.len(), done.next), (1, None), "no more match: no cursor");

        // A record that expired is skipped and dropped from the index.
        let gone = &seen[0];
        let key = store.names().status_key(gone.id);
        let _: () = store
            .run(|mut c| {
                let key = key.clone();
                async move { c.del(key).await }
            })
            .await
            .unwrap();
        let page = index.page(Scope::Owner("alice"), None, 100, None).await.unwrap();
        assert_eq!(page.jobs, seen[1..]);
        let index_key = store.names().owner_jobs_index("alice");
        let left: i64 = store
            .run(|mut c| {
                let k = index_key.clone();
                async move { c.zcard(k).await }
            })
            .await
            .unwrap();
        assert_eq!(left, 4);
    }
}
