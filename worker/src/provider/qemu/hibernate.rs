//! Pause to disk and resume: the VM's device and memory state migrated to `paused.state` in its
//! directory and its QEMU ended (a paused VM holds no host memory); resumed by a new QEMU that
//! loads that file (checksum checked), `cont`s and gets its clock set — the same machine, not a
//! new identity (unless it was renamed while paused).
//!
//! Crash safety: the state file is written under a temporary name, checksummed, renamed into
//! place and `meta.json` says `paused` (with its checksum) **before** QEMU is ended. A crash before
//! that leaves a running VM and a stray temporary file; after it, a paused VM whose leftover QEMU
//! the next `open` kills. A resume that finds the file missing or corrupt fails the VM (it is
//! buried with the reason, never half-running); one that fails for another reason (QEMU would
//! not start, a timeout) leaves it paused, to be tried again.

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tokio::time::Instant;
use tracing::{info, warn};

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWrite};

use super::machine::RunPaths;
use super::migration::SavedState;
use super::{Inner, Machine, STATE_ENTRY, VmMeta, qmp_error};
use crate::provider::guest::{self, GuestHost, PAUSED_STATE, PausedState, VmmProcess};
use crate::provider::registry;
use crate::provider::registry::state_root::{
    blocking, in_background, remove_dir_logged, sha256_file, to_json,
};
use crate::provider::snapshot_archive as archive;
use crate::provider::{ProviderError, VmId, VmState, VmView, disk_free_bytes, lifecycle};

/// The metadata entry of a paused VM's export stream.
#[derive(Debug, Serialize, Deserialize)]
struct PausedExport {
    /// `qemu --version` of the worker that saved the state: it loads only into the same build.
    qemu_version: String,
    /// The VM's `meta.json`.
    vm: VmMeta,
}

/// Free space a pause leaves on the state file's file system beyond the state itself.
const PAUSE_HEADROOM_BYTES: u64 = 64 << 20;

impl Inner {
    /// `Running`/`Stopped` -> `Paused` (see the module docs).
    pub(super) async fn hibernate(self: &Arc<Self>, vm_id: &VmId) -> Result<VmView, ProviderError> {
        let record = self.registry.record(vm_id)?;
        let _launching = record.launching.lock().await;
        let (machine, was_running, dir, memory_mib) = {
            let slot = record.slot.lock();
            lifecycle::check_pause(vm_id, slot.meta.state)?;
            (
                slot.runtime.clone(),
                slot.meta.state == VmState::Running,
                slot.dir.clone(),
                slot.meta.backend.machine.memory_mib,
            )
        };
        // The state is at most the guest's memory plus a little: refuse before touching the VM
        // when it cannot fit.
        let needed = (u64::from(memory_mib) << 20) + PAUSE_HEADROOM_BYTES;
        let free = disk_free_bytes(&dir)
            .map_err(|e| ProviderError::io("cannot inspect the state disk", e))?;
        if free < needed {
            return Err(ProviderError::NoSpace(format!(
                "vm {vm_id} cannot be paused: {free} bytes free on the state disk, {needed} needed"
            )));
        }
        let started = Instant::now();
        let timeout = Duration::from_millis(self.config.migrate_timeout_ms);
        let qmp = machine
            .qmp(self.timing.deadline())
            .await
            .map_err(|e| qmp_error(vm_id, &machine, "connecting", e))?;
        if was_running {
            qmp.execute("stop", json!({}), self.config.agent_timeout())
                .await
                .map_err(|e| qmp_error(vm_id, &machine, "stop", e))?;
        }
        let partial = dir.join(format!("{PAUSED_STATE}.partial"));
        let state = dir.join(PAUSED_STATE);
        let saved = async {
            let uri = format!("exec:cat > '{}'", partial.display());
            qmp.execute("migrate", json!({ "uri": uri }), timeout)
                .await
                .map_err(|e| qmp_error(vm_id, &machine, "migrate", e))?;
            self.wait_migration(vm_id, &machine, qmp, timeout)
                .await
                .map_err(|e| match e {
                    ProviderError::CommandFailed(desc) => {
                        ProviderError::internal(format!("vm {vm_id}: saving its state"), desc)
                    }
                    e => e,
                })?;
            let (partial, state) = (partial.clone(), state.clone());
            blocking(move || {
                let bytes = std::fs::metadata(&partial)
                    .map_err(|e| ProviderError::io("cannot inspect the saved state", e))?
                    .len();
                let sha256 = sha256_file(&partial)
                    .map_err(|e| ProviderError::io("cannot read the saved state", e))?;
                std::fs::File::open(&partial)
                    .and_then(|f| f.sync_all())
                    .and_then(|()| std::fs::rename(&partial, &state))
                    .map_err(|e| ProviderError::io("cannot keep the saved state", e))?;
                Ok(PausedState { sha256, bytes })
            })
            .await
        }
        .await;
        let paused = match saved {
            Ok(paused) => paused,
            Err(e) => {
                // The VM keeps running as it was; nothing of the attempt stays on disk.
                let _ = tokio::fs::remove_file(&partial).await;
                if was_running {
                    match qmp
                        .execute("cont", json!({}), self.config.agent_timeout())
                        .await
                    {
                        Ok(_) => guest::sync_clock(vm_id, &*machine, self.timing.deadline()).await,
                        Err(e) => {
                            warn!(%vm_id, error = %e, "cannot resume the vm after a failed pause")
                        }
                    }
                }
                let free = disk_free_bytes(&dir).unwrap_or(u64::MAX);
                return Err(if free < PAUSE_HEADROOM_BYTES {
                    ProviderError::NoSpace(format!(
                        "vm {vm_id} cannot be paused: the state disk filled up ({e})"
                    ))
                } else {
                    e
                });
            }
        };
        let bytes = paused.bytes;
        {
            let mut slot = record.slot.lock();
            slot.meta.mark_paused();
            slot.meta.backend.paused = Some(paused);
        }
        // The commit point: from here the VM is paused, on disk, whatever happens next.
        if let Err(e) = record.save().await {
            let _ = tokio::fs::remove_file(&state).await;
            {
                let mut slot = record.slot.lock();
                slot.meta.mark_running();
                slot.meta.backend.paused = None;
                if !was_running {
                    slot.meta.mark_stopped();
                }
            }
            if was_running {
                let _ = qmp
                    .execute("cont", json!({}), self.config.agent_timeout())
                    .await;
            }
            return Err(e);
        }
        machine.vmm.kill().await;
        let run = machine.run.dir.clone();
        in_background(move || remove_dir_logged(&run));
        info!(%vm_id, bytes, took_ms = started.elapsed().as_millis() as u64, "paused vm to disk");
        Ok(record.view())
    }

    /// `Paused` -> `Running` (see the module docs).
    pub(super) async fn wake(self: &Arc<Self>, vm_id: &VmId) -> Result<VmView, ProviderError> {
        let record = self.registry.record(vm_id)?;
        let _launching = record.launching.lock().await;
        let (spec, dir, paused, pending, env) = {
            let slot = record.slot.lock();
            if slot.meta.state != VmState::Paused {
                lifecycle::check_start(vm_id, slot.meta.state)?;
            }
            (
                slot.meta.backend.machine.clone(),
                slot.dir.clone(),
                slot.meta.backend.paused.clone(),
                slot.meta.backend.identity_pending,
                slot.meta.env.clone(),
            )
        };
        let state = dir.join(PAUSED_STATE);
        let started = Instant::now();
        let loaded = async {
            let paused = paused.ok_or_else(|| {
                ProviderError::InvalidArgument(format!(
                    "the paused state of vm {vm_id} was never recorded"
                ))
            })?;
            let deadline = Instant::now() + Duration::from_millis(self.config.boot_timeout_ms);
            let guard = self.launch(&spec, true, deadline).await?;
            let machine = guard.machine();
            let saved = SavedState {
                path: &state,
                sha256: &paused.sha256,
                bytes: paused.bytes,
            };
            self.load_state_file(
                vm_id,
                &machine,
                &saved,
                &format!("the paused state of vm {vm_id}"),
                true,
            )
            .await?;
            let qmp = machine
                .qmp(self.timing.deadline())
                .await
                .map_err(|e| qmp_error(vm_id, &machine, "connecting", e))?;
            qmp.execute("cont", json!({}), self.config.agent_timeout())
                .await
                .map_err(|e| qmp_error(vm_id, &machine, "cont", e))?;
            let deadline = self.timing.deadline();
            if pending {
                self.reset_identity(vm_id, &machine, &env, deadline).await?;
            } else {
                guest::sync_clock(vm_id, &*machine, deadline).await;
            }
            Ok(guard)
        }
        .await;
        let guard = match loaded {
            Ok(guard) => guard,
            Err(ProviderError::InvalidArgument(reason)) => {
                // Missing or corrupt state: the VM cannot come back. It is failed (the session
                // is lost with this reason), its half-started QEMU killed by the guard's drop.
                let reason = format!("resume failed: {reason}");
                warn!(%vm_id, %reason, "paused vm cannot be resumed");
                let parked = record.runtime();
                if let Some((_, dir)) = self
                    .registry
                    .bury_failed(|slot| Arc::ptr_eq(&slot.runtime, &parked), reason.clone())
                {
                    in_background(move || remove_dir_logged(&dir));
                }
                return Err(ProviderError::InvalidState(format!(
                    "vm {vm_id} failed: {reason}"
                )));
            }
            Err(e) => return Err(e),
        };
        let machine = guard.disarm();
        let old = {
            let mut slot = record.slot.lock();
            let old = std::mem::replace(&mut slot.runtime, machine.clone());
            slot.meta.mark_running();
            slot.meta.backend.instance = machine.vmm.instance.clone();
            slot.meta.backend.identity_pending = false;
            slot.meta.backend.paused = None;
            old
        };
        record.save().await?;
        old.vmm.end();
        let _ = tokio::fs::remove_file(&state).await;
        if machine.vmm.dead.is_cancelled() {
            self.machine_died(&machine);
        }
        info!(%vm_id, took_ms = started.elapsed().as_millis() as u64, "resumed paused vm");
        Ok(record.view())
    }

    /// The paused VM as one stream (`pause_upload`): its metadata (with the QEMU build it was
    /// saved by and the state's SHA-256), then its state file zstd-compressed with a frame
    /// checksum. Holds the VM's launch lock, so no resume runs meanwhile.
    pub(super) async fn export_paused(
        self: &Arc<Self>,
        vm_id: &VmId,
        out: &mut (dyn AsyncWrite + Unpin + Send),
    ) -> Result<u64, ProviderError> {
        let record = self.registry.record(vm_id)?;
        let _launching = record.launching.lock().await;
        let (meta, dir) = {
            let slot = record.slot.lock();
            if slot.meta.state != VmState::Paused || slot.meta.backend.paused.is_none() {
                return Err(ProviderError::InvalidState(format!(
                    "vm {vm_id} is {}, not paused to disk",
                    slot.meta.state
                )));
            }
            (slot.meta.clone(), slot.dir.clone())
        };
        let doc = PausedExport {
            qemu_version: self.qemu_version.clone(),
            vm: meta,
        };
        let meta_bytes = to_json(&doc)?;
        let zst = self.registry.root().staging("export-paused");
        {
            let (state, zst) = (dir.join(PAUSED_STATE), zst.clone());
            let level = self.config.snapshot_compression_level;
            blocking(move || {
                archive::compress(&state, &zst, level)
                    .map_err(|e| ProviderError::io("cannot compress the paused state", e))
            })
            .await?;
        }
        let written = archive::write_export(&meta_bytes, &[(STATE_ENTRY, &zst)], out).await;
        let _ = tokio::fs::remove_file(&zst).await;
        written.map_err(|e| ProviderError::io(format!("cannot export paused vm {vm_id}"), e))
    }

    /// Makes `vm_id` from an [`Inner::export_paused`] stream: paused, the same machine. The
    /// state is decompressed and its SHA-256 and size checked, and the machine must load on this
    /// worker (same QEMU build and accelerator, the same image files found), all before the VM
    /// exists; otherwise nothing of it is left.
    pub(super) async fn import_paused(
        self: &Arc<Self>,
        vm_id: &VmId,
        input: &mut (dyn AsyncRead + Unpin + Send),
    ) -> Result<VmView, ProviderError> {
        let (mut reservation, _) = self.registry.reserve_vm(vm_id, None)?;
        reservation.make_dir().await?;
        let dir = reservation.dir().to_path_buf();
        let corrupt = |detail: String| {
            ProviderError::InvalidArgument(format!("corrupt paused state of vm {vm_id}: {detail}"))
        };
        let meta_bytes = archive::read_export(input, &[STATE_ENTRY], &dir).await?;
        let doc: PausedExport =
            serde_json::from_slice(&meta_bytes).map_err(|e| corrupt(e.to_string()))?;
        let mut meta = doc.vm;
        let paused = match (&meta.backend.paused, meta.state, meta.format) {
            (Some(paused), VmState::Paused, registry::META_FORMAT) => paused.clone(),
            _ => return Err(corrupt("not a paused vm of a known format".into())),
        };
        {
            let (zst, state) = (dir.join(STATE_ENTRY), dir.join(PAUSED_STATE));
            let (sha, bytes) = blocking(move || {
                let got = archive::decompress(&zst, &state)
                    .map_err(|e| ProviderError::InvalidArgument(e.to_string()))?;
                let _ = std::fs::remove_file(&zst);
                std::fs::File::open(&state)
                    .and_then(|f| f.sync_all())
                    .map_err(|e| ProviderError::io("cannot keep the paused state", e))?;
                Ok(got)
            })
            .await
            .map_err(|e| match e {
                ProviderError::InvalidArgument(d) => corrupt(d),
                e => e,
            })?;
            if sha != paused.sha256 || bytes != paused.bytes {
                return Err(corrupt("the state does not match its checksum".into()));
            }
        }
        meta.backend.machine = self
            .machine_here(
                &meta.backend.machine,
                &doc.qemu_version,
                &format!("the paused state of vm {vm_id}"),
            )
            .await?;
        meta.vm_id = vm_id.clone();
        let machine = self.paused_machine(meta.backend.instance.clone());
        let record = reservation.commit(meta, machine).await?;
        info!(%vm_id, bytes = paused.bytes, "imported paused vm");
        Ok(record.view())
    }

    /// The runtime of a VM found paused at `open`: no process, its run directory unused.
    pub(super) fn paused_machine(self: &Arc<Self>, instance: String) -> Arc<Machine> {
        let run = RunPaths {
            dir: self.run_dir.join(&instance),
        };
        Machine::new(
            VmmProcess::none("qemu", instance),
            run,
            Arc::downgrade(self),
        )
    }

    /// Bytes of paused state held on disk.
    pub(super) fn paused_bytes(&self) -> u64 {
        self.registry
            .records()
            .iter()
            .filter_map(|r| r.slot.lock().meta.backend.paused.as_ref().map(|p| p.bytes))
            .sum()
    }
}
