//! Hearth worker: owns the VMs on one host. It runs lifecycle jobs from the scheduler, serves the
//! data plane (exec, files) of the sessions whose VMs it holds under per-VM locks, publishes
//! heartbeats, VM events and Prometheus metrics, and reconciles with its provider on start.
//!
//! Entry points: [`run`] (what the `hearth-worker` binary calls), [`Worker::start`] for embedding
//! (the `hearth up` stack, tests), and the provider traits in [`provider`].

mod backups;
pub mod config;
pub mod image;
mod inventory;
mod jobs;
mod locks;
pub mod metrics;
pub mod provider;
mod state;
mod worker;

pub use config::{ConfigError, ProviderKind, WorkerArgs, WorkerConfig};
pub use worker::{
    JobHost, JobRunner, MemoryHost, MemoryObjects, MemoryStore, SERVICE_NAME, Worker, WorkerError,
    run, wire_error,
};

use std::sync::Arc;

/// Opens the provider the config names.
pub fn open_provider(
    config: &WorkerConfig,
) -> Result<Arc<dyn provider::VmRuntime>, provider::ProviderError> {
    Ok(match config.provider {
        ProviderKind::Process => {
            Arc::new(provider::ProcessProvider::open(config.process_config())?)
        }
        ProviderKind::Fake => Arc::new(provider::FakeProvider::default()),
        ProviderKind::Qemu => Arc::new(provider::QemuProvider::open(config.qemu_config())?),
        ProviderKind::Firecracker => Arc::new(provider::FirecrackerProvider::open(
            config.firecracker_config(),
        )?),
        ProviderKind::Oci => {
            let (process, oci) = config.oci_config();
            Arc::new(provider::ProcessProvider::open_oci(process, oci)?)
        }
    })
}
