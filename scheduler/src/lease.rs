//! The leader lease: one key in the `<prefix>_leader` KV bucket, whose `max_age` is the lease
//! length. Acquire with `create` (create-if-absent), renew with `update` (compare-and-set on the
//! revision) every third of the lease, release by deleting it. Expiry by `max_age` emits no watch
//! event, so standbys retry `create` periodically.

use std::time::Duration;

use async_nats::jetstream;
use async_nats::jetstream::kv;
use hearth_messages::{Bucket, Subjects};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::store::{StoreError, open_bucket};

/// The key holding the lease.
pub const LEASE_KEY: &str = "leader";

/// What the lease key holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseHolder {
    /// The scheduler's configured id.
    pub scheduler_id: String,
    /// This process's random instance id (two processes with one id are still told apart).
    pub instance: String,
    /// When the lease was first acquired (unix ms).
    pub acquired_ms: u64,
}

/// Opens (creating if needed) the leader bucket with `max_age = ttl`.
pub async fn open_leader_bucket(
    js: &jetstream::Context,
    subjects: &Subjects,
    replicas: usize,
    ttl: Duration,
) -> Result<kv::Store, StoreError> {
    open_bucket(
        js,
        subjects.bucket(Bucket::Leader),
        replicas,
        ttl,
        "hearth scheduler leader lease",
    )
    .await
}

/// A held lease.
#[derive(Debug)]
pub struct Lease {
    kv: kv::Store,
    value: bytes::Bytes,
    revision: u64,
    ttl: Duration,
    renewed: Instant,
}

impl Lease {
    /// Waits until this scheduler holds the lease, or `stop` is cancelled (`None`).
    pub async fn acquire(
        kv: kv::Store,
        scheduler_id: &str,
        ttl: Duration,
        stop: &CancellationToken,
    ) -> Option<Lease> {
        let holder = LeaseHolder {
            scheduler_id: scheduler_id.to_owned(),
            instance: uuid::Uuid::new_v4().simple().to_string(),
            acquired_ms: hearth_messages::now_ms(),
        };
        let value: bytes::Bytes = serde_json::to_vec(&holder).unwrap_or_default().into();
        let retry = (ttl / 3).max(Duration::from_millis(50));
        let mut announced = false;
        loop {
            match kv.create(LEASE_KEY, value.clone()).await {
                Ok(revision) => {
                    tracing::info!(scheduler_id, "acquired the leader lease");
                    return Some(Lease {
                        kv,
                        value,
                        revision,
                        ttl,
                        renewed: Instant::now(),
                    });
                }
                Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {
                    if !announced {
                        let current = kv
                            .get(LEASE_KEY)
                            .await
                            .ok()
                            .flatten()
                            .and_then(|b| serde_json::from_slice::<LeaseHolder>(&b).ok());
                        tracing::info!(holder = ?current.map(|h| h.scheduler_id),
                            "another scheduler holds the lease; standing by");
                        announced = true;
                    }
                }
                Err(e) => tracing::warn!(error = %e, "acquiring the leader lease failed"),
            }
            tokio::select! {
                _ = stop.cancelled() => return None,
                _ = tokio::time::sleep(retry) => {}
            }
        }
    }

    /// Renews the lease every third of its length until `stop` is cancelled (then returns the
    /// lease, still held) or it is lost (then cancels `lost` and returns `None`).
    pub async fn keep(mut self, stop: CancellationToken, lost: CancellationToken) -> Option<Lease> {
        let period = (self.ttl / 3).max(Duration::from_millis(50));
        loop {
            tokio::select! {
                _ = stop.cancelled() => return Some(self),
                _ = tokio::time::sleep(period) => {}
            }
            match self
                .kv
                .update(LEASE_KEY, self.value.clone(), self.revision)
                .await
            {
                Ok(revision) => {
                    self.revision = revision;
                    self.renewed = Instant::now();
                }
                Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => {
                    tracing::error!("the leader lease was taken over; stepping down");
                    lost.cancel();
                    return None;
                }
                Err(e) => {
                    // Keep trying while the lease may still be ours.
                    if self.renewed.elapsed() + period >= self.ttl {
                        tracing::error!(error = %e, "cannot renew the leader lease; stepping down");
                        lost.cancel();
                        return None;
                    }
                    tracing::warn!(error = %e, "renewing the leader lease failed; retrying");
                }
            }
        }
    }

    /// Gives the lease up so a standby takes over at once.
    pub async fn release(self) {
        if let Err(e) = self
            .kv
            .delete_expect_revision(LEASE_KEY, Some(self.revision))
            .await
        {
            tracing::warn!(error = %e, "releasing the leader lease failed (it will expire)");
        } else {
            tracing::info!("released the leader lease");
        }
    }
}
