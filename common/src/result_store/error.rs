//! What can go wrong with S3, and whether trying again later may help: the
//! SDK's errors mapped onto [`ResultStoreError`], whose
//! [`is_transient`](ResultStoreError::is_transient) the worker's retry window
//! and its redelivery decision rely on.

use std::error::Error as StdError;

use aws_credential_types::provider::error::CredentialsError;
use aws_runtime::retries::classifiers::{THROTTLING_ERRORS, TRANSIENT_ERRORS};
use aws_sdk_s3::config::http::HttpResponse;
use aws_sdk_s3::error::{BoxError, ProvideErrorMetadata, SdkError};

#[derive(Debug, thiserror::Error)]
pub enum ResultStoreError {
    #[error("S3 endpoint, bucket or credentials are misconfigured: {0}")]
    Config(String),
    /// No answer: connection refused or dropped, a timeout, DNS.
    #[error("S3 unreachable during {op} of `{key}`: {}", error_chain(source.as_ref()))]
    Unreachable {
        op: &'static str,
        key: String,
        #[source]
        source: BoxError,
    },
    /// The credential chain (profile, web identity, metadata) gave none:
    /// `missing` when none of its sources is configured, rather than one that
    /// did not answer.
    #[error("no S3 credentials for {op} of `{key}`: {}", error_chain(source.as_ref()))]
    Credentials {
        op: &'static str,
        key: String,
        missing: bool,
        #[source]
        source: BoxError,
    },
    /// S3 answered with an error status (`code` is S3's, e.g. `SlowDown`).
    #[error("S3 answered {status} to {op} of `{key}`{}", describe(code.as_deref(), message))]
    Status {
        op: &'static str,
        key: String,
        status: u16,
        code: Option<String>,
        message: String,
    },
    /// Some objects of a `DeleteObjects` batch were not deleted.
    #[error("S3 kept {count} object(s) of {op} under `{key}`, e.g. `{first}`: {code}")]
    NotDeleted {
        op: &'static str,
        key: String,
        count: usize,
        first: String,
        code: String,
    },
    /// We asked for something the store refuses to do (e.g. delete a whole bucket).
    #[error("{op} of `{key}` refused: {reason}")]
    Refused {
        op: &'static str,
        key: String,
        reason: &'static str,
    },
    #[error("S3 sent an unexpected answer to {op} of `{key}`: {detail}")]
    Protocol {
        op: &'static str,
        key: String,
        detail: String,
    },
}

/// S3 error codes that mean "later" whatever the status says (`RequestTimeout`
/// comes as a 400): the SDK's own lists, so both retry layers agree.
fn code_is_transient(code: &str) -> bool {
    THROTTLING_ERRORS.contains(&code) || TRANSIENT_ERRORS.contains(&code) || code == "InternalError"
}

impl ResultStoreError {
    /// Whether trying again later may succeed: S3 unreachable or timed out,
    /// 5xx, throttled (429, `SlowDown`), a credential source that did not
    /// answer. A signature mismatch, a denied access or any other 4xx is not.
    pub fn is_transient(&self) -> bool {
        match self {
            ResultStoreError::Unreachable { .. } => true,
            ResultStoreError::Credentials { missing, .. } => !missing,
            ResultStoreError::Status { status, code, .. } => {
                *status >= 500 || *status == 429 || *status == 408 || code.as_deref().is_some_and(code_is_transient)
            }
            ResultStoreError::NotDeleted { code, .. } => code_is_transient(code),
            ResultStoreError::Config(_) | ResultStoreError::Refused { .. } | ResultStoreError::Protocol { .. } => false,
        }
    }

    /// Maps an SDK error (after the SDK's own retries) of `op` on `key`.
    pub(crate) fn from_sdk<E>(op: &'static str, key: &str, err: SdkError<E, HttpResponse>) -> Self
    where
        E: ProvideErrorMetadata + StdError + Send + Sync + 'static,
    {
        let key = key.to_string();
        let status = err.raw_response().map(|r| r.status().as_u16());
        let code = err.code().map(str::to_string);
        let message = err.message().map(str::to_string);
        // A credential provider's failure comes back as a dispatch failure.
        if let Some(credentials) = find_source::<CredentialsError>(&err) {
            let missing = matches!(
                credentials,
                CredentialsError::CredentialsNotLoaded(_) | CredentialsError::InvalidConfiguration(_)
            );
            return ResultStoreError::Credentials {
                op,
                key,
                missing,
                source: Box::new(err),
            };
        }
        match err {
            SdkError::ServiceError(_) => ResultStoreError::Status {
                op,
                key,
                status: status.unwrap_or_default(),
                code,
                message: message.unwrap_or_default(),
            },
            SdkError::TimeoutError(_) => ResultStoreError::Unreachable {
                op,
                key,
                source: Box::new(err),
            },
            SdkError::DispatchFailure(ref failure) if failure.is_user() => ResultStoreError::Protocol {
                op,
                key,
                detail: error_chain(&err),
            },
            SdkError::DispatchFailure(_) => ResultStoreError::Unreachable {
                op,
                key,
                source: Box::new(err),
            },
            // An answer that could not be read: an error status we could not
            // parse (a proxy's 502 page), or a body cut off by a dropped connection.
            SdkError::ResponseError(_) => match status {
                Some(s) if !(200..300).contains(&s) => ResultStoreError::Status {
                    op,
                    key,
                    status: s,
                    code,
                    message: message.unwrap_or_else(|| error_chain(&err)),
                },
                _ if find_source::<std::io::Error>(&err).is_some() => ResultStoreError::Unreachable {
                    op,
                    key,
                    source: Box::new(err),
                },
                _ => ResultStoreError::Protocol {
                    op,
                    key,
                    detail: error_chain(&err),
                },
            },
            _ => ResultStoreError::Config(format!("building the {op} request for `{key}`: {}", error_chain(&err))),
        }
    }
}

/// `: Code: message`, `: Code`, `: message` or nothing.
fn describe(code: Option<&str>, message: &str) -> String {
    match (code, message) {
        (Some(c), "") => format!(": {c}"),
        (Some(c), m) => format!(": {c}: {m}"),
        (None, "") => String::new(),
        (None, m) => format!(": {m}"),
    }
}

/// The first error of type `T` in `err`'s chain of sources.
fn find_source<'a, T: StdError + 'static>(err: &'a (dyn StdError + 'static)) -> Option<&'a T> {
    let mut next: Option<&(dyn StdError + 'static)> = Some(err);
    while let Some(e) = next {
        if let Some(found) = e.downcast_ref::<T>() {
            return Some(found);
        }
        next = e.source();
    }
    None
}

/// `err` and its causes on one line: an `SdkError`'s own `Display` is terse
/// ("dispatch failure"), and the worker logs errors with `Display`.
fn error_chain(err: &(dyn StdError + 'static)) -> String {
    let mut out = err.to_string();
    let mut next = err.source();
    while let Some(e) = next {
        out.push_str(": ");
        out.push_str(&e.to_string());
        next = e.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(status: u16, code: Option<&str>) -> ResultStoreError {
        ResultStoreError::Status {
            op: "PutObject",
            key: "k".into(),
            status,
            code: code.map(str::to_string),
            message: String::new(),
        }
    }

    #[test]
    fn server_errors_and_throttling_are_transient_other_refusals_are_not() {
        assert!(status(500, Some("InternalError")).is_transient());
        assert!(status(503, Some("SlowDown")).is_transient());
        assert!(status(429, None).is_transient());
        assert!(status(400, Some("RequestTimeout")).is_transient());
        assert!(!status(403, Some("SignatureDoesNotMatch")).is_transient());
        assert!(!status(403, Some("AccessDenied")).is_transient());
        assert!(!status(404, Some("NoSuchBucket")).is_transient());
        assert!(!status(400, Some("InvalidArgument")).is_transient());
    }

    #[test]
    fn missing_credentials_are_not_transient_a_silent_provider_is() {
        let credentials = |missing| ResultStoreError::Credentials {
            op: "PutObject",
            key: "k".into(),
            missing,
            source: "no provider in the chain gave credentials".into(),
        };
        assert!(!credentials(true).is_transient());
        assert!(credentials(false).is_transient());
    }

    #[test]
    fn the_status_and_code_are_in_the_message() {
        let e = status(403, Some("SignatureDoesNotMatch"));
        assert_eq!(
            e.to_string(),
            "S3 answered 403 to PutObject of `k`: SignatureDoesNotMatch"
        );
    }
}
