//! Hearth's v1 wire contract: subjects, request/response types, error model, codec and (feature
//! `client`) the typed [`HearthClient`](client::HearthClient) an executor embeds.

pub mod ids;

pub use ids::{IdError, JobId, SessionId, SnapshotId, TemplateName, VmId, WorkerId};
