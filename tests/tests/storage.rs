//! The S3 client against the real S3 server (s3s-fs, which checks request
//! signatures): bucket creation, multipart uploads above the threshold,
//! content types, presigned URLs, and refusal of a wrong secret.

use std::time::Duration;

use common::config::{S3Args, Secret};
use common::result_store::ResultStore;
use e2e_tests::stack::services_env;
use uuid::Uuid;

fn args(bucket: &str, secret: Option<&str>) -> S3Args {
    let env = services_env();
    let get = |k: &str| env.get(k).cloned().unwrap_or_default();
    S3Args {
        s3_endpoint: get("S3_ENDPOINT"),
        s3_public_endpoint: None,
        s3_bucket: bucket.into(),
        aws_region: get("AWS_REGION"),
        aws_access_key_id: Some(Secret(get("AWS_ACCESS_KEY_ID"))),
        aws_secret_access_key: Some(Secret(
            secret
                .map(str::to_string)
                .unwrap_or_else(|| get("AWS_SECRET_ACCESS_KEY")),
        )),
        s3_virtual_host_style: false,
        s3_multipart_threshold: 5 * 1024 * 1024,
        s3_presign_ttl: Duration::from_secs(600),
    }
}

#[tokio::test]
async fn bucket_is_created_and_large_objects_go_up_in_parts() -> anyhow::Result<()> {
    let bucket = format!("e2e-storage-{}", &Uuid::new_v4().simple().to_string()[..10]);
    let store = ResultStore::new(&args(&bucket, None))?;
    store.ensure_bucket().await?;
    store.ensure_bucket().await?; // idempotent

    // 12 MiB of varied bytes: three parts of at most 5 MiB.
    let big: Vec<u8> = (0..12 * 1024 * 1024u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    store.put("jobs/x/grid.png", big.clone(), "image/png").await?;
    let back = store.get("jobs/x/grid.png").await?.expect("stored");
    assert_eq!(back.len(), big.len());
    assert!(back == big, "the multipart object reads back byte for byte");
    assert_eq!(store.head("jobs/x/grid.png").await?.as_deref(), Some("image/png"));

    store.put("jobs/x/0.jpeg", b"small".to_vec(), "image/jpeg").await?;
    assert_eq!(store.head("jobs/x/0.jpeg").await?.as_deref(), Some("image/jpeg"));
    assert_eq!(store.list("jobs/x/").await?.len(), 2);
    assert_eq!(store.get("jobs/x/missing").await?, None);

    // A presigned URL works without credentials; a tampered one does not.
    let url = store.presign_get("jobs/x/0.jpeg");
    assert_eq!(reqwest::get(&url).await?.bytes().await?.as_ref(), b"small");
    let tampered = url.replace("X-Amz-Signature=", "X-Amz-Signature=0");
    assert!(!reqwest::get(&tampered).await?.status().is_success());
    Ok(())
}

#[tokio::test]
async fn a_wrong_secret_is_refused_and_not_retried_as_transient() -> anyhow::Result<()> {
    let store = ResultStore::new(&args("e2e-wrong-secret", Some("not-the-secret")))?;
    let err = store.put("k", b"v".to_vec(), "text/plain").await.unwrap_err();
    assert!(!err.is_transient(), "{err}");
    assert!(err.to_string().contains("403"), "{err}");
    Ok(())
}
