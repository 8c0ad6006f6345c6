//! Child processes: building and finding the binaries, and a handle that
//! kills its process when dropped (a failing test leaves nothing behind).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

/// The workspace root (this crate's parent folder).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate lives in the workspace")
        .to_path_buf()
}

pub struct Binaries {
    pub worker: PathBuf,
    pub dispatcher: PathBuf,
    // Keeps the folder of the linked binaries alive for the whole run.
    _dir: tempfile::TempDir,
}

/// Builds `worker` and `dispatcher` once per test binary (cargo cannot hand
/// one crate's binaries to another crate's tests), and hard-links them into a
/// private folder so that a concurrent build cannot swap them mid-test.
pub fn binaries() -> &'static Binaries {
    static BINARIES: OnceLock<Binaries> = OnceLock::new();
    BINARIES.get_or_init(|| build_binaries().expect("building worker and dispatcher"))
}

fn build_binaries() -> anyhow::Result<Binaries> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(workspace_root()).args([
        "build",
        "--bins",
        "-p",
        "worker",
        "-p",
        "dispatcher",
        "--message-format=json-render-diagnostics",
    ]);
    if !cfg!(debug_assertions) {
        cmd.arg("--release");
    }
    let out = cmd.stderr(Stdio::inherit()).output().context("running cargo build")?;
    if !out.status.success() {
        bail!("cargo build failed: {}", out.status);
    }
    let built: Vec<(String, PathBuf)> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter_map(|msg| {
            let exe = msg["executable"].as_str()?;
            Some((msg["target"]["name"].as_str()?.to_string(), PathBuf::from(exe)))
        })
        .collect();
    // Next to the originals, so that hard links work (same file system).
    let parent = built
        .first()
        .and_then(|(_, exe)| exe.parent())
        .context("cargo reported no executable")?;
    // Statics are never dropped, so a test process cannot remove its own
    // folder: each one removes those of processes that have exited.
    remove_stale_copies(parent);
    let dir = tempfile::Builder::new()
        .prefix(&format!(".e2e-bin-{}-", std::process::id()))
        .tempdir_in(parent)?;
    let (mut worker, mut dispatcher) = (None, None);
    for (name, exe) in &built {
        let private = dir.path().join(name);
        if std::fs::hard_link(exe, &private).is_err() {
            std::fs::copy(exe, &private).with_context(|| format!("copying {}", exe.display()))?;
        }
        match name.as_str() {
            "worker" => worker = Some(private),
            "dispatcher" => dispatcher = Some(private),
            _ => {}
        }
    }
    Ok(Binaries {
        worker: worker.context("cargo built no worker binary")?,
        dispatcher: dispatcher.context("cargo built no dispatcher binary")?,
        _dir: dir,
    })
}

fn remove_stale_copies(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        let Some(pid) = name.strip_prefix(".e2e-bin-").and_then(|rest| rest.split('-').next()) else {
            continue;
        };
        if pid.parse::<u32>().is_ok() && !Path::new("/proc").join(pid).exists() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// The process ids of every [`Proc`] alive, for the watchdog to kill.
static CHILDREN: Mutex<Vec<u32>> = Mutex::new(Vec::new());

/// SIGKILLs every [`Proc`] still alive and its process group, if it leads
/// one (a watchdog's last act: `Drop` does not run on `exit`).
pub fn kill_all_children() {
    let pids = CHILDREN.lock().map(|c| c.clone()).unwrap_or_default();
    for pid in pids {
        let _ = Command::new("kill").args(["-KILL", "--", &format!("-{pid}")]).status();
        let _ = Command::new("kill").args(["-KILL", &pid.to_string()]).status();
    }
}

/// A child process with its output in a log file; killed on drop.
pub struct Proc {
    pub name: String,
    child: Child,
    pub log: PathBuf,
}

impl Proc {
    pub fn spawn(name: &str, mut cmd: Command, log: PathBuf) -> anyhow::Result<Proc> {
        let file = std::fs::File::create(&log)?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        if let Ok(mut children) = CHILDREN.lock() {
            children.push(child.id());
        }
        Ok(Proc {
            name: name.to_string(),
            child,
            log,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the log contains `needle` (or fails, showing the log).
    pub async fn wait_for_log(&mut self, needle: &str, timeout: Duration) -> anyhow::Result<()> {
        let start = Instant::now();
        loop {
            if self.log_text().contains(needle) {
                return Ok(());
            }
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "{} exited ({status}) before logging {needle:?}:\n{}",
                    self.name,
                    self.log_text()
                );
            }
            if start.elapsed() > timeout {
                bail!(
                    "{} did not log {needle:?} within {timeout:?}:\n{}",
                    self.name,
                    self.log_text()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// SIGKILL, and reap it.
    pub fn kill_9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM (the process decides what to do with it).
    pub fn sigterm(&self) -> anyhow::Result<()> {
        let status = Command::new("kill").args(["-TERM", &self.pid().to_string()]).status()?;
        if !status.success() {
            bail!("kill -TERM {} failed", self.pid());
        }
        Ok(())
    }

    pub async fn wait_exit(&mut self, timeout: Duration) -> anyhow::Result<ExitStatus> {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if start.elapsed() > timeout {
                bail!("{} did not exit within {timeout:?}:\n{}", self.name, self.log_text());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if let Ok(mut children) = CHILDREN.lock() {
            children.retain(|&pid| pid != self.child.id());
        }
    }
}

/// The environment printed by `scripts/services.sh` (run once per test binary).
pub fn services_env() -> &'static HashMap<String, String> {
    static ENV: OnceLock<HashMap<String, String>> = OnceLock::new();
    ENV.get_or_init(|| {
        let out = Command::new(workspace_root().join("scripts/services.sh"))
            .stderr(std::process::Stdio::inherit())
            .output()
            .expect("running scripts/services.sh");
        assert!(out.status.success(), "scripts/services.sh failed: {}", out.status);
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.strip_prefix("export "))
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    })
}
