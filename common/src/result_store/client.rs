//! Building the SDK's S3 clients from [`S3Args`]: the credentials (explicit
//! keys, else aws-config's default chain), the endpoint and its addressing
//! style, the retry and timeout settings, and rustls on ring for HTTPS.

use std::time::Duration;

use aws_config::default_provider::credentials::DefaultCredentialsChain;
use aws_config::provider_config::ProviderConfig;
use aws_credential_types::provider::{future, ProvideCredentials, SharedCredentialsProvider};
use aws_sdk_s3::config::retry::RetryConfig;
use aws_sdk_s3::config::timeout::TimeoutConfig;
use aws_sdk_s3::config::{
    BehaviorVersion, Credentials, Region, RequestChecksumCalculation, ResponseChecksumValidation, SharedHttpClient,
};
use aws_smithy_http_client::tls::{rustls_provider::CryptoMode, Provider};

use super::error::ResultStoreError;
use crate::config::{S3Args, Secret};

/// The SDK retries a failed call this many times in all, quickly: short
/// hiccups (a reset connection, one 503) never reach the caller. Longer
/// outages do, as transient errors, and the worker's own retry window
/// (`SDXL_RETRY_FOR`) waits them out.
const MAX_ATTEMPTS: u32 = 3;
const INITIAL_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// A server that is down refuses at once; one that is unreachable must not
/// hold a job for minutes.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Until the answer's headers, the request body included (a 5 MiB part).
const READ_TIMEOUT: Duration = Duration::from_secs(30);
/// One attempt, whatever it waits on.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(60);

/// The client that talks to S3 and the one that presigns for clients.
pub(super) struct Clients {
    pub s3: aws_sdk_s3::Client,
    /// Configured with `S3_PUBLIC_ENDPOINT` (or the same endpoint): it only
    /// presigns, so the URLs it signs name the host clients reach.
    pub presigner: aws_sdk_s3::Client,
}

pub(super) fn build(args: &S3Args) -> Result<Clients, ResultStoreError> {
    let region = Region::new(args.aws_region.clone());
    let http = https_client();
    let config = aws_sdk_s3::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(region.clone())
        .credentials_provider(credentials(args, region, http.clone())?)
        .http_client(http)
        .force_path_style(!args.s3_virtual_host_style)
        .retry_config(
            RetryConfig::standard()
                .with_max_attempts(MAX_ATTEMPTS)
                .with_initial_backoff(INITIAL_BACKOFF)
                .with_max_backoff(MAX_BACKOFF),
        )
        .timeout_config(
            TimeoutConfig::builder()
                .connect_timeout(CONNECT_TIMEOUT)
                .read_timeout(READ_TIMEOUT)
                .operation_attempt_timeout(ATTEMPT_TIMEOUT)
                .build(),
        )
        // Checksums only where S3 requires them (DeleteObjects): MinIO and
        // other S3 servers do not all take the SDK's default CRC32 headers
        // and trailers, and the connection already has TCP's and TLS's.
        .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
        .response_checksum_validation(ResponseChecksumValidation::WhenRequired);
    let at = |builder: aws_sdk_s3::config::Builder, name: &str, endpoint: &str| {
        if endpoint.is_empty() {
            return Ok(builder); // AWS's own endpoint for the region
        }
        let url: url::Url = endpoint
            .parse()
            .map_err(|e| ResultStoreError::Config(format!("{name} `{endpoint}`: {e}")))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(ResultStoreError::Config(format!(
                "{name} `{endpoint}`: not an http(s) URL"
            )));
        }
        Ok(builder.endpoint_url(endpoint))
    };
    let public = args.s3_public_endpoint.as_deref().unwrap_or(&args.s3_endpoint);
    let presigner = at(config.clone(), "S3_PUBLIC_ENDPOINT", public)?.build();
    let s3 = at(config, "S3_ENDPOINT", &args.s3_endpoint)?.build();
    Ok(Clients {
        s3: aws_sdk_s3::Client::from_conf(s3),
        presigner: aws_sdk_s3::Client::from_conf(presigner),
    })
}

/// hyper with rustls on ring (the crypto lapin and reqwest already use; the
/// SDK's default, aws-lc-rs, is a C build) and the system's root certificates.
/// Connect and read timeouts come from the client's `TimeoutConfig`.
fn https_client() -> SharedHttpClient {
    aws_smithy_http_client::Builder::new()
        .tls_provider(Provider::Rustls(CryptoMode::Ring))
        .build_https()
}

fn given(value: &Option<Secret>) -> Option<&str> {
    value.as_ref().map(|s| s.0.as_str()).filter(|s| !s.is_empty())
}

/// Explicit keys when both are given; none: aws-config's default chain.
fn credentials(
    args: &S3Args,
    region: Region,
    http: SharedHttpClient,
) -> Result<SharedCredentialsProvider, ResultStoreError> {
    match (given(&args.aws_access_key_id), given(&args.aws_secret_access_key)) {
        (Some(id), Some(secret)) => Ok(SharedCredentialsProvider::new(Credentials::new(
            id,
            secret,
            given(&args.aws_session_token).map(str::to_string),
            None,
            "S3Args",
        ))),
        (None, None) => Ok(SharedCredentialsProvider::new(DefaultChain {
            region,
            http,
            chain: tokio::sync::OnceCell::new(),
        })),
        _ => Err(ResultStoreError::Config(
            "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY go together: give both, or neither to use the default credential chain".into(),
        )),
    }
}

/// aws-config's default chain (environment, shared profile, web identity /
/// IRSA, ECS container, EC2 instance metadata), built on first use: building
/// it is async and [`super::ResultStore::new`] is not. The SDK's identity
/// cache in front of it keeps the credentials until they are due to expire.
#[derive(Debug)]
struct DefaultChain {
    region: Region,
    http: SharedHttpClient,
    chain: tokio::sync::OnceCell<DefaultCredentialsChain>,
}

impl ProvideCredentials for DefaultChain {
    fn provide_credentials<'a>(&'a self) -> future::ProvideCredentials<'a>
    where
        Self: 'a,
    {
        future::ProvideCredentials::new(async move {
            let chain = self
                .chain
                .get_or_init(|| async {
                    let config = ProviderConfig::without_region()
                        .with_http_client(self.http.clone())
                        .with_region(Some(self.region.clone()));
                    DefaultCredentialsChain::builder()
                        .configure(config)
                        .region(self.region.clone())
                        .build()
                        .await
                })
                .await;
            chain.provide_credentials().await
        })
    }
}
