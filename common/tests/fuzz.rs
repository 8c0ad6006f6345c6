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
use common::rules::{validate, ValidJob, ValidationError};
use common::rules::{IntegerLimit, RequestLimits};
use common::rules::{JobRequest, OutputFormat};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use serde_json::Value;
use uuid::Uuid;

/// Cases per property when `PROPTEST_CASES` is unset: the whole file runs in
/// about ten seconds in a debug build on two cores.
const DEFAULT_CASES: u32 = 10_000;

/// The fields of a request, as the parser and `ValidationError::field` name them.
const FIELDS: [&str; 11] = [
    "prompt",
    "negative_prompt",
    "num_inference_steps",
    "width",
    "height",
    "guidance_scale",
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

// --- near-valid requests, each field labelled -------------------------------

/// What a field's value should get from the parser and the validator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Valid,
    /// Refused, naming this field.
    Invalid,
    /// Not JSON: the whole body is refused.
    Malformed,
}

/// A field's JSON text and its verdict.
#[derive(Debug, Clone)]
struct Fragment {
    text: String,
    verdict: Verdict,
}

fn fragment(text: impl Into<String>, verdict: Verdict) -> Fragment {
    Fragment {
        text: text.into(),
        verdict,
    }
}

fn json_string(s: &str) -> String {
    serde_json::to_string(s).unwrap()
}

/// Values of a wrong JSON type for a numeric field (or numbers no i64 holds).
fn wrong_number() -> BoxedStrategy<Fragment> {
    prop::sample::select(vec![
        "\"12\"",
        "\"\"",
        "true",
        "false",
        "[]",
        "{}",
        "[256]",
        "{\"value\":256}",
        "256.5",
        "256.0",
        "1e2",
        "-0.5",
        "9223372036854775808",
        "18446744073709551615",
        "-9223372036854775809",
        "18446744073709551616",
    ])
    .prop_map(|t| fragment(t, Verdict::Invalid))
    .boxed()
}

/// Values of a wrong JSON type for a text field.
fn wrong_text() -> BoxedStrategy<Fragment> {
    prop::sample::select(vec![
        "0",
        "12",
        "-1",
        "1.5",
        "true",
        "false",
        "[]",
        "[\"a\"]",
        "{}",
        "{\"text\":\"a\"}",
    ])
    .prop_map(|t| fragment(t, Verdict::Invalid))
    .boxed()
}

/// Not JSON at all (the whole body is malformed).
fn malformed() -> BoxedStrategy<Fragment> {
    prop::sample::select(vec![
        "NaN",
        "Infinity",
        "-Infinity",
        "1e400",
        "\"open",
        "tru",
        "nul",
        "-",
        "01",
        "1.",
        ".5",
        "+1",
        "[1,",
        "{\"a\"}",
        "'x'",
        "\"\\u12\"",
    ])
    .prop_map(|t| fragment(t, Verdict::Malformed))
    .boxed()
}

fn null() -> BoxedStrategy<Fragment> {
    Just(fragment("null", Verdict::Valid)).boxed()
}

/// An integer field with bounds `lo..=hi` and step `multiple`.
fn integer(lo: i64, hi: i64, multiple: i64) -> BoxedStrategy<Fragment> {
    let valid = prop_oneof![
        Just(lo),
        Just(hi),
        (lo..=hi).prop_map(move |v| (v - v.rem_euclid(multiple)).max(lo)),
    ]
    .prop_map(|v| fragment(v.to_string(), Verdict::Valid));
    let outside = prop_oneof![
        prop::sample::select(vec![
            lo - multiple,
            hi + multiple,
            lo - 1,
            hi + 1,
            i64::MIN,
            i64::MAX,
            0,
            -1
        ]),
        i64::MIN..lo,
        (hi + 1)..=i64::MAX,
    ]
    .prop_filter("outside the range", move |v| !(lo..=hi).contains(v));
    let off_step = if multiple > 1 {
        // Inside the range, not on the step.
        ((lo / multiple)..(hi / multiple), 1..multiple)
            .prop_map(move |(k, r)| k * multiple + r)
            .boxed()
    } else {
        outside.clone().boxed()
    };
    let invalid = prop_oneof![outside, off_step].prop_map(|v| fragment(v.to_string(), Verdict::Invalid));
    prop_oneof![
        10 => valid,
        1 => null(),
        3 => invalid,
        1 => wrong_number(),
        1 => malformed(),
    ]
    .boxed()
}

fn guidance_scale() -> BoxedStrategy<Fragment> {
    let valid = prop_oneof![
        prop::sample::select(vec!["0", "30", "0.0", "30.0", "1e1", "5", "7.5", "0.5e1"]).prop_map(String::from),
        (0.0f64..=30.0).prop_map(|g| serde_json::to_string(&g).unwrap()),
    ]
    .prop_map(|t| fragment(t, Verdict::Valid));
    let invalid = prop_oneof![
        prop::sample::select(vec!["-0.01", "30.01", "31", "-1", "1e300", "-1e300", "1e19"]).prop_map(String::from),
        (30.001f64..1e12).prop_map(|g| serde_json::to_string(&g).unwrap()),
        (-1e12f64..-0.001).prop_map(|g| serde_json::to_string(&g).unwrap()),
    ]
    .prop_map(|t| fragment(t, Verdict::Invalid));
    let wrong =
        prop::sample::select(vec!["\"5\"", "true", "[]", "{}", "\"\""]).prop_map(|t| fragment(t, Verdict::Invalid));
    prop_oneof![10 => valid, 1 => null(), 3 => invalid, 1 => wrong, 1 => malformed()].boxed()
}

fn seed() -> BoxedStrategy<Fragment> {
    let valid = prop_oneof![Just(0u64), Just(u64::MAX), Just(i64::MAX as u64 + 1), any::<u64>()]
        .prop_map(|s| fragment(s.to_string(), Verdict::Valid));
    let invalid = prop::sample::select(vec![
        "-1",
        "1.5",
        "7.0",
        "\"7\"",
        "true",
        "[]",
        "18446744073709551616",
        "-9223372036854775808",
    ])
    .prop_map(|t| fragment(t, Verdict::Invalid));
    prop_oneof![10 => valid, 1 => null(), 3 => invalid, 1 => malformed()].boxed()
}

fn prompt() -> BoxedStrategy<Fragment> {
    let valid = prop_oneof![
        "\\PC{1,40}",
        Just("a".to_string()),
        Just("é".repeat(2000)),
        Just("x".repeat(2000)),
        Just("\u{0}\n\t\u{1F600}".to_string()),
    ]
    .prop_map(|s| fragment(json_string(&s), Verdict::Valid));
    let invalid = prop_oneof![
        Just(String::new()),
        Just("x".repeat(2001)),
        Just("é".repeat(2001)),
        "\\PC{2001,2010}",
    ]
    .prop_map(|s| fragment(json_string(&s), Verdict::Invalid));
    // `null` means "not given", and the prompt is required.
    let missing = Just(fragment("null", Verdict::Invalid));
    prop_oneof![10 => valid, 3 => invalid, 1 => missing, 1 => wrong_text(), 1 => malformed()].boxed()
}

fn negative_prompt() -> BoxedStrategy<Fragment> {
    let valid = prop_oneof!["\\PC{0,40}", Just(String::new()), Just("é".repeat(2000)),]
        .prop_map(|s| fragment(json_string(&s), Verdict::Valid));
    let invalid = prop_oneof![Just("x".repeat(2001)), Just("😀".repeat(2001))]
        .prop_map(|s| fragment(json_string(&s), Verdict::Invalid));
    prop_oneof![10 => valid, 1 => null(), 2 => invalid, 1 => wrong_text(), 1 => malformed()].boxed()
}

fn output_format() -> BoxedStrategy<Fragment> {
    let valid = prop::sample::select(OutputFormat::ALL.to_vec())
        .prop_map(|f| fragment(json_string(f.extension()), Verdict::Valid));
    let invalid = prop_oneof![
        prop::sample::select(vec!["PNG", "gif", "", "jpg", "png ", " webp", "jpeg\u{0}"]).prop_map(String::from),
        "\\PC{0,12}".prop_filter("not a format", |s| s.parse::<OutputFormat>().is_err()),
    ]
    .prop_map(|s| fragment(json_string(&s), Verdict::Invalid));
    prop_oneof![10 => valid, 1 => null(), 3 => invalid, 1 => wrong_text(), 1 => malformed()].boxed()
}

/// A near-valid request: the body, and the fields that must be refused (or
/// `None` when the body is not JSON). An empty set means it must pass.
#[derive(Debug, Clone)]
struct NearValid {
    body: String,
    refused: Option<BTreeSet<String>>,
}

fn near_valid() -> impl Strategy<Value = NearValid> {
    // Each optional field is left out half the time (left out is valid: the
    // default), so that about a fifth of the requests pass.
    let optional = |s: BoxedStrategy<Fragment>| prop::option::of(s);
    let fields = (
        prop::option::weighted(0.95, prompt()),
        optional(negative_prompt()),
        optional(integer(1, 100, 1)),
        optional(integer(256, 2048, 8)),
        optional(integer(256, 2048, 8)),
        optional(guidance_scale()),
        optional(seed()),
        optional(integer(1, 16, 1)),
        optional(integer(0, 100, 1)),
        optional(output_format()),
        optional(integer(0, 9, 1)),
    );
    let unknown = prop::option::weighted(
        0.1,
        prop_oneof![
            prop::sample::select(vec!["steps", "model", "Prompt", "width ", "", "seed2", "__proto__"])
                .prop_map(String::from),
            "[a-z_]{1,12}".prop_filter("unknown", |k| !FIELDS.contains(&k.as_str())),
        ],
    );
    (fields, unknown).prop_flat_map(|((p, n, st, w, h, g, se, ni, pe, of, pr), unknown)| {
        let mut entries: Vec<(String, Fragment)> = [p, n, st, w, h, g, se, ni, pe, of, pr]
            .into_iter()
            .zip(FIELDS)
            .filter_map(|(f, key)| f.map(|f| (key.to_string(), f)))
            .collect();
        let prompt_given = entries.iter().any(|(k, _)| k == "prompt");
        if let Some(key) = unknown {
            entries.push((key, fragment("1", Verdict::Invalid)));
        }
        Just(entries).prop_shuffle().prop_map(move |entries| {
            let body = format!(
                "{{{}}}",
                entries
                    .iter()
                    .map(|(k, f)| format!("{}:{}", json_string(k), f.text))
                    .collect::<Vec<_>>()
                    .join(",")
            );
            let refused = if entries.iter().any(|(_, f)| f.verdict == Verdict::Malformed) {
                None
            } else {
                let mut refused: BTreeSet<String> = entries
                    .iter()
                    .filter(|(_, f)| f.verdict == Verdict::Invalid)
                    .map(|(k, _)| k.clone())
                    .collect();
                if !prompt_given {
                    refused.insert("prompt".into());
                }
                Some(refused)
            };
            NearValid { body, refused }
        })
    })
}

/// The parser and the validator give each near-valid request the verdict its
/// fields call for, and an accepted one keeps the values it was given.
fn check_near_valid(case: &NearValid) -> Result<(), TestCaseError> {
    let outcome = check_body(case.body.as_bytes())?;
    match (&case.refused, &outcome) {
        (None, Err(e)) => prop_assert!(matches!(e, ValidationError::Malformed(_)), "{e} for {}", case.body),
        (None, Ok(_)) => prop_assert!(false, "malformed body accepted: {}", case.body),
        (Some(refused), Err(e)) => prop_assert!(
            refused.contains(e.field()),
            "refused for `{}` ({e}), but the refusable fields are {refused:?}: {}",
            e.field(),
            case.body
        ),
        (Some(refused), Ok(job)) => {
            prop_assert!(
                refused.is_empty(),
                "accepted, but {refused:?} should be refused: {}",
                case.body
            );
            let given: Value = serde_json::from_str(&case.body).unwrap();
            let kept = serde_json::to_value(job).unwrap();
            for (key, value) in given.as_object().unwrap() {
                if value.is_null() {
                    continue;
                }
                let same = match (value.as_f64(), kept[key].as_f64()) {
                    (Some(a), Some(b)) => a == b,
                    _ => *value == kept[key],
                };
                prop_assert!(same, "`{key}`: given {value}, kept {}", kept[key]);
            }
        }
    }
    Ok(())
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
        ),
    )
        .prop_map(
            |(
                (prompt, negative_prompt, steps, w, h, guidance_scale),
                (seed, num_images, preview_every, output_format, priority),
            )| {
                ValidJob {
                    prompt,
                    negative_prompt,
                    num_inference_steps: steps,
                    width: w * 8,
                    height: h * 8,
                    guidance_scale,
                    seed,
                    num_images,
                    preview_every,
                    output_format,
                    priority,
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
