//! The harness of the end-to-end tests under `tests/tests/`: the services
//! (started by `scripts/services.sh`), the real `worker` and `dispatcher`
//! binaries as child processes, and a [`Stack`] per test with its own queue,
//! Redis prefix and bucket, so that tests run in parallel.

pub mod browser;
pub mod ledger;
pub mod process;
pub mod server;
pub mod stack;
pub mod watchdog;

pub use ledger::{reconcile, Ledger};
pub use process::Proc;
pub use server::Server;
pub use stack::{features_dir, EventRecorder, JobParams, Stack};
