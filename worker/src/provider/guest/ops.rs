//! The VM operations of a VMM backend that differ only in how its VMM pauses and resumes a
//! guest and pushes an identity: start, stop, destroy, rename and backup, written once over
//! [`GuestHost`].

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::time::Instant;
use tracing::{info, warn};

use super::{AgentTiming, GuestMachine, GuestVm, backup, sync_clock};
use crate::provider::registry::state_root::{blocking, remove_dir_logged};
use crate::provider::registry::{Backend, Registry};
use crate::provider::{ProviderError, VmId, VmState, VmView, lifecycle};

/// A VMM backend, as the shared operations drive it.
#[async_trait]
pub(crate) trait GuestHost: Send + Sync + 'static {
    /// What a snapshot of a VM must be restored into (its `meta.json` records it).
    type Spec: Clone + Debug + Serialize + DeserializeOwned + Send + Sync + 'static;
    type Machine: GuestMachine;
    type Backend: Backend<Vm = GuestVm<Self::Spec>, Runtime = Arc<Self::Machine>>;

    fn registry(&self) -> &Arc<Registry<Self::Backend>>;
    fn timing(&self) -> AgentTiming;
    /// zstd level of backups.
    fn compression_level(&self) -> i32;

    /// Pauses the guest (its memory stays).
    async fn pause(&self, vm_id: &VmId, machine: &Arc<Self::Machine>) -> Result<(), ProviderError>;
    /// Resumes a paused guest.
    async fn resume(&self, vm_id: &VmId, machine: &Arc<Self::Machine>)
    -> Result<(), ProviderError>;
    /// Pushes a fresh identity for `vm_id` (with the VM's `env`) into the guest, and whatever
    /// else the VMM keeps of it.
    async fn reset_identity(
        &self,
        vm_id: &VmId,
        machine: &Self::Machine,
        env: &BTreeMap<String, String>,
        deadline: Instant,
    ) -> Result<(), ProviderError>;
}

/// `Stopped` -> `Running`: resume, then the identity a rename left pending, else the clock.
pub(crate) async fn start<H: GuestHost>(host: &H, vm_id: &VmId) -> Result<VmView, ProviderError> {
    let record = host.registry().record(vm_id)?;
    let (machine, pending, env) = {
        let slot = record.slot.lock();
        lifecycle::check_start(vm_id, slot.meta.state)?;
        (
            slot.runtime.clone(),
            slot.meta.backend.identity_pending,
            slot.meta.env.clone(),
        )
    };
    host.resume(vm_id, &machine).await?;
    let deadline = host.timing().deadline();
    if pending {
        // Renamed while stopped: the guest learns its new name now (this also sets the clock).
        host.reset_identity(vm_id, &machine, &env, deadline).await?;
    } else {
        sync_clock(vm_id, &*machine, deadline).await;
    }
    {
        let mut slot = record.slot.lock();
        slot.meta.mark_running();
        slot.meta.backend.identity_pending = false;
    }
    record.save().await?;
    info!(%vm_id, "started vm");
    Ok(record.view())
}

/// `Running` -> `Stopped`: the guest is paused, its memory kept.
pub(crate) async fn stop<H: GuestHost>(host: &H, vm_id: &VmId) -> Result<VmView, ProviderError> {
    let record = host.registry().record(vm_id)?;
    let machine = {
        let slot = record.slot.lock();
        lifecycle::check_stop(vm_id, slot.meta.state)?;
        slot.runtime.clone()
    };
    host.pause(vm_id, &machine).await?;
    record.slot.lock().meta.mark_stopped();
    record.save().await?;
    info!(%vm_id, "stopped vm");
    Ok(record.view())
}

/// Destroys a VM: gone from the index (a tombstone) at once, its directory moved to the trash,
/// then its VMM killed and waited for and every file removed, off the async threads. A VM
/// already destroyed is a no-op.
pub(crate) async fn destroy<H: GuestHost>(host: &H, vm_id: &VmId) -> Result<(), ProviderError> {
    let registry = host.registry();
    let Some((machine, dir)) = registry.destroy(vm_id, |slot| {
        slot.runtime.vmm().end();
        Ok((slot.runtime.clone(), slot.dir.clone()))
    })?
    else {
        return Ok(());
    };
    let trash = {
        let registry = registry.clone();
        blocking(move || Ok(registry.root().trash(&dir, "destroy").unwrap_or(dir))).await?
    };
    machine.vmm().kill().await;
    let run = machine.run_dir().to_path_buf();
    blocking(move || {
        remove_dir_logged(&trash);
        remove_dir_logged(&run);
        Ok(())
    })
    .await?;
    info!(%vm_id, "destroyed vm");
    Ok(())
}

/// Renames a VM: a running guest takes its new identity first (a VM whose agent does not answer
/// is not handed out); a stopped one on its next start.
pub(crate) async fn rename<H: GuestHost>(
    host: &H,
    old: &VmId,
    new: &VmId,
) -> Result<VmView, ProviderError> {
    let registry = host.registry();
    let (record, reservation) = registry.reserve_rename(old, new)?;
    let (machine, running, env) = {
        let slot = record.slot.lock();
        (
            slot.runtime.clone(),
            slot.meta.state == VmState::Running,
            slot.meta.env.clone(),
        )
    };
    if running {
        let deadline = host.timing().deadline();
        host.reset_identity(new, &machine, &env, deadline).await?;
    }
    let view = registry.commit_rename(old, reservation, &record, |slot| {
        slot.meta.backend.identity_pending = !running;
    })?;
    // The directory name is authoritative; a failed rewrite is repaired on reopen.
    if let Err(e) = record.save().await {
        warn!(vm_id = %new, error = %e, "cannot rewrite meta.json after rename");
    }
    info!(%old, %new, "renamed vm");
    Ok(view)
}

/// Archives the guest's work directory through its agent; a stopped VM runs for the length of
/// the backup and is paused again after it.
pub(crate) async fn backup_vm<H: GuestHost>(
    host: &H,
    vm_id: &VmId,
    dest_dir: &Path,
) -> Result<PathBuf, ProviderError> {
    let record = host.registry().record(vm_id)?;
    let (machine, stopped) = {
        let slot = record.slot.lock();
        (slot.runtime.clone(), slot.meta.state == VmState::Stopped)
    };
    if stopped {
        host.resume(vm_id, &machine).await?;
    }
    let limits = host.timing().limits();
    let level = host.compression_level();
    let result = backup(vm_id, &*machine, limits, dest_dir, level).await;
    if stopped && let Err(e) = host.pause(vm_id, &machine).await {
        warn!(%vm_id, error = %e, "cannot pause the vm again after its backup");
    }
    result
}
