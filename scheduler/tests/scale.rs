//! Heartbeats that scale, over a real `nats-server`: a worker holding 20,000 (fake) VMs sends
//! heartbeats of a few hundred bytes, the scheduler pages its inventory in under `max_payload`,
//! keeps it current from the heartbeats' changes (paging the changes when a heartbeat cannot
//! carry them), and converges again after a restart.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures::StreamExt;
use hearth_messages::{
    Encoding, HearthClient, JobOp, JobRequest, Subjects, TemplateName, VmId, WorkerId, WorkerStatus,
};
use hearth_scheduler::{RunError, SchedulerConfig, TemplateConfig};
use hearth_testkit::NatsServer;
use hearth_worker::provider::{FakeProvider, VmProvider, VmSpec};
use hearth_worker::{ProviderKind, Worker, WorkerConfig};

const VMS: usize = 20_000;

fn config(server: &NatsServer, id: &str) -> SchedulerConfig {
    SchedulerConfig {
        nats_url: server.url().to_owned(),
        scheduler_id: id.to_owned(),
        heartbeat_timeout: Duration::from_millis(1500),
        lease_ttl: Duration::from_millis(1500),
        drain_grace: Duration::from_secs(2),
        // The 20,000 VMs belong to nobody: reconcile must not destroy them during the test.
        leak_grace: Duration::from_secs(3600),
        templates: vec![TemplateConfig::new(
            TemplateName::new("default").unwrap(),
            0,
        )],
        ..SchedulerConfig::default()
    }
}

async fn scheduler(
    server: &NatsServer,
    id: &str,
) -> (
    tokio::task::JoinHandle<Result<(), RunError>>,
    tokio::sync::oneshot::Sender<()>,
) {
    let client = server.connect().await.unwrap();
    let (stop, rx) = tokio::sync::oneshot::channel::<()>();
    let handle = tokio::spawn(hearth_scheduler::run(
        config(server, id),
        client,
        async move {
            let _ = rx.await;
        },
    ));
    (handle, stop)
}

/// Waits until the scheduler's view of `w1` is synced with `vms` VMs; its generation.
async fn converged(client: &HearthClient, vms: u32, limit: Duration) -> u64 {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if let Ok(status) = client.workers_status().await
            && let Some(w) = status.workers.iter().find(|w| w.worker_id.as_str() == "w1")
            && w.inventory.synced
            && w.inventory.vms == vms
        {
            return w.inventory.generation;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the scheduler's view did not converge on {vms} vms: {:?}",
            client.workers_status().await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_with_20000_vms_heartbeats_small_and_is_paged_in_after_a_restart() {
    let server = NatsServer::start().unwrap();
    let nats = server.connect().await.unwrap();
    let max_payload = nats.server_info().max_payload;
    let dir = tempfile::tempdir().unwrap();

    // Every message on the bus, measured: none may exceed max_payload; heartbeats stay small.
    let largest = Arc::new(AtomicUsize::new(0));
    let largest_heartbeat = Arc::new(AtomicUsize::new(0));
    let pages = Arc::new(AtomicUsize::new(0));
    let change_pages = Arc::new(AtomicUsize::new(0));
    let mut all = nats.subscribe(">").await.unwrap();
    let subjects = Subjects::default();
    let w1 = WorkerId::new("w1").unwrap();
    let (status_subject, jobs_subject) = (subjects.worker_status(&w1), subjects.worker_jobs(&w1));
    let watcher = {
        let (largest, largest_heartbeat, pages, change_pages) = (
            largest.clone(),
            largest_heartbeat.clone(),
            pages.clone(),
            change_pages.clone(),
        );
        tokio::spawn(async move {
            while let Some(msg) = all.next().await {
                largest.fetch_max(msg.payload.len(), Ordering::Relaxed);
                if msg.subject.as_str() == status_subject {
                    let s: WorkerStatus = Encoding::MsgPack.decode(&msg.payload).unwrap();
                    // A heartbeat carrying the inventory counts as too large.
                    let size = if s.vms.is_empty() {
                        msg.payload.len()
                    } else {
                        usize::MAX
                    };
                    largest_heartbeat.fetch_max(size, Ordering::Relaxed);
                } else if msg.subject.as_str() == jobs_subject
                    && let Ok(job) = Encoding::MsgPack.decode::<JobRequest>(&msg.payload)
                {
                    match job.op {
                        JobOp::ListVmsPage { .. } => pages.fetch_add(1, Ordering::Relaxed),
                        JobOp::ListVmChanges { .. } => change_pages.fetch_add(1, Ordering::Relaxed),
                        _ => 0,
                    };
                }
            }
        })
    };

    let provider = Arc::new(FakeProvider::new());
    for i in 0..VMS {
        let id = VmId::new(format!("vm-{i:05}")).unwrap();
        provider
            .create_vm_with_spec(&id, &VmSpec::default())
            .await
            .unwrap();
    }
    let mut wc = WorkerConfig::new(w1.clone(), dir.path().join("w1"));
    wc.nats_url = server.url().to_owned();
    wc.provider = ProviderKind::Fake;
    wc.heartbeat_interval = Duration::from_millis(250);
    wc.max_vms = (VMS + 100) as u32;
    let worker_nats = server.connect().await.unwrap();
    let _worker = Worker::start(wc, worker_nats, provider.clone())
        .await
        .unwrap();

    let client = HearthClient::new(nats.clone()).with_timeout(Duration::from_secs(5));
    let (first, stop_first) = scheduler(&server, "one").await;
    let generation = converged(&client, VMS as u32, Duration::from_secs(60)).await;
    let paged = pages.load(Ordering::Relaxed);
    assert!(
        paged >= VMS / hearth_messages::MAX_INVENTORY_PAGE as usize,
        "{paged} pages for {VMS} vms"
    );

    // Changes travel in heartbeats: the view follows without paging again.
    for i in 0..10 {
        let id = VmId::new(format!("vm-{i:05}")).unwrap();
        provider.destroy_vm(&id).await.unwrap();
    }
    let after = converged(&client, (VMS - 10) as u32, Duration::from_secs(10)).await;
    assert!(after > generation);
    assert_eq!(
        pages.load(Ordering::Relaxed),
        paged,
        "paged again for 10 changes"
    );

    // More changes than a heartbeat carries (700 gone, 800 new): the scheduler pages the
    // changes, not the 20,000-VM inventory, and the view follows.
    for i in 10..710 {
        let id = VmId::new(format!("vm-{i:05}")).unwrap();
        provider.destroy_vm(&id).await.unwrap();
    }
    for i in 0..800 {
        let id = VmId::new(format!("new-{i:05}")).unwrap();
        provider
            .create_vm_with_spec(&id, &VmSpec::default())
            .await
            .unwrap();
    }
    let after = converged(&client, (VMS - 10 + 100) as u32, Duration::from_secs(10)).await;
    assert!(change_pages.load(Ordering::Relaxed) >= 1, "no change pages");
    assert_eq!(
        pages.load(Ordering::Relaxed),
        paged,
        "paged the whole inventory again for 1,500 changes"
    );

    // A restarted scheduler pages the inventory in again and converges on the same view.
    let _ = stop_first.send(());
    tokio::time::timeout(Duration::from_secs(10), first)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let (second, stop_second) = scheduler(&server, "two").await;
    let again = converged(&client, (VMS - 10 + 100) as u32, Duration::from_secs(60)).await;
    assert!(again >= after);
    assert!(pages.load(Ordering::Relaxed) >= paged * 2 - 1);

    let heartbeat = largest_heartbeat.load(Ordering::Relaxed);
    assert!(
        heartbeat > 0 && heartbeat < 64 * 1024,
        "heartbeat of {heartbeat} bytes"
    );
    let biggest = largest.load(Ordering::Relaxed);
    assert!(
        biggest < max_payload,
        "a message of {biggest} bytes (max_payload {max_payload})"
    );
    let _ = stop_second.send(());
    let _ = tokio::time::timeout(Duration::from_secs(10), second).await;
    watcher.abort();
}
