//! The worker's provider layer: the `VmProvider` / `VmQuery` traits every VM backend implements, the
//! domain types they speak (plain Rust, not wire types) and `ProviderError`.
//!
//! Adapters: [`fake`] (in memory, for scheduler logic tests) and [`process`] (a volume directory plus
//! commands run by a shell in it, optionally inside bubblewrap namespaces; the embedded default);
//! [`qemu`] (real microVMs under QEMU `-M microvm`, with the Hearth guest agent inside) and
//! [`firecracker`] (Firecracker microVMs on hosts with KVM, the agent over vsock); [`oci`] (OCI
//! containers run by crun/runc: the process adapter with containers for sandboxes).
//!
//! Architecture invariant: the caller (the worker's NATS layer) serialises operations per VM with a
//! per-VM async lock and enforces capacity. Providers are still internally thread-safe: operations on
//! different VMs run in parallel and no provider holds a global lock across a long await.
//!
//! Size: just over 800 lines because the domain types (`VmSpec`, `ExecSpec`, `ExecOutcome`, …)
//! and `ProviderError` sit with the traits that speak them; everything a backend shares lives in
//! `registry/` and `guest/`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;

pub use hearth_messages::{SnapshotId, TemplateName, VmId};

mod agent;
pub mod fake;
pub mod firecracker;
pub mod oci;
mod paths;
pub mod process;
pub mod qemu;
mod registry;

pub use registry::TOMBSTONE_CAPACITY;
pub(crate) use registry::Tombstones;
mod guest;
mod snapshot_archive;

pub use fake::{FakeConfig, FakeOp, FakeProvider};
pub use firecracker::{FirecrackerConfig, FirecrackerMmds, FirecrackerProvider};
pub use oci::OciConfig;
pub use process::{Isolation, ProcessConfig, ProcessProvider, SandboxConfig, WORKSPACE};
pub use qemu::{Accel, QemuConfig, QemuProvider};

/// State-changing operations on VMs, executed by lifecycle jobs and the data plane.
#[async_trait]
pub trait VmProvider: Send + Sync + 'static {
    /// Short adapter name for logs and heartbeats: `"fake"`, `"process"`.
    fn name(&self) -> &'static str;

    /// What separates this provider's VMs from the host and from each other, as enforced.
    fn isolation(&self) -> hearth_messages::IsolationReport;

    /// What runs the VMs, with its version, for heartbeats (`versions.provider`): the VMM's
    /// `--version` (qemu, firecracker), the sandbox tool's (process), or this crate's.
    fn version(&self) -> Option<String>;

    /// Creates and boots a VM with default settings (empty volume). The VM is `Running` on return.
    /// `AlreadyExists` if `vm_id` is in use (a destroyed VM's tombstone does not count).
    async fn create_vm(&self, vm_id: &VmId) -> Result<VmView, ProviderError> {
        self.create_vm_with_spec(vm_id, &VmSpec::default()).await
    }

    /// Creates and boots a VM from `spec`: a cold boot (seeded from `spec.base`, then `spec.bootstrap`
    /// run once), or a restore of `spec.restore_from` (`NotFound` if that snapshot is unknown). A
    /// failed create leaves nothing behind.
    async fn create_vm_with_spec(
        &self,
        vm_id: &VmId,
        spec: &VmSpec,
    ) -> Result<VmView, ProviderError>;

    /// `Stopped` -> `Running`. `InvalidState` if running or destroyed.
    async fn start_vm(&self, vm_id: &VmId) -> Result<VmView, ProviderError>;

    /// `Running` -> `Stopped`: nothing in the VM runs until [`start_vm`](Self::start_vm). What is
    /// kept besides the volume is the backend's: the VMM backends keep the VM's memory, `oci`
    /// freezes its container (processes and memory kept), `process` kills its sandbox.
    /// `InvalidState` if stopped or destroyed.
    async fn stop_vm(&self, vm_id: &VmId) -> Result<VmView, ProviderError>;

    /// `Running` or `Stopped` -> `Paused`: the VM's whole state (memory and devices with its
    /// processes) is kept for [`start_vm`](Self::start_vm) to resume exactly where it was. The VMM
    /// backends write it to the worker's disk and end the VMM (no host memory while paused); the
    /// process backend freezes the sandbox's processes (their memory stays resident). The pause is
    /// durable: a reopened provider still holds the VM `Paused`. A pause that fails leaves the VM
    /// as it was (a full disk included: `NoSpace`). `InvalidState` if paused or destroyed,
    /// `Unsupported` where the backend cannot.
    async fn pause_vm(&self, vm_id: &VmId) -> Result<VmView, ProviderError> {
        let _ = vm_id;
        Err(ProviderError::Unsupported(format!(
            "the {} provider cannot pause vms",
            self.name()
        )))
    }

    /// Bytes of paused VM state this provider holds on disk (for the worker's gauge).
    fn paused_bytes(&self) -> u64 {
        0
    }

    /// Writes everything resuming a `Paused` VM needs (`pause_upload`) as one stream, checksummed
    /// within, and returns its length; the VM stays paused here. `InvalidState` unless paused,
    /// `Unsupported` where a paused VM is not a file (the process backend freezes it in memory:
    /// nothing survives its host).
    async fn export_paused(
        &self,
        vm_id: &VmId,
        out: &mut (dyn AsyncWrite + Unpin + Send),
    ) -> Result<u64, ProviderError> {
        let _ = (vm_id, out);
        Err(ProviderError::Unsupported(format!(
            "the {} provider keeps a paused vm in memory: pause_upload needs a provider that \
             pauses to disk (qemu)",
            self.name()
        )))
    }

    /// Makes `vm_id` from a stream [`export_paused`](Self::export_paused) wrote: the same machine,
    /// `Paused`, for [`start_vm`](Self::start_vm) to resume. Every checksum is verified before the
    /// VM exists; a corrupt, truncated or foreign stream is `InvalidArgument` and leaves nothing.
    /// `AlreadyExists` if the id is taken.
    async fn import_paused(
        &self,
        vm_id: &VmId,
        input: &mut (dyn AsyncRead + Unpin + Send),
    ) -> Result<VmView, ProviderError> {
        let _ = (vm_id, input);
        Err(ProviderError::Unsupported(format!(
            "the {} provider cannot restore a paused vm from another worker",
            self.name()
        )))
    }

    /// Captures the VM (running or stopped) as snapshot `snapshot_id`. `AlreadyExists` if the snapshot
    /// exists, `InvalidState` if the VM is destroyed.
    async fn snapshot_vm(
        &self,
        vm_id: &VmId,
        snapshot_id: &SnapshotId,
    ) -> Result<SnapshotInfo, ProviderError>;

    /// Tears the VM down for good: kills its processes, deletes its volume and leaves a `Destroyed`
    /// tombstone. Destroying a tombstoned VM again is a no-op; an unknown VM is `NotFound`.
    async fn destroy_vm(&self, vm_id: &VmId) -> Result<(), ProviderError>;

    /// Renames a VM (the warm-pool hand-off). The VM keeps running and keeps its state and files.
    /// `NotFound` if `old` is unknown, `InvalidState` if it is destroyed, `AlreadyExists` if `new` is
    /// in use.
    async fn rename_vm(&self, old: &VmId, new: &VmId) -> Result<VmView, ProviderError>;

    /// Runs one command in a running VM. With `chunks`, output is streamed as it arrives and the
    /// outcome's `stdout`/`stderr` hold only what could not be delivered. `InvalidState` unless the VM
    /// is running. A command that fails to start is not an error: it yields exit code 127.
    /// Activity: `last_activity_ms` is bumped when the command starts **and** when it ends, so a
    /// long command never looks idle the moment it finishes (file transfers bump it too).
    async fn exec(
        &self,
        vm_id: &VmId,
        spec: ExecSpec,
        chunks: Option<mpsc::Sender<OutputChunk>>,
    ) -> Result<ExecOutcome, ProviderError>;

    /// Writes a file at `path` (relative to the volume, parents created), replacing any file there
    /// (a symlink there is replaced, not followed). `mode` is masked to `0o777`; without it a
    /// replaced file keeps its mode and a new one gets the default. Returns the bytes written.
    async fn put_file(
        &self,
        vm_id: &VmId,
        path: &str,
        data: &[u8],
        mode: Option<u32>,
    ) -> Result<u64, ProviderError>;

    /// Reads the file at `path` (relative to the volume). `NotFound` if missing, `InvalidArgument` if
    /// it is a directory or larger than `max_bytes`.
    async fn get_file(
        &self,
        vm_id: &VmId,
        path: &str,
        max_bytes: u64,
    ) -> Result<Vec<u8>, ProviderError>;

    /// Archives the VM's volume as `<dest_dir>/<vm_id>-<unix_ms>.tar.zst` and returns that path.
    async fn backup_vm(&self, vm_id: &VmId, dest_dir: &Path) -> Result<PathBuf, ProviderError>;

    /// Writes the snapshot as one self-describing byte stream (for the fleet's object store).
    /// Returns the number of bytes written.
    async fn export_snapshot(
        &self,
        snapshot_id: &SnapshotId,
        out: &mut (dyn AsyncWrite + Unpin + Send),
    ) -> Result<u64, ProviderError>;

    /// Stores a stream written by [`export_snapshot`](Self::export_snapshot) (of the same adapter) as
    /// `snapshot_id`. `AlreadyExists` if present; a corrupt stream is `InvalidArgument` and leaves
    /// nothing behind.
    async fn import_snapshot(
        &self,
        snapshot_id: &SnapshotId,
        input: &mut (dyn AsyncRead + Unpin + Send),
    ) -> Result<SnapshotInfo, ProviderError>;

    /// Deletes a snapshot (e.g. a replaced template). `NotFound` if unknown. VMs restored from it are
    /// unaffected.
    async fn delete_snapshot(&self, snapshot_id: &SnapshotId) -> Result<(), ProviderError>;

    /// A background-process operation in a running VM, answered by its guest agent, which owns
    /// the processes and their output rings. `wait` bounds how long the agent may hold the call
    /// (a `Read` or `Wait` with a long wait). The agent going away is `Lost`, never a hang.
    /// Adapters without an agent answer `Unsupported`.
    async fn process(
        &self,
        vm_id: &VmId,
        call: ProcessCall,
        wait: Duration,
    ) -> Result<ProcessAnswer, ProviderError> {
        let _ = (call, wait);
        Err(ProviderError::Unsupported(format!(
            "vm {vm_id}: background processes are not supported by the {} provider",
            self.name()
        )))
    }
}

pub use hearth_messages::agent::{ProcessAnswer, ProcessCall};

/// Read-only queries against VM state, used by heartbeats and reconcile.
#[async_trait]
pub trait VmQuery: Send + Sync + 'static {
    /// Every known VM, including `Destroyed` tombstones, sorted by id.
    async fn list_vms(&self) -> Result<Vec<VmView>, ProviderError>;

    /// Number of VMs that are not destroyed: what counts against capacity. Adapters answer from
    /// their index; the default counts [`list_vms`](Self::list_vms).
    async fn count_vms(&self) -> Result<usize, ProviderError> {
        Ok(self
            .list_vms()
            .await?
            .iter()
            .filter(|v| v.state != VmState::Destroyed)
            .count())
    }

    /// One VM (possibly a `Destroyed` tombstone), or `None` if unknown.
    async fn get_vm(&self, vm_id: &VmId) -> Result<Option<VmView>, ProviderError>;

    /// Ids of the snapshots taken of the VM while it had this id, sorted; `None` if the VM is unknown.
    async fn list_snapshots(&self, vm_id: &VmId) -> Result<Option<Vec<SnapshotId>>, ProviderError>;

    /// One snapshot, or `None` if unknown.
    async fn get_snapshot(
        &self,
        snapshot_id: &SnapshotId,
    ) -> Result<Option<SnapshotInfo>, ProviderError>;

    /// Every snapshot on this worker, sorted by id (for heartbeats: which templates can restore here).
    async fn list_all_snapshots(&self) -> Result<Vec<SnapshotInfo>, ProviderError>;
}

/// The trait object the worker holds: `Arc<dyn VmRuntime>`, chosen from config at runtime.
pub trait VmRuntime: VmProvider + VmQuery {}

impl<T> VmRuntime for T where T: VmProvider + VmQuery {}

/// Lifecycle state of a VM. Create and restore yield a `Running` VM (booted and ready).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VmState {
    Running,
    Stopped,
    /// Paused to disk (VMM backends) or frozen (process): resumed by `start_vm`.
    Paused,
    Destroyed,
}

impl VmState {
    /// Lowercase name, as used in messages and metrics labels.
    pub fn as_str(self) -> &'static str {
        match self {
            VmState::Running => "running",
            VmState::Stopped => "stopped",
            VmState::Paused => "paused",
            VmState::Destroyed => "destroyed",
        }
    }
}

impl std::fmt::Display for VmState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the worker knows about one VM. Times are unix milliseconds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmView {
    pub vm_id: VmId,
    pub state: VmState,
    /// The template the VM was created for, if any (inherited from the snapshot on restore).
    pub template: Option<TemplateName>,
    pub created_ms: u64,
    /// Last exec, file transfer or lifecycle change; drives idle stop.
    pub last_activity_ms: u64,
    /// When the VM was last stopped or paused; `None` while running.
    pub stopped_ms: Option<u64>,
    /// The snapshot the VM was restored from; `None` for a cold boot.
    pub restored_from: Option<SnapshotId>,
}

/// How to create a VM. `Default` is an empty cold-booted VM with no template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmSpec {
    pub template: Option<TemplateName>,
    /// Size of the VM; the process adapter enforces them with cgroups where the host allows
    /// (0 = no limit there).
    pub vcpus: u32,
    pub memory_mib: u32,
    /// Disk quota of the volume, MiB (0 = none).
    pub disk_mib: u32,
    /// Most processes at once (0 = no limit).
    pub max_processes: u32,
    /// Network access of the VM's commands.
    pub network: NetworkMode,
    /// Environment added to every command run in the VM (under the request's own `env`).
    pub env: BTreeMap<String, String>,
    /// A directory, `.tar` or `.tar.zst` copied into the volume on a cold boot.
    pub base: Option<PathBuf>,
    /// Argv run once in the new VM after a cold boot; a failure (non-zero exit, timeout) fails the
    /// create and leaves nothing behind.
    pub bootstrap: Option<Vec<String>>,
    /// Restore this snapshot instead of a cold boot; `base` and `bootstrap` are then ignored.
    pub restore_from: Option<SnapshotId>,
}

/// The isolation of a real VM: guest code runs only in the guest, sized by the VM itself.
pub(crate) fn vm_isolation() -> hearth_messages::IsolationReport {
    hearth_messages::IsolationReport {
        mode: "vm".into(),
        limits: "vm".into(),
        disk: "vm".into(),
    }
}

/// Memory of a VM when its template does not say.
pub const DEFAULT_MEMORY_MIB: u32 = 512;
/// Disk quota of a VM when its template does not say (a sparse file: unused space costs nothing).
pub const DEFAULT_DISK_MIB: u32 = 4096;
/// Process limit of a VM when its template does not say.
pub const DEFAULT_MAX_PROCESSES: u32 = 512;

/// Network access of a VM's commands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NetworkMode {
    /// No network at all (only a loopback of its own).
    #[default]
    None,
    /// Outbound connections through a user-mode network stack, never to the host's own
    /// addresses, its loopback or link-local (metadata) addresses.
    Egress,
}

impl std::fmt::Display for NetworkMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl NetworkMode {
    /// `"none"` or `"egress"`, as in templates.
    pub fn as_str(self) -> &'static str {
        match self {
            NetworkMode::None => "none",
            NetworkMode::Egress => "egress",
        }
    }

    /// Parses `none` or `egress`.
    pub fn parse(text: &str) -> Result<Self, ProviderError> {
        match text {
            "none" => Ok(NetworkMode::None),
            "egress" => Ok(NetworkMode::Egress),
            other => Err(ProviderError::InvalidArgument(format!(
                "network {other:?} is not none or egress"
            ))),
        }
    }
}

impl Default for VmSpec {
    fn default() -> Self {
        Self {
            template: None,
            vcpus: 1,
            memory_mib: DEFAULT_MEMORY_MIB,
            disk_mib: DEFAULT_DISK_MIB,
            max_processes: DEFAULT_MAX_PROCESSES,
            network: NetworkMode::None,
            env: BTreeMap::new(),
            base: None,
            bootstrap: None,
            restore_from: None,
        }
    }
}

impl VmSpec {
    /// Rejects specs no adapter can create (an empty bootstrap argv on a cold boot).
    pub(crate) fn validate(&self) -> Result<(), ProviderError> {
        if let Some(bootstrap) = &self.bootstrap
            && self.restore_from.is_none()
            && bootstrap.first().is_none_or(String::is_empty)
        {
            return Err(ProviderError::InvalidArgument(
                "bootstrap argv must not be empty".into(),
            ));
        }
        Ok(())
    }
}

/// A snapshot held by this worker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotInfo {
    pub snapshot_id: SnapshotId,
    /// The id the VM had when the snapshot was taken (`None` for an import that did not say).
    pub source_vm: Option<VmId>,
    pub template: Option<TemplateName>,
    pub created_ms: u64,
    /// Bytes the snapshot occupies on this worker (compressed).
    pub size_bytes: u64,
}

/// What an exec runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Program {
    /// A command line run by the VM's shell as `sh -c <cmd>`.
    Shell(String),
    /// An argv run directly; `argv[0]` is looked up in `PATH`.
    Argv(Vec<String>),
}

/// Default exec timeout, matching the wire default `timeout_ms = 60000`.
pub const DEFAULT_EXEC_TIMEOUT: Duration = Duration::from_secs(60);
/// Default cap on captured output per stream, matching the wire default (1 MiB).
pub const DEFAULT_MAX_OUTPUT_BYTES: usize = 1024 * 1024;

/// One command to run in a VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecSpec {
    pub program: Program,
    /// Added on top of the adapter's and the VM's environment.
    pub env: BTreeMap<String, String>,
    /// Working directory relative to the volume (confined to it); `None` is the volume itself.
    pub cwd: Option<String>,
    /// Bytes fed to the command's stdin, which is then closed; `None` gives it `/dev/null`.
    pub stdin: Option<Vec<u8>>,
    /// On expiry the whole process group is killed and the outcome says `timed_out`.
    pub timeout: Duration,
    /// Output kept per stream; the rest is drained and dropped, and flagged as truncated.
    pub max_output_bytes: usize,
}

impl ExecSpec {
    /// `sh -c cmd` with default limits.
    pub fn shell(cmd: impl Into<String>) -> Self {
        Self::new(Program::Shell(cmd.into()))
    }

    /// A direct argv with default limits.
    pub fn argv<I, S>(argv: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Self::new(Program::Argv(argv.into_iter().map(Into::into).collect()))
    }

    /// `program` with no env, cwd or stdin and default limits.
    pub fn new(program: Program) -> Self {
        Self {
            program,
            env: BTreeMap::new(),
            cwd: None,
            stdin: None,
            timeout: DEFAULT_EXEC_TIMEOUT,
            max_output_bytes: DEFAULT_MAX_OUTPUT_BYTES,
        }
    }

    pub fn with_env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.insert(key.into(), value.into());
        self
    }

    pub fn with_cwd(mut self, cwd: impl Into<String>) -> Self {
        self.cwd = Some(cwd.into());
        self
    }

    pub fn with_stdin(mut self, stdin: impl Into<Vec<u8>>) -> Self {
        self.stdin = Some(stdin.into());
        self
    }

    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    pub fn with_max_output_bytes(mut self, max_output_bytes: usize) -> Self {
        self.max_output_bytes = max_output_bytes;
        self
    }

    /// Rejects specs no adapter can run (an empty argv or empty program name).
    pub(crate) fn validate(&self) -> Result<(), ProviderError> {
        if let Program::Argv(argv) = &self.program {
            match argv.first() {
                None => {
                    return Err(ProviderError::InvalidArgument(
                        "argv must not be empty".into(),
                    ));
                }
                Some(p) if p.is_empty() => {
                    return Err(ProviderError::InvalidArgument(
                        "argv[0] must not be empty".into(),
                    ));
                }
                Some(_) => {}
            }
        }
        let has_nul = |s: &str| s.contains('\0');
        let program_nul = match &self.program {
            Program::Shell(cmd) => has_nul(cmd),
            Program::Argv(argv) => argv.iter().any(|a| has_nul(a)),
        };
        if program_nul || self.env.iter().any(|(k, v)| has_nul(k) || has_nul(v)) {
            return Err(ProviderError::InvalidArgument(
                "command and environment must not contain NUL bytes".into(),
            ));
        }
        if self.env.keys().any(|k| k.is_empty() || k.contains('=')) {
            return Err(ProviderError::InvalidArgument(
                "environment variable names must be non-empty and must not contain '='".into(),
            ));
        }
        Ok(())
    }
}

/// Which output stream a chunk came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OutputStream {
    Stdout,
    Stderr,
}

impl OutputStream {
    /// `"stdout"` / `"stderr"`, as in the `Hearth-Chunk` header.
    pub fn as_str(self) -> &'static str {
        match self {
            OutputStream::Stdout => "stdout",
            OutputStream::Stderr => "stderr",
        }
    }
}

/// A piece of streamed output. Chunks of one stream arrive in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputChunk {
    pub stream: OutputStream,
    pub data: Bytes,
}

/// The result of one exec.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ExecOutcome {
    /// The exit code, or `128 + signal` when the command was killed by a signal (like a shell).
    pub exit_code: i32,
    /// The signal that killed the command, if any.
    pub signal: Option<i32>,
    /// Captured output; when streaming, only what was not delivered as chunks.
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    /// Output beyond `max_output_bytes` was dropped (streamed output counts against the cap too).
    pub stdout_truncated: bool,
    pub stderr_truncated: bool,
    /// The command outlived its timeout and its process group was killed.
    pub timed_out: bool,
    pub duration: Duration,
    /// The VM's memory limit was hit while the command ran and the kernel killed a process.
    pub oom_killed: bool,
}

impl ExecOutcome {
    /// Exited with code 0 within its timeout.
    pub fn success(&self) -> bool {
        self.exit_code == 0 && !self.timed_out
    }
}

/// Everything a provider can fail with. Messages are lowercase without a trailing period.
#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    /// The operation does not fit the VM's state (exec on a stopped VM, start a running one).
    #[error("{0}")]
    InvalidState(String),
    /// Bad input: a path escaping the volume, an empty argv, a corrupt snapshot stream.
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    Unsupported(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    /// A failure that is not I/O: inside the provider (a task that panicked, metadata that does
    /// not encode) or in a peer's protocol (an unexpected answer from a guest agent or a VMM, a
    /// command in the guest that failed). The source is kept for logs and messages.
    #[error("{context}: {source}")]
    Internal {
        context: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A command the provider ran on the caller's behalf (bootstrap) failed.
    #[error("{0}")]
    CommandFailed(String),
    /// The provider cannot work on this host (e.g. bubblewrap configured but missing).
    #[error("{0}")]
    Unavailable(String),
    /// A deadline passed: the VM (its guest agent) did not answer in time.
    #[error("{0}")]
    Timeout(String),
    /// The VM's disk quota is full: the write did not fit.
    #[error("{0}")]
    NoSpace(String),
    /// A limit of the VM's was reached (too many background processes running).
    #[error("{0}")]
    Quota(String),
}

/// The class of a [`ProviderError`], for mapping onto wire error codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ProviderErrorKind {
    NotFound,
    AlreadyExists,
    InvalidState,
    InvalidArgument,
    Unsupported,
    Io,
    Internal,
    CommandFailed,
    Unavailable,
    Timeout,
    NoSpace,
    Quota,
}

impl ProviderErrorKind {
    /// The wire error code: 404 unknown, 409 conflict, 400 bad request, 500 internal, 503 no
    /// capacity, 504 deadline, 507 disk quota full.
    pub fn status_code(self) -> u16 {
        match self {
            ProviderErrorKind::NotFound => 404,
            ProviderErrorKind::AlreadyExists | ProviderErrorKind::InvalidState => 409,
            ProviderErrorKind::InvalidArgument | ProviderErrorKind::Unsupported => 400,
            ProviderErrorKind::Io
            | ProviderErrorKind::Internal
            | ProviderErrorKind::CommandFailed => 500,
            ProviderErrorKind::Unavailable => 503,
            ProviderErrorKind::Timeout => 504,
            ProviderErrorKind::NoSpace => 507,
            ProviderErrorKind::Quota => 429,
        }
    }
}

impl ProviderError {
    pub fn kind(&self) -> ProviderErrorKind {
        match self {
            ProviderError::NotFound(_) => ProviderErrorKind::NotFound,
            ProviderError::AlreadyExists(_) => ProviderErrorKind::AlreadyExists,
            ProviderError::InvalidState(_) => ProviderErrorKind::InvalidState,
            ProviderError::InvalidArgument(_) => ProviderErrorKind::InvalidArgument,
            ProviderError::Unsupported(_) => ProviderErrorKind::Unsupported,
            ProviderError::Io { .. } => ProviderErrorKind::Io,
            ProviderError::Internal { .. } => ProviderErrorKind::Internal,
            ProviderError::CommandFailed(_) => ProviderErrorKind::CommandFailed,
            ProviderError::Unavailable(_) => ProviderErrorKind::Unavailable,
            ProviderError::Timeout(_) => ProviderErrorKind::Timeout,
            ProviderError::NoSpace(_) => ProviderErrorKind::NoSpace,
            ProviderError::Quota(_) => ProviderErrorKind::Quota,
        }
    }

    /// Shorthand for `self.kind().status_code()`.
    pub fn status_code(&self) -> u16 {
        self.kind().status_code()
    }

    /// Wraps an I/O error with what was being done.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        ProviderError::Io {
            context: context.into(),
            source,
        }
    }

    /// A failure that is not I/O (see [`ProviderError::Internal`]), with what was being done.
    pub fn internal(
        context: impl Into<String>,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        ProviderError::Internal {
            context: context.into(),
            source: source.into(),
        }
    }

    pub(crate) fn vm_not_found(vm_id: &VmId) -> Self {
        ProviderError::NotFound(format!("vm {vm_id} not found"))
    }

    pub(crate) fn vm_exists(vm_id: &VmId) -> Self {
        ProviderError::AlreadyExists(format!("vm {vm_id} already exists"))
    }

    pub(crate) fn vm_destroyed(vm_id: &VmId) -> Self {
        ProviderError::InvalidState(format!("vm {vm_id} is destroyed"))
    }

    pub(crate) fn snapshot_not_found(snapshot_id: &SnapshotId) -> Self {
        ProviderError::NotFound(format!("snapshot {snapshot_id} not found"))
    }

    pub(crate) fn snapshot_exists(snapshot_id: &SnapshotId) -> Self {
        ProviderError::AlreadyExists(format!("snapshot {snapshot_id} already exists"))
    }

    pub(crate) fn corrupt_snapshot(detail: impl std::fmt::Display) -> Self {
        ProviderError::InvalidArgument(format!("corrupt snapshot stream: {detail}"))
    }
}

/// The one state-machine rule set both adapters apply, so they cannot drift apart.
pub(crate) mod lifecycle {
    use super::{ProviderError, VmId, VmState};

    /// Exec and file transfer need a running VM.
    pub(crate) fn require_running(vm_id: &VmId, state: VmState) -> Result<(), ProviderError> {
        match state {
            VmState::Running => Ok(()),
            VmState::Stopped => Err(ProviderError::InvalidState(format!(
                "vm {vm_id} is stopped"
            ))),
            VmState::Paused => Err(ProviderError::InvalidState(format!("vm {vm_id} is paused"))),
            VmState::Destroyed => Err(ProviderError::vm_destroyed(vm_id)),
        }
    }

    /// A pause needs a VM that is running or stopped.
    pub(crate) fn check_pause(vm_id: &VmId, state: VmState) -> Result<(), ProviderError> {
        match state {
            VmState::Running | VmState::Stopped => Ok(()),
            VmState::Paused => Err(ProviderError::InvalidState(format!(
                "vm {vm_id} is already paused"
            ))),
            VmState::Destroyed => Err(ProviderError::vm_destroyed(vm_id)),
        }
    }

    pub(crate) fn check_start(vm_id: &VmId, state: VmState) -> Result<(), ProviderError> {
        match state {
            VmState::Stopped | VmState::Paused => Ok(()),
            VmState::Running => Err(ProviderError::InvalidState(format!(
                "vm {vm_id} is already running"
            ))),
            VmState::Destroyed => Err(ProviderError::vm_destroyed(vm_id)),
        }
    }

    pub(crate) fn check_stop(vm_id: &VmId, state: VmState) -> Result<(), ProviderError> {
        match state {
            VmState::Running => Ok(()),
            VmState::Paused => Err(ProviderError::InvalidState(format!("vm {vm_id} is paused"))),
            VmState::Stopped => Err(ProviderError::InvalidState(format!(
                "vm {vm_id} is already stopped"
            ))),
            VmState::Destroyed => Err(ProviderError::vm_destroyed(vm_id)),
        }
    }
}

/// How long a bootstrap command may run.
pub(crate) const BOOTSTRAP_TIMEOUT: Duration = Duration::from_secs(600);
/// Output kept from a bootstrap command for the error message.
pub(crate) const BOOTSTRAP_OUTPUT_BYTES: usize = 64 * 1024;

/// The error of a bootstrap that did not succeed: how it ended, and the end of what it said
/// (its stderr, or its stdout when it wrote nothing to stderr). The same on every backend.
pub(crate) fn bootstrap_failed(vm_id: &VmId, outcome: &ExecOutcome) -> ProviderError {
    let how = if outcome.timed_out {
        format!("timed out after {}s", BOOTSTRAP_TIMEOUT.as_secs())
    } else {
        format!("exited with code {}", outcome.exit_code)
    };
    let tail = if outcome.stderr.is_empty() {
        tail_lossy(&outcome.stdout, 2000)
    } else {
        tail_lossy(&outcome.stderr, 2000)
    };
    ProviderError::CommandFailed(format!("bootstrap of vm {vm_id} {how}: {tail}"))
}

/// A tool's `--version` (its first line); `Unavailable` if it cannot run. VMM snapshots record
/// it (state only loads into the same build) and heartbeats report it.
pub(crate) fn probe_version(bin: &Path) -> Result<String, ProviderError> {
    let output = std::process::Command::new(bin)
        .arg("--version")
        .output()
        .map_err(|e| ProviderError::Unavailable(format!("cannot run {}: {e}", bin.display())))?;
    if !output.status.success() {
        return Err(ProviderError::Unavailable(format!(
            "{} --version fails: {}",
            bin.display(),
            tail_lossy(&output.stderr, 300)
        )));
    }
    Ok(String::from_utf8_lossy(&output.stdout)
        .lines()
        .next()
        .unwrap_or_default()
        .trim()
        .to_owned())
}

/// Free bytes (for unprivileged users) on the file system holding `dir`: whether paused state
/// fits, and the worker's disk gauge.
pub fn disk_free_bytes(dir: &Path) -> std::io::Result<u64> {
    let stat = nix::sys::statvfs::statvfs(dir).map_err(std::io::Error::from)?;
    Ok(stat.blocks_available().saturating_mul(stat.fragment_size()))
}

/// Now as unix milliseconds.
pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The last `max` bytes of `bytes`, lossily decoded, for error messages.
pub(crate) fn tail_lossy(bytes: &[u8], max: usize) -> String {
    let start = bytes.len().saturating_sub(max);
    String::from_utf8_lossy(&bytes[start..]).trim().to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_kinds_map_to_wire_codes() {
        let codes: Vec<u16> = [
            ProviderError::NotFound(String::new()),
            ProviderError::AlreadyExists(String::new()),
            ProviderError::InvalidState(String::new()),
            ProviderError::InvalidArgument(String::new()),
            ProviderError::Unsupported(String::new()),
            ProviderError::io("x", std::io::Error::other("y")),
            ProviderError::internal("x", "y"),
            ProviderError::CommandFailed(String::new()),
            ProviderError::Unavailable(String::new()),
            ProviderError::Timeout(String::new()),
        ]
        .iter()
        .map(ProviderError::status_code)
        .collect();
        assert_eq!(codes, [404, 409, 409, 400, 400, 500, 500, 500, 503, 504]);
    }

    #[test]
    fn internal_errors_keep_their_source() {
        let err = ProviderError::internal("vm a", std::fmt::Error);
        assert_eq!(err.kind(), ProviderErrorKind::Internal);
        let source = std::error::Error::source(&err).expect("a source");
        assert_eq!(source.to_string(), std::fmt::Error.to_string());
        assert!(err.to_string().starts_with("vm a: "), "{err}");
    }

    #[test]
    fn exec_spec_validation_rejects_empty_argv_and_nul() {
        assert!(ExecSpec::argv(Vec::<String>::new()).validate().is_err());
        assert!(ExecSpec::argv([""]).validate().is_err());
        assert!(ExecSpec::shell("echo \0").validate().is_err());
        assert!(
            ExecSpec::shell("true")
                .with_env("A=B", "c")
                .validate()
                .is_err()
        );
        assert!(
            ExecSpec::argv(["true"])
                .with_env("A", "b")
                .validate()
                .is_ok()
        );
    }
}
