//! Every Prometheus metric of the dispatcher, defined in one place (as TEI's
//! `router/src/prometheus.rs`), served as text by `GET /metrics`.

use prometheus::{Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, Opts, Registry, TextEncoder};

#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    /// Jobs queued (confirmed by RabbitMQ).
    pub jobs_submitted: IntCounter,
    /// Submits replayed through an `Idempotency-Key`.
    pub jobs_replayed: IntCounter,
    /// Requests refused by validation, by field.
    pub validation_errors: IntCounterVec,
    /// Publishes RabbitMQ did not confirm.
    pub publish_failures: IntCounter,
    /// Cancel requests accepted.
    pub jobs_cancelled: IntCounter,
    /// HTTP requests by route, method and status.
    pub http_requests: IntCounterVec,
    /// HTTP request durations (SSE streams: until the headers).
    pub http_duration: HistogramVec,
    /// Every refusal (401, 404, 409, 413, 422, 429, 503) by reason
    /// (`unauthorized`, `not_found`, `invalid`, `rate_limited`, `queue_full`, …;
    /// see `http/error.rs`).
    pub refused: IntCounterVec,
}

impl Metrics {
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new_custom(Some("sdxl_dispatcher".into()), None)?;
        let jobs_submitted = IntCounter::new("jobs_submitted_total", "Jobs queued (confirmed by RabbitMQ)")?;
        let jobs_replayed = IntCounter::new("jobs_replayed_total", "Submits answered from an Idempotency-Key")?;
        let validation_errors = IntCounterVec::new(
            Opts::new("validation_errors_total", "Requests refused by validation"),
            &["field"],
        )?;
        let publish_failures = IntCounter::new("publish_failures_total", "Publishes RabbitMQ did not confirm")?;
        let jobs_cancelled = IntCounter::new("jobs_cancelled_total", "Cancel requests accepted")?;
        let http_requests = IntCounterVec::new(
            Opts::new("http_requests_total", "HTTP requests"),
            &["route", "method", "status"],
        )?;
        let http_duration = HistogramVec::new(
            HistogramOpts::new("http_request_duration_seconds", "HTTP request durations")
                .buckets(vec![0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0]),
            &["route", "method"],
        )?;
        registry.register(Box::new(jobs_submitted.clone()))?;
        registry.register(Box::new(jobs_replayed.clone()))?;
        registry.register(Box::new(validation_errors.clone()))?;
        registry.register(Box::new(publish_failures.clone()))?;
        registry.register(Box::new(jobs_cancelled.clone()))?;
        registry.register(Box::new(http_requests.clone()))?;
        registry.register(Box::new(http_duration.clone()))?;
        let refused = IntCounterVec::new(
            Opts::new(
                "requests_refused_total",
                "Requests refused (401, 404, 409, 413, 422, 429, 503), by reason",
            ),
            &["reason"],
        )?;
        registry.register(Box::new(refused.clone()))?;
        Ok(Metrics {
            refused,
            registry,
            jobs_submitted,
            jobs_replayed,
            validation_errors,
            publish_failures,
            jobs_cancelled,
            http_requests,
            http_duration,
        })
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::error!(error = %e, "cannot encode metrics");
        }
        String::from_utf8(out).unwrap_or_default()
    }
}
