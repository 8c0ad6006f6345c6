//! Property-based fuzzing (proptest) of what reads untrusted bytes: the
//! request parser and validator (`JobRequest::from_json` then `validate`,
//! what the dispatcher runs on every HTTP body) and the queue-message decoder
//! (`decode_message`, what the worker runs on every delivery).
//!
//! Inputs: arbitrary bytes, arbitrary JSON values, near-valid requests whose
//! every field is drawn from in-range, boundary, out-of-range, wrong-type,
//! null and malformed values (each labelled, so the test knows the verdict in
//! advance), valid messages with bytes flipped, cut or inserted, and valid
//! envelopes around arbitrary requests. Properties: nothing panics; every
//! rejection is an error with a message and a field (or job id) it names; an
//! accepted request keeps every limit that `GET /v1/limits` publishes; the
//! worker accepts exactly what the dispatcher accepts; a published message
//! decodes to itself.
//!
//! Bounded for CI: `PROPTEST_CASES` cases per property (default
//! [`DEFAULT_CASES`]); each property prints how many it ran.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicUsize, Ordering};

use chrono::{DateTime, Utc};
use common::queue::{decode_message, DecodeError, JobMessage};
use common::rules::{validate, JobLora, ValidJob, ValidationError};
use common::rules::{IntegerLimit, RequestLimits};
use common::rules::{JobRequest, OutputFormat, Scheduler, WebhookEvent};

mod requests;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use requests::*;
use serde_json::Value;
use uuid::Uuid;

/// Cases per property when `PROPTEST_CASES` is unset: the whole file runs in
/// about ten seconds in a debug build on two cores.
const DEFAULT_CASES: u32 = 10_000;

/// The fields of a request, as the parser and `ValidationError::field` name them.
const FIELDS: [&str; 12] = [
    "prompt",
    "negative_prompt",
    "num_inference_steps",
    "width",
    "height",
    "guidance_scale",
    "scheduler",
    "seed",
    "num_images",
    "preview_every",
    "output_format",
    "priority",
];

/// Runs `test` on `cases()` inputs of `strategy`, then prints the count.
fn fuzz<S: Strategy>(name: &str, strategy: S, test: impl Fn(S::Value) -> Result<(), TestCaseError>) {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(DEFAULT_CASES);
    let mut runner = TestRunner::new(Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    });
    let ran = AtomicUsize::new(0);
    let result = runner.run(&strategy, |input| {
        ran.fetch_add(1, Ordering::Relaxed);
        test(input)
    });
    if let Err(e) = result {
        panic!("{name}: {e}");
    }
    println!(
        "fuzz {name}: {cases} cases passed ({} runs)",
        ran.load(Ordering::Relaxed)
    );
}

// --- what every answer must look like --------------------------------------

/// A rejection is clean: it says something, and names a field of the
/// request (a known one, the body as a whole, or the unknown key it refuses).
fn check_rejection(e: &ValidationError, keys: &BTreeSet<String>) -> Result<(), TestCaseError> {
    prop_assert!(!e.to_string().trim().is_empty(), "empty message: {e:?}");
    let field = e.field();
    let named = FIELDS.contains(&field)
        || field == "body"
        || matches!(e, ValidationError::UnknownField(k) if keys.contains(k) && !FIELDS.contains(&k.as_str()));
    prop_assert!(named, "`{field}` is no field of the request ({e})");
    Ok(())
}

fn within(limit: &IntegerLimit, value: u64) -> bool {
    (limit.min..=limit.max).contains(&value) && limit.multiple_of.is_none_or(|m| value.is_multiple_of(m))
}

/// An accepted request keeps every published limit.
fn check_accepted(job: &ValidJob) -> Result<(), TestCaseError> {
    let l = RequestLimits::current();
    let prompt = job.prompt.chars().count();
    prop_assert!(
        (l.prompt.min_chars..=l.prompt.max_chars).contains(&prompt),
        "prompt {prompt}"
    );
    let negative = job.negative_prompt.chars().count();
    prop_assert!(
        (l.negative_prompt.min_chars..=l.negative_prompt.max_chars).contains(&negative),
        "negative_prompt {negative}"
    );
    prop_assert!(
        within(&l.num_inference_steps, job.num_inference_steps.into()),
        "{job:?}"
    );
    prop_assert!(within(&l.width, job.width.into()), "{job:?}");
    prop_assert!(within(&l.height, job.height.into()), "{job:?}");
    prop_assert!(
        (l.guidance_scale.min..=l.guidance_scale.max).contains(&job.guidance_scale),
        "{job:?}"
    );
    prop_assert!(
        job.num_images.is_none_or(|n| within(&l.num_images, n.into())),
        "{job:?}"
    );
    prop_assert!(within(&l.preview_every, job.preview_every.into()), "{job:?}");
    prop_assert!(within(&l.priority, job.priority.into()), "{job:?}");
    prop_assert!(
        l.output_format.one_of.contains(&job.output_format.extension()),
        "{job:?}"
    );
    prop_assert!(l.scheduler.one_of.contains(&job.scheduler.name()), "{job:?}");
    Ok(())
}

/// The keys of a JSON object body (empty for anything else).
fn keys_of(body: &[u8]) -> BTreeSet<String> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(map)) => map.keys().cloned().collect(),
        _ => BTreeSet::new(),
    }
}

/// What the dispatcher does with a body: parse, then validate.
fn parse_and_validate(body: &[u8]) -> Result<ValidJob, ValidationError> {
    let request = JobRequest::from_json(body)?;
    validate(&request, || 7)
}

/// Any body: no panic, and a clean answer either way.
fn check_body(body: &[u8]) -> Result<Result<ValidJob, ValidationError>, TestCaseError> {
    let outcome = parse_and_validate(body);
    match &outcome {
        Ok(job) => check_accepted(job)?,
        Err(e) => check_rejection(e, &keys_of(body))?,
    }
    Ok(outcome)
}

/// A decode error is clean: it says something, and the id it names is the
/// one the payload really carries.
fn check_decode_error(e: &DecodeError, payload: &[u8]) -> Result<(), TestCaseError> {
    prop_assert!(!e.reason.trim().is_empty(), "empty reason: {e:?}");
    prop_assert!(!e.to_string().trim().is_empty());
    if let Some(id) = e.id {
        // The id may be read from a payload that is not valid JSON as a whole
        // (serde skips the other fields without checking all of them), and
        // in any form `Uuid` parses: it must be there in the bytes.
        let text = String::from_utf8_lossy(payload).to_lowercase();
        prop_assert!(
            text.contains(&id.hyphenated().to_string()) || text.contains(&id.simple().to_string()),
            "the error names job {id}, which the payload does not carry"
        );
    }
    Ok(())
}

fn check_payload(payload: &[u8]) -> Result<Result<JobMessage<ValidJob>, DecodeError>, TestCaseError> {
    let outcome = decode_message(payload);
    match &outcome {
        Ok(message) => check_accepted(&message.request)?,
        Err(e) => check_decode_error(e, payload)?,
    }
    Ok(outcome)
}

// --- arbitrary JSON ---------------------------------------------------------

fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_filter_map("finite", |f| serde_json::Number::from_f64(f).map(Value::Number)),
        (-1e3f64..1e3).prop_map(Value::from),
        (0i64..3000).prop_map(Value::from),
        "\\PC{0,20}".prop_map(Value::String),
        any::<String>().prop_map(Value::String),
        prop::sample::select(vec!["png", "jpeg", "webp"]).prop_map(Value::from),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(key(), inner, 0..6).prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Mostly the request's own field names, so that values reach validation.
fn key() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => prop::sample::select(FIELDS.to_vec()).prop_map(String::from),
        1 => "\\PC{0,12}",
    ]
}

/// A JSON object with the request's keys and arbitrary values, or any JSON.
fn any_request() -> impl Strategy<Value = Value> {
    prop_oneof![
        3 => prop::collection::btree_map(key(), any_json(), 0..12).prop_map(|m| Value::Object(m.into_iter().collect())),
        1 => any_json(),
    ]
}

// --- messages ---------------------------------------------------------------

fn any_valid_job() -> impl Strategy<Value = ValidJob> {
    (
        (
            "\\PC{1,60}",
            "\\PC{0,30}",
            1u32..=100,
            32u32..=256,
            32u32..=256,
            0.0f64..=30.0,
        ),
        (
            any::<u64>(),
            prop::option::of(1u32..=16),
            0u32..=100,
            prop::sample::select(OutputFormat::ALL.to_vec()),
            0u8..=9,
            prop::sample::select(Scheduler::ALL.to_vec()),
        ),
        prop::collection::vec(("[A-Za-z0-9_-]{1,20}", -4.0f64..=4.0), 0..=4),
        prop::option::of((
            "[a-z0-9]{1,12}",
            prop::sample::subsequence(WebhookEvent::ALL.to_vec(), 1..=4),
        )),
    )
        .prop_map(
            |(
                (prompt, negative_prompt, steps, w, h, guidance_scale),
                (seed, num_images, preview_every, output_format, priority, scheduler),
                loras,
                webhook,
            )| {
                ValidJob {
                    prompt,
                    negative_prompt,
                    num_inference_steps: steps,
                    width: w * 8,
                    height: h * 8,
                    guidance_scale,
                    scheduler,
                    seed,
                    num_images,
                    preview_every,
                    output_format,
                    priority,
                    image: None,
                    mask: None,
                    strength: None,
                    // Numbered, so that no name comes twice.
                    loras: loras
                        .into_iter()
                        .enumerate()
                        .map(|(i, (name, scale))| JobLora {
                            name: format!("{i}{name}"),
                            scale,
                            sha256: None,
                        })
                        .collect(),
                    // Sorted and each once, as validation makes them.
                    webhook_url: webhook
                        .as_ref()
                        .map(|(host, _)| format!("https://{host}.example/hook?job=1")),
                    webhook_events: webhook.map(|(_, events)| events).unwrap_or_default(),
                }
            },
        )
}

fn any_created_at() -> impl Strategy<Value = DateTime<Utc>> {
    (0i64..4_102_444_800, 0u32..1_000_000_000).prop_map(|(s, n)| DateTime::from_timestamp(s, n).unwrap())
}

fn any_message() -> impl Strategy<Value = JobMessage<ValidJob>> {
    (
        any::<u128>(),
        any_created_at(),
        any_valid_job(),
        prop::option::of("[a-z0-9._@-]{1,12}"),
    )
        .prop_map(|(id, created_at, request, owner)| JobMessage {
            id: Uuid::from_u128(id),
            created_at,
            request,
            owner,
        })
}

/// One edit of a payload's bytes.
#[derive(Debug, Clone)]
enum Mutation {
    Flip { at: prop::sample::Index, bit: u8 },
    Set { at: prop::sample::Index, byte: u8 },
    Truncate { at: prop::sample::Index },
    Remove { at: prop::sample::Index, len: usize },
    Insert { at: prop::sample::Index, bytes: Vec<u8> },
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let at = any::<prop::sample::Index>();
    prop_oneof![
        (at.clone(), 0u8..8).prop_map(|(at, bit)| Mutation::Flip { at, bit }),
        (
            at.clone(),
            prop_oneof![any::<u8>(), prop::sample::select(b"{}[]\",:0-9en\\ ".to_vec())]
        )
            .prop_map(|(at, byte)| Mutation::Set { at, byte }),
        at.clone().prop_map(|at| Mutation::Truncate { at }),
        (at.clone(), 1usize..16).prop_map(|(at, len)| Mutation::Remove { at, len }),
        (at, prop::collection::vec(any::<u8>(), 1..8)).prop_map(|(at, bytes)| Mutation::Insert { at, bytes }),
    ]
}

fn mutate(mut bytes: Vec<u8>, mutations: &[Mutation]) -> Vec<u8> {
    for m in mutations {
        if bytes.is_empty() {
            break;
        }
        match m {
            Mutation::Flip { at, bit } => {
                let i = at.index(bytes.len());
                bytes[i] ^= 1 << bit;
            }
            Mutation::Set { at, byte } => {
                let i = at.index(bytes.len());
                bytes[i] = *byte;
            }
            Mutation::Truncate { at } => bytes.truncate(at.index(bytes.len())),
            Mutation::Remove { at, len } => {
                let i = at.index(bytes.len());
                let end = (i + len).min(bytes.len());
                bytes.drain(i..end);
            }
            Mutation::Insert { at, bytes: new } => {
                let i = at.index(bytes.len() + 1);
                bytes.splice(i..i, new.iter().copied());
            }
        }
    }
    bytes
}

fn envelope(id: Uuid, request: &str) -> String {
    format!(r#"{{"id":"{id}","created_at":"2026-11-24T12:00:00Z","request":{request}}}"#)
}

/// The worker's decoder and the dispatcher's parser give the same verdict,
/// with the same message, on the request inside a well-formed envelope.
fn check_envelope(id: Uuid, request: &str) -> Result<(), TestCaseError> {
    let payload = envelope(id, request);
    let decoded = check_payload(payload.as_bytes())?;
    let parsed = parse_and_validate(request.as_bytes());
    match (decoded, parsed) {
        (Ok(message), Ok(mut job)) => {
            prop_assert_eq!(message.id, id);
            // A request without a seed gets one drawn on each side.
            if JobRequest::from_json(request.as_bytes()).is_ok_and(|r| r.seed.is_none()) {
                job.seed = message.request.seed;
            }
            prop_assert_eq!(message.request, job);
        }
        (Err(e), Err(v)) => {
            if let ValidationError::Malformed(_) = v {
                // Not JSON: the envelope is not JSON either, though its id
                // may still be readable.
                prop_assert!(e.id.is_none_or(|i| i == id), "{}", e);
            } else {
                prop_assert_eq!(e.id, Some(id), "{}", e);
                prop_assert_eq!(e.reason, v.to_string());
            }
        }
        (Ok(m), Err(v)) => prop_assert!(false, "the worker accepts what the dispatcher refuses ({v}): {m:?}"),
        (Err(e), Ok(j)) => prop_assert!(false, "the worker refuses what the dispatcher accepts ({e}): {j:?}"),
    }
    Ok(())
}

// --- the properties ---------------------------------------------------------

#[test]
fn request_parser_on_arbitrary_bytes() {
    fuzz(
        "request parser, arbitrary bytes",
        prop::collection::vec(any::<u8>(), 0..256),
        |bytes| check_body(&bytes).map(|_| ()),
    );
}

#[test]
fn request_parser_on_arbitrary_json() {
    fuzz("request parser, arbitrary JSON", any_request(), |value| {
        check_body(&serde_json::to_vec(&value).unwrap()).map(|_| ())
    });
}

#[test]
fn request_parser_on_near_valid_requests() {
    let accepted = AtomicUsize::new(0);
    fuzz("request parser, near-valid requests", near_valid(), |case| {
        check_near_valid(&case)?;
        if case.refused.as_ref().is_some_and(BTreeSet::is_empty) {
            accepted.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    });
    let accepted = accepted.load(Ordering::Relaxed);
    println!("  of which {accepted} were valid requests (accepted)");
    assert!(accepted > 0, "the strategy made no valid request");
}

#[test]
fn request_parser_on_mutated_near_valid_bodies() {
    fuzz(
        "request parser, mutated near-valid bodies",
        (near_valid(), prop::collection::vec(mutation(), 1..4)),
        |(case, mutations)| check_body(&mutate(case.body.into_bytes(), &mutations)).map(|_| ()),
    );
}

#[test]
fn message_decoder_on_arbitrary_bytes() {
    fuzz(
        "message decoder, arbitrary bytes",
        prop::collection::vec(any::<u8>(), 0..256),
        |bytes| check_payload(&bytes).map(|_| ()),
    );
}

#[test]
fn message_decoder_on_mutated_messages() {
    fuzz(
        "message decoder, mutated valid messages",
        (any_message(), prop::collection::vec(mutation(), 1..4)),
        |(message, mutations)| check_payload(&mutate(serde_json::to_vec(&message).unwrap(), &mutations)).map(|_| ()),
    );
}

#[test]
fn message_decoder_agrees_with_the_request_parser() {
    fuzz(
        "message decoder, envelopes around arbitrary and near-valid requests",
        (
            any::<u128>(),
            prop_oneof![
                any_request().prop_map(|v| serde_json::to_string(&v).unwrap()),
                near_valid().prop_map(|c| c.body),
            ],
        ),
        |(id, request)| check_envelope(Uuid::from_u128(id), &request),
    );
}

#[test]
fn message_decoder_round_trips_published_messages() {
    fuzz("message decoder, round trip", any_message(), |message| {
        let payload = serde_json::to_vec(&message).unwrap();
        let decoded = decode_message(&payload).map_err(|e| TestCaseError::fail(format!("{e}")))?;
        prop_assert_eq!(decoded.id, message.id);
        prop_assert_eq!(decoded.created_at, message.created_at);
        prop_assert_eq!(decoded.request, message.request);
        prop_assert_eq!(decoded.owner, message.owner);
        Ok(())
    });
}
