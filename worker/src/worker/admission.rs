//! Capacity admission for new VMs and eviction of the oldest stopped VM when the worker is full.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use hearth_messages::{TerminationReason, VmId, WireError};
use tracing::info;

use super::runner::RunnerCore;
use super::{MAX_EVICTION_TRIES, RETRY_AFTER_MS, wire_error};
use crate::metrics as m;
use crate::provider::VmState;

impl RunnerCore {
    /// Reserves a slot for a new VM, evicting the oldest stopped VM when full; 503 when nothing
    /// can be evicted.
    ///
    /// The admission mutex only covers counting and choosing: a chosen victim is reserved
    /// (`evicting`) and its slot handed to this create, then locked, re-checked, backed up and
    /// destroyed with admission released, so other creates never wait behind one VM's lock or
    /// backup. A victim that became busy (resumed by an exec) in between is spared and another
    /// one chosen.
    pub(super) async fn admit(self: &Arc<Self>, creating: &VmId) -> Result<Reservation, WireError> {
        let inner = self;
        for _ in 0..MAX_EVICTION_TRIES {
            let (victim, chosen, reservation) = {
                let _admission = inner.admission.lock().await;
                let evicting = !inner.evicting.is_empty();
                let held = inner
                    .provider
                    .count_vms()
                    .await
                    .map_err(|e| wire_error(&e))? as u32;
                let reserved = inner.reserved.load(Ordering::SeqCst);
                if !evicting && held + reserved < inner.config.max_vms {
                    inner.reserved.fetch_add(1, Ordering::SeqCst);
                    return Ok(Reservation(self.clone()));
                }
                // Full, or evictions in flight: only now is the whole inventory worth listing.
                // A victim being evicted no longer counts: its slot is promised to the create
                // that chose it (whose reservation counts), destroyed yet or not.
                let vms = inner
                    .provider
                    .list_vms()
                    .await
                    .map_err(|e| wire_error(&e))?;
                let held = vms
                    .iter()
                    .filter(|v| !inner.evicting.contains_key(&v.vm_id))
                    .count() as u32;
                if held + reserved < inner.config.max_vms {
                    inner.reserved.fetch_add(1, Ordering::SeqCst);
                    return Ok(Reservation(self.clone()));
                }
                let victim = vms
                    .iter()
                    .filter(|v| {
                        matches!(v.state, VmState::Stopped | VmState::Paused)
                            && &v.vm_id != creating
                            && !inner.evicting.contains_key(&v.vm_id)
                            && !inner.locks.is_busy(&v.vm_id)
                    })
                    .min_by_key(|v| v.stopped_ms.unwrap_or(v.last_activity_ms));
                let Some(victim) = victim else {
                    return Err(WireError::no_capacity(
                        format!(
                            "worker {} is at capacity ({} vms)",
                            inner.config.worker_id, inner.config.max_vms
                        ),
                        RETRY_AFTER_MS,
                    ));
                };
                inner.evicting.insert(victim.vm_id.clone(), ());
                inner.reserved.fetch_add(1, Ordering::SeqCst);
                let evicting = Evicting(self.clone(), victim.vm_id.clone());
                (
                    evicting,
                    (victim.last_activity_ms, victim.stopped_ms),
                    Reservation(self.clone()),
                )
            };
            let vm_id = victim.1.clone();
            let guard = inner.locks.lock(&vm_id).await;
            // Re-checked under its lock: an exec may have resumed it since it was chosen.
            let now = inner
                .provider
                .get_vm(&vm_id)
                .await
                .map_err(|e| wire_error(&e))?;
            match now {
                None => {
                    // Gone already (released meanwhile): its slot is free.
                    drop(guard);
                    inner.locks.forget_if_idle(&vm_id);
                    drop(victim);
                    return Ok(reservation);
                }
                Some(view)
                    if matches!(view.state, VmState::Stopped | VmState::Paused)
                        && (view.last_activity_ms, view.stopped_ms) == chosen =>
                {
                    info!(%vm_id, "evicting the oldest stopped vm to make room");
                    let result = self
                        .destroy_locked(&vm_id, true, Some(TerminationReason::Evicted))
                        .await;
                    drop(guard);
                    inner.locks.forget_if_idle(&vm_id);
                    drop(victim);
                    result?;
                    metrics::counter!(m::EVICTIONS_TOTAL).increment(1);
                    return Ok(reservation);
                }
                Some(_) => {
                    info!(%vm_id, "the eviction victim became busy; choosing again");
                    drop(guard);
                    inner.locks.forget_if_idle(&vm_id);
                    // Dropping `victim` and `reservation` gives both back.
                }
            }
        }
        Err(WireError::no_capacity(
            format!(
                "worker {} is at capacity ({} vms) and its stopped vms keep resuming",
                inner.config.worker_id, inner.config.max_vms
            ),
            RETRY_AFTER_MS,
        ))
    }
}

/// Releases a capacity reservation when dropped.
pub(super) struct Reservation(Arc<RunnerCore>);

/// A VM chosen for eviction, no longer a candidate for any other create; released when dropped.
pub(super) struct Evicting(Arc<RunnerCore>, VmId);

impl Drop for Evicting {
    fn drop(&mut self) {
        self.0.evicting.remove(&self.1);
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.0.reserved.fetch_sub(1, Ordering::SeqCst);
    }
}
