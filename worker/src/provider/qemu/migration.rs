//! Snapshot state in and out of QEMU: loading a snapshot's migration stream into a paused QEMU
//! (with its checksum checked in parallel) and waiting for a migration to finish.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tokio::time::Instant;

use super::qmp::Qmp;
use super::{Inner, Machine, QemuSnapshot, qmp_error};
use crate::provider::guest::log_tail;
use crate::provider::registry::SnapshotMeta;
use crate::provider::registry::state_root::sha256_file;
use crate::provider::{ProviderError, VmId};

/// A migration stream on disk and what it must match.
pub(super) struct SavedState<'a> {
    pub path: &'a Path,
    pub sha256: &'a str,
    pub bytes: u64,
}

impl Inner {
    /// Loads a snapshot's state into a freshly launched, paused QEMU and checks its checksum (in
    /// parallel: a mismatch fails the restore as soon as it is known).
    pub(super) async fn load_state(
        &self,
        vm_id: &VmId,
        machine: &Arc<Machine>,
        snapshot: &SnapshotMeta<QemuSnapshot>,
    ) -> Result<(), ProviderError> {
        let snapshot_id = &snapshot.snapshot_id;
        let state = self.snapshot_dir(snapshot_id).join("state");
        let saved = SavedState {
            path: &state,
            sha256: &snapshot.backend.state_sha256,
            bytes: snapshot.backend.state_bytes,
        };
        self.load_state_file(
            vm_id,
            machine,
            &saved,
            &format!("snapshot {snapshot_id}"),
            self.config.verify_snapshots,
        )
        .await
    }

    /// Loads the migration stream `saved` into a freshly launched, paused QEMU; `what` names it in errors (a snapshot, a paused VM's state).
    /// A state that is missing, of the wrong size, fails its checksum (checked with `verify`) or
    /// is refused by QEMU is `InvalidArgument`.
    pub(super) async fn load_state_file(
        &self,
        vm_id: &VmId,
        machine: &Arc<Machine>,
        saved: &SavedState<'_>,
        what: &str,
        verify: bool,
    ) -> Result<(), ProviderError> {
        let (state, state_sha256, state_bytes) = (saved.path, saved.sha256, saved.bytes);
        let corrupt = |detail: String| {
            ProviderError::InvalidArgument(format!("{what} cannot be restored: {detail}"))
        };
        // QEMU 7.2 waits forever on an empty stream and exits on a bad one: check what can be
        // checked first, and turn an exit into the state's fault.
        match std::fs::metadata(state) {
            Ok(m) if m.len() == state_bytes => {}
            Ok(m) => {
                return Err(corrupt(format!(
                    "its state file is {} bytes, expected {}",
                    m.len(),
                    state_bytes
                )));
            }
            Err(e) => return Err(corrupt(format!("its state file is unreadable: {e}"))),
        }
        let verify = async {
            if !verify {
                return Ok(());
            }
            let path = state.to_path_buf();
            let digest = tokio::task::spawn_blocking(move || sha256_file(&path))
                .await
                .map_err(|e| ProviderError::internal("the checksum task failed", e))?
                .map_err(|e| ProviderError::io("cannot read the saved state", e))?;
            if digest == state_sha256 {
                Ok(())
            } else {
                Err(ProviderError::InvalidArgument(format!(
                    "{what} is corrupt: its state does not match its checksum"
                )))
            }
        };
        let timeout = Duration::from_millis(self.config.migrate_timeout_ms);
        let load = async {
            let qmp = machine
                .qmp(Instant::now() + timeout)
                .await
                .map_err(|e| qmp_error(vm_id, machine, "connecting", e))?;
            let uri = format!("exec:cat '{}'", state.display());
            qmp.execute("migrate-incoming", json!({ "uri": uri }), timeout)
                .await
                .map_err(|e| qmp_error(vm_id, machine, "migrate-incoming", e))?;
            self.wait_migration(vm_id, machine, qmp, timeout).await
        };
        tokio::pin!(verify, load);
        let mut verified = false;
        let loaded = loop {
            tokio::select! {
                loaded = &mut load => break loaded,
                checked = &mut verify, if !verified => {
                    checked?;
                    verified = true;
                }
            }
        };
        match loaded {
            Ok(()) => {}
            Err(ProviderError::CommandFailed(desc)) => return Err(corrupt(desc)),
            Err(ProviderError::InvalidState(_)) => {
                let _ = tokio::time::timeout(
                    Duration::from_millis(300),
                    machine.vmm.reaped.cancelled(),
                )
                .await;
                return Err(corrupt(format!(
                    "qemu refused its state: {}",
                    log_tail(&machine.run.log())
                )));
            }
            Err(e) => return Err(e),
        }
        if !verified {
            verify.await?;
        }
        Ok(())
    }

    /// Polls `query-migrate` until the migration completes; `CommandFailed(desc)` if it failed.
    pub(super) async fn wait_migration(
        &self,
        vm_id: &VmId,
        machine: &Machine,
        qmp: &Qmp,
        timeout: Duration,
    ) -> Result<(), ProviderError> {
        let deadline = Instant::now() + timeout;
        loop {
            let status = qmp
                .execute("query-migrate", json!({}), timeout)
                .await
                .map_err(|e| qmp_error(vm_id, machine, "query-migrate", e))?;
            match status["status"].as_str().unwrap_or_default() {
                "completed" => return Ok(()),
                "failed" | "cancelled" => {
                    let desc = status["error-desc"]
                        .as_str()
                        .unwrap_or("migration failed")
                        .to_owned();
                    return Err(ProviderError::CommandFailed(desc));
                }
                _ => {}
            }
            if Instant::now() >= deadline {
                return Err(ProviderError::Timeout(format!(
                    "vm {vm_id}: migration did not finish within {timeout:?}"
                )));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}
