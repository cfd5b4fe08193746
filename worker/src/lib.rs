//! Hearth worker: owns the VMs on one host, runs lifecycle jobs, exec under per-VM locks, heartbeats.

pub mod provider;
