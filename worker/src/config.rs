//! Worker configuration: command-line flags, `HEARTH_*` environment variables and an optional TOML
//! file, in that order of precedence. One struct backs all three.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use hearth_messages::{Subjects, WorkerId};
use serde::Deserialize;

use crate::provider::{
    Accel, FirecrackerConfig, Isolation, OciConfig, ProcessConfig, QemuConfig, SandboxConfig,
};

/// A configuration error: the binary prints it on one line and exits 64.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

/// Which VM backend the worker drives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum ProviderKind {
    /// A volume directory plus commands run by a shell in it (the default).
    Process,
    /// In memory; for tests and demos only, nothing runs for real.
    Fake,
    /// Real microVMs: QEMU `-M microvm` with the Hearth guest agent (settings under `[qemu]`).
    Qemu,
    /// Real microVMs under Firecracker, on hosts with hardware KVM (settings under
    /// `[firecracker]`: binary, kernel, rootfs).
    Firecracker,
    /// OCI containers run by crun/runc (settings under `[oci]`: runtime, root, seccomp, init).
    Oci,
}

impl ProviderKind {
    /// The name `--provider` takes.
    pub fn as_str(self) -> &'static str {
        match self {
            ProviderKind::Process => "process",
            ProviderKind::Fake => "fake",
            ProviderKind::Qemu => "qemu",
            ProviderKind::Firecracker => "firecracker",
            ProviderKind::Oci => "oci",
        }
    }
}

/// Limits of background processes (see [`WorkerConfig::processes`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcessLimits {
    /// Most background processes running at once per VM.
    pub max_per_vm: u32,
    /// Output ring buffer per process, bytes.
    pub ring_bytes: u64,
    /// Most stdin bytes per `stdin` request.
    pub max_stdin_bytes: u64,
    /// Most process requests (waits, follows, stdin, …) held per VM at once; 429 beyond.
    pub max_requests_per_vm: usize,
}

impl Default for ProcessLimits {
    fn default() -> Self {
        Self {
            max_per_vm: 16,
            ring_bytes: 1 << 20,
            max_stdin_bytes: 1 << 20,
            max_requests_per_vm: 64,
        }
    }
}

/// Default of `max_queued_per_vm`.
pub const DEFAULT_MAX_QUEUED_PER_VM: usize = 32;
/// Default of `max_queued_bytes_per_vm` (64 MiB).
pub const DEFAULT_MAX_QUEUED_BYTES_PER_VM: u64 = 64 << 20;

/// How many backups `backup_dir` keeps. Each limit is off at 0; the backup just written is always
/// kept, the others go oldest first until every limit holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackupRetention {
    /// Most backups kept (all sessions together).
    pub keep: usize,
    /// Backups older than this are deleted.
    pub max_age: Option<Duration>,
    /// Most bytes of backups kept.
    pub max_bytes: u64,
}

impl Default for BackupRetention {
    fn default() -> Self {
        Self {
            keep: 256,
            max_age: Some(Duration::from_secs(7 * 24 * 3600)),
            max_bytes: 10 << 30,
        }
    }
}

/// Everything the worker needs, resolved.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// NATS server URL(s), comma-separated.
    pub nats_url: String,
    /// Subjects under the configured prefix.
    pub subjects: Subjects,
    /// This worker's id (default: the host name).
    pub worker_id: WorkerId,
    /// The VM backend.
    pub provider: ProviderKind,
    /// Where the process provider keeps VMs and snapshots, and the worker its own state.
    pub data_dir: PathBuf,
    /// How the process provider isolates commands: `sandbox` (default) or `none`.
    pub isolation: Isolation,
    /// The process provider's sandbox tools and host identity (`[sandbox]` in the file).
    pub sandbox: SandboxConfig,
    /// The `hearth-guest-agent` binary the process provider runs in each sandbox.
    pub agent: Option<PathBuf>,
    /// Most VMs held at once; beyond it the oldest stopped VM is evicted, else 503.
    pub max_vms: u32,
    /// Most lifecycle jobs running at once (jobs on one VM are serialised anyway).
    pub job_concurrency: usize,
    /// Heartbeat period.
    pub heartbeat_interval: Duration,
    /// Prometheus `/metrics` listen address; none disables the exporter.
    pub metrics_listen: Option<SocketAddr>,
    /// Where volumes are backed up before a prune (`DestroyVm{backup: true}`); none = no backups.
    pub backup_dir: Option<PathBuf>,
    /// What `backup_dir` keeps: pruned after every backup, oldest first.
    pub backup_retention: BackupRetention,
    /// Most exec and file requests held per VM at once (running plus waiting for its lock);
    /// beyond it a request is answered 429 with `retry_after_ms`.
    pub max_queued_per_vm: usize,
    /// Most request payload bytes held per VM at once (running plus waiting); beyond it 429. A VM
    /// holding nothing always admits one request, whatever its size.
    pub max_queued_bytes_per_vm: u64,
    /// How long SIGTERM waits for running commands and jobs.
    pub drain_grace: Duration,
    /// Replicas of the snapshot object store when the worker has to create it.
    pub store_replicas: usize,
    /// Size limit of the snapshot object store when the worker has to create it (bytes): template
    /// snapshots can never take the JetStream storage the KV buckets need.
    pub store_max_bytes: u64,
    /// Largest file `files.get` returns.
    pub max_file_bytes: u64,
    /// Background processes: most running at once per VM (429 beyond), the size of each one's
    /// output ring buffer in the guest agent, and the most stdin bytes one request may carry
    /// (400 beyond). File keys `max_processes_per_vm`, `process_ring_bytes`, `max_stdin_bytes`.
    pub processes: ProcessLimits,
    /// The qemu provider's settings (`[qemu]` in the file); an empty `root` is `<data_dir>/qemu`.
    pub qemu: QemuConfig,
    /// The firecracker provider's settings (`[firecracker]` in the file); an empty `root` is
    /// `<data_dir>/firecracker`.
    pub firecracker: FirecrackerConfig,
    /// The oci provider's settings (`[oci]` in the file); an empty `root` is `<data_dir>/oci`.
    pub oci: OciConfig,
    /// The shell an exec's `cmd` runs in, as `<shell> <shell_args…> <cmd>`; `None` leaves `cmd`
    /// to the provider (`/bin/sh -c` in every provider today).
    pub shell: Option<PathBuf>,
    /// Arguments before the command (default `["-c"]`).
    pub shell_args: Vec<String>,
    /// Added to every command's environment, under the VM's (template's) and the request's own.
    pub env: BTreeMap<String, String>,
}

/// Default of `shell_args`.
pub fn default_shell_args() -> Vec<String> {
    vec!["-c".into()]
}

impl WorkerConfig {
    /// A config for tests and embedding: process provider under `data_dir`, defaults elsewhere.
    pub fn new(worker_id: WorkerId, data_dir: impl Into<PathBuf>) -> Self {
        Self {
            nats_url: "nats://127.0.0.1:4222".into(),
            subjects: Subjects::default(),
            worker_id,
            provider: ProviderKind::Process,
            data_dir: data_dir.into(),
            isolation: Isolation::Sandbox,
            sandbox: SandboxConfig::default(),
            agent: None,
            max_vms: 64,
            job_concurrency: 16,
            heartbeat_interval: Duration::from_secs(1),
            metrics_listen: None,
            backup_dir: None,
            backup_retention: BackupRetention::default(),
            max_queued_per_vm: DEFAULT_MAX_QUEUED_PER_VM,
            max_queued_bytes_per_vm: DEFAULT_MAX_QUEUED_BYTES_PER_VM,
            drain_grace: Duration::from_secs(30),
            store_replicas: 1,
            store_max_bytes: 8 << 30,
            max_file_bytes: hearth_messages::data::DEFAULT_MAX_FILE_BYTES,
            processes: ProcessLimits::default(),
            qemu: QemuConfig::default(),
            shell: None,
            shell_args: default_shell_args(),
            env: BTreeMap::new(),
            firecracker: FirecrackerConfig::default(),
            oci: OciConfig::default(),
        }
    }

    /// The argv an exec's `cmd` becomes, when the worker's shell settings differ from the
    /// providers' `/bin/sh -c`; `None` leaves `cmd` to the provider.
    pub fn shell_argv(&self, cmd: &str) -> Option<Vec<String>> {
        if self.shell.is_none() && self.shell_args == default_shell_args() {
            return None;
        }
        let shell = self.shell.as_deref().unwrap_or(Path::new("/bin/sh"));
        let mut argv = vec![shell.to_string_lossy().into_owned()];
        argv.extend(self.shell_args.iter().cloned());
        argv.push(cmd.to_owned());
        Some(argv)
    }

    /// The process provider's configuration derived from this one.
    pub fn process_config(&self) -> ProcessConfig {
        let mut config = ProcessConfig::new(self.data_dir.join("process"));
        config.isolation = self.isolation;
        config.sandbox = self.sandbox.clone();
        config.agent = self.agent.clone();
        if let Some(shell) = &self.shell {
            config.shell = shell.clone();
        }
        config.env = self.env.clone();
        config
    }

    /// The oci provider's configuration: the process provider's settings (shell, env, agent,
    /// sandbox uid) rooted at `[oci] root` (default `<data_dir>/oci`), and the `[oci]` section.
    pub fn oci_config(&self) -> (ProcessConfig, OciConfig) {
        let mut process = self.process_config();
        process.root = if self.oci.root.as_os_str().is_empty() {
            self.data_dir.join("oci")
        } else {
            self.oci.root.clone()
        };
        process.isolation = Isolation::Sandbox;
        (process, self.oci.clone())
    }

    /// The qemu provider's configuration, its root defaulting to `<data_dir>/qemu`.
    pub fn qemu_config(&self) -> QemuConfig {
        let mut config = self.qemu.clone();
        if config.root.as_os_str().is_empty() {
            config.root = self.data_dir.join("qemu");
        }
        // The worker-wide env under the `[qemu]` section's own.
        let mut env = self.env.clone();
        env.append(&mut config.env);
        config.env = env;
        config
    }

    /// The firecracker provider's configuration, its root defaulting to `<data_dir>/firecracker`.
    pub fn firecracker_config(&self) -> FirecrackerConfig {
        let mut config = self.firecracker.clone();
        if config.root.as_os_str().is_empty() {
            config.root = self.data_dir.join("firecracker");
        }
        // The worker-wide env under the `[firecracker]` section's own.
        let mut env = self.env.clone();
        env.append(&mut config.env);
        config.env = env;
        config
    }
}

/// Command-line flags (each also readable from its `HEARTH_*` variable).
#[derive(Debug, Clone, Default, clap::Parser)]
#[command(
    name = "hearth-worker",
    version,
    about = "Hearth worker: owns the VMs on this host"
)]
pub struct WorkerArgs {
    /// TOML file with any of the settings below (flags and environment win).
    #[arg(long, env = "HEARTH_WORKER_CONFIG")]
    pub config: Option<PathBuf>,
    /// NATS server URL(s), comma-separated.
    #[arg(long, env = "HEARTH_NATS_URL")]
    pub nats_url: Option<String>,
    /// Subject prefix.
    #[arg(long, env = "HEARTH_PREFIX")]
    pub prefix: Option<String>,
    /// This worker's id (default: the host name).
    #[arg(long, env = "HEARTH_WORKER_ID")]
    pub worker_id: Option<String>,
    /// VM backend.
    #[arg(long, env = "HEARTH_PROVIDER", value_enum)]
    pub provider: Option<ProviderKind>,
    /// Data directory (VMs, snapshots, worker state).
    #[arg(long, env = "HEARTH_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Isolation of the process provider: `sandbox` (the default: hardened bubblewrap) or `none`
    /// (commands run as host processes; only for trusted code).
    #[arg(long, env = "HEARTH_ISOLATION", value_parser = parse_isolation)]
    pub isolation: Option<Isolation>,
    /// bubblewrap binary of the sandbox (default /usr/bin/bwrap).
    #[arg(long, env = "HEARTH_BWRAP")]
    pub bwrap: Option<PathBuf>,
    /// The hearth-guest-agent binary (default: next to this executable, or on PATH).
    #[arg(long, env = "HEARTH_AGENT_BIN")]
    pub agent: Option<PathBuf>,
    /// Most VMs held at once.
    #[arg(long, env = "HEARTH_MAX_VMS")]
    pub max_vms: Option<u32>,
    /// Most lifecycle jobs at once.
    #[arg(long, env = "HEARTH_JOB_CONCURRENCY")]
    pub job_concurrency: Option<usize>,
    /// Heartbeat period in milliseconds.
    #[arg(long, env = "HEARTH_HEARTBEAT_MS")]
    pub heartbeat_ms: Option<u64>,
    /// Prometheus listen address, e.g. 0.0.0.0:9102; "off" disables.
    #[arg(long, env = "HEARTH_METRICS_LISTEN")]
    pub metrics_listen: Option<String>,
    /// Backup destination for pruned volumes.
    #[arg(long, env = "HEARTH_BACKUP_DIR")]
    pub backup_dir: Option<PathBuf>,
    /// Most backups kept in the backup dir (0: no limit).
    #[arg(long, env = "HEARTH_BACKUP_KEEP")]
    pub backup_keep: Option<usize>,
    /// Backups older than this many seconds are deleted (0: no limit).
    #[arg(long, env = "HEARTH_BACKUP_MAX_AGE_S")]
    pub backup_max_age_s: Option<u64>,
    /// Most bytes of backups kept (0: no limit).
    #[arg(long, env = "HEARTH_BACKUP_MAX_BYTES")]
    pub backup_max_bytes: Option<u64>,
    /// Most exec/file requests held per VM (running plus queued); beyond it 429.
    #[arg(long, env = "HEARTH_MAX_QUEUED_PER_VM")]
    pub max_queued_per_vm: Option<usize>,
    /// Most request payload bytes held per VM (running plus queued); beyond it 429.
    #[arg(long, env = "HEARTH_MAX_QUEUED_BYTES_PER_VM")]
    pub max_queued_bytes_per_vm: Option<u64>,
    /// Seconds SIGTERM waits for running work.
    #[arg(long, env = "HEARTH_DRAIN_GRACE_S")]
    pub drain_grace_s: Option<u64>,
    /// Replicas for the snapshot object store.
    #[arg(long, env = "HEARTH_STORE_REPLICAS")]
    pub store_replicas: Option<usize>,
    /// Size limit (bytes) of the snapshot object store, when this worker creates it.
    #[arg(long, env = "HEARTH_STORE_MAX_BYTES")]
    pub store_max_bytes: Option<u64>,
    /// Guest image directory of the qemu provider (vmlinuz, initrd.img).
    #[arg(long, env = "HEARTH_QEMU_IMAGE")]
    pub qemu_image: Option<PathBuf>,
    /// Accelerator of the qemu provider.
    #[arg(long, env = "HEARTH_QEMU_ACCEL", value_enum)]
    pub qemu_accel: Option<Accel>,
    /// The shell an exec's `cmd` runs in (`<shell> <shell-arg…> <cmd>`).
    #[arg(long, env = "HEARTH_SHELL")]
    pub shell: Option<PathBuf>,
    /// An argument before the command (repeat for several; default `-c`).
    #[arg(long = "shell-arg", allow_hyphen_values = true)]
    pub shell_args: Vec<String>,
    /// `KEY=VALUE` added to every command's environment (repeatable; under the template's and
    /// the request's env).
    #[arg(long = "env", value_parser = parse_env_pair)]
    pub env: Vec<(String, String)>,
    /// The `firecracker` binary of the firecracker provider.
    #[arg(long, env = "HEARTH_FIRECRACKER_BIN")]
    pub firecracker_bin: Option<PathBuf>,
    /// Guest kernel (uncompressed `vmlinux`) of the firecracker provider.
    #[arg(long, env = "HEARTH_FIRECRACKER_KERNEL")]
    pub firecracker_kernel: Option<PathBuf>,
    /// Root filesystem image (ext4, its init runs hearth-guest-agent) of the firecracker provider.
    #[arg(long, env = "HEARTH_FIRECRACKER_ROOTFS")]
    pub firecracker_rootfs: Option<PathBuf>,
}

/// The TOML file's shape (every key optional).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct WorkerFile {
    nats_url: Option<String>,
    prefix: Option<String>,
    worker_id: Option<String>,
    provider: Option<ProviderKind>,
    data_dir: Option<PathBuf>,
    isolation: Option<Isolation>,
    bwrap: Option<PathBuf>,
    agent: Option<PathBuf>,
    sandbox: Option<SandboxConfig>,
    max_vms: Option<u32>,
    job_concurrency: Option<usize>,
    heartbeat_ms: Option<u64>,
    metrics_listen: Option<String>,
    backup_dir: Option<PathBuf>,
    backup_keep: Option<usize>,
    backup_max_age_s: Option<u64>,
    backup_max_bytes: Option<u64>,
    max_queued_per_vm: Option<usize>,
    max_queued_bytes_per_vm: Option<u64>,
    max_processes_per_vm: Option<u32>,
    process_ring_bytes: Option<u64>,
    max_stdin_bytes: Option<u64>,
    drain_grace_s: Option<u64>,
    store_replicas: Option<usize>,
    store_max_bytes: Option<u64>,
    qemu: Option<QemuConfig>,
    shell: Option<PathBuf>,
    shell_args: Option<Vec<String>>,
    env: Option<BTreeMap<String, String>>,
    firecracker: Option<FirecrackerConfig>,
    oci: Option<OciConfig>,
}

fn read_file(path: &Path) -> Result<WorkerFile, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError(format!("cannot read {}: {e}", path.display())))?;
    toml::from_str(&text).map_err(|e| {
        ConfigError(format!(
            "invalid {}: {}",
            path.display(),
            e.to_string().replace('\n', " ")
        ))
    })
}

/// Parses `--env KEY=VALUE`.
fn parse_env_pair(value: &str) -> Result<(String, String), String> {
    match value.split_once('=') {
        Some((key, value)) if !key.is_empty() => Ok((key.to_owned(), value.to_owned())),
        _ => Err(format!("{value:?} is not KEY=VALUE")),
    }
}

/// Parses `--isolation`.
fn parse_isolation(value: &str) -> Result<Isolation, String> {
    Isolation::parse(value).ok_or_else(|| format!("{value:?} is not sandbox or none"))
}

/// Parses a metrics listen setting: an address, or `off`.
pub fn parse_listen(value: &str) -> Result<Option<SocketAddr>, ConfigError> {
    if value.eq_ignore_ascii_case("off") || value.is_empty() {
        return Ok(None);
    }
    value
        .parse()
        .map(Some)
        .map_err(|e| ConfigError(format!("invalid metrics listen address {value:?}: {e}")))
}

fn default_worker_id() -> String {
    let raw = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .unwrap_or_else(|_| "worker".into());
    let id: String = raw
        .trim()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '-'
            }
        })
        .collect();
    if id.is_empty() { "worker".into() } else { id }
}

impl WorkerArgs {
    /// Resolves flags, environment and file into a [`WorkerConfig`].
    pub fn resolve(self) -> Result<WorkerConfig, ConfigError> {
        let file = match &self.config {
            Some(path) => read_file(path)?,
            None => WorkerFile::default(),
        };
        let worker_id = self
            .worker_id
            .or(file.worker_id)
            .unwrap_or_else(default_worker_id);
        let worker_id = WorkerId::new(worker_id).map_err(|e| ConfigError(e.to_string()))?;
        let data_dir = self
            .data_dir
            .or(file.data_dir)
            .unwrap_or_else(|| PathBuf::from("/var/lib/hearth/worker"));
        let mut config = WorkerConfig::new(worker_id, data_dir);
        if let Some(url) = self.nats_url.or(file.nats_url) {
            config.nats_url = url;
        }
        if let Some(prefix) = self.prefix.or(file.prefix) {
            config.subjects = Subjects::new(&prefix).map_err(|e| ConfigError(e.to_string()))?;
        }
        if let Some(provider) = self.provider.or(file.provider) {
            config.provider = provider;
        }
        if let Some(isolation) = self.isolation.or(file.isolation) {
            config.isolation = isolation;
        }
        if let Some(sandbox) = file.sandbox {
            config.sandbox = sandbox;
        }
        if let Some(bwrap) = self.bwrap.or(file.bwrap) {
            config.sandbox.bwrap = bwrap;
        }
        config.agent = self.agent.or(file.agent);
        if let Some(qemu) = file.qemu {
            config.qemu = qemu;
        }
        if let Some(image) = self.qemu_image {
            config.qemu.image = image;
        }
        if let Some(accel) = self.qemu_accel {
            config.qemu.accel = accel;
        }
        if let Some(oci) = file.oci {
            config.oci = oci;
        }
        if let Some(firecracker) = file.firecracker {
            config.firecracker = firecracker;
        }
        if let Some(bin) = self.firecracker_bin {
            config.firecracker.binary = bin;
        }
        if let Some(kernel) = self.firecracker_kernel {
            config.firecracker.kernel = kernel;
        }
        if let Some(rootfs) = self.firecracker_rootfs {
            config.firecracker.rootfs = rootfs;
        }
        if let Some(max_vms) = self.max_vms.or(file.max_vms) {
            if max_vms == 0 {
                return Err(ConfigError("max_vms must be at least 1".into()));
            }
            config.max_vms = max_vms;
        }
        if let Some(n) = self.job_concurrency.or(file.job_concurrency) {
            if n == 0 {
                return Err(ConfigError("job_concurrency must be at least 1".into()));
            }
            config.job_concurrency = n;
        }
        if let Some(ms) = self.heartbeat_ms.or(file.heartbeat_ms) {
            if ms < 50 {
                return Err(ConfigError("heartbeat_ms must be at least 50".into()));
            }
            config.heartbeat_interval = Duration::from_millis(ms);
        }
        config.metrics_listen = match self.metrics_listen.or(file.metrics_listen) {
            Some(value) => parse_listen(&value)?,
            None => Some(SocketAddr::from(([0, 0, 0, 0], 9102))),
        };
        config.backup_dir = self.backup_dir.or(file.backup_dir);
        if let Some(n) = self.backup_keep.or(file.backup_keep) {
            config.backup_retention.keep = n;
        }
        if let Some(s) = self.backup_max_age_s.or(file.backup_max_age_s) {
            config.backup_retention.max_age = (s > 0).then(|| Duration::from_secs(s));
        }
        if let Some(n) = self.backup_max_bytes.or(file.backup_max_bytes) {
            config.backup_retention.max_bytes = n;
        }
        for (name, value, slot) in [
            (
                "max_processes_per_vm",
                file.max_processes_per_vm.map(u64::from),
                0usize,
            ),
            ("process_ring_bytes", file.process_ring_bytes, 1),
            ("max_stdin_bytes", file.max_stdin_bytes, 2),
        ] {
            let Some(n) = value else { continue };
            if n == 0 {
                return Err(ConfigError(format!("{name} must be at least 1")));
            }
            match slot {
                0 => config.processes.max_per_vm = n.min(u64::from(u32::MAX)) as u32,
                1 => config.processes.ring_bytes = n,
                _ => config.processes.max_stdin_bytes = n,
            }
        }
        if let Some(n) = self.max_queued_per_vm.or(file.max_queued_per_vm) {
            if n == 0 {
                return Err(ConfigError("max_queued_per_vm must be at least 1".into()));
            }
            config.max_queued_per_vm = n;
        }
        if let Some(n) = self
            .max_queued_bytes_per_vm
            .or(file.max_queued_bytes_per_vm)
        {
            if n == 0 {
                return Err(ConfigError(
                    "max_queued_bytes_per_vm must be at least 1".into(),
                ));
            }
            config.max_queued_bytes_per_vm = n;
        }
        if let Some(s) = self.drain_grace_s.or(file.drain_grace_s) {
            config.drain_grace = Duration::from_secs(s);
        }
        if let Some(r) = self.store_replicas.or(file.store_replicas) {
            if !(1..=5).contains(&r) {
                return Err(ConfigError("store_replicas must be 1..=5".into()));
            }
            config.store_replicas = r;
        }
        config.shell = self.shell.or(file.shell);
        if !self.shell_args.is_empty() {
            config.shell_args = self.shell_args;
        } else if let Some(args) = file.shell_args {
            config.shell_args = args;
        }
        config.env = file.env.unwrap_or_default();
        config.env.extend(self.env);
        if let Some(b) = self.store_max_bytes.or(file.store_max_bytes) {
            if b == 0 {
                return Err(ConfigError("store_max_bytes must be positive".into()));
            }
            config.store_max_bytes = b;
        }
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn firecracker_is_selectable_with_its_own_section() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.toml");
        std::fs::write(
            &path,
            "provider = \"firecracker\"\ndata_dir = \"/d\"\n[firecracker]\nbinary = \"/fc\"\nkernel = \"/k\"\nrootfs = \"/r\"\n",
        )
        .unwrap();
        let args = WorkerArgs {
            config: Some(path),
            firecracker_rootfs: Some("/flag-rootfs".into()),
            ..WorkerArgs::default()
        };
        let config = args.resolve().unwrap();
        assert_eq!(config.provider, ProviderKind::Firecracker);
        let fc = config.firecracker_config();
        assert_eq!(fc.binary, PathBuf::from("/fc"));
        assert_eq!(fc.kernel, PathBuf::from("/k"));
        assert_eq!(fc.rootfs, PathBuf::from("/flag-rootfs"));
        assert_eq!(fc.root, PathBuf::from("/d/firecracker"));
    }

    #[test]
    fn flags_win_over_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.toml");
        std::fs::write(
            &path,
            "worker_id = \"from-file\"\nmax_vms = 3\nprefix = \"acme\"\nmetrics_listen = \"off\"\n",
        )
        .unwrap();
        let config = WorkerArgs {
            config: Some(path),
            worker_id: Some("from-flag".into()),
            ..Default::default()
        }
        .resolve()
        .unwrap();
        assert_eq!(config.worker_id.as_str(), "from-flag");
        assert_eq!(config.max_vms, 3);
        assert_eq!(config.subjects.prefix(), "acme");
        assert_eq!(config.metrics_listen, None);
    }

    #[test]
    fn bounds_have_defaults_and_are_configurable() {
        let config = WorkerArgs::default().resolve().unwrap();
        assert_eq!(config.max_queued_per_vm, DEFAULT_MAX_QUEUED_PER_VM);
        assert_eq!(
            config.max_queued_bytes_per_vm,
            DEFAULT_MAX_QUEUED_BYTES_PER_VM
        );
        assert_eq!(config.backup_retention, BackupRetention::default());
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.toml");
        std::fs::write(
            &path,
            "max_queued_per_vm = 8\nmax_queued_bytes_per_vm = 1024\nbackup_keep = 3\nbackup_max_age_s = 0\nbackup_max_bytes = 5\n",
        )
        .unwrap();
        let config = WorkerArgs {
            config: Some(path),
            backup_keep: Some(4),
            ..Default::default()
        }
        .resolve()
        .unwrap();
        assert_eq!(config.max_queued_per_vm, 8);
        assert_eq!(config.max_queued_bytes_per_vm, 1024);
        assert_eq!(
            config.backup_retention,
            BackupRetention {
                keep: 4,
                max_age: None,
                max_bytes: 5
            }
        );
        let err = WorkerArgs {
            max_queued_per_vm: Some(0),
            ..Default::default()
        }
        .resolve()
        .unwrap_err();
        assert!(err.to_string().contains("max_queued_per_vm"), "{err}");
    }

    #[test]
    fn process_limits_have_defaults_and_come_from_the_file() {
        let config = WorkerArgs::default().resolve().unwrap();
        assert_eq!(config.processes, ProcessLimits::default());
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.toml");
        std::fs::write(
            &path,
            "max_processes_per_vm = 3\nprocess_ring_bytes = 4096\nmax_stdin_bytes = 10\n",
        )
        .unwrap();
        let args = |path: &Path| WorkerArgs {
            config: Some(path.to_path_buf()),
            ..Default::default()
        };
        let config = args(&path).resolve().unwrap();
        assert_eq!(
            (
                config.processes.max_per_vm,
                config.processes.ring_bytes,
                config.processes.max_stdin_bytes
            ),
            (3, 4096, 10)
        );
        std::fs::write(&path, "process_ring_bytes = 0\n").unwrap();
        let err = args(&path).resolve().unwrap_err();
        assert!(err.to_string().contains("process_ring_bytes"), "{err}");
    }

    #[test]
    fn shell_and_env_come_from_the_file_and_flags() {
        let config = WorkerArgs::default().resolve().unwrap();
        assert_eq!(config.shell_args, ["-c"]);
        assert_eq!(config.shell_argv("true"), None, "the provider's default");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.toml");
        std::fs::write(
            &path,
            "shell = \"/bin/bash\"\nshell_args = [\"-lc\"]\n[env]\nA = \"file\"\nB = \"file\"\n",
        )
        .unwrap();
        let config = WorkerArgs {
            config: Some(path.clone()),
            env: vec![("B".into(), "flag".into())],
            ..Default::default()
        }
        .resolve()
        .unwrap();
        assert_eq!(config.shell_argv("ls").unwrap(), ["/bin/bash", "-lc", "ls"]);
        assert_eq!(config.env["A"], "file");
        assert_eq!(config.env["B"], "flag", "a flag wins over the file");
        assert_eq!(config.process_config().env, config.env);
        assert_eq!(config.process_config().shell, PathBuf::from("/bin/bash"));
        let config = WorkerArgs {
            config: Some(path),
            shell_args: vec!["-e".into(), "-c".into()],
            ..Default::default()
        }
        .resolve()
        .unwrap();
        assert_eq!(
            config.shell_argv("x").unwrap(),
            ["/bin/bash", "-e", "-c", "x"]
        );
        assert!(parse_env_pair("novalue").is_err());
    }

    #[test]
    fn bad_values_are_one_line_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.toml");
        std::fs::write(&path, "max_vmz = 3\n").unwrap();
        let err = WorkerArgs {
            config: Some(path),
            ..Default::default()
        }
        .resolve()
        .unwrap_err();
        assert!(!err.to_string().contains('\n'), "{err}");
        assert!(err.to_string().contains("max_vmz"), "{err}");
        let err = WorkerArgs {
            worker_id: Some("a.b".into()),
            ..Default::default()
        }
        .resolve()
        .unwrap_err();
        assert!(err.to_string().contains("worker_id"), "{err}");
    }

    #[test]
    fn the_qemu_section_and_flags_configure_the_qemu_provider() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.toml");
        std::fs::write(
            &path,
            "[qemu]\nimage = \"/img\"\nagent_timeout_ms = 3000\naccel = \"kvm\"\n",
        )
        .unwrap();
        let config = WorkerArgs {
            config: Some(path),
            data_dir: Some(dir.path().to_path_buf()),
            qemu_accel: Some(Accel::Tcg),
            ..Default::default()
        }
        .resolve()
        .unwrap();
        let qemu = config.qemu_config();
        assert_eq!(qemu.image, PathBuf::from("/img"));
        assert_eq!(qemu.agent_timeout_ms, 3000);
        assert_eq!(qemu.accel, Accel::Tcg, "the flag wins over the file");
        assert_eq!(qemu.root, dir.path().join("qemu"));
    }
}
