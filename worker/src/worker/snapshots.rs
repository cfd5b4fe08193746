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

/// The fleet's snapshot store is the JetStream object store `<prefix>_snapshots` (template
/// snapshots under their ids, uploaded paused VMs under `paused/<tenant>/<sid>`).
impl Inner {
    pub(super) async fn upload_to_store(
        &self,
        provider: &Arc<dyn VmRuntime>,
        snapshot_id: &SnapshotId,
    ) -> Result<(), WireError> {
        let provider = provider.clone();
        let id = snapshot_id.clone();
        self.put_exported(snapshot_id.as_str(), move |mut writer| async move {
            provider.export_snapshot(&id, &mut writer).await
        })
        .await
        .map(drop)
    }

    /// Uploads the paused VM `vm_id` as the object `key`; its size.
    pub(super) async fn upload_paused_to_store(
        &self,
        provider: &Arc<dyn VmRuntime>,
        vm_id: &VmId,
        key: &str,
    ) -> Result<u64, WireError> {
        let provider = provider.clone();
        let id = vm_id.clone();
        self.put_exported(key, move |mut writer| async move {
            provider.export_paused(&id, &mut writer).await
        })
        .await
    }

    /// Streams what `export` writes into the object `key` (the store chunks it and records its
    /// SHA-256); the object's size. When the export or the upload fails, no object is left
    /// under `key`: a truncated stream is never mistaken for a whole one.
    async fn put_exported<F, Fut>(&self, key: &str, export: F) -> Result<u64, WireError>
    where
        F: FnOnce(tokio::io::DuplexStream) -> Fut,
        Fut: std::future::Future<Output = Result<u64, ProviderError>> + Send + 'static,
    {
        let (writer, mut reader) = tokio::io::duplex(256 * 1024);
        let export = tokio::spawn(export(writer));
        let put = self.store.put(key, &mut reader).await;
        // A failed upload stops reading: the export must see a closed pipe, not wait on it.
        drop(reader);
        let exported = export
            .await
            .map_err(|e| WireError::internal(format!("export task: {e}")));
        let outcome = match (exported, put) {
            (Ok(Ok(_)), Ok(info)) => return Ok(info.size as u64),
            (_, Err(e)) => WireError::internal(format!("uploading {key} to the object store: {e}")),
            (Ok(Err(e)), Ok(_)) => wire_error(&e),
            (Err(e), Ok(_)) => e,
        };
        if let Err(err) = self.delete_object(key).await {
            warn!(key, %err, "removing a failed upload");
        }
        Err(outcome)
    }

    /// Brings the paused VM stored as `key` into the provider as `vm_id` (paused). The whole
    /// object is read first, so the store's SHA-256 is checked before any of it is used: a
    /// damaged or missing object is a 400 and leaves nothing.
    pub(super) async fn download_paused_from_store(
        &self,
        provider: &Arc<dyn VmRuntime>,
        vm_id: &VmId,
        key: &str,
    ) -> Result<crate::provider::VmView, WireError> {
        let mut object = self.store.get(key).await.map_err(|e| {
            WireError::bad_request(format!(
                "the paused state {key} is not in the object store: {e}"
            ))
        })?;
        let dir = self.config.data_dir.join("downloads");
        tokio::fs::create_dir_all(&dir)
            .await
            .map_err(|e| WireError::internal(format!("creating {}: {e}", dir.display())))?;
        let path = dir.join(format!("{vm_id}.{}", crate::provider::now_ms()));
        let downloaded = async {
            let mut file = tokio::fs::File::create(&path).await?;
            let n = tokio::io::copy(&mut object, &mut file).await?;
            tokio::io::AsyncWriteExt::flush(&mut file).await?;
            Ok::<u64, std::io::Error>(n)
        }
        .await;
        let result = match downloaded {
            Err(e) if e.to_string().contains("digest") => Err(WireError::bad_request(format!(
                "the paused state {key} in the object store is corrupt: {e}"
            ))),
            Err(e) => Err(WireError::internal(format!("downloading {key}: {e}"))),
            Ok(bytes) => {
                metrics::counter!(m::SNAPSHOT_FETCH_BYTES_TOTAL).increment(bytes);
                match tokio::fs::File::open(&path).await {
                    Ok(mut file) => provider
                        .import_paused(vm_id, &mut file)
                        .await
                        .map_err(|e| wire_error(&e)),
                    Err(e) => Err(WireError::internal(format!("reading {key}: {e}"))),
                }
            }
        };
        let _ = tokio::fs::remove_file(&path).await;
        result
    }

    /// Removes the object `key` (missing is success).
    async fn delete_object(&self, key: &str) -> Result<(), WireError> {
        match self.store.delete(key).await {
            Ok(()) => Ok(()),
            Err(err) if err.kind() == jetstream::object_store::DeleteErrorKind::NotFound => Ok(()),
            Err(err) => Err(WireError::internal(format!(
                "removing {key} from the object store: {err}"
            ))),
        }
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
        self.delete_object(snapshot_id.as_str()).await?;
        info!(%snapshot_id, "snapshot removed from the object store");
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
