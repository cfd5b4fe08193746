//! Snapshot transfer through the fleet's object store: publish, fetch once, delete.

use std::sync::Arc;

use async_nats::jetstream;
use async_nats::jetstream::object_store::ObjectStore;
use hearth_messages::{Bucket, JobOutput, SnapshotId, VmId, WireError};
use tracing::{debug, info, warn};

use super::convert::snapshot_info;
use super::runner::RunnerCore;
use super::{Inner, WorkerError, nats_err, wire_error};
use crate::config::WorkerConfig;
use crate::jobs::Outcome;
use crate::metrics as m;
use crate::provider::{ProviderError, VmRuntime};

impl RunnerCore {
    /// The snapshots on this worker (those taken of `vm_id`, with one), sorted by id; `published`
    /// says whether the fleet's object store holds each.
    pub(super) async fn snapshot_infos(
        &self,
        vm_id: Option<&VmId>,
    ) -> Result<Vec<hearth_messages::SnapshotInfo>, WireError> {
        let werr = |e: ProviderError| wire_error(&e);
        let local = match vm_id {
            None => self.provider.list_all_snapshots().await.map_err(werr)?,
            Some(vm_id) => {
                let ids = self
                    .provider
                    .list_snapshots(vm_id)
                    .await
                    .map_err(werr)?
                    .ok_or_else(|| WireError::not_found(format!("vm {vm_id} not found")))?;
                let mut infos = Vec::with_capacity(ids.len());
                for id in ids {
                    infos.extend(self.provider.get_snapshot(&id).await.map_err(werr)?);
                }
                infos
            }
        };
        let mut out = Vec::with_capacity(local.len());
        for info in local {
            let published = self.host.is_published(&info.snapshot_id).await;
            out.push(snapshot_info(info, published));
        }
        Ok(out)
    }

    /// Uploads a snapshot to the fleet's store.
    pub(super) async fn publish_snapshot(&self, snapshot_id: &SnapshotId) -> Result<(), WireError> {
        self.host.upload_snapshot(&self.provider, snapshot_id).await
    }

    /// Deletes a snapshot from this worker and, with `unpublish`, from the object store. Both are
    /// idempotent (missing is success). Runs under the snapshot's lock, so it never interleaves
    /// with a fetch of the same snapshot.
    pub(super) async fn delete_snapshot(
        &self,
        snapshot_id: &SnapshotId,
        unpublish: bool,
    ) -> Outcome {
        let lock = self
            .snapshot_fetch
            .entry(snapshot_id.clone())
            .or_default()
            .clone();
        let guard = lock.lock().await;
        match self.provider.delete_snapshot(snapshot_id).await {
            Ok(()) => info!(%snapshot_id, "snapshot deleted"),
            Err(ProviderError::NotFound(_)) => debug!(%snapshot_id, "snapshot already gone"),
            Err(err) => return Err(wire_error(&err)),
        }
        if unpublish {
            self.host.unpublish_snapshot(snapshot_id).await?;
        }
        drop(guard);
        drop(lock);
        self.snapshot_fetch
            .remove_if(snapshot_id, |_, m| Arc::strong_count(m) == 1);
        Ok(JobOutput::Done {})
    }

    /// Makes sure a snapshot is on this worker, fetching it from the object store once.
    pub(super) async fn ensure_snapshot(&self, snapshot_id: &SnapshotId) -> Result<(), WireError> {
        let lock = self
            .snapshot_fetch
            .entry(snapshot_id.clone())
            .or_default()
            .clone();
        let _guard = lock.lock().await;
        if self
            .provider
            .get_snapshot(snapshot_id)
            .await
            .map_err(|e| wire_error(&e))?
            .is_some()
        {
            return Ok(());
        }
        let bytes = self
            .host
            .download_snapshot(&self.provider, snapshot_id)
            .await?;
        metrics::counter!(m::SNAPSHOT_FETCH_BYTES_TOTAL).increment(bytes);
        info!(%snapshot_id, bytes, "snapshot fetched from the fleet's store");
        Ok(())
    }
}

/// The fleet's snapshot store is the JetStream object store `<prefix>_snapshots`.
impl Inner {
    pub(super) async fn upload_to_store(
        &self,
        provider: &Arc<dyn VmRuntime>,
        snapshot_id: &SnapshotId,
    ) -> Result<(), WireError> {
        let (mut writer, mut reader) = tokio::io::duplex(256 * 1024);
        let provider = provider.clone();
        let id = snapshot_id.clone();
        let export = tokio::spawn(async move {
            let result = provider.export_snapshot(&id, &mut writer).await;
            drop(writer);
            result
        });
        let put = self.store.put(snapshot_id.as_str(), &mut reader).await;
        let exported = export
            .await
            .map_err(|e| WireError::internal(format!("snapshot export task: {e}")))?;
        exported.map_err(|e| wire_error(&e))?;
        put.map_err(|e| WireError::internal(format!("uploading snapshot {snapshot_id}: {e}")))?;
        Ok(())
    }

    pub(super) async fn download_from_store(
        &self,
        provider: &Arc<dyn VmRuntime>,
        snapshot_id: &SnapshotId,
    ) -> Result<u64, WireError> {
        let mut object = self.store.get(snapshot_id.as_str()).await.map_err(|e| {
            WireError::not_found(format!(
                "snapshot {snapshot_id} is neither on this worker nor in the object store: {e}"
            ))
        })?;
        let info = provider
            .import_snapshot(snapshot_id, &mut object)
            .await
            .map_err(|e| wire_error(&e))?;
        Ok(info.size_bytes)
    }

    pub(super) async fn delete_from_store(
        &self,
        snapshot_id: &SnapshotId,
    ) -> Result<(), WireError> {
        match self.store.delete(snapshot_id.as_str()).await {
            Ok(()) => info!(%snapshot_id, "snapshot removed from the object store"),
            Err(err) if err.kind() == jetstream::object_store::DeleteErrorKind::NotFound => {}
            Err(err) => {
                return Err(WireError::internal(format!(
                    "removing snapshot {snapshot_id} from the object store: {err}"
                )));
            }
        }
        Ok(())
    }

    pub(super) async fn in_store(&self, snapshot_id: &SnapshotId) -> bool {
        self.store.info(snapshot_id.as_str()).await.is_ok()
    }
}

pub(super) async fn open_snapshot_store(
    nats: &async_nats::Client,
    config: &WorkerConfig,
) -> Result<ObjectStore, WorkerError> {
    let js = jetstream::new(nats.clone());
    let bucket = config.subjects.bucket(Bucket::Snapshots);
    if let Ok(store) = js.get_object_store(&bucket).await {
        return Ok(store);
    }
    // The size limit keeps snapshots off the KV buckets' storage. A server with less JetStream
    // storage than asked refuses the reservation ("insufficient storage resources"): ask for
    // half, down to 256 MiB, rather than not starting (logged: the operator should size it).
    let mut max_bytes = config.store_max_bytes.max(1);
    loop {
        let created = js
            .create_object_store(jetstream::object_store::Config {
                bucket: bucket.clone(),
                description: Some("Hearth template snapshots".into()),
                num_replicas: config.store_replicas,
                max_bytes: i64::try_from(max_bytes).unwrap_or(i64::MAX),
                ..Default::default()
            })
            .await;
        let create_err = match created {
            Ok(store) => {
                if max_bytes < config.store_max_bytes {
                    warn!(
                        asked = config.store_max_bytes,
                        got = max_bytes,
                        "the JetStream server has less storage than store_max_bytes; the snapshot store is smaller"
                    );
                }
                return Ok(store);
            }
            Err(e) => e,
        };
        // Another worker created it first?
        if let Ok(store) = js.get_object_store(&bucket).await {
            return Ok(store);
        }
        let insufficient = create_err.to_string().contains("insufficient storage");
        if insufficient && max_bytes / 2 >= MIN_STORE_BYTES {
            max_bytes /= 2;
            continue;
        }
        return Err(nats_err(format!("creating object store {bucket}"))(
            create_err,
        ));
    }
}

/// The smallest snapshot store a worker settles for when the server's storage is short.
const MIN_STORE_BYTES: u64 = 256 << 20;
