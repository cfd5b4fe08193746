//! Hearth's v1 wire contract: subjects, request/response types, error model, codec and (feature
//! `client`) the typed [`HearthClient`] an executor embeds. Feature `otel` (default) carries W3C
//! trace context in NATS headers ([`trace`]); feature `telemetry` is the binaries' logging and
//! OTLP setup and their NATS connection hygiene (`connection`).
//!
//! Everything that crosses a process boundary is defined here and nowhere else. The types carry
//! no business logic; servers and clients both depend on this crate.

pub mod agent;
pub mod api;
pub mod blob;
pub mod codec;
pub mod data;
pub mod error;
pub mod events;
pub mod ids;
pub mod jobs;
pub mod processes;
pub mod subjects;
pub mod tenant;

#[cfg(feature = "telemetry")]
pub mod binary;
#[cfg(feature = "client")]
pub mod client;
#[cfg(feature = "telemetry")]
pub mod connection;
#[cfg(feature = "telemetry")]
pub mod telemetry;
#[cfg(feature = "otel")]
pub mod trace;
#[cfg(feature = "client")]
pub mod transport;

pub use api::{
    CreateSessionRequest, DeleteTemplateRequest, Empty, ForkFailure, ForkSessionReply,
    ForkSessionRequest, InventoryView, KeepaliveRequest, Labels, ListSessionsRequest,
    MAX_FORK_COUNT, MaintenanceReport, PauseRequest, PoolStatus, PoolsStatus, Quota, QuotasStatus,
    Session, SessionList, SessionState, SetQuotaRequest, SnapshotSessionRequest, Template,
    TemplateList, TenantUsage, WorkerView, WorkersStatus,
};
pub use blob::Blob;
pub use codec::Encoding;
pub use data::{
    ExecRequest, ExecResult, FileGetRequest, FileGetResult, FilePutRequest, FilePutResult,
};
pub use error::{ErrorCode, WireError};
pub use events::{
    InventoryDelta, InventoryDigest, IsolationReport, MAX_INVENTORY_DELTA, SessionEvent,
    TerminationReason, Versions, VmEvent, WorkerStatus, inventory_hash, vm_hash,
};
pub use ids::{IdError, JobId, SessionId, SnapshotId, TemplateName, TenantId, VmId, WorkerId};
pub use jobs::{
    JobOp, JobOutput, JobReply, JobRequest, MAX_INVENTORY_PAGE, PAUSED_OBJECT_PREFIX, SnapshotInfo,
    VmInfo, VmSpec, VmState, paused_object_key,
};
pub use subjects::{Bucket, SessionOp, Subjects};
pub use tenant::Caller;

#[cfg(feature = "client")]
pub use client::{ClientError, ExecEvent, HearthClient, ProcessEvent};

/// The current time as unix milliseconds, the unit of every `*_ms` field.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
