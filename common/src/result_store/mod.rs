//! Results in S3 (AWS, MinIO, s3s-fs) through the AWS SDK: the bucket,
//! uploads (multipart above a threshold), reads, listings, deletes and
//! presigned GET URLs.
//!
//! [`client`] builds the SDK's clients (credentials, endpoint, retries,
//! timeouts, TLS), [`multipart`] uploads in parts, and [`error`] says what
//! went wrong and whether it is worth trying again.

mod client;
mod error;
mod multipart;

use std::time::Duration;

use aws_sdk_s3::error::ProvideErrorMetadata;
use aws_sdk_s3::presigning::PresigningConfig;
use aws_sdk_s3::primitives::{ByteStream, DateTime};
use aws_sdk_s3::types::{BucketLocationConstraint, CreateBucketConfiguration, Delete, ObjectIdentifier};
use chrono::{DateTime as ChronoDateTime, Utc};

use crate::config::S3Args;

pub use self::error::ResultStoreError;
pub use self::multipart::MIN_PART_SIZE;

/// S3 presigns for at most a week.
const MAX_PRESIGN_TTL: Duration = Duration::from_secs(7 * 86400);
/// `DeleteObjects` takes at most this many keys.
const DELETE_BATCH: usize = 1000;

/// One stored object, as a listing or a `HEAD` describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectInfo {
    pub key: String,
    /// Bytes.
    pub size: u64,
    pub last_modified: Option<ChronoDateTime<Utc>>,
}

#[derive(Clone)]
pub struct ResultStore {
    s3: aws_sdk_s3::Client,
    /// The same bucket as clients address it (`S3_PUBLIC_ENDPOINT`), for presigned URLs.
    presigner: aws_sdk_s3::Client,
    bucket: String,
    region: String,
    endpoint: String,
    multipart_threshold: usize,
    presign_ttl: Duration,
}

impl std::fmt::Debug for ResultStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResultStore")
            .field("bucket", &self.bucket)
            .field("endpoint", &self.endpoint)
            .finish_non_exhaustive()
    }
}

/// Whether `err` says there is no such object (`NoSuchKey`, or a 404 to a
/// `HEAD`, which has no body to say more); a missing bucket is an error.
fn not_found<E: ProvideErrorMetadata>(err: &aws_sdk_s3::error::SdkError<E>) -> bool {
    err.raw_response().is_some_and(|r| r.status().as_u16() == 404) && err.code() != Some("NoSuchBucket")
}

fn to_chrono(t: Option<&DateTime>) -> Option<ChronoDateTime<Utc>> {
    t.and_then(|t| ChronoDateTime::from_timestamp(t.secs(), t.subsec_nanos()))
}

impl ResultStore {
    /// The store of `args`; nothing is sent until the first call.
    pub fn new(args: &S3Args) -> Result<Self, ResultStoreError> {
        let clients = client::build(args)?;
        Ok(ResultStore {
            s3: clients.s3,
            presigner: clients.presigner,
            bucket: args.s3_bucket.clone(),
            region: args.aws_region.clone(),
            endpoint: args.s3_endpoint.clone(),
            multipart_threshold: args.s3_multipart_threshold.max(MIN_PART_SIZE),
            presign_ttl: args.s3_presign_ttl.min(MAX_PRESIGN_TTL),
        })
    }

    pub fn bucket_name(&self) -> &str {
        &self.bucket
    }

    /// Creates the bucket when it does not exist.
    pub async fn ensure_bucket(&self) -> Result<(), ResultStoreError> {
        let name = &self.bucket;
        match self.s3.head_bucket().bucket(name).send().await {
            Ok(_) => return Ok(()),
            Err(e) if e.raw_response().is_some_and(|r| r.status().as_u16() == 404) => {}
            Err(e) => return Err(ResultStoreError::from_sdk("HeadBucket", name, e)),
        }
        let mut create = self.s3.create_bucket().bucket(name);
        // us-east-1 is the one region S3 wants no constraint for.
        if self.region != "us-east-1" {
            create = create.create_bucket_configuration(
                CreateBucketConfiguration::builder()
                    .location_constraint(BucketLocationConstraint::from(self.region.as_str()))
                    .build(),
            );
        }
        match create.send().await {
            Ok(_) => {
                tracing::info!(bucket = %name, "created bucket");
                Ok(())
            }
            // Another process may have created it in between.
            Err(e) if e.raw_response().is_some_and(|r| r.status().as_u16() == 409) => Ok(()),
            Err(e) => Err(ResultStoreError::from_sdk("CreateBucket", name, e)),
        }
    }

    /// Stores `body` under `key`; in parts when larger than the threshold.
    pub async fn put(&self, key: &str, body: Vec<u8>, content_type: &str) -> Result<(), ResultStoreError> {
        if body.len() > self.multipart_threshold {
            return multipart::put(&self.s3, &self.bucket, key, body, content_type).await;
        }
        self.s3
            .put_object()
            .bucket(&self.bucket)
            .key(key)
            .content_type(content_type)
            .body(ByteStream::from(body))
            .send()
            .await
            .map_err(|e| ResultStoreError::from_sdk("PutObject", key, e))?;
        Ok(())
    }

    /// The object under `key`, or `None` when there is none.
    pub async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, ResultStoreError> {
        let object = match self.s3.get_object().bucket(&self.bucket).key(key).send().await {
            Ok(object) => object,
            Err(e) if not_found(&e) => return Ok(None),
            Err(e) => return Err(ResultStoreError::from_sdk("GetObject", key, e)),
        };
        let bytes = object.body.collect().await.map_err(|e| ResultStoreError::Unreachable {
            op: "GetObject",
            key: key.to_string(),
            source: Box::new(e),
        })?;
        Ok(Some(bytes.to_vec()))
    }

    async fn head_object(
        &self,
        key: &str,
    ) -> Result<Option<aws_sdk_s3::operation::head_object::HeadObjectOutput>, ResultStoreError> {
        match self.s3.head_object().bucket(&self.bucket).key(key).send().await {
            Ok(head) => Ok(Some(head)),
            Err(e) if not_found(&e) => Ok(None),
            Err(e) => Err(ResultStoreError::from_sdk("HeadObject", key, e)),
        }
    }

    /// The `Content-Type` of the object under `key`, or `None` when there is none.
    pub async fn head(&self, key: &str) -> Result<Option<String>, ResultStoreError> {
        Ok(self
            .head_object(key)
            .await?
            .map(|head| head.content_type().unwrap_or_default().to_string()))
    }

    /// The size and age of the object under `key`, or `None` when there is none.
    pub async fn stat(&self, key: &str) -> Result<Option<ObjectInfo>, ResultStoreError> {
        Ok(self.head_object(key).await?.map(|head| ObjectInfo {
            key: key.to_string(),
            size: head.content_length().and_then(|n| u64::try_from(n).ok()).unwrap_or(0),
            last_modified: to_chrono(head.last_modified()),
        }))
    }

    /// Every object under `prefix` (all pages), e.g. every object of a job.
    pub async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, ResultStoreError> {
        let mut pages = self
            .s3
            .list_objects_v2()
            .bucket(&self.bucket)
            .prefix(prefix)
            .into_paginator()
            .send();
        let mut objects = Vec::new();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| ResultStoreError::from_sdk("ListObjectsV2", prefix, e))?;
            objects.extend(page.contents().iter().filter_map(|object| {
                Some(ObjectInfo {
                    key: object.key()?.to_string(),
                    size: object.size().and_then(|n| u64::try_from(n).ok()).unwrap_or(0),
                    last_modified: to_chrono(object.last_modified()),
                })
            }));
        }
        Ok(objects)
    }

    /// Deletes the object under `key`; a missing one is no error.
    pub async fn delete(&self, key: &str) -> Result<(), ResultStoreError> {
        self.s3
            .delete_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
            .map_err(|e| ResultStoreError::from_sdk("DeleteObject", key, e))?;
        Ok(())
    }

    /// Deletes every object under `prefix` (e.g. `jobs/{id}/`, a job's
    /// objects), a thousand a request; returns how many there were. An empty
    /// prefix, the whole bucket, is refused.
    pub async fn delete_prefix(&self, prefix: &str) -> Result<usize, ResultStoreError> {
        const OP: &str = "DeleteObjects";
        if prefix.is_empty() {
            return Err(ResultStoreError::Refused {
                op: OP,
                key: String::new(),
                reason: "an empty prefix would delete the whole bucket",
            });
        }
        let objects = self.list(prefix).await?;
        for batch in objects.chunks(DELETE_BATCH) {
            let identifiers = batch
                .iter()
                .map(|o| ObjectIdentifier::builder().key(&o.key).build())
                .collect::<Result<Vec<_>, _>>()
                .and_then(|ids| Delete::builder().set_objects(Some(ids)).quiet(true).build())
                .map_err(|e| ResultStoreError::Config(format!("{OP} of `{prefix}`: {e}")))?;
            let deleted = self
                .s3
                .delete_objects()
                .bucket(&self.bucket)
                .delete(identifiers)
                .send()
                .await
                .map_err(|e| ResultStoreError::from_sdk(OP, prefix, e))?;
            // Quiet mode: only the keys that could not be deleted come back.
            if let Some(first) = deleted.errors().first() {
                return Err(ResultStoreError::NotDeleted {
                    op: OP,
                    key: prefix.to_string(),
                    count: deleted.errors().len(),
                    first: first.key().unwrap_or_default().to_string(),
                    code: first.code().unwrap_or("unknown").to_string(),
                });
            }
        }
        Ok(objects.len())
    }

    /// A presigned GET URL of `key` on the public endpoint, valid for the
    /// configured presign TTL. Signing needs credentials, which the default
    /// chain may have to fetch: hence async.
    pub async fn presign_get(&self, key: &str) -> Result<String, ResultStoreError> {
        let config = PresigningConfig::expires_in(self.presign_ttl)
            .map_err(|e| ResultStoreError::Config(format!("S3_PRESIGN_TTL {:?}: {e}", self.presign_ttl)))?;
        let presigned = self
            .presigner
            .get_object()
            .bucket(&self.bucket)
            .key(key)
            .presigned(config)
            .await
            .map_err(|e| ResultStoreError::from_sdk("presigning GetObject", key, e))?;
        Ok(presigned.uri().to_string())
    }
}
