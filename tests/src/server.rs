//! Private servers for the fault tests: s3s-fs, redis-server and a RabbitMQ
//! node of the test's own, each on a port and data folder of its own, that a
//! test can crash (SIGKILL) and start again without touching the machine's
//! shared services.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::process::{services_env, Proc};

/// A private server (s3s-fs, redis-server) that a test can stop and start
/// again on the same port and data folder.
pub struct Server {
    pub port: u16,
    name: String,
    command: Box<dyn Fn(u16) -> Command + Send + Sync>,
    log: PathBuf,
    proc: Option<Proc>,
    /// The server runs in its own process group, all of which is killed
    /// (rabbitmq-server is a shell script whose child is the broker).
    group: bool,
}

impl Server {
    async fn start(
        name: &str,
        dir: &Path,
        command: Box<dyn Fn(u16) -> Command + Send + Sync>,
    ) -> anyhow::Result<Server> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let mut server = Server {
            port,
            name: name.to_string(),
            command,
            log: dir.join(format!("{name}.log")),
            proc: None,
            group: false,
        };
        server.restart().await?;
        Ok(server)
    }

    /// A RabbitMQ node of its own (node name, port and data folder under
    /// `dir`): stopping it is a broker crash, starting it again recovers
    /// its durable queues and persistent messages from disk.
    pub async fn rabbitmq(dir: &Path) -> anyhow::Result<Server> {
        let base = dir.join("rabbitmq");
        std::fs::create_dir_all(&base)?;
        std::fs::write(base.join("enabled_plugins"), "[].")?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let dist = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let server_bin = ["/usr/lib/rabbitmq/bin/rabbitmq-server", "/usr/sbin/rabbitmq-server"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .context("rabbitmq-server is not installed")?;
        let mut server = Server {
            port,
            name: "rabbitmq".into(),
            command: Box::new(move |port| {
                use std::os::unix::process::CommandExt;
                let mut cmd = Command::new(server_bin);
                cmd.env("RABBITMQ_NODENAME", format!("e2e{port}@localhost"))
                    .env("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1")
                    .env("RABBITMQ_NODE_PORT", port.to_string())
                    .env("RABBITMQ_DIST_PORT", dist.to_string())
                    .env("RABBITMQ_MNESIA_BASE", base.join("mnesia"))
                    .env("RABBITMQ_LOG_BASE", base.join("log"))
                    .env("RABBITMQ_ENABLED_PLUGINS_FILE", base.join("enabled_plugins"))
                    .env("RABBITMQ_PLUGINS_EXPAND_DIR", base.join("plugins-expand"))
                    .env("RABBITMQ_PID_FILE", base.join("pid"))
                    .env("RABBITMQ_CONFIG_FILE", base.join("none"))
                    .env("RABBITMQ_ADVANCED_CONFIG_FILE", base.join("none-advanced.config"))
                    .process_group(0);
                cmd
            }),
            log: dir.join("rabbitmq.log"),
            proc: None,
            group: true,
        };
        server.restart_within(Duration::from_secs(120)).await?;
        Ok(server)
    }

    pub fn amqp_url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    /// redis-server with an append-only file synced on every write: a
    /// restart keeps every key, as a production Redis for this service should.
    pub async fn redis_persistent(dir: &Path) -> anyhow::Result<Server> {
        let dir_arg = dir.to_path_buf();
        Self::start(
            "redis-server",
            dir,
            Box::new(move |port| {
                let mut cmd = Command::new("redis-server");
                cmd.args(["--bind", "127.0.0.1", "--port", &port.to_string(), "--save", ""])
                    .args(["--appendonly", "yes", "--appendfsync", "always"])
                    .arg("--dir")
                    .arg(&dir_arg);
                cmd
            }),
        )
        .await
    }

    /// s3s-fs with the credentials of `services.sh`, data under `dir`.
    pub async fn s3s_fs(dir: &Path) -> anyhow::Result<Server> {
        let env = services_env();
        let bin = env
            .get("S3S_FS_BIN")
            .context("services.sh printed no S3S_FS_BIN")?
            .clone();
        let key = env.get("AWS_ACCESS_KEY_ID").cloned().unwrap_or_default();
        let secret = env.get("AWS_SECRET_ACCESS_KEY").cloned().unwrap_or_default();
        let data = dir.join("s3-data");
        std::fs::create_dir_all(&data)?;
        Self::start(
            "s3s-fs",
            dir,
            Box::new(move |port| {
                let mut cmd = Command::new(&bin);
                cmd.args(["--host", "127.0.0.1", "--port", &port.to_string()])
                    .args(["--access-key", &key, "--secret-key", &secret])
                    .arg(&data);
                cmd
            }),
        )
        .await
    }

    /// redis-server keeping nothing on disk: a restart loses every key.
    pub async fn redis(dir: &Path) -> anyhow::Result<Server> {
        let dir_arg = dir.to_path_buf();
        Self::start(
            "redis-server",
            dir,
            Box::new(move |port| {
                let mut cmd = Command::new("redis-server");
                cmd.args([
                    "--bind",
                    "127.0.0.1",
                    "--port",
                    &port.to_string(),
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                ])
                .arg("--dir")
                .arg(&dir_arg);
                cmd
            }),
        )
        .await
    }

    pub fn http_endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn redis_url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// SIGKILL: a crash, not a shutdown.
    pub fn stop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            if self.group {
                let _ = Command::new("kill")
                    .args(["-KILL", "--", &format!("-{}", p.pid())])
                    .status();
            }
            p.kill_9();
        }
        // Wait until the port is free again (the broker's children exit a
        // moment after the group is killed).
        let start = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok()
            && start.elapsed() < Duration::from_secs(10)
        {
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGSTOP to the whole server: it keeps its connections open and
    /// answers nothing, as a hung or cut-off server does.
    pub fn freeze(&self) -> anyhow::Result<()> {
        self.signal("-STOP")
    }

    /// SIGCONT: a frozen server goes on where it stopped.
    pub fn thaw(&self) -> anyhow::Result<()> {
        self.signal("-CONT")
    }

    fn signal(&self, signal: &str) -> anyhow::Result<()> {
        let proc = self
            .proc
            .as_ref()
            .with_context(|| format!("{} is not running", self.name))?;
        let target = if self.group {
            format!("-{}", proc.pid())
        } else {
            proc.pid().to_string()
        };
        let status = Command::new("kill").args([signal, "--", &target]).status()?;
        if !status.success() {
            bail!("kill {signal} {target} failed");
        }
        Ok(())
    }

    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.restart_within(Duration::from_secs(30)).await
    }

    async fn restart_within(&mut self, limit: Duration) -> anyhow::Result<()> {
        let mut proc = Proc::spawn(&self.name, (self.command)(self.port), self.log.clone())?;
        let start = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            if !proc.is_running() || start.elapsed() > limit {
                bail!("{} did not start:\n{}", self.name, proc.log_text());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.proc = Some(proc);
        Ok(())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}
