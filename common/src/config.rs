//! Command-line/environment configuration shared by the dispatcher and the
//! worker (clap with `env`: every flag has a variable, and `--help` shows it).
//!
//! Secrets (the S3 secret key, passwords inside URLs) are wrapped in
//! [`Secret`] and [`SecretUrl`], whose `Debug` never shows them, and their
//! environment values are hidden from `--help`.

use std::time::Duration;

use clap::Args;

use crate::names::{Names, DEFAULT_QUEUE, DEFAULT_REDIS_PREFIX};

/// A string that never appears in logs.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("\"***\"")
    }
}

impl std::str::FromStr for Secret {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Secret(s.to_string()))
    }
}

/// A URL that may carry a password (`amqp://user:pass@host`): shown without it.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretUrl(pub String);

impl std::fmt::Debug for SecretUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match url::Url::parse(&self.0) {
            Ok(mut u) => {
                if u.password().is_some() {
                    let _ = u.set_password(Some("***"));
                }
                write!(f, "{:?}", u.as_str())
            }
            Err(_) => f.write_str("\"<unparsable url>\""),
        }
    }
}

impl std::str::FromStr for SecretUrl {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(SecretUrl(s.to_string()))
    }
}

/// Parses `500ms`, `30s`, `15m`, `2h`, `7d` or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let n: u64 = number
        .parse()
        .map_err(|_| format!("`{s}` is not a duration such as 30s, 15m, 2h or 7d"))?;
    let secs = match unit {
        "ms" => return Ok(Duration::from_millis(n)),
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        _ => return Err(format!("`{s}`: unknown unit `{unit}` (ms, s, m, h, d)")),
    };
    Ok(Duration::from_secs(n.saturating_mul(secs)))
}

/// Where the queue, the status store and the event channels are.
#[derive(Debug, Clone, Args)]
pub struct ServiceArgs {
    /// RabbitMQ URL.
    #[arg(
        long,
        env = "AMQP_URL",
        hide_env_values = true,
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f"
    )]
    pub amqp_url: SecretUrl,
    /// Redis URL.
    #[arg(
        long,
        env = "REDIS_URL",
        hide_env_values = true,
        default_value = "redis://127.0.0.1:6379/"
    )]
    pub redis_url: SecretUrl,
    /// The job queue; its dead-letter exchange and queue are `{queue}.dlx` and `{queue}.dead`.
    #[arg(long, env = "SDXL_QUEUE", default_value = DEFAULT_QUEUE)]
    pub queue: String,
    /// Prefix of every Redis key and channel (`{prefix}:job:{id}`).
    #[arg(long, env = "SDXL_REDIS_PREFIX", default_value = DEFAULT_REDIS_PREFIX)]
    pub redis_prefix: String,
    /// How long status records (and idempotency keys) live in Redis.
    #[arg(long, env = "SDXL_STATUS_TTL", default_value = "7d", value_parser = parse_duration)]
    pub status_ttl: Duration,
    #[command(flatten)]
    pub s3: S3Args,
}

impl ServiceArgs {
    pub fn names(&self) -> Names {
        Names::new(self.queue.clone(), self.redis_prefix.clone())
    }
}

/// Where results are stored.
#[derive(Debug, Clone, Args)]
pub struct S3Args {
    /// S3 endpoint (AWS, MinIO, s3s-fs...); empty: AWS's own endpoint for the region.
    #[arg(long, env = "S3_ENDPOINT", default_value = "http://127.0.0.1:8014")]
    pub s3_endpoint: String,
    /// The endpoint clients reach S3 at, when it differs from `S3_ENDPOINT`
    /// (e.g. `http://localhost:9000` outside compose): presigned URLs use it.
    #[arg(long, env = "S3_PUBLIC_ENDPOINT")]
    pub s3_public_endpoint: Option<String>,
    /// Bucket of the results; created when missing.
    #[arg(long, env = "S3_BUCKET", default_value = "sdxl")]
    pub s3_bucket: String,
    /// Region used to sign requests.
    #[arg(long, env = "AWS_REGION", default_value = "us-east-1")]
    pub aws_region: String,
    /// Access key id. With the secret key, it takes precedence; without
    /// either, credentials come from the AWS default chain (profile, web
    /// identity / IRSA, container or instance metadata).
    #[arg(long, env = "AWS_ACCESS_KEY_ID", hide_env_values = true)]
    pub aws_access_key_id: Option<Secret>,
    /// Secret access key (goes with the access key id).
    #[arg(long, env = "AWS_SECRET_ACCESS_KEY", hide_env_values = true)]
    pub aws_secret_access_key: Option<Secret>,
    /// Session token of temporary keys (goes with the access key id).
    #[arg(long, env = "AWS_SESSION_TOKEN", hide_env_values = true)]
    pub aws_session_token: Option<Secret>,
    /// Virtual-host-style addressing (`bucket.host`) instead of path style
    /// (`host/bucket`, what MinIO and s3s-fs expect).
    #[arg(long, env = "S3_VIRTUAL_HOST_STYLE")]
    pub s3_virtual_host_style: bool,
    /// Objects larger than this many bytes are uploaded in parts (at least 5 MiB each).
    #[arg(long, env = "S3_MULTIPART_THRESHOLD", default_value_t = 8 * 1024 * 1024)]
    pub s3_multipart_threshold: usize,
    /// How long presigned result URLs stay valid (at most 7 days).
    #[arg(long, env = "S3_PRESIGN_TTL", default_value = "1h", value_parser = parse_duration)]
    pub s3_presign_ttl: Duration,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("7d").unwrap(), Duration::from_secs(7 * 86400));
        assert_eq!(parse_duration("90").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert!(parse_duration("7w").is_err());
        assert!(parse_duration("d").is_err());
    }

    #[test]
    fn secrets_are_not_in_debug_output() {
        let s = format!("{:?}", Secret("hunter2".into()));
        assert!(!s.contains("hunter2"));
        let u = format!("{:?}", SecretUrl("amqp://guest:hunter2@host:5672/%2f".into()));
        assert!(!u.contains("hunter2") && u.contains("guest"), "{u}");
    }
}
