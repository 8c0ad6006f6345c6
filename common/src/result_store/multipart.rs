//! Multipart uploads: create, upload the parts, complete; abort on any
//! failure, so a failed upload leaves no parts behind to pay for.

use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
use bytes::Bytes;

use super::error::ResultStoreError;

/// S3 refuses parts smaller than this (but the last).
pub const MIN_PART_SIZE: usize = 5 * 1024 * 1024;
/// S3 takes at most this many parts per upload.
const MAX_PARTS: usize = 10_000;

/// The part size for `len` bytes: the smallest S3 takes, larger only when
/// the object would need more than 10,000 parts.
pub(super) fn part_size(len: usize) -> usize {
    MIN_PART_SIZE.max(len.div_ceil(MAX_PARTS))
}

/// Stores `body` under `key` in parts of [`part_size`].
pub(super) async fn put(
    s3: &aws_sdk_s3::Client,
    bucket: &str,
    key: &str,
    body: Vec<u8>,
    content_type: &str,
) -> Result<(), ResultStoreError> {
    let created = s3
        .create_multipart_upload()
        .bucket(bucket)
        .key(key)
        .content_type(content_type)
        .send()
        .await
        .map_err(|e| ResultStoreError::from_sdk("CreateMultipartUpload", key, e))?;
    let upload_id = created.upload_id().ok_or_else(|| ResultStoreError::Protocol {
        op: "CreateMultipartUpload",
        key: key.to_string(),
        detail: "no UploadId in the answer".into(),
    })?;
    let result = upload_parts(s3, bucket, key, upload_id, Bytes::from(body)).await;
    if result.is_err() {
        // Best effort: when S3 is down this fails too, and a lifecycle rule
        // (AbortIncompleteMultipartUpload) is what cleans up after us.
        if let Err(e) = s3
            .abort_multipart_upload()
            .bucket(bucket)
            .key(key)
            .upload_id(upload_id)
            .send()
            .await
        {
            let e = ResultStoreError::from_sdk("AbortMultipartUpload", key, e);
            tracing::warn!(error = %e, key, upload_id, "could not abort a failed multipart upload");
        }
    }
    result
}

async fn upload_parts(
    s3: &aws_sdk_s3::Client,
    bucket: &str,
    key: &str,
    upload_id: &str,
    body: Bytes,
) -> Result<(), ResultStoreError> {
    let size = part_size(body.len());
    let mut parts = Vec::with_capacity(body.len().div_ceil(size));
    for (index, start) in (0..body.len()).step_by(size).enumerate() {
        // At most MAX_PARTS, so the number fits.
        let number = i32::try_from(index + 1).unwrap_or(i32::MAX);
        // A `Bytes` slice, not a copy; the SDK can resend it on a retry.
        let part = body.slice(start..(start + size).min(body.len()));
        let uploaded = s3
            .upload_part()
            .bucket(bucket)
            .key(key)
            .upload_id(upload_id)
            .part_number(number)
            .body(ByteStream::from(part))
            .send()
            .await
            .map_err(|e| ResultStoreError::from_sdk("UploadPart", key, e))?;
        let etag = uploaded.e_tag().ok_or_else(|| ResultStoreError::Protocol {
            op: "UploadPart",
            key: key.to_string(),
            detail: format!("no ETag in the answer for part {number}"),
        })?;
        parts.push(CompletedPart::builder().part_number(number).e_tag(etag).build());
    }
    s3.complete_multipart_upload()
        .bucket(bucket)
        .key(key)
        .upload_id(upload_id)
        .multipart_upload(CompletedMultipartUpload::builder().set_parts(Some(parts)).build())
        .send()
        .await
        .map_err(|e| ResultStoreError::from_sdk("CompleteMultipartUpload", key, e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_are_the_smallest_s3_takes_unless_there_would_be_too_many() {
        assert_eq!(part_size(12 * 1024 * 1024), MIN_PART_SIZE);
        assert_eq!(part_size(MIN_PART_SIZE * MAX_PARTS), MIN_PART_SIZE);
        let huge = MIN_PART_SIZE * MAX_PARTS + 1;
        assert!(part_size(huge) > MIN_PART_SIZE);
        assert!(huge.div_ceil(part_size(huge)) <= MAX_PARTS);
    }
}
