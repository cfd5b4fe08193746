//! The leader lease: one key in the `<prefix>_leader` KV bucket, whose `max_age` is the lease
//! length. Acquire with `create` (create-if-absent), renew with `update` (compare-and-set on the
//! revision) every third of the lease, release by deleting it. Expiry by `max_age` emits no watch
//! event, so standbys retry `create` periodically.
//!
//! The holder value names the process (scheduler id + a random instance id), so a scheduler that
//! could not renew across a NATS outage recognises its own lease afterwards and takes it back by
//! compare-and-set instead of waiting it out. The revision a term began with is its fencing token:
//! jobs carry it, and workers refuse jobs with an older one.

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

impl LeaseHolder {
    /// This process's holder value: `scheduler_id` plus a fresh random instance id. Keep it for
    /// the life of the process, so the lease it wrote before a NATS outage is recognised as its
    /// own afterwards.
    pub fn new(scheduler_id: &str) -> Self {
        Self {
            scheduler_id: scheduler_id.to_owned(),
            instance: uuid::Uuid::new_v4().simple().to_string(),
            acquired_ms: hearth_messages::now_ms(),
        }
    }

    fn same_process(&self, other: &LeaseHolder) -> bool {
        self.scheduler_id == other.scheduler_id && self.instance == other.instance
    }
}

/// A held lease.
#[derive(Debug)]
pub struct Lease {
    kv: kv::Store,
    holder: LeaseHolder,
    value: bytes::Bytes,
    /// The key's current revision (changes with every renewal).
    revision: u64,
    /// The revision this term began with: the fencing token every job carries. Higher than any
    /// earlier term's, since KV revisions only grow.
    term: u64,
    ttl: Duration,
    renewed: Instant,
}

/// The wait before acquire attempt `attempt` fails for a reason other than a held lease (NATS
/// down): short, so leadership comes back within a second of NATS.
fn unavailable_delay(attempt: u32) -> Duration {
    Duration::from_millis(100u64.saturating_mul(1 << attempt.min(3)))
        .min(Duration::from_millis(500))
}

/// Reads the lease key: its holder (if it parses) and revision.
async fn read(kv: &kv::Store) -> Option<(Option<LeaseHolder>, u64)> {
    let entry = kv.entry(LEASE_KEY).await.ok().flatten()?;
    if matches!(
        entry.operation,
        kv::Operation::Delete | kv::Operation::Purge
    ) {
        return None;
    }
    Some((serde_json::from_slice(&entry.value).ok(), entry.revision))
}

impl Lease {
    /// Waits until this process holds the lease, or `stop` is cancelled (`None`). A lease that
    /// names this very process (written before a NATS outage, say) is taken back at once with a
    /// compare-and-set, not waited out.
    pub async fn acquire(
        kv: kv::Store,
        holder: &LeaseHolder,
        ttl: Duration,
        stop: &CancellationToken,
    ) -> Option<Lease> {
        let value: bytes::Bytes = serde_json::to_vec(holder).unwrap_or_default().into();
        let standby = (ttl / 3).max(Duration::from_millis(50));
        let mut announced: Option<LeaseHolder> = None;
        let mut failures = 0u32;
        loop {
            let mut wait = standby;
            let attempt = match kv.create(LEASE_KEY, value.clone()).await {
                Ok(revision) => Ok(revision),
                Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => match read(&kv).await {
                    Some((Some(current), revision)) if current.same_process(holder) => {
                        // Ours from before (a NATS outage, a step-down): take it back by CAS,
                        // which fails if anyone else wrote it in between.
                        kv.update(LEASE_KEY, value.clone(), revision)
                            .await
                            .map_err(|e| e.to_string())
                    }
                    Some((current, _)) => {
                        if announced != current {
                            tracing::info!(holder = ?current.as_ref().map(|h| &h.scheduler_id),
                                instance = ?current.as_ref().map(|h| &h.instance),
                                "another scheduler holds the lease; standing by");
                            announced = current;
                        }
                        Err(String::new())
                    }
                    // Gone between the two calls: try again at once.
                    None => {
                        wait = Duration::ZERO;
                        Err(String::new())
                    }
                },
                Err(e) => Err(e.to_string()),
            };
            match attempt {
                Ok(revision) => {
                    tracing::info!(scheduler_id = %holder.scheduler_id, lease_revision = revision,
                        "acquired the leader lease");
                    return Some(Lease {
                        kv,
                        holder: holder.clone(),
                        value,
                        revision,
                        term: revision,
                        ttl,
                        renewed: Instant::now(),
                    });
                }
                Err(e) if e.is_empty() => failures = 0,
                Err(e) => {
                    failures += 1;
                    wait = unavailable_delay(failures);
                    tracing::warn!(error = %e, attempt = failures, "acquiring the leader lease failed; retrying");
                }
            }
            tokio::select! {
                _ = stop.cancelled() => return None,
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// The fencing token of this term (the lease revision it began with).
    pub fn term(&self) -> u64 {
        self.term
    }

    /// Renews the lease every third of its length until `stop` is cancelled (then returns the
    /// lease, still held) or it is lost (then cancels `lost` and returns `None`). A failed renewal
    /// is retried quickly while the lease may still be ours; past its length it counts as lost
    /// (another scheduler may hold it by then).
    pub async fn keep(mut self, stop: CancellationToken, lost: CancellationToken) -> Option<Lease> {
        let period = (self.ttl / 3).max(Duration::from_millis(50));
        let retry = (period / 4).max(Duration::from_millis(50));
        let mut wait = period;
        loop {
            tokio::select! {
                _ = stop.cancelled() => return Some(self),
                _ = tokio::time::sleep(wait) => {}
            }
            match self
                .kv
                .update(LEASE_KEY, self.value.clone(), self.revision)
                .await
            {
                Ok(revision) => {
                    self.revision = revision;
                    self.renewed = Instant::now();
                    wait = period;
                }
                Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => {
                    // A renewal whose reply was lost still wrote our value: adopt its revision.
                    match read(&self.kv).await {
                        Some((Some(current), revision)) if current.same_process(&self.holder) => {
                            tracing::info!("the lease still names this scheduler; renewed");
                            self.revision = revision;
                            wait = Duration::ZERO;
                        }
                        _ => {
                            tracing::error!("the leader lease was taken over; stepping down");
                            ::metrics::counter!(crate::metrics::LEASE_LOST_TOTAL).increment(1);
                            lost.cancel();
                            return None;
                        }
                    }
                }
                Err(e) => {
                    if self.renewed.elapsed() + retry >= self.ttl {
                        tracing::error!(error = %e, "cannot renew the leader lease in time; stepping down");
                        ::metrics::counter!(crate::metrics::LEASE_LOST_TOTAL).increment(1);
                        lost.cancel();
                        return None;
                    }
                    tracing::warn!(error = %e, "renewing the leader lease failed; retrying");
                    wait = retry;
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
