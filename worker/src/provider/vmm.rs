//! Helpers shared by the VM adapters (`qemu`, `firecracker`): metadata files, staging, host
//! randomness and identities, mapping agent failures onto [`ProviderError`], and the exec request
//! sent to a guest agent.

use std::collections::BTreeMap;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::time::Duration;

use hearth_messages::ExecRequest;
use hearth_messages::agent::{AgentReply, Identity};
use tokio_util::sync::CancellationToken;

use tokio::sync::mpsc;

use super::agent::{AgentCallError, AgentLink, ExecLimits};
use super::registry::state_root::hex;
use super::{ExecSpec, OutputChunk, OutputStream, Program, ProviderError, VmId, VmSpec, now_ms};

/// Largest backup: the agent's output cap.
pub(crate) const BACKUP_MAX_BYTES: usize = hearth_messages::data::MAX_OUTPUT_BYTES as usize;

/// A backup that failed in the agent call itself, or anywhere else.
#[derive(Debug)]
pub(crate) enum BackupError {
    Agent(AgentCallError),
    Provider(ProviderError),
}

/// Archives the guest's work directory through its agent (`tar -cf - .` in the guest, streamed
/// and compressed on the host) into `<dest_dir>/<vm_id>-<unix_ms>.tar.zst`; at most
/// [`BACKUP_MAX_BYTES`] of tar. Nothing is left on failure.
pub(crate) async fn backup_via_agent(
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
}

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

/// The last lines of a VMM's log, for error messages.
pub(crate) fn log_tail(path: &Path) -> String {
    std::fs::read(path)
        .map(|b| super::tail_lossy(&b, 600))
        .unwrap_or_default()
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

pub(crate) fn process_alive(pid: i32) -> bool {
    pid > 0 && nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok()
}

/// Maps a failed agent call onto the provider's errors.
///
/// `dead` fires when the VMM process is known to be gone; `exit_reason` then says how.
pub(crate) async fn agent_error(
    vm_id: &VmId,
    e: AgentCallError,
    dead: &CancellationToken,
    exit_reason: &(dyn Fn() -> String + Send + Sync),
) -> ProviderError {
    match e {
        AgentCallError::Closed | AgentCallError::Io(_) | AgentCallError::Protocol(_) => {
            // A lost channel usually means the VMM died: wait for its watcher to say so.
            let _ = tokio::time::timeout(Duration::from_millis(500), dead.cancelled()).await;
            if dead.is_cancelled() {
                ProviderError::InvalidState(format!("vm {vm_id} failed: {}", exit_reason()))
            } else {
                e.for_vm(vm_id)
            }
        }
        e => e.for_vm(vm_id),
    }
}

pub(crate) fn exec_request(spec: &ExecSpec) -> ExecRequest {
    let mut req = match &spec.program {
        Program::Shell(cmd) => ExecRequest::cmd(cmd.clone()),
        Program::Argv(argv) => ExecRequest::argv(argv.iter().cloned()),
    };
    req.env = spec.env.clone();
    req.cwd = spec.cwd.clone();
    req.stdin = spec.stdin.clone().map(Into::into);
    let max_timeout = hearth_messages::data::MAX_EXEC_TIMEOUT_MS;
    req.timeout_ms = Some((spec.timeout.as_millis() as u64).clamp(1, max_timeout));
    req.max_output_bytes =
        Some((spec.max_output_bytes as u64).min(hearth_messages::data::MAX_OUTPUT_BYTES));
    req
}

/// Extra time for moving `bytes` through an agent channel (about 4 MiB/s, generous for a serial
/// port under TCG).
pub(crate) fn transfer_allowance(bytes: u64) -> Duration {
    Duration::from_millis(bytes / 4096)
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
    fn exec_requests_carry_the_spec_within_the_wire_limits() {
        let spec = ExecSpec::shell("echo hi")
            .with_env("A", "b")
            .with_cwd("sub")
            .with_stdin(b"in".to_vec())
            .with_timeout(Duration::ZERO)
            .with_max_output_bytes(usize::MAX);
        let req = exec_request(&spec);
        assert_eq!(req.cmd.as_deref(), Some("echo hi"));
        assert_eq!(req.timeout_ms, Some(1), "zero is not a valid wire timeout");
        assert_eq!(
            req.max_output_bytes,
            Some(hearth_messages::data::MAX_OUTPUT_BYTES)
        );
        assert_eq!(req.cwd.as_deref(), Some("sub"));
        assert!(req.program().is_ok());
    }

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
