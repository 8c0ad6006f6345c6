//! Near-valid requests for the fuzzer: each field drawn from in-range,
//! boundary, out-of-range, wrong-type, null and malformed values, labelled
//! with the verdict the parser and the validator must give.

use std::collections::BTreeSet;

use common::rules::{OutputFormat, Scheduler, ValidationError};
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use serde_json::Value;

use super::{check_body, FIELDS};

// --- near-valid requests, each field labelled -------------------------------

/// What a field's value should get from the parser and the validator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Valid,
    /// Refused, naming this field.
    Invalid,
    /// Not JSON: the whole body is refused.
    Malformed,
}

/// A field's JSON text and its verdict.
#[derive(Debug, Clone)]
pub struct Fragment {
    text: String,
    verdict: Verdict,
}

pub fn fragment(text: impl Into<String>, verdict: Verdict) -> Fragment {
    Fragment {
        text: text.into(),
        verdict,
    }
}

pub fn json_string(s: &str) -> String {
    serde_json::to_string(s).unwrap()
}

/// Values of a wrong JSON type for a numeric field (or numbers no i64 holds).
/// A number without a fraction (`256.0`, `1e2`) is an integer, as JSON
/// Schema counts it: those are drawn by [`integer`] with their verdict.
pub fn wrong_number() -> BoxedStrategy<Fragment> {
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
pub fn wrong_text() -> BoxedStrategy<Fragment> {
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
pub fn malformed() -> BoxedStrategy<Fragment> {
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

pub fn null() -> BoxedStrategy<Fragment> {
    Just(fragment("null", Verdict::Valid)).boxed()
}

/// An integer field with bounds `lo..=hi` and step `multiple`.
pub fn integer(lo: i64, hi: i64, multiple: i64) -> BoxedStrategy<Fragment> {
    let valid = prop_oneof![
        Just(lo),
        Just(hi),
        (lo..=hi).prop_map(move |v| (v - v.rem_euclid(multiple)).max(lo)),
    ];
    // Written as an integer, or as a number with no fraction (`21.0`, `2.1e1`).
    let valid = (valid, 0..3u8)
        .prop_map(|(v, form)| match form {
            0 => v.to_string(),
            1 => format!("{v}.0"),
            _ => format!("{}e1", v as f64 / 10.0),
        })
        .prop_map(|t| fragment(t, Verdict::Valid));
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

pub fn guidance_scale() -> BoxedStrategy<Fragment> {
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

pub fn seed() -> BoxedStrategy<Fragment> {
    let valid = prop_oneof![
        prop_oneof![Just(0u64), Just(u64::MAX), Just(i64::MAX as u64 + 1), any::<u64>()].prop_map(|s| s.to_string()),
        // no fraction: an integer, as JSON Schema counts it
        prop::sample::select(vec!["7.0", "1e3", "0.0"]).prop_map(String::from),
    ]
    .prop_map(|t| fragment(t, Verdict::Valid));
    let invalid = prop::sample::select(vec![
        "-1",
        "1.5",
        "\"7\"",
        "true",
        "[]",
        "18446744073709551616",
        "-9223372036854775808",
    ])
    .prop_map(|t| fragment(t, Verdict::Invalid));
    prop_oneof![10 => valid, 1 => null(), 3 => invalid, 1 => malformed()].boxed()
}

pub fn prompt() -> BoxedStrategy<Fragment> {
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

pub fn negative_prompt() -> BoxedStrategy<Fragment> {
    let valid = prop_oneof!["\\PC{0,40}", Just(String::new()), Just("é".repeat(2000)),]
        .prop_map(|s| fragment(json_string(&s), Verdict::Valid));
    let invalid = prop_oneof![Just("x".repeat(2001)), Just("😀".repeat(2001))]
        .prop_map(|s| fragment(json_string(&s), Verdict::Invalid));
    prop_oneof![10 => valid, 1 => null(), 2 => invalid, 1 => wrong_text(), 1 => malformed()].boxed()
}

pub fn output_format() -> BoxedStrategy<Fragment> {
    let valid = prop::sample::select(OutputFormat::ALL.to_vec())
        .prop_map(|f| fragment(json_string(f.extension()), Verdict::Valid));
    let invalid = prop_oneof![
        prop::sample::select(vec!["PNG", "gif", "", "jpg", "png ", " webp", "jpeg\u{0}"]).prop_map(String::from),
        "\\PC{0,12}".prop_filter("not a format", |s| s.parse::<OutputFormat>().is_err()),
    ]
    .prop_map(|s| fragment(json_string(&s), Verdict::Invalid));
    prop_oneof![10 => valid, 1 => null(), 3 => invalid, 1 => wrong_text(), 1 => malformed()].boxed()
}

pub fn scheduler() -> BoxedStrategy<Fragment> {
    let valid =
        prop::sample::select(Scheduler::ALL.to_vec()).prop_map(|s| fragment(json_string(s.name()), Verdict::Valid));
    let invalid = prop_oneof![
        prop::sample::select(vec!["Euler", "heun", "", "dpm++", "euler ", "ddpm"]).prop_map(String::from),
        "\\PC{0,12}".prop_filter("not a sampler", |s| s.parse::<Scheduler>().is_err()),
    ]
    .prop_map(|s| fragment(json_string(&s), Verdict::Invalid));
    prop_oneof![10 => valid, 1 => null(), 3 => invalid, 1 => wrong_text(), 1 => malformed()].boxed()
}

/// A near-valid request: the body, and the fields that must be refused (or
/// `None` when the body is not JSON). An empty set means it must pass.
#[derive(Debug, Clone)]
pub struct NearValid {
    pub body: String,
    pub refused: Option<BTreeSet<String>>,
}

pub fn near_valid() -> impl Strategy<Value = NearValid> {
    // Each optional field is left out half the time (left out is valid: the
    // default), so that about a fifth of the requests pass.
    let optional = |s: BoxedStrategy<Fragment>| prop::option::of(s).boxed();
    // One strategy per field, in the order of FIELDS.
    let fields: Vec<BoxedStrategy<Option<Fragment>>> = vec![
        prop::option::weighted(0.95, prompt()).boxed(),
        optional(negative_prompt()),
        optional(integer(1, 100, 1)),
        optional(integer(256, 2048, 8)),
        optional(integer(256, 2048, 8)),
        optional(guidance_scale()),
        optional(scheduler()),
        optional(seed()),
        optional(integer(1, 16, 1)),
        optional(integer(0, 100, 1)),
        optional(output_format()),
        optional(integer(0, 9, 1)),
    ];
    let unknown = prop::option::weighted(
        0.1,
        prop_oneof![
            prop::sample::select(vec!["steps", "model", "Prompt", "width ", "", "seed2", "__proto__"])
                .prop_map(String::from),
            "[a-z_]{1,12}".prop_filter("unknown", |k| !FIELDS.contains(&k.as_str())),
        ],
    );
    (fields, unknown).prop_flat_map(|(values, unknown)| {
        let mut entries: Vec<(String, Fragment)> = values
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
pub fn check_near_valid(case: &NearValid) -> Result<(), TestCaseError> {
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
