//! `pause_upload` over a real nats-server and its JetStream object store, with real workers (the
//! worker library, fake provider): two paused sessions uploaded; their worker goes silent; a
//! files request to one — sent to the session's data plane as any client does, now served by the
//! scheduler — moves it to the other worker and is answered from there with its file; the other
//! session's object had a byte flipped in the store, so its exec gets 409 and it is `lost`, with
//! no VM left on the new worker and no object left in the store.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use hearth_messages::{
    Bucket, CreateSessionRequest, ErrorCode, ExecRequest, HearthClient, SessionId, SessionState,
    TemplateName, VmId, WorkerId, paused_object_key,
};
use hearth_scheduler::{SchedulerConfig, TemplateConfig};
use hearth_testkit::NatsServer;
use hearth_worker::provider::{FakeProvider, VmQuery, VmState};
use hearth_worker::{ProviderKind, Worker, WorkerConfig};
use tokio::io::AsyncReadExt;

async fn start_worker(
    server: &NatsServer,
    id: &str,
    dir: &std::path::Path,
) -> (Worker, Arc<FakeProvider>) {
    let mut wc = WorkerConfig::new(WorkerId::new(id).unwrap(), dir.join(id));
    wc.nats_url = server.url().to_owned();
    wc.provider = ProviderKind::Fake;
    wc.heartbeat_interval = Duration::from_millis(200);
    wc.max_vms = 8;
    wc.drain_grace = Duration::from_millis(200);
    let provider = Arc::new(FakeProvider::new());
    let worker = Worker::start(wc, server.connect().await.unwrap(), provider.clone())
        .await
        .unwrap();
    (worker, provider)
}

async fn wait_until<F, Fut>(what: &str, limit: Duration, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    while !f().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Whether the store holds no (undeleted) object `key`.
async fn gone(store: &async_nats::jetstream::object_store::ObjectStore, key: &str) -> bool {
    store.info(key).await.map_or(true, |info| info.deleted)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unplaced_sessions_move_on_a_data_plane_request_and_a_flipped_byte_loses_one() {
    let server = NatsServer::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (w1, _p1) = start_worker(&server, "w1", dir.path()).await;
    let mut template = TemplateConfig::new(TemplateName::new("default").unwrap(), 1);
    template.pause_upload = true;
    let cfg = SchedulerConfig {
        nats_url: server.url().to_owned(),
        heartbeat_timeout: Duration::from_millis(1000),
        worker_lost_grace: Duration::from_millis(2500),
        reconcile_interval: Duration::from_millis(300),
        claim_wait: Duration::from_secs(5),
        templates: vec![template],
        ..SchedulerConfig::default()
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let scheduler = tokio::spawn(hearth_scheduler::run(
        cfg,
        server.connect().await.unwrap(),
        async move {
            let _ = stopped.await;
        },
    ));
    let client = HearthClient::new(server.connect().await.unwrap());
    wait_until("a warm pool", Duration::from_secs(20), || async {
        client
            .pool_status()
            .await
            .is_ok_and(|s| s.pools.iter().any(|p| p.ready >= 1))
    })
    .await;

    let (good, bad) = (
        SessionId::new("good").unwrap(),
        SessionId::new("bad").unwrap(),
    );
    for sid in [&good, &bad] {
        let s = client
            .create_session(&CreateSessionRequest {
                session_id: Some(sid.clone()),
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(s.worker_id.as_str(), "w1");
        client
            .put_file(sid, "notes.txt", format!("file of {sid}"), None)
            .await
            .unwrap();
        let paused = client.pause(sid).await.unwrap();
        assert!(paused.pause_uploaded, "{paused:?}");
    }
    let (_w2, p2) = start_worker(&server, "w2", dir.path()).await;

    // Flip one byte of `bad`'s object in the store: its chunk is replaced, its metadata (size,
    // SHA-256) kept.
    let js = async_nats::jetstream::new(client.nats().clone());
    let bucket = client.subjects().bucket(Bucket::Snapshots);
    let store = js.get_object_store(&bucket).await.unwrap();
    let bad_key = paused_object_key(None, &VmId::from(bad.clone()));
    let info = store.info(&bad_key).await.unwrap();
    assert_eq!(info.chunks, 1, "a small fake vm is one chunk");
    let mut bytes = Vec::new();
    store
        .get(&bad_key)
        .await
        .unwrap()
        .read_to_end(&mut bytes)
        .await
        .unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 0x20;
    let chunk_subject = format!("$O.{bucket}.C.{}", info.nuid);
    let stream = js.get_stream(format!("OBJ_{bucket}")).await.unwrap();
    stream.purge().filter(&chunk_subject).await.unwrap();
    js.publish(chunk_subject, bytes.into())
        .await
        .unwrap()
        .await
        .unwrap();

    // w1 goes silent for good (its data plane with it).
    w1.drain().await;
    for sid in [&good, &bad] {
        wait_until("unplaced", Duration::from_secs(15), || async {
            client.get_session(sid).await.unwrap().unplaced
        })
        .await;
    }

    // A files request is the touch: answered by w2, with the file.
    let file = client.get_file(&good, "notes.txt").await.unwrap();
    assert_eq!(file, b"file of good");
    let s = client.get_session(&good).await.unwrap();
    assert_eq!(s.state, SessionState::Running);
    assert_eq!(s.worker_id.as_str(), "w2");
    assert!(
        gone(&store, &paused_object_key(None, &VmId::from(good.clone()))).await,
        "the moved session's object is deleted"
    );

    // The damaged one: 409, lost with the reason, nothing half-restored, no object left.
    let err = client
        .exec(&bad, &ExecRequest::cmd("true"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::Conflict), "{err}");
    let s = client.get_session(&bad).await.unwrap();
    assert_eq!(s.state, SessionState::Lost);
    let detail = s.detail.unwrap();
    assert!(detail.contains("corrupt"), "{detail}");
    let on_w2 = p2.get_vm(&VmId::from(bad.clone())).await.unwrap();
    assert!(
        on_w2.as_ref().is_none_or(|v| v.state == VmState::Destroyed),
        "a vm left behind: {on_w2:?}"
    );
    assert!(gone(&store, &bad_key).await, "object left behind");
    let mut left = store.list().await.unwrap();
    while let Some(Ok(object)) = left.next().await {
        assert!(
            object.deleted || !object.name.starts_with("paused/"),
            "object {} left behind",
            object.name
        );
    }

    let _ = stop.send(());
    let _ = tokio::time::timeout(Duration::from_secs(10), scheduler).await;
}
