//! The webhook a job may carry: where its status record is POSTed, and on
//! which of its events. Validation here is the URL's form only (the same on
//! the dispatcher and the worker); whether its host is a public address is
//! the dispatcher's check at submit and at each delivery, which needs DNS
//! and the server's `SDXL_WEBHOOK_ALLOW_PRIVATE`.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::ValidationError;
use crate::status::JobState;

/// The longest `webhook_url` accepted.
pub const WEBHOOK_URL_MAX_CHARS: usize = 2048;

/// An event a webhook can be sent for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum WebhookEvent {
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl WebhookEvent {
    pub const ALL: [WebhookEvent; 4] = [
        WebhookEvent::Running,
        WebhookEvent::Succeeded,
        WebhookEvent::Failed,
        WebhookEvent::Cancelled,
    ];
    /// What a job that names no events is subscribed to: its end.
    pub const TERMINAL: [WebhookEvent; 3] = [WebhookEvent::Succeeded, WebhookEvent::Failed, WebhookEvent::Cancelled];

    pub fn as_str(self) -> &'static str {
        match self {
            WebhookEvent::Running => "running",
            WebhookEvent::Succeeded => "succeeded",
            WebhookEvent::Failed => "failed",
            WebhookEvent::Cancelled => "cancelled",
        }
    }

    /// The event a record entering `state` is.
    pub fn of_state(state: JobState) -> Option<WebhookEvent> {
        match state {
            JobState::Queued => None,
            JobState::Running => Some(WebhookEvent::Running),
            JobState::Succeeded => Some(WebhookEvent::Succeeded),
            JobState::Failed => Some(WebhookEvent::Failed),
            JobState::Cancelled => Some(WebhookEvent::Cancelled),
        }
    }

    /// `running, succeeded, failed, cancelled`, for messages.
    pub fn names() -> String {
        Self::ALL.map(Self::as_str).join(", ")
    }
}

impl std::fmt::Display for WebhookEvent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for WebhookEvent {
    type Err = ();
    fn from_str(s: &str) -> Result<Self, ()> {
        Self::ALL.into_iter().find(|e| e.as_str() == s).ok_or(())
    }
}

/// A valid job's webhook.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Webhook {
    pub url: String,
    /// Sorted, each once.
    pub events: Vec<WebhookEvent>,
}

impl Webhook {
    pub fn wants(&self, event: WebhookEvent) -> bool {
        self.events.contains(&event)
    }
}

/// What is shown of a refused value: the start of it, so that a 2 MB
/// string does not come back whole in the error.
fn shown(value: &str) -> String {
    const SHOWN: usize = 200;
    match value.char_indices().nth(SHOWN) {
        Some((end, _)) => format!("{}…", &value[..end]),
        None => value.to_string(),
    }
}

/// `webhook_url` and `webhook_events` of a request. Events without a URL are
/// checked and ignored (as `strength` without `image`).
pub fn webhook(url: Option<&str>, events: Option<&[String]>) -> Result<Option<Webhook>, ValidationError> {
    let events = match events {
        None => WebhookEvent::TERMINAL.to_vec(),
        Some([]) => return Err(ValidationError::WebhookEventsEmpty),
        Some(names) => {
            let mut events = Vec::with_capacity(names.len());
            for name in names {
                let event = name
                    .parse::<WebhookEvent>()
                    .map_err(|()| ValidationError::WebhookEvent(shown(name)))?;
                events.push(event);
            }
            events.sort();
            events.dedup();
            events
        }
    };
    let Some(url) = url else {
        return Ok(None);
    };
    let refuse = |reason: &str| ValidationError::WebhookUrl {
        value: shown(url),
        reason: reason.to_string(),
    };
    if url.chars().count() > WEBHOOK_URL_MAX_CHARS {
        return Err(refuse(&format!("it is over {WEBHOOK_URL_MAX_CHARS} characters")));
    }
    let parsed = url::Url::parse(url).map_err(|e| refuse(&format!("it is not an absolute URL ({e})")))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(refuse(&format!("its scheme is `{}`", parsed.scheme())));
    }
    if parsed.host().is_none() {
        return Err(refuse("it has no host"));
    }
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err(refuse(
            "it carries credentials (sign-in data belongs in the signature check, not the URL)",
        ));
    }
    Ok(Some(Webhook {
        url: parsed.to_string(),
        events,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn terminal_events_by_default_and_a_named_list_sorted_once() {
        let w = webhook(Some("https://example.com/hook"), None).unwrap().unwrap();
        assert_eq!(w.events, WebhookEvent::TERMINAL);
        assert_eq!(w.url, "https://example.com/hook");
        let w = webhook(
            Some("http://h:9/x?y=1"),
            Some(&names(&["succeeded", "running", "running"])),
        )
        .unwrap()
        .unwrap();
        assert_eq!(w.events, [WebhookEvent::Running, WebhookEvent::Succeeded]);
        assert!(w.wants(WebhookEvent::Running) && !w.wants(WebhookEvent::Failed));
        assert_eq!(webhook(None, Some(&names(&["failed"]))).unwrap(), None);
    }

    #[test]
    fn bad_urls_and_events_are_refused_by_name() {
        for (url, words) in [
            ("not a url", "not an absolute URL"),
            ("ftp://example.com/x", "scheme is `ftp`"),
            ("https://user:pw@example.com/", "credentials"),
        ] {
            let e = webhook(Some(url), None).unwrap_err();
            assert_eq!(e.field(), "webhook_url");
            assert!(e.to_string().contains(words) && e.to_string().contains(url), "{e}");
        }
        let long = format!("https://example.com/{}", "a".repeat(WEBHOOK_URL_MAX_CHARS));
        let e = webhook(Some(&long), None).unwrap_err().to_string();
        assert!(e.contains("over 2048") && e.len() < 600, "{e}");
        let e = webhook(Some("https://e.com"), Some(&names(&["done"]))).unwrap_err();
        assert_eq!(e.field(), "webhook_events");
        assert!(e.to_string().contains("running, succeeded, failed, cancelled") && e.to_string().contains("done"));
        assert_eq!(webhook(None, Some(&[])).unwrap_err().field(), "webhook_events");
    }

    #[test]
    fn states_map_to_events() {
        assert_eq!(WebhookEvent::of_state(JobState::Queued), None);
        for e in WebhookEvent::ALL {
            assert_eq!(e.as_str().parse::<WebhookEvent>(), Ok(e));
            assert_eq!(serde_json::to_value(e).unwrap(), e.as_str());
        }
        assert_eq!(
            WebhookEvent::of_state(JobState::Cancelled),
            Some(WebhookEvent::Cancelled)
        );
    }
}
