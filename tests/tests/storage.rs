//! The S3 client against the real S3 server (s3s-fs, which checks request
//! signatures): bucket creation, multipart uploads above the threshold,
//! content types, listing across pages, stat and deletes (one key, a
//! prefix), presigned URLs (on the public endpoint too), refusal of a wrong
//! secret, a quick transient error from a server that is down, and the
//! default credential chain when no keys are given.

use std::time::Duration;

use common::config::{S3Args, Secret};
use common::result_store::ResultStore;
use e2e_tests::stack::services_env;
use futures_util::StreamExt;
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
        aws_session_token: None,
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
    let url = store.presign_get("jobs/x/0.jpeg").await?;
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

/// A store on the test's own bucket, created.
async fn fresh_store(test: &str) -> anyhow::Result<ResultStore> {
    let bucket = format!("e2e-{test}-{}", &Uuid::new_v4().simple().to_string()[..10]);
    let store = ResultStore::new(&args(&bucket, None))?;
    store.ensure_bucket().await?;
    Ok(store)
}

#[tokio::test]
async fn objects_are_listed_across_pages_statted_and_deleted() -> anyhow::Result<()> {
    let store = fresh_store("objects").await?;
    // More than one ListObjectsV2 page (1,000 keys) and one DeleteObjects batch.
    let keys: Vec<String> = (0..1005).map(|i| format!("jobs/many/{i:04}.png")).collect();
    let uploads = futures_util::stream::iter(keys.iter().map(|key| {
        let store = &store;
        async move { store.put(key, key.as_bytes().to_vec(), "image/png").await }
    }))
    .buffer_unordered(16)
    .collect::<Vec<_>>()
    .await;
    uploads.into_iter().collect::<Result<Vec<_>, _>>()?;
    store
        .put("jobs/other/result.json", b"{}".to_vec(), "application/json")
        .await?;

    let started = chrono::Utc::now() - chrono::Duration::minutes(5);
    let listed = store.list("jobs/many/").await?;
    let mut names: Vec<&str> = listed.iter().map(|o| o.key.as_str()).collect();
    names.sort_unstable();
    names.dedup();
    assert_eq!(
        names,
        keys.iter().map(String::as_str).collect::<Vec<_>>(),
        "every key, once"
    );
    for object in &listed {
        assert_eq!(object.size, object.key.len() as u64, "{object:?}");
        assert!(object.last_modified.is_some_and(|t| t > started), "{object:?}");
    }

    let info = store.stat("jobs/many/0007.png").await?.expect("stored");
    assert_eq!((info.key.as_str(), info.size), ("jobs/many/0007.png", 18));
    assert!(info.last_modified.is_some_and(|t| t > started), "{info:?}");
    assert_eq!(store.stat("jobs/many/missing.png").await?, None);

    store.delete("jobs/many/0007.png").await?;
    assert_eq!(store.stat("jobs/many/0007.png").await?, None);
    assert_eq!(store.get("jobs/many/0007.png").await?, None);
    store.delete("jobs/many/0007.png").await?; // already gone: no error

    assert_eq!(store.delete_prefix("jobs/many/").await?, 1004);
    assert!(store.list("jobs/many/").await?.is_empty());
    assert_eq!(store.list("jobs/other/").await?.len(), 1, "another prefix is untouched");
    assert_eq!(store.delete_prefix("jobs/many/").await?, 0);
    let refused = store.delete_prefix("").await.unwrap_err();
    assert!(!refused.is_transient(), "{refused}");
    assert_eq!(store.list("").await?.len(), 1, "an empty prefix deletes nothing");
    Ok(())
}

#[tokio::test]
async fn presigned_urls_name_the_public_endpoint_and_still_validate() -> anyhow::Result<()> {
    let internal = services_env().get("S3_ENDPOINT").cloned().unwrap_or_default();
    // The same server under another name, as a browser outside compose reaches it.
    let public = internal.replace("127.0.0.1", "localhost");
    assert_ne!(public, internal, "S3_ENDPOINT is {internal}");
    let bucket = format!("e2e-public-{}", &Uuid::new_v4().simple().to_string()[..10]);
    let mut s3 = args(&bucket, None);
    s3.s3_public_endpoint = Some(public.clone());
    let store = ResultStore::new(&s3)?;
    store.ensure_bucket().await?;
    store
        .put("jobs/y/grid.png", b"public bytes".to_vec(), "image/png")
        .await?;

    let url = store.presign_get("jobs/y/grid.png").await?;
    assert!(url.starts_with(&format!("{public}/{bucket}/jobs/y/grid.png?")), "{url}");
    assert!(url.contains("X-Amz-Expires=600"), "the presign TTL: {url}");
    let response = reqwest::get(&url).await?;
    assert!(response.status().is_success(), "{}", response.status());
    assert_eq!(response.bytes().await?.as_ref(), b"public bytes");
    Ok(())
}

#[tokio::test]
async fn an_unreachable_server_is_a_quick_transient_error() -> anyhow::Result<()> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let mut s3 = args("e2e-unreachable", None);
    s3.s3_endpoint = format!("http://127.0.0.1:{port}");
    let store = ResultStore::new(&s3)?;
    let start = std::time::Instant::now();
    let err = store.put("k", b"v".to_vec(), "text/plain").await.unwrap_err();
    assert!(err.is_transient(), "{err}");
    let err = store.get("k").await.unwrap_err();
    assert!(err.is_transient(), "{err}");
    // The SDK's few quick retries, not a hang: the worker's window does the waiting.
    assert!(start.elapsed() < Duration::from_secs(5), "{:?}", start.elapsed());
    Ok(())
}

/// Set in the child process of the credential-chain test: which case it runs.
const CHAIN_CASE: &str = "E2E_STORAGE_CHAIN_CASE";
const CHAIN_TEST: &str = "without_keys_the_default_credential_chain_is_used";

/// The chain reads the process environment, so each case runs in a child
/// process of this test binary with an environment of its own.
#[tokio::test]
async fn without_keys_the_default_credential_chain_is_used() -> anyhow::Result<()> {
    if let Ok(case) = std::env::var(CHAIN_CASE) {
        return chain_case(&case).await;
    }
    let env = services_env();
    let get = |k: &str| env.get(k).cloned().unwrap_or_default();
    let dir = tempfile::tempdir()?;
    let profile = |name: &str, secret: &str| -> anyhow::Result<std::path::PathBuf> {
        let path = dir.path().join(name);
        std::fs::write(
            &path,
            format!(
                "[default]\naws_access_key_id = {}\naws_secret_access_key = {secret}\n",
                get("AWS_ACCESS_KEY_ID")
            ),
        )?;
        Ok(path)
    };
    let good = profile("good", &get("AWS_SECRET_ACCESS_KEY"))?;
    let wrong = profile("wrong", "not-the-secret")?;
    let empty = dir.path().join("empty");
    std::fs::write(&empty, "")?;
    for (case, credentials) in [("profile", &good), ("wrong", &wrong), ("none", &empty)] {
        let mut child = std::process::Command::new(std::env::current_exe()?);
        child
            .args(["--exact", CHAIN_TEST, "--nocapture", "--test-threads=1"])
            .env(CHAIN_CASE, case)
            .env("S3_ENDPOINT", get("S3_ENDPOINT"))
            .env("AWS_REGION", get("AWS_REGION"))
            .env("AWS_SHARED_CREDENTIALS_FILE", credentials)
            .env("AWS_CONFIG_FILE", &empty)
            // Never ask a metadata address: only loopback is ours.
            .env("AWS_EC2_METADATA_DISABLED", "true");
        for unset in [
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
            "AWS_SESSION_TOKEN",
            "AWS_PROFILE",
            "AWS_ROLE_ARN",
            "AWS_WEB_IDENTITY_TOKEN_FILE",
            "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
            "AWS_CONTAINER_CREDENTIALS_FULL_URI",
        ] {
            child.env_remove(unset);
        }
        let out = child.output()?;
        anyhow::ensure!(
            out.status.success(),
            "case {case}: {}\n{}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        anyhow::ensure!(stdout.contains("1 passed"), "case {case} ran no test:\n{stdout}");
    }
    Ok(())
}

/// One case of the chain test, in the child: no keys in `S3Args`.
async fn chain_case(case: &str) -> anyhow::Result<()> {
    let var = |k: &str| std::env::var(k).unwrap_or_default();
    let s3 = S3Args {
        s3_endpoint: var("S3_ENDPOINT"),
        s3_public_endpoint: None,
        s3_bucket: format!("e2e-chain-{}", &Uuid::new_v4().simple().to_string()[..10]),
        aws_region: var("AWS_REGION"),
        aws_access_key_id: None,
        aws_secret_access_key: None,
        aws_session_token: None,
        s3_virtual_host_style: false,
        s3_multipart_threshold: 8 * 1024 * 1024,
        s3_presign_ttl: Duration::from_secs(60),
    };
    let store = ResultStore::new(&s3)?;
    match case {
        // s3s-fs checks the signature: the profile's keys signed it.
        "profile" => {
            store.ensure_bucket().await?;
            store.put("k", b"from the profile".to_vec(), "text/plain").await?;
            assert_eq!(store.get("k").await?.as_deref(), Some(&b"from the profile"[..]));
            let url = store.presign_get("k").await?;
            assert_eq!(reqwest::get(&url).await?.bytes().await?.as_ref(), b"from the profile");
        }
        "wrong" => {
            let err = store.put("k", b"v".to_vec(), "text/plain").await.unwrap_err();
            assert!(!err.is_transient() && err.to_string().contains("403"), "{err}");
        }
        "none" => {
            let err = store.put("k", b"v".to_vec(), "text/plain").await.unwrap_err();
            assert!(!err.is_transient(), "no credentials anywhere is not transient: {err}");
            assert!(err.to_string().contains("credentials"), "{err}");
        }
        other => anyhow::bail!("unknown case {other}"),
    }
    Ok(())
}
