//! What the VMM backends (qemu, firecracker) share: a guest reached through its agent, in a VMM
//! process the provider supervises ([`vmm`]). The agent operations are written here once —
//! identity resets (fresh host name, machine id, entropy, clock), clock syncs, bootstrap, exec,
//! file transfer, backups — with their failures mapped the same way (a lost channel of a VMM that
//! died is `vm … failed: <how it ended>`); a backend adds only what its VMM needs around them
//! (QMP `cont`, a Firecracker `PATCH /vm`, an MMDS push).

use std::collections::BTreeMap;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use hearth_messages::ExecRequest;
use hearth_messages::agent::{AgentReply, AgentRequest, Identity, ProcessAnswer, ProcessCall};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::warn;

use super::agent::{AgentCallError, AgentLink, ExecLimits};
use super::paths;
use super::registry::state_root::{hex, remove_dir_logged};
use super::registry::{Backend, Registry};
use super::{
    BOOTSTRAP_OUTPUT_BYTES, BOOTSTRAP_TIMEOUT, ExecOutcome, ExecSpec, OutputChunk, OutputStream,
    ProviderError, VmId, VmSpec, bootstrap_failed, now_ms,
};

mod ops;
pub(crate) mod vmm;

pub(crate) use ops::{GuestHost, backup_vm, destroy, rename, start, stop};

pub(crate) use super::agent::{exec_request, transfer_allowance};
pub(crate) use vmm::{VmmProcess, is_ours, log_tail, signal_kill};

/// A VM in a VMM process, as the shared guest operations see it.
pub(crate) trait GuestMachine: Send + Sync + 'static {
    fn agent(&self) -> &AgentLink;
    fn vmm(&self) -> &VmmProcess;
    /// `run/<instance>`: the process's sockets, pid file and logs.
    fn run_dir(&self) -> &Path;
}

/// Kills a half-launched VMM and removes its run directory unless disarmed (a failed or
/// dropped create); the waiting and the file work happen off the caller's thread.
#[derive(Debug)]
pub(crate) struct LaunchGuard<M: GuestMachine> {
    machine: Option<Arc<M>>,
}

impl<M: GuestMachine> LaunchGuard<M> {
    pub(crate) fn new(machine: Arc<M>) -> Self {
        Self {
            machine: Some(machine),
        }
    }

    pub(crate) fn machine(&self) -> Arc<M> {
        self.machine.clone().expect("armed guard")
    }

    /// The create succeeded: the machine is the VM's now.
    pub(crate) fn disarm(mut self) -> Arc<M> {
        self.machine.take().expect("armed guard")
    }
}

impl<M: GuestMachine> Drop for LaunchGuard<M> {
    fn drop(&mut self) {
        let Some(machine) = self.machine.take() else {
            return;
        };
        machine.vmm().end();
        match tokio::runtime::Handle::try_current() {
            Ok(handle) => {
                handle.spawn(async move {
                    machine.vmm().kill().await;
                    let run = machine.run_dir().to_path_buf();
                    let _ = tokio::task::spawn_blocking(move || remove_dir_logged(&run)).await;
                });
            }
            Err(_) => {
                machine.vmm().kill_now();
                remove_dir_logged(machine.run_dir());
            }
        }
    }
}

/// How long a guest's agent may take: to answer a call, and past a command's own timeout.
#[derive(Debug, Clone, Copy)]
pub(crate) struct AgentTiming {
    pub timeout: Duration,
    pub grace: Duration,
}

impl AgentTiming {
    pub(crate) fn new(timeout_ms: u64, grace_ms: u64) -> Self {
        Self {
            timeout: Duration::from_millis(timeout_ms),
            grace: Duration::from_millis(grace_ms),
        }
    }

    pub(crate) fn deadline(&self) -> Instant {
        Instant::now() + self.timeout
    }

    pub(crate) fn limits(&self) -> ExecLimits {
        ExecLimits {
            handshake: self.timeout,
            grace: self.grace,
        }
    }
}

/// Largest backup: the agent's output cap.
pub(crate) const BACKUP_MAX_BYTES: usize = hearth_messages::data::MAX_OUTPUT_BYTES as usize;

/// A backup that failed in the agent call itself, or anywhere else.
#[derive(Debug)]
enum BackupError {
    Agent(AgentCallError),
    Provider(ProviderError),
}

/// Archives the guest's work directory through its agent (`tar -cf - .` in the guest, streamed
/// and compressed on the host) into `<dest_dir>/<vm_id>-<unix_ms>.tar.zst`; at most
/// [`BACKUP_MAX_BYTES`] of tar. Nothing is left on failure.
async fn backup_via_agent(
    vm_id: &VmId,
    agent: &AgentLink,
    limits: ExecLimits,
    dest_dir: &Path,
    level: i32,
) -> Result<PathBuf, BackupError> {
    let name = format!("{vm_id}-{}.tar.zst", now_ms());
    let dest = dest_dir.join(&name);
    let partial = dest_dir.join(format!(".{name}.partial"));
    let (tx, mut rx) = mpsc::channel::<OutputChunk>(64);
    let writer = {
        let partial = partial.clone();
        tokio::task::spawn_blocking(move || -> io::Result<u64> {
            std::fs::create_dir_all(partial.parent().unwrap_or(Path::new(".")))?;
            let file = std::fs::File::create(&partial)?;
            let mut encoder = zstd::Encoder::new(io::BufWriter::new(file), level)?;
            encoder.include_checksum(true)?;
            let mut total = 0u64;
            while let Some(chunk) = rx.blocking_recv() {
                if chunk.stream == OutputStream::Stdout {
                    io::Write::write_all(&mut encoder, &chunk.data)?;
                    total += chunk.data.len() as u64;
                }
            }
            let mut out = encoder.finish()?;
            io::Write::flush(&mut out)?;
            Ok(total)
        })
    };
    let mut req = ExecRequest::argv(["tar", "-cf", "-", "."]);
    req.timeout_ms = Some(600_000);
    req.max_output_bytes = Some(BACKUP_MAX_BYTES as u64);
    let outcome = agent.exec(req, BACKUP_MAX_BYTES, Some(tx), limits).await;
    let written = writer
        .await
        .map_err(|e| ProviderError::internal("the backup writer failed", e))
        .and_then(|r| r.map_err(|e| ProviderError::io("cannot write backup", e)));
    let fail = |e: BackupError| {
        let _ = std::fs::remove_file(&partial);
        e
    };
    let outcome = outcome.map_err(|e| fail(BackupError::Agent(e)))?;
    written.map_err(|e| fail(BackupError::Provider(e)))?;
    if !outcome.success() || outcome.stdout_truncated {
        return Err(fail(BackupError::Provider(ProviderError::CommandFailed(
            format!(
                "backup of vm {vm_id} failed (exit {}{}): {}",
                outcome.exit_code,
                if outcome.stdout_truncated {
                    ", larger than 64 MiB"
                } else {
                    ""
                },
                super::tail_lossy(&outcome.stderr, 500)
            ),
        ))));
    }
    tokio::fs::rename(&partial, &dest).await.map_err(|e| {
        fail(BackupError::Provider(ProviderError::io(
            "cannot write backup",
            e,
        )))
    })?;
    Ok(dest)
}

/// What a VM's `meta.json` adds for a VM in a VMM process (qemu, firecracker).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub(crate) struct GuestVm<M> {
    /// What a snapshot of the VM must be restored into.
    pub machine: M,
    /// The VMM process: `run/<instance>`.
    pub instance: String,
    /// Renamed while stopped: the guest gets its new identity on the next start.
    #[serde(default)]
    pub identity_pending: bool,
    /// Paused to disk: what its state file (`paused.state` in the VM's directory) must match.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paused: Option<PausedState>,
}

/// The state file of a VM paused to disk, as recorded when it was written.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct PausedState {
    pub sha256: String,
    pub bytes: u64,
}

/// The name of a paused VM's state file in its directory.
pub(crate) const PAUSED_STATE: &str = "paused.state";

/// Rejects a VM size the VMM cannot give (the same rule on every VMM; only the vCPU limit
/// differs): vCPUs in `1..=max_vcpus`, memory in `128..=1048576` MiB.
pub(crate) fn check_machine_size(spec: &VmSpec, max_vcpus: u32) -> Result<(), ProviderError> {
    if !(1..=max_vcpus).contains(&spec.vcpus) {
        return Err(ProviderError::InvalidArgument(format!(
            "vcpus must be in 1..={max_vcpus}, got {}",
            spec.vcpus
        )));
    }
    if !(128..=1 << 20).contains(&spec.memory_mib) {
        return Err(ProviderError::InvalidArgument(format!(
            "memory_mib must be in 128..=1048576, got {}",
            spec.memory_mib
        )));
    }
    Ok(())
}

/// Bytes of host entropy pushed into a guest's RNG on every identity reset.
pub(crate) const ENTROPY_BYTES: usize = 64;

/// `len` bytes from the host's kernel RNG.
pub(crate) fn host_random(len: usize) -> Result<Vec<u8>, ProviderError> {
    let mut bytes = vec![0u8; len];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .map_err(|e| ProviderError::io("cannot read /dev/urandom", e))?;
    Ok(bytes)
}

/// A fresh identity for `vm_id`: host name = the id (at most 64 bytes), a random machine id.
pub(crate) fn new_identity(
    vm_id: &VmId,
    env: BTreeMap<String, String>,
) -> Result<Identity, ProviderError> {
    Ok(Identity {
        hostname: vm_id.as_str().chars().take(64).collect(),
        machine_id: hex(&host_random(16)?),
        session_id: vm_id.to_string(),
        env,
        entropy: host_random(ENTROPY_BYTES)?.into(),
        now_ms: now_ms(),
    })
}

/// Maps a failed agent call onto the provider's errors; a lost channel of a VMM that died (its
/// watcher says so within half a second) is `InvalidState` with how it ended.
pub(crate) async fn agent_error(
    vm_id: &VmId,
    vmm: &VmmProcess,
    e: AgentCallError,
) -> ProviderError {
    match e {
        AgentCallError::Closed | AgentCallError::Io(_) | AgentCallError::Protocol(_) => {
            let _ = tokio::time::timeout(Duration::from_millis(500), vmm.dead.cancelled()).await;
            if vmm.dead.is_cancelled() {
                ProviderError::InvalidState(format!("vm {vm_id} failed: {}", vmm.exit_reason()))
            } else {
                e.for_vm(vm_id)
            }
        }
        e => e.for_vm(vm_id),
    }
}

/// Pushes a fresh identity for `vm_id` into the guest (host name, machine id, session id,
/// entropy, the clock, `env`); returns it.
pub(crate) async fn reset_identity(
    vm_id: &VmId,
    m: &dyn GuestMachine,
    env: BTreeMap<String, String>,
    deadline: Instant,
) -> Result<Identity, ProviderError> {
    let identity = new_identity(vm_id, env)?;
    let request = AgentRequest::ResetIdentity(identity.clone());
    match m.agent().call(request, "an identity reset", deadline).await {
        Ok(AgentReply::IdentitySet { .. }) => Ok(identity),
        Ok(other) => Err(unexpected(vm_id, &other)),
        Err(e) => Err(agent_error(vm_id, m.vmm(), e).await),
    }
}

/// Sets the guest clock after a pause; failures are only logged.
pub(crate) async fn sync_clock(vm_id: &VmId, m: &dyn GuestMachine, deadline: Instant) {
    let request = AgentRequest::SetClock { now_ms: now_ms() };
    if let Err(e) = m.agent().call(request, "a clock sync", deadline).await {
        warn!(%vm_id, error = %e, "cannot set the guest clock");
    }
}

/// Runs the bootstrap argv of a cold boot; any failure fails the create.
pub(crate) async fn bootstrap(
    vm_id: &VmId,
    m: &dyn GuestMachine,
    argv: &[String],
    limits: ExecLimits,
) -> Result<(), ProviderError> {
    let mut req = ExecRequest::argv(argv.iter().cloned());
    req.timeout_ms = Some(BOOTSTRAP_TIMEOUT.as_millis() as u64);
    req.max_output_bytes = Some(BOOTSTRAP_OUTPUT_BYTES as u64);
    match m
        .agent()
        .exec(req, BOOTSTRAP_OUTPUT_BYTES, None, limits)
        .await
    {
        Ok(outcome) if outcome.success() => Ok(()),
        Ok(outcome) => Err(bootstrap_failed(vm_id, &outcome)),
        Err(e) => Err(agent_error(vm_id, m.vmm(), e).await),
    }
}

/// Runs `spec` in a running VM of `registry` (validated first, as by every adapter); the VM's
/// activity is bumped when the command starts and when it ends.
pub(crate) async fn exec<B, M>(
    registry: &Registry<B>,
    timing: AgentTiming,
    vm_id: &VmId,
    spec: ExecSpec,
    chunks: Option<mpsc::Sender<OutputChunk>>,
) -> Result<ExecOutcome, ProviderError>
where
    B: Backend<Runtime = Arc<M>>,
    M: GuestMachine,
{
    spec.validate()?;
    paths::relative_path("cwd", spec.cwd.as_deref().unwrap_or(""))?;
    let (record, m) = registry.running(vm_id)?;
    let result = m
        .agent()
        .exec(
            exec_request(&spec),
            spec.max_output_bytes,
            chunks,
            timing.limits(),
        )
        .await;
    record.touch();
    match result {
        Ok(outcome) => Ok(outcome),
        Err(e) => Err(agent_error(vm_id, m.vmm(), e).await),
    }
}

/// Writes a file in a running VM of `registry`; the deadline grows with its size.
pub(crate) async fn put_file<B, M>(
    registry: &Registry<B>,
    timing: AgentTiming,
    vm_id: &VmId,
    path: &str,
    data: &[u8],
    mode: Option<u32>,
) -> Result<u64, ProviderError>
where
    B: Backend<Runtime = Arc<M>>,
    M: GuestMachine,
{
    paths::file_path(path)?;
    let (record, m) = registry.running(vm_id)?;
    let deadline = timing.deadline() + transfer_allowance(data.len() as u64);
    let result = m.agent().put_file(path, data, mode, deadline).await;
    record.touch();
    match result {
        Ok(size) => Ok(size),
        Err(e) => Err(agent_error(vm_id, m.vmm(), e).await),
    }
}

/// Reads a file from a running VM of `registry`; the deadline grows with its largest size.
pub(crate) async fn get_file<B, M>(
    registry: &Registry<B>,
    timing: AgentTiming,
    vm_id: &VmId,
    path: &str,
    max_bytes: u64,
) -> Result<Vec<u8>, ProviderError>
where
    B: Backend<Runtime = Arc<M>>,
    M: GuestMachine,
{
    paths::file_path(path)?;
    let (record, m) = registry.running(vm_id)?;
    let deadline = timing.deadline() + transfer_allowance(max_bytes);
    let result = m.agent().get_file(path, max_bytes, deadline).await;
    record.touch();
    match result {
        Ok(data) => Ok(data),
        Err(e) => Err(agent_error(vm_id, m.vmm(), e).await),
    }
}

/// A background-process operation in a running VM of `registry`, by its agent; a start bumps
/// the VM's activity.
pub(crate) async fn process<B, M>(
    registry: &Registry<B>,
    vm_id: &VmId,
    call: ProcessCall,
    wait: Duration,
) -> Result<ProcessAnswer, ProviderError>
where
    B: Backend<Runtime = Arc<M>>,
    M: GuestMachine,
{
    if let ProcessCall::Start { request, .. } = &call {
        paths::relative_path("cwd", request.cwd.as_deref().unwrap_or(""))?;
    }
    let (record, m) = registry.running(vm_id)?;
    let start = matches!(call, ProcessCall::Start { .. });
    let result = m.agent().process_call(vm_id, call, wait).await;
    if start {
        record.touch();
    }
    match result {
        Ok(answer) => Ok(answer),
        Err(e) => Err(agent_error(vm_id, m.vmm(), e).await),
    }
}

/// Archives the guest's work directory (see [`backup_via_agent`]), its failures mapped.
pub(crate) async fn backup(
    vm_id: &VmId,
    m: &dyn GuestMachine,
    limits: ExecLimits,
    dest_dir: &Path,
    level: i32,
) -> Result<PathBuf, ProviderError> {
    match backup_via_agent(vm_id, m.agent(), limits, dest_dir, level).await {
        Ok(path) => Ok(path),
        Err(BackupError::Agent(e)) => Err(agent_error(vm_id, m.vmm(), e).await),
        Err(BackupError::Provider(e)) => Err(e),
    }
}

pub(crate) fn unexpected(vm_id: &VmId, reply: &AgentReply) -> ProviderError {
    ProviderError::internal(
        format!("vm {vm_id}"),
        format!("unexpected answer from the guest agent: {reply:?}"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identities_are_fresh_and_valid() {
        let id = VmId::new("x".repeat(100)).unwrap();
        let a = new_identity(&id, BTreeMap::new()).unwrap();
        let b = new_identity(&id, BTreeMap::new()).unwrap();
        assert_eq!(a.hostname.len(), 64);
        assert_eq!(a.machine_id.len(), 32);
        assert_ne!(a.machine_id, b.machine_id);
        assert_ne!(a.entropy, b.entropy);
        assert_eq!(a.entropy.len(), ENTROPY_BYTES);
    }
}
