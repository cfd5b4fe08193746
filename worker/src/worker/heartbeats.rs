//! Heartbeats (`WorkerStatus` on `workers.<wid>.status`) and VM events.

use std::sync::atomic::Ordering;

use hearth_messages::{Encoding, Versions, VmEvent, WorkerStatus, now_ms};
use tracing::warn;

use super::{Inner, Worker};
use crate::metrics as m;

impl Worker {
    /// Heartbeats until the drain ends (not on `tasks`: the drain waits for those, and heartbeats
    /// must go on while it does; `heartbeat_stop` owns this task).
    pub(super) fn start_heartbeats(&self) {
        let inner = self.inner.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(inner.config.heartbeat_interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = inner.heartbeat_stop.cancelled() => break,
                    _ = tick.tick() => inner.publish_heartbeat().await,
                }
            }
        });
    }
}

impl Inner {
    pub(super) async fn publish_heartbeat(&self) {
        let vms = match self.vm_infos().await {
            Ok(vms) => vms,
            Err(err) => {
                warn!(%err, "listing vms for the heartbeat failed");
                return;
            }
        };
        let running = vms
            .iter()
            .filter(|v| v.state == hearth_messages::VmState::Running)
            .count();
        let paused = vms
            .iter()
            .filter(|v| v.state == hearth_messages::VmState::Paused)
            .count();
        metrics::gauge!(m::VMS, "state" => "running").set(running as f64);
        metrics::gauge!(m::VMS, "state" => "stopped").set((vms.len() - running - paused) as f64);
        metrics::gauge!(m::VMS, "state" => "paused").set(paused as f64);
        metrics::gauge!(m::PAUSED_BYTES).set(self.provider.paused_bytes() as f64);
        if let Ok(free) = crate::provider::disk_free_bytes(&self.config.data_dir) {
            metrics::gauge!(m::DATA_DISK_FREE_BYTES).set(free as f64);
        }
        let used_vms = vms.len() as u32;
        // A digest and the changes, not every VM: the heartbeat stays small at any inventory.
        let inventory = self.inventory.observe(vms);
        let status = WorkerStatus {
            worker_id: self.config.worker_id.clone(),
            seq: self.seq.fetch_add(1, Ordering::Relaxed),
            at_ms: now_ms(),
            started_ms: self.started_ms,
            provider: self.provider.name().to_owned(),
            max_vms: self.config.max_vms,
            used_vms,
            draining: self.draining.load(Ordering::SeqCst),
            jobs_in_flight: self.jobs_in_flight.load(Ordering::Relaxed),
            execs_in_flight: self.execs_in_flight.load(Ordering::Relaxed),
            vms: Vec::new(),
            inventory: Some(inventory),
            versions: Versions {
                hearth: env!("CARGO_PKG_VERSION").to_owned(),
                protocol: hearth_messages::subjects::PROTOCOL_VERSION.to_owned(),
                provider: self.provider.version(),
            },
            isolation: self.provider.isolation(),
        };
        let Ok(payload) = Encoding::MsgPack.encode(&status) else {
            return;
        };
        let subject = self.config.subjects.worker_status(&self.config.worker_id);
        if let Err(err) = self.nats.publish(subject, payload.into()).await {
            warn!(%err, "publishing heartbeat failed");
        }
        metrics::counter!(m::HEARTBEATS_TOTAL).increment(1);
    }

    /// Publishes a VM event on `events.vms.<wid>` (the NATS side of [`super::JobHost::vm_event`]).
    pub(super) async fn publish_vm_event(&self, event: &VmEvent) {
        if let Ok(payload) = Encoding::MsgPack.encode(event) {
            let subject = self.config.subjects.vm_events(&self.config.worker_id);
            if let Err(err) = self.nats.publish(subject, payload.into()).await {
                warn!(%err, "publishing vm event failed");
            }
        }
    }
}
