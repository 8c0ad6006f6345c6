//! A hung end-to-end test fails instead of holding CI until its own time
//! limit runs out: each [`crate::Stack`] arms a watchdog that, if the stack
//! is still alive after the limit, prints the end of every log in the
//! stack's folder (the dispatcher's, the workers', the servers'), kills the
//! processes the harness started and exits the test binary with an error.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::{Duration, Instant};

use crate::process::kill_all_children;

/// The limit unless `E2E_HANG_LIMIT` (seconds) or the test
/// ([`Watchdog::extend_to`]) says otherwise: far above the e2e tests on a
/// 2-core CI machine (a few minutes; the load test, which runs longer,
/// raises its own), far below CI's own limit.
const DEFAULT_LIMIT: Duration = Duration::from_secs(20 * 60);

/// The lines of each log printed when the limit passes.
const LOG_TAIL_LINES: usize = 80;

/// Disarmed when dropped.
pub struct Watchdog {
    limits: mpsc::Sender<Duration>,
}

impl Watchdog {
    /// Arms a watchdog for the test stack `name`, whose logs are in `dir`.
    pub fn arm(name: &str, dir: PathBuf) -> Watchdog {
        let limit = std::env::var("E2E_HANG_LIMIT")
            .ok()
            .and_then(|s| s.parse().ok())
            .map_or(DEFAULT_LIMIT, Duration::from_secs);
        let (limits, armed) = mpsc::channel::<Duration>();
        let owned = name.to_string();
        let spawned = std::thread::Builder::new()
            .name(format!("watchdog-{name}"))
            .spawn(move || {
                let start = Instant::now();
                let mut limit = limit;
                loop {
                    match armed.recv_timeout(limit.saturating_sub(start.elapsed())) {
                        Ok(longer) => limit = limit.max(longer),
                        Err(RecvTimeoutError::Timeout) => fire(&owned, &dir, limit),
                        // Dropping the sender disconnects: the stack ended in time.
                        Err(RecvTimeoutError::Disconnected) => return,
                    }
                }
            });
        if let Err(e) = spawned {
            let _ = writeln!(std::io::stderr(), "watchdog for `{name}` not started: {e}");
        }
        Watchdog { limits }
    }

    /// Lets the stack run `limit` in all, from when it was made, for a test
    /// that is meant to run longer than the default (never shortens it).
    pub fn extend_to(&self, limit: Duration) {
        let _ = self.limits.send(limit);
    }
}

fn fire(name: &str, dir: &Path, limit: Duration) -> ! {
    // Straight to the process's stderr: the test harness captures what a
    // test's threads (this one too) print with `eprintln!`, and drops it
    // when the process exits.
    let mut err = std::io::stderr().lock();
    let _ = writeln!(
        err,
        "\n=== test stack `{name}` still running after {limit:?}: it hangs. The end of each log in {}:",
        dir.display()
    );
    let mut logs: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|entries| entries.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    logs.retain(|p| p.extension().is_some_and(|e| e == "log"));
    logs.sort();
    for log in logs {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let _ = writeln!(err, "--- {} (last {LOG_TAIL_LINES} lines)", log.display());
        for line in &lines[lines.len().saturating_sub(LOG_TAIL_LINES)..] {
            let _ = writeln!(err, "{line}");
        }
    }
    let _ = writeln!(
        err,
        "=== killing the processes the harness started and failing the test binary"
    );
    let _ = err.flush();
    kill_all_children();
    std::process::exit(101)
}
