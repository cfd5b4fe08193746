//! Durable state: the records the scheduler keeps in JetStream KV and the [`Kv`] trait the core writes
//! them through, with an in-memory implementation ([`MemKv`], for logic tests) and the NATS one
//! ([`NatsKv`]).
//!
//! KV layout (values are JSON, so an operator can read them with any KV tool):
//! - `<prefix>_sessions`, key = session id: [`SessionRecord`]. Written (create-if-absent) before the
//!   client hears of the session, then updated with compare-and-set on every state change.
//! - `<prefix>_pool`, key = VM id: [`PoolRecord`], one per ready pooled VM.
//! - `<prefix>_templates`, key = template name: [`TemplateRecord`] (including the replaced snapshots
//!   still to be garbage-collected).
//! - `<prefix>_leader`, key `leader`: the lease (see [`crate::lease`]).
//! - `<prefix>_tenants`, key = tenant: a [`Quota`] set at run time (`admin.quotas.set`), which
//!   overrides the config's for that tenant.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use async_nats::jetstream;
use async_nats::jetstream::kv;
use async_trait::async_trait;
use futures::TryStreamExt;
use hearth_messages::{
    Bucket, Quota, Session, SessionId, SnapshotId, Subjects, Template, TemplateName, TenantId,
    TerminationReason, VmId, WorkerId,
};
use parking_lot::Mutex;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// Why a store operation failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// Create of an existing key, or update with a stale revision: someone else wrote it.
    #[error("conflicting write to {key}")]
    Conflict {
        /// The key.
        key: String,
    },
    /// The store could not be reached or refused the write.
    #[error("state store unavailable: {0}")]
    Unavailable(String),
    /// A stored value could not be decoded.
    #[error("corrupt record {key}: {reason}")]
    Corrupt {
        /// The key.
        key: String,
        /// The decode error.
        reason: String,
    },
}

/// The scheduler's tables (one KV bucket each).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Table {
    /// Session records.
    Sessions,
    /// Ready pooled VMs.
    Pool,
    /// Templates.
    Templates,
    /// Tenant quotas set at run time.
    Tenants,
}

impl Table {
    /// Every table.
    pub const ALL: [Table; 4] = [
        Table::Sessions,
        Table::Pool,
        Table::Templates,
        Table::Tenants,
    ];

    fn bucket(self) -> Bucket {
        match self {
            Table::Sessions => Bucket::Sessions,
            Table::Pool => Bucket::Pool,
            Table::Templates => Bucket::Templates,
            Table::Tenants => Bucket::Tenants,
        }
    }
}

/// A raw key-value store with compare-and-set, the only persistence the core needs.
#[async_trait]
pub trait Kv: Send + Sync + 'static {
    /// Every live key with its value and revision.
    async fn load(&self, table: Table) -> Result<Vec<(String, Vec<u8>, u64)>, StoreError>;
    /// The live value of `key` with its revision, if any.
    async fn get(&self, table: Table, key: &str) -> Result<Option<(Vec<u8>, u64)>, StoreError>;
    /// Writes `key` only if it does not exist; the new revision.
    async fn create(&self, table: Table, key: &str, value: Vec<u8>) -> Result<u64, StoreError>;
    /// Writes `key` only if its revision is still `revision`; the new revision.
    async fn update(
        &self,
        table: Table,
        key: &str,
        value: Vec<u8>,
        revision: u64,
    ) -> Result<u64, StoreError>;
    /// Writes `key` unconditionally; the new revision.
    async fn put(&self, table: Table, key: &str, value: Vec<u8>) -> Result<u64, StoreError>;
    /// Deletes `key` (absent keys are fine).
    async fn delete(&self, table: Table, key: &str) -> Result<(), StoreError>;
}

/// A session as persisted: the wire view plus what the lifetime logic needs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionRecord {
    /// What clients see.
    pub session: Session,
    /// The TTL in seconds (running time) keepalives without `ttl_s` renew by.
    pub ttl_s: u64,
    /// Idle timeout in seconds; none = never stopped for idleness.
    #[serde(default)]
    pub idle_timeout_s: Option<u64>,
    /// When the VM was stopped for idleness (scheduler clock); drives prune.
    #[serde(default)]
    pub stopped_ms: Option<u64>,
    /// Since when TTL is paused (stopped time does not count); `expires_ms` moves by the pause on
    /// resume.
    #[serde(default)]
    pub ttl_paused_ms: Option<u64>,
    /// The worker's `last_activity_ms` in the stop reply: a later value while running means the VM
    /// was resumed by an exec.
    #[serde(default)]
    pub stop_activity_ms: Option<u64>,
    /// Why it ended.
    #[serde(default)]
    pub reason: Option<TerminationReason>,
    /// When it ended.
    #[serde(default)]
    pub ended_ms: Option<u64>,
    /// The `backup_after_s` backup was taken (or tried and refused): one per session.
    #[serde(default)]
    pub backed_up: bool,
    /// An object may exist under the session's paused-state key (`pause_upload` was tried):
    /// set before the upload starts, cleared once the object is deleted, so no upload (even one
    /// whose reply was lost) outlives the session in the object store.
    #[serde(default)]
    pub pause_object: bool,
}

/// A ready pooled VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolRecord {
    /// The VM (`pool-<template>-<id>`).
    pub vm_id: VmId,
    /// Its template.
    pub template: TemplateName,
    /// Where it runs.
    pub worker_id: WorkerId,
    /// The snapshot it was restored from; entries of a replaced snapshot are retired.
    pub snapshot_id: SnapshotId,
    /// Ready since (scheduler clock).
    pub created_ms: u64,
}

/// How a config template is built; a change triggers a rebuild of its snapshot.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuildSpec {
    /// Base image on the worker.
    #[serde(default)]
    pub base: Option<String>,
    /// Bootstrap argv.
    #[serde(default)]
    pub bootstrap: Option<Vec<String>>,
    /// Nix profile hydrated at build.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nix_profile: Option<String>,
}

/// A template as persisted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TemplateRecord {
    /// What clients see (`snapshot_id` absent until first built).
    pub template: Template,
    /// Environment for every command in its VMs.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// For config templates: what the current snapshot was built from. `None` for templates made
    /// from a session snapshot (they cannot be rebuilt).
    #[serde(default)]
    pub build: Option<BuildSpec>,
    /// Snapshots this template no longer uses (replaced by a rebuild) that are not yet deleted
    /// from every worker and the object store. Written in the same record as the replacement, so a
    /// restarted scheduler still finishes the deletion; an entry is removed once it is done.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub retired_snapshots: Vec<SnapshotId>,
}

/// Typed access to the scheduler's tables over a [`Kv`].
#[derive(Clone)]
pub struct Store {
    kv: Arc<dyn Kv>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Store")
    }
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    // The records are plain data: encoding cannot fail.
    serde_json::to_vec(value).unwrap_or_default()
}

fn decode<T: DeserializeOwned>(key: &str, bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt {
        key: key.to_owned(),
        reason: e.to_string(),
    })
}

/// What [`Store::load_all`] found; corrupt records are skipped and counted.
#[derive(Debug, Default)]
pub struct Loaded {
    /// Sessions with their revisions.
    pub sessions: Vec<(SessionRecord, u64)>,
    /// Pool entries.
    pub pool: Vec<PoolRecord>,
    /// Templates.
    pub templates: Vec<TemplateRecord>,
    /// Tenant quotas set at run time.
    pub quotas: Vec<(TenantId, Quota)>,
    /// Records that did not decode.
    pub corrupt: Vec<StoreError>,
}

impl Store {
    /// A store over `kv`.
    pub fn new(kv: Arc<dyn Kv>) -> Self {
        Self { kv }
    }

    /// Reads every table.
    pub async fn load_all(&self) -> Result<Loaded, StoreError> {
        let mut out = Loaded::default();
        for (key, value, rev) in self.kv.load(Table::Sessions).await? {
            match decode::<SessionRecord>(&key, &value) {
                Ok(rec) => out.sessions.push((rec, rev)),
                Err(e) => out.corrupt.push(e),
            }
        }
        for (key, value, _) in self.kv.load(Table::Pool).await? {
            match decode::<PoolRecord>(&key, &value) {
                Ok(rec) => out.pool.push(rec),
                Err(e) => out.corrupt.push(e),
            }
        }
        for (key, value, _) in self.kv.load(Table::Templates).await? {
            match decode::<TemplateRecord>(&key, &value) {
                Ok(rec) => out.templates.push(rec),
                Err(e) => out.corrupt.push(e),
            }
        }
        for (key, value, _) in self.kv.load(Table::Tenants).await? {
            let tenant = TenantId::new(key.as_str()).map_err(|e| StoreError::Corrupt {
                key: key.clone(),
                reason: e.to_string(),
            });
            match tenant.and_then(|t| decode::<Quota>(&key, &value).map(|q| (t, q))) {
                Ok(entry) => out.quotas.push(entry),
                Err(e) => out.corrupt.push(e),
            }
        }
        Ok(out)
    }

    /// Records a new session; `Conflict` if the id is taken.
    pub async fn create_session(&self, rec: &SessionRecord) -> Result<u64, StoreError> {
        self.kv
            .create(
                Table::Sessions,
                rec.session.session_id.as_str(),
                encode(rec),
            )
            .await
    }

    /// Reads one session record back (how a claim resolves a `Conflict` or a lost ack).
    pub async fn get_session(
        &self,
        id: &SessionId,
    ) -> Result<Option<(SessionRecord, u64)>, StoreError> {
        match self.kv.get(Table::Sessions, id.as_str()).await? {
            Some((value, rev)) => Ok(Some((decode(id.as_str(), &value)?, rev))),
            None => Ok(None),
        }
    }

    /// Updates a session whose last revision is `revision`.
    pub async fn update_session(
        &self,
        rec: &SessionRecord,
        revision: u64,
    ) -> Result<u64, StoreError> {
        self.kv
            .update(
                Table::Sessions,
                rec.session.session_id.as_str(),
                encode(rec),
                revision,
            )
            .await
    }

    /// Forgets a session.
    pub async fn delete_session(&self, id: &SessionId) -> Result<(), StoreError> {
        self.kv.delete(Table::Sessions, id.as_str()).await
    }

    /// Records a ready pooled VM.
    pub async fn put_pool(&self, rec: &PoolRecord) -> Result<(), StoreError> {
        self.kv
            .put(Table::Pool, rec.vm_id.as_str(), encode(rec))
            .await
            .map(|_| ())
    }

    /// Forgets a pooled VM.
    pub async fn delete_pool(&self, vm_id: &VmId) -> Result<(), StoreError> {
        self.kv.delete(Table::Pool, vm_id.as_str()).await
    }

    /// Writes a template unconditionally.
    pub async fn put_template(&self, rec: &TemplateRecord) -> Result<(), StoreError> {
        self.kv
            .put(Table::Templates, rec.template.name.as_str(), encode(rec))
            .await
            .map(|_| ())
    }

    /// Forgets a template (its pool and snapshots are gone).
    pub async fn delete_template(&self, name: &TemplateName) -> Result<(), StoreError> {
        self.kv.delete(Table::Templates, name.as_str()).await
    }

    /// Records a tenant's run-time quota (`None`: forget it, the config's applies).
    pub async fn put_quota(
        &self,
        tenant: &TenantId,
        quota: Option<&Quota>,
    ) -> Result<(), StoreError> {
        match quota {
            Some(q) => self
                .kv
                .put(Table::Tenants, tenant.as_str(), encode(q))
                .await
                .map(|_| ()),
            None => self.kv.delete(Table::Tenants, tenant.as_str()).await,
        }
    }

    /// Records a new template; `Conflict` if the name is taken.
    pub async fn create_template(&self, rec: &TemplateRecord) -> Result<(), StoreError> {
        self.kv
            .create(Table::Templates, rec.template.name.as_str(), encode(rec))
            .await
            .map(|_| ())
    }
}

/// An in-memory [`Kv`] with the same create/update semantics as JetStream KV. Operations can be
/// made to fail, to test what the core does when the store is down, and single writes can fail
/// before or after they are applied (a refused write versus a lost ack).
#[derive(Debug, Default)]
pub struct MemKv {
    inner: Mutex<MemInner>,
    failing: AtomicBool,
    reads_failing: AtomicBool,
    faults: Mutex<HashMap<Table, WriteFaults>>,
}

#[derive(Debug, Default)]
struct WriteFaults {
    /// The next writes fail with `Unavailable` and are not applied.
    refused: usize,
    /// The next writes are applied, then answer `Unavailable` (the ack was lost).
    acks_lost: usize,
}

#[derive(Debug, Default)]
struct MemInner {
    revision: u64,
    tables: HashMap<Table, BTreeMap<String, (Vec<u8>, u64)>>,
}

impl MemKv {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Makes every operation fail with `Unavailable` (or work again).
    pub fn set_failing(&self, failing: bool) {
        self.failing.store(failing, Ordering::SeqCst);
    }

    /// Makes the next `n` writes (create, update, put) to `table` fail with `Unavailable`,
    /// unapplied.
    pub fn refuse_next_writes(&self, table: Table, n: usize) {
        self.faults.lock().entry(table).or_default().refused = n;
    }

    /// Makes the next `n` writes to `table` apply, then answer `Unavailable`, as if their ack
    /// was lost.
    pub fn lose_next_acks(&self, table: Table, n: usize) {
        self.faults.lock().entry(table).or_default().acks_lost = n;
    }

    /// Makes every read (`get`, `load`) fail with `Unavailable` (or work again); writes still work.
    pub fn set_reads_failing(&self, failing: bool) {
        self.reads_failing.store(failing, Ordering::SeqCst);
    }

    /// The keys of a table (for assertions).
    pub fn keys(&self, table: Table) -> Vec<String> {
        self.inner
            .lock()
            .tables
            .get(&table)
            .map(|t| t.keys().cloned().collect())
            .unwrap_or_default()
    }

    fn check(&self) -> Result<(), StoreError> {
        if self.failing.load(Ordering::SeqCst) {
            return Err(StoreError::Unavailable("store is failing (test)".into()));
        }
        Ok(())
    }

    fn check_read(&self) -> Result<(), StoreError> {
        self.check()?;
        if self.reads_failing.load(Ordering::SeqCst) {
            return Err(StoreError::Unavailable("reads are failing (test)".into()));
        }
        Ok(())
    }

    /// Before a write: refused, or whether its ack is to be lost.
    fn check_write(&self, table: Table) -> Result<bool, StoreError> {
        self.check()?;
        let mut faults = self.faults.lock();
        let f = faults.entry(table).or_default();
        if f.refused > 0 {
            f.refused -= 1;
            return Err(StoreError::Unavailable("write refused (test)".into()));
        }
        if f.acks_lost > 0 {
            f.acks_lost -= 1;
            return Ok(true);
        }
        Ok(false)
    }
}

fn ack<T>(lost: bool, result: Result<T, StoreError>) -> Result<T, StoreError> {
    match result {
        Ok(_) if lost => Err(StoreError::Unavailable("ack lost (test)".into())),
        other => other,
    }
}

#[async_trait]
impl Kv for MemKv {
    async fn get(&self, table: Table, key: &str) -> Result<Option<(Vec<u8>, u64)>, StoreError> {
        self.check_read()?;
        Ok(self
            .inner
            .lock()
            .tables
            .get(&table)
            .and_then(|t| t.get(key).cloned()))
    }

    async fn load(&self, table: Table) -> Result<Vec<(String, Vec<u8>, u64)>, StoreError> {
        self.check_read()?;
        Ok(self
            .inner
            .lock()
            .tables
            .get(&table)
            .map(|t| {
                t.iter()
                    .map(|(k, (v, r))| (k.clone(), v.clone(), *r))
                    .collect()
            })
            .unwrap_or_default())
    }

    async fn create(&self, table: Table, key: &str, value: Vec<u8>) -> Result<u64, StoreError> {
        let lost = self.check_write(table)?;
        let mut inner = self.inner.lock();
        inner.revision += 1;
        let rev = inner.revision;
        let t = inner.tables.entry(table).or_default();
        if t.contains_key(key) {
            return Err(StoreError::Conflict { key: key.into() });
        }
        t.insert(key.to_owned(), (value, rev));
        ack(lost, Ok(rev))
    }

    async fn update(
        &self,
        table: Table,
        key: &str,
        value: Vec<u8>,
        revision: u64,
    ) -> Result<u64, StoreError> {
        let lost = self.check_write(table)?;
        let mut inner = self.inner.lock();
        inner.revision += 1;
        let rev = inner.revision;
        let t = inner.tables.entry(table).or_default();
        match t.get_mut(key) {
            Some(entry) if entry.1 == revision => {
                *entry = (value, rev);
                ack(lost, Ok(rev))
            }
            _ => Err(StoreError::Conflict { key: key.into() }),
        }
    }

    async fn put(&self, table: Table, key: &str, value: Vec<u8>) -> Result<u64, StoreError> {
        let lost = self.check_write(table)?;
        let mut inner = self.inner.lock();
        inner.revision += 1;
        let rev = inner.revision;
        inner
            .tables
            .entry(table)
            .or_default()
            .insert(key.to_owned(), (value, rev));
        ack(lost, Ok(rev))
    }

    async fn delete(&self, table: Table, key: &str) -> Result<(), StoreError> {
        self.check()?;
        if let Some(t) = self.inner.lock().tables.get_mut(&table) {
            t.remove(key);
        }
        Ok(())
    }
}

/// [`Kv`] over JetStream KV buckets (one per [`Table`]).
#[derive(Debug, Clone)]
pub struct NatsKv {
    sessions: kv::Store,
    pool: kv::Store,
    templates: kv::Store,
    tenants: kv::Store,
}

/// Opens a KV bucket, creating it if it does not exist. An existing bucket keeps its replicas and
/// storage (an operator may have set it up, e.g. R3 on a cluster); only a different `max_age`
/// (the lease length of the leader bucket) is updated.
pub(crate) async fn open_bucket(
    js: &jetstream::Context,
    name: String,
    replicas: usize,
    max_age: std::time::Duration,
    description: &str,
) -> Result<kv::Store, StoreError> {
    let config = kv::Config {
        bucket: name.clone(),
        description: description.to_owned(),
        history: 1,
        max_age,
        num_replicas: replicas,
        storage: jetstream::stream::StorageType::File,
        ..Default::default()
    };
    let fail = |e: &dyn std::fmt::Display| {
        StoreError::Unavailable(format!("opening kv bucket {name}: {e}"))
    };
    if let Ok(store) = js.get_key_value(name.as_str()).await {
        let stream = js
            .get_stream(format!("KV_{name}"))
            .await
            .map_err(|e| fail(&e))?;
        if stream.cached_info().config.max_age == max_age {
            return Ok(store);
        }
        let mut stream_config = stream.cached_info().config.clone();
        stream_config.max_age = max_age;
        js.update_stream(stream_config)
            .await
            .map_err(|e| fail(&e))?;
        return js.get_key_value(name.as_str()).await.map_err(|e| fail(&e));
    }
    match js.create_key_value(config).await {
        Ok(store) => Ok(store),
        // Another scheduler created it in between.
        Err(create) => js
            .get_key_value(name.as_str())
            .await
            .map_err(|_| fail(&create)),
    }
}

impl NatsKv {
    /// Opens (creating if needed) the sessions, pool and templates buckets.
    pub async fn open(
        js: &jetstream::Context,
        subjects: &Subjects,
        replicas: usize,
    ) -> Result<Self, StoreError> {
        let zero = std::time::Duration::ZERO;
        Ok(Self {
            sessions: open_bucket(
                js,
                subjects.bucket(Bucket::Sessions),
                replicas,
                zero,
                "hearth sessions",
            )
            .await?,
            pool: open_bucket(
                js,
                subjects.bucket(Bucket::Pool),
                replicas,
                zero,
                "hearth warm pool",
            )
            .await?,
            templates: open_bucket(
                js,
                subjects.bucket(Bucket::Templates),
                replicas,
                zero,
                "hearth templates",
            )
            .await?,
            tenants: open_bucket(
                js,
                subjects.bucket(Bucket::Tenants),
                replicas,
                zero,
                "hearth tenant quotas",
            )
            .await?,
        })
    }

    fn bucket(&self, table: Table) -> &kv::Store {
        match table {
            Table::Sessions => &self.sessions,
            Table::Pool => &self.pool,
            Table::Templates => &self.templates,
            Table::Tenants => &self.tenants,
        }
    }
}

fn unavailable(table: Table, what: &str, err: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(format!("{what} in {:?}: {err}", table.bucket()))
}

#[async_trait]
impl Kv for NatsKv {
    async fn get(&self, table: Table, key: &str) -> Result<Option<(Vec<u8>, u64)>, StoreError> {
        let entry = self
            .bucket(table)
            .entry(key)
            .await
            .map_err(|e| unavailable(table, "reading", e))?;
        Ok(entry
            .filter(|e| e.operation == kv::Operation::Put)
            .map(|e| (e.value.to_vec(), e.revision)))
    }

    async fn load(&self, table: Table) -> Result<Vec<(String, Vec<u8>, u64)>, StoreError> {
        let bucket = self.bucket(table);
        let keys: Vec<String> = bucket
            .keys()
            .await
            .map_err(|e| unavailable(table, "listing keys", e))?
            .try_collect()
            .await
            .map_err(|e| unavailable(table, "listing keys", e))?;
        let mut out = Vec::with_capacity(keys.len());
        for key in keys {
            if let Some(entry) = bucket
                .entry(key.clone())
                .await
                .map_err(|e| unavailable(table, "reading", e))?
                && entry.operation == kv::Operation::Put
            {
                out.push((key, entry.value.to_vec(), entry.revision));
            }
        }
        Ok(out)
    }

    async fn create(&self, table: Table, key: &str, value: Vec<u8>) -> Result<u64, StoreError> {
        self.bucket(table)
            .create(key, value.into())
            .await
            .map_err(|e| match e.kind() {
                kv::CreateErrorKind::AlreadyExists => StoreError::Conflict { key: key.into() },
                _ => unavailable(table, "creating", e),
            })
    }

    async fn update(
        &self,
        table: Table,
        key: &str,
        value: Vec<u8>,
        revision: u64,
    ) -> Result<u64, StoreError> {
        self.bucket(table)
            .update(key, value.into(), revision)
            .await
            .map_err(|e| match e.kind() {
                kv::UpdateErrorKind::WrongLastRevision => StoreError::Conflict { key: key.into() },
                _ => unavailable(table, "updating", e),
            })
    }

    async fn put(&self, table: Table, key: &str, value: Vec<u8>) -> Result<u64, StoreError> {
        self.bucket(table)
            .put(key, value.into())
            .await
            .map_err(|e| unavailable(table, "writing", e))
    }

    async fn delete(&self, table: Table, key: &str) -> Result<(), StoreError> {
        self.bucket(table)
            .purge(key)
            .await
            .map_err(|e| unavailable(table, "deleting", e))
    }
}
