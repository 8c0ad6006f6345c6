//! Results in S3 (AWS, MinIO, s3s-fs): the bucket, uploads (multipart above a
//! threshold), existence checks, downloads and presigned GET URLs.
//!
//! Requests are signed with `rusty-s3` (SigV4, sans-IO) and sent with
//! `reqwest`: a much smaller build than the AWS SDK for the five calls we need.

use std::time::Duration;

use rusty_s3::actions::{CreateMultipartUpload, ListObjectsV2, S3Action};
use rusty_s3::{Bucket, Credentials, UrlStyle};

use crate::config::S3Args;

/// S3 refuses parts smaller than this (but the last).
pub const MIN_PART_SIZE: usize = 5 * 1024 * 1024;
/// Signed request URLs only need to outlive the request itself.
const REQUEST_SIGNATURE_TTL: Duration = Duration::from_secs(300);

#[derive(Debug, thiserror::Error)]
pub enum ResultStoreError {
    #[error("S3 endpoint or bucket is misconfigured: {0}")]
    Config(String),
    #[error("S3 unreachable during {op} of `{key}`: {source}")]
    Unreachable {
        op: &'static str,
        key: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("S3 answered {status} to {op} of `{key}`: {body}")]
    Status {
        op: &'static str,
        key: String,
        status: u16,
        body: String,
    },
    #[error("S3 sent an unexpected answer to {op} of `{key}`: {detail}")]
    Protocol {
        op: &'static str,
        key: String,
        detail: String,
    },
}

impl ResultStoreError {
    /// Whether trying again later may succeed: S3 unreachable, 5xx, throttled.
    pub fn is_transient(&self) -> bool {
        match self {
            ResultStoreError::Unreachable { .. } => true,
            ResultStoreError::Status { status, .. } => *status >= 500 || *status == 429 || *status == 408,
            ResultStoreError::Config(_) | ResultStoreError::Protocol { .. } => false,
        }
    }
}

#[derive(Clone)]
pub struct ResultStore {
    http: reqwest::Client,
    bucket: Bucket,
    /// The same bucket as clients address it (`S3_PUBLIC_ENDPOINT`), for presigned URLs.
    public_bucket: Bucket,
    credentials: Credentials,
    multipart_threshold: usize,
    presign_ttl: Duration,
}

impl std::fmt::Debug for ResultStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResultStore")
            .field("bucket", &self.bucket.name())
            .field("endpoint", &self.bucket.base_url().as_str())
            .finish_non_exhaustive()
    }
}

impl ResultStore {
    pub fn new(args: &S3Args) -> Result<Self, ResultStoreError> {
        let style = if args.s3_virtual_host_style {
            UrlStyle::VirtualHost
        } else {
            UrlStyle::Path
        };
        let bucket_at = |name: &str, endpoint: &str| -> Result<Bucket, ResultStoreError> {
            let url: url::Url = endpoint
                .parse()
                .map_err(|e| ResultStoreError::Config(format!("{name} `{endpoint}`: {e}")))?;
            Bucket::new(url, style, args.s3_bucket.clone(), args.aws_region.clone())
                .map_err(|e| ResultStoreError::Config(format!("bucket `{}` at {name}: {e}", args.s3_bucket)))
        };
        let bucket = bucket_at("S3_ENDPOINT", &args.s3_endpoint)?;
        let public_bucket = match &args.s3_public_endpoint {
            Some(public) => bucket_at("S3_PUBLIC_ENDPOINT", public)?,
            None => bucket.clone(),
        };
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(120))
            .build()
            .map_err(|e| ResultStoreError::Config(e.to_string()))?;
        let (Some(key), Some(secret)) = (&args.aws_access_key_id, &args.aws_secret_access_key) else {
            return Err(ResultStoreError::Config(
                "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or --aws-access-key-id and --aws-secret-access-key) are required".into(),
            ));
        };
        Ok(ResultStore {
            http,
            bucket,
            public_bucket,
            credentials: Credentials::new(key.0.clone(), secret.0.clone()),
            multipart_threshold: args.s3_multipart_threshold.max(MIN_PART_SIZE),
            presign_ttl: args.s3_presign_ttl.min(Duration::from_secs(7 * 86400)),
        })
    }

    pub fn bucket_name(&self) -> &str {
        self.bucket.name()
    }

    async fn send(
        &self,
        op: &'static str,
        key: &str,
        request: reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, ResultStoreError> {
        request.send().await.map_err(|source| ResultStoreError::Unreachable {
            op,
            key: key.to_string(),
            source,
        })
    }

    async fn fail(op: &'static str, key: &str, response: reqwest::Response) -> ResultStoreError {
        let status = response.status().as_u16();
        let body = response.text().await.unwrap_or_default();
        ResultStoreError::Status {
            op,
            key: key.to_string(),
            status,
            body: body.chars().take(500).collect(),
        }
    }

    /// Creates the bucket when it does not exist.
    pub async fn ensure_bucket(&self) -> Result<(), ResultStoreError> {
        let name = self.bucket.name().to_string();
        let url = self
            .bucket
            .head_bucket(Some(&self.credentials))
            .sign(REQUEST_SIGNATURE_TTL);
        let head = self.send("HeadBucket", &name, self.http.head(url)).await?;
        if head.status().is_success() {
            return Ok(());
        }
        if head.status().as_u16() != 404 {
            return Err(Self::fail("HeadBucket", &name, head).await);
        }
        let action = self.bucket.create_bucket(&self.credentials);
        let url = action.sign(REQUEST_SIGNATURE_TTL);
        let create = self
            .send("CreateBucket", &name, self.http.put(url).body(action.body()))
            .await?;
        // Another process may have created it in between.
        if create.status().is_success() || create.status().as_u16() == 409 {
            tracing::info!(bucket = %name, "created bucket");
            return Ok(());
        }
        Err(Self::fail("CreateBucket", &name, create).await)
    }

    /// Stores `body` under `key`; in parts when larger than the threshold.
    pub async fn put(&self, key: &str, body: Vec<u8>, content_type: &str) -> Result<(), ResultStoreError> {
        if body.len() > self.multipart_threshold {
            return self.put_multipart(key, body, content_type).await;
        }
        let url = self
            .bucket
            .put_object(Some(&self.credentials), key)
            .sign(REQUEST_SIGNATURE_TTL);
        let request = self.http.put(url).header("content-type", content_type).body(body);
        let response = self.send("PutObject", key, request).await?;
        if !response.status().is_success() {
            return Err(Self::fail("PutObject", key, response).await);
        }
        Ok(())
    }

    async fn put_multipart(&self, key: &str, body: Vec<u8>, content_type: &str) -> Result<(), ResultStoreError> {
        let url = self
            .bucket
            .create_multipart_upload(Some(&self.credentials), key)
            .sign(REQUEST_SIGNATURE_TTL);
        let response = self
            .send(
                "CreateMultipartUpload",
                key,
                self.http.post(url).header("content-type", content_type),
            )
            .await?;
        if !response.status().is_success() {
            return Err(Self::fail("CreateMultipartUpload", key, response).await);
        }
        let xml = response.text().await.map_err(|source| ResultStoreError::Unreachable {
            op: "CreateMultipartUpload",
            key: key.to_string(),
            source,
        })?;
        let created = CreateMultipartUpload::parse_response(&xml).map_err(|e| ResultStoreError::Protocol {
            op: "CreateMultipartUpload",
            key: key.to_string(),
            detail: e.to_string(),
        })?;
        let upload_id = created.upload_id();
        let mut etags = Vec::new();
        for (index, part) in body.chunks(MIN_PART_SIZE).enumerate() {
            let number = u16::try_from(index + 1).map_err(|_| ResultStoreError::Protocol {
                op: "UploadPart",
                key: key.to_string(),
                detail: "more than 65535 parts".into(),
            })?;
            let url = self
                .bucket
                .upload_part(Some(&self.credentials), key, number, upload_id)
                .sign(REQUEST_SIGNATURE_TTL);
            let response = self
                .send("UploadPart", key, self.http.put(url).body(part.to_vec()))
                .await?;
            if !response.status().is_success() {
                return Err(Self::fail("UploadPart", key, response).await);
            }
            let etag = response
                .headers()
                .get("etag")
                .and_then(|v| v.to_str().ok())
                .ok_or_else(|| ResultStoreError::Protocol {
                    op: "UploadPart",
                    key: key.to_string(),
                    detail: "no ETag in the answer".into(),
                })?;
            etags.push(etag.to_string());
        }
        let action = self.bucket.complete_multipart_upload(
            Some(&self.credentials),
            key,
            upload_id,
            etags.iter().map(String::as_str),
        );
        let url = action.sign(REQUEST_SIGNATURE_TTL);
        let response = self
            .send("CompleteMultipartUpload", key, self.http.post(url).body(action.body()))
            .await?;
        if !response.status().is_success() {
            return Err(Self::fail("CompleteMultipartUpload", key, response).await);
        }
        Ok(())
    }

    /// The object under `key`, or `None` when there is none.
    pub async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, ResultStoreError> {
        let url = self
            .bucket
            .get_object(Some(&self.credentials), key)
            .sign(REQUEST_SIGNATURE_TTL);
        let response = self.send("GetObject", key, self.http.get(url)).await?;
        if response.status().as_u16() == 404 {
            return Ok(None);
        }
        if !response.status().is_success() {
            return Err(Self::fail("GetObject", key, response).await);
        }
        let bytes = response.bytes().await.map_err(|source| ResultStoreError::Unreachable {
            op: "GetObject",
            key: key.to_string(),
            source,
        })?;
        Ok(Some(bytes.to_vec()))
    }

    /// The `Content-Type` of the object under `key`, or `None` when there is none.
    pub async fn head(&self, key: &str) -> Result<Option<String>, ResultStoreError> {
        let url = self
            .bucket
            .head_object(Some(&self.credentials), key)
            .sign(REQUEST_SIGNATURE_TTL);
        let response = self.send("HeadObject", key, self.http.head(url)).await?;
        if response.status().as_u16() == 404 {
            return Ok(None);
        }
        if !response.status().is_success() {
            return Err(Self::fail("HeadObject", key, response).await);
        }
        Ok(Some(
            response
                .headers()
                .get("content-type")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_string(),
        ))
    }

    /// The keys under `prefix` (first 1000), e.g. every object of a job.
    pub async fn list(&self, prefix: &str) -> Result<Vec<String>, ResultStoreError> {
        let mut action = self.bucket.list_objects_v2(Some(&self.credentials));
        action.with_prefix(prefix);
        let url = action.sign(REQUEST_SIGNATURE_TTL);
        let response = self.send("ListObjectsV2", prefix, self.http.get(url)).await?;
        if !response.status().is_success() {
            return Err(Self::fail("ListObjectsV2", prefix, response).await);
        }
        let xml = response.text().await.map_err(|source| ResultStoreError::Unreachable {
            op: "ListObjectsV2",
            key: prefix.to_string(),
            source,
        })?;
        let listed = ListObjectsV2::parse_response(&xml).map_err(|e| ResultStoreError::Protocol {
            op: "ListObjectsV2",
            key: prefix.to_string(),
            detail: e.to_string(),
        })?;
        Ok(listed.contents.into_iter().map(|c| c.key).collect())
    }

    /// A presigned GET URL of `key`, valid for the configured presign TTL.
    pub fn presign_get(&self, key: &str) -> String {
        self.public_bucket
            .get_object(Some(&self.credentials), key)
            .sign(self.presign_ttl)
            .to_string()
    }
}
