//! `hearth bench scale`: one scheduler (its own process) over many workers, simulated in this
//! process as in production — each worker its own NATS connection, subjects and job runner, with
//! the fake provider — and one nats-server (or, with `--cluster`, a 3-node NATS cluster with the
//! KV buckets replicated 3 times and the workers spread over the nodes). It measures what grows
//! with the fleet: claim latency with every VM pooled, the scheduler's CPU and the bus bytes that
//! heartbeats cost, the reconcile pass, the scheduler's RSS, and leader failover: a standby
//! scheduler, the leader SIGKILLed, the time until a claim succeeds again.

use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow};
use futures::StreamExt;
use hearth_messages::{Subjects, TemplateName, WorkerId};
use hearth_natsd::{ChildProcess, NatsServer};
use hearth_worker::provider::FakeProvider;
use hearth_worker::{ProviderKind, Worker, WorkerConfig};
use serde_json::json;

use super::{
    BenchArgs, Report, baseline, concurrent_claims, connect, round3, rss_bytes, sequential_claims,
    sibling_bin, template_toml, wait_ready,
};

/// Seconds of CPU (user + system) process `pid` has used.
fn cpu_seconds(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .ok_or_else(|| anyhow!("bad /proc/{pid}/stat"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields[11].parse::<f64>()? + fields[12].parse::<f64>()?;
    Ok(ticks / 100.0)
}

/// `name` summed and counted from a Prometheus text page.
fn histogram_sum_count(page: &str, name: &str) -> (f64, f64) {
    let value = |suffix: &str| {
        page.lines()
            .find(|l| l.starts_with(&format!("{name}{suffix} ")))
            .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
            .unwrap_or(0.0)
    };
    (value("_sum"), value("_count"))
}

async fn scrape(addr: &str) -> Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(format!("GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await?;
    let mut body = String::new();
    s.read_to_string(&mut body).await?;
    Ok(body)
}

pub(super) async fn run(args: &BenchArgs, url: Option<&str>) -> Result<Report> {
    if url.is_some() {
        anyhow::bail!("the scale scenario starts its own stack (it simulates the workers)");
    }
    let (workers, per) = if args.quick {
        (args.workers.min(10), args.vms_per_worker.min(20))
    } else {
        (args.workers, args.vms_per_worker)
    };
    let pooled = workers * per;
    let dir = tempfile::Builder::new()
        .prefix("hearth-bench-scale-")
        .tempdir()?;
    let nodes = if args.cluster { 3 } else { 1 };
    let servers = tokio::task::spawn_blocking(move || match nodes {
        1 => NatsServer::builder().start().map(|s| vec![s]),
        n => hearth_natsd::start_cluster(n),
    })
    .await??;
    let urls: Vec<String> = servers.iter().map(|s| s.url().to_owned()).collect();
    if args.cluster {
        wait_for_jetstream(&urls[0]).await?;
    }
    let nats_url = urls.join(",");
    let replicas = nodes.to_string();

    // The fleet: every worker its own connection and subjects, the fake provider.
    let mut fleet = Vec::with_capacity(workers);
    for i in 0..workers {
        let id = WorkerId::new(format!("sim-{i:04}"))?;
        let mut wc = WorkerConfig::new(id.clone(), dir.path().join(id.as_str()));
        // Spread over the nodes, as workers on many hosts would be.
        let node_url = &urls[i % urls.len()];
        wc.nats_url = node_url.clone();
        wc.provider = ProviderKind::Fake;
        wc.max_vms = (per + per / 4 + 2) as u32;
        let client = async_nats::ConnectOptions::new()
            .name(format!("hearth-worker {id}"))
            .connect(node_url.as_str())
            .await?;
        fleet.push(Worker::start(wc, client, Arc::new(FakeProvider::new())).await?);
    }

    let metrics_port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0")?;
        l.local_addr()?.port()
    };
    let metrics_addr = format!("127.0.0.1:{metrics_port}");
    let config = dir.path().join("scheduler.toml");
    std::fs::write(
        &config,
        format!(
            "claim_wait_ms = 30000\nrefill_parallelism = 64\nleak_grace_ms = 3600000\n\n[sessions]\ndefault_idle_timeout_s = 0\n\n{}",
            template_toml("default", pooled)
        ),
    )?;
    let scheduler = |id: &str, metrics: &str| -> Result<ChildProcess> {
        let mut cmd = Command::new(sibling_bin("hearth-scheduler")?);
        cmd.args(["--nats-url", &nats_url, "--metrics-listen", metrics])
            .args(["--scheduler-id", id, "--kv-replicas", &replicas])
            .arg("--config")
            .arg(&config)
            .env("RUST_LOG", "warn");
        ChildProcess::spawn(id, cmd, dir.path())
    };
    let mut leader = scheduler("s1", &metrics_addr)?;
    let pid = leader
        .pid()
        .ok_or_else(|| anyhow!("scheduler not running"))?;

    let client = connect(&nats_url, &Subjects::default()).await?;
    let fill = wait_ready(&client, "default", pooled).await?;

    // Quiet: heartbeats only. CPU of the scheduler, bytes of heartbeats on the bus.
    let bytes = Arc::new(AtomicU64::new(0));
    let beats = Arc::new(AtomicU64::new(0));
    let mut sub = client
        .nats()
        .subscribe(Subjects::default().worker_status_all())
        .await?;
    let counter = {
        let (bytes, beats) = (bytes.clone(), beats.clone());
        tokio::spawn(async move {
            while let Some(msg) = sub.next().await {
                bytes.fetch_add(msg.payload.len() as u64, Ordering::Relaxed);
                beats.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    let window = Duration::from_secs(if args.quick { 3 } else { 10 });
    let (b0, n0) = (bytes.load(Ordering::Relaxed), beats.load(Ordering::Relaxed));
    let cpu0 = cpu_seconds(pid)?;
    let t0 = Instant::now();
    tokio::time::sleep(window).await;
    let secs = t0.elapsed().as_secs_f64();
    let idle_cpu = (cpu_seconds(pid)? - cpu0) / secs;
    let hb_bytes = (bytes.load(Ordering::Relaxed) - b0) as f64 / secs;
    let hb_rate = (beats.load(Ordering::Relaxed) - n0) as f64 / secs;
    counter.abort();
    let page = scrape(&metrics_addr)
        .await
        .context("scraping the scheduler")?;
    let (pass_sum, pass_count) = histogram_sum_count(&page, "hearth_reconcile_pass_seconds");
    let (fetch_sum, fetch_count) = histogram_sum_count(&page, "hearth_inventory_fetch_seconds");
    let rss = rss_bytes(pid)?;

    // Claims with every VM pooled.
    let base = baseline(&nats_url, args.samples.unwrap_or(500)).await?;
    let template = TemplateName::default_template();
    let samples = (pooled / 4).min(args.samples.unwrap_or(1000)).max(10);
    let (seq, _, _) = sequential_claims(&client, &template, 10, samples, false).await?;
    let conc_n = (pooled - samples - 10).min(args.claims.unwrap_or(pooled / 2));
    let (conc, elapsed, _) =
        concurrent_claims(&client, &template, conc_n, args.concurrency).await?;

    let mut r = Report::new(if args.cluster {
        "scale_cluster"
    } else {
        "scale"
    });
    r.field("workers", json!(workers), Some(workers.to_string()));
    r.field("pooled_vms", json!(pooled), Some(pooled.to_string()));
    r.field(
        "pool_fill_s",
        json!(round3(fill.as_secs_f64())),
        Some(format!("{:.1} s to pool {pooled} VMs", fill.as_secs_f64())),
    );
    r.baseline(&base);
    r.latency("claim", &seq);
    r.ratio(
        "claim_p50_to_baseline",
        seq.value_at_quantile(0.5) as f64,
        base.value_at_quantile(0.5) as f64,
    );
    r.latency("throughput_claim", &conc);
    let rate = conc_n as f64 / elapsed.as_secs_f64();
    r.field(
        "throughput_claims_per_s",
        json!(rate.round()),
        Some(format!("{rate:.0}/s with {} executors", args.concurrency)),
    );
    r.field(
        "scheduler_idle_cpu_pct",
        json!(round3(idle_cpu * 100.0)),
        Some(format!(
            "{:.2} % of a core (heartbeats only)",
            idle_cpu * 100.0
        )),
    );
    r.field(
        "heartbeats_per_s",
        json!(round3(hb_rate)),
        Some(format!("{hb_rate:.0}/s")),
    );
    r.field(
        "heartbeat_bytes_per_s",
        json!(hb_bytes.round()),
        Some(format!(
            "{:.1} KB/s ({:.0} B a heartbeat)",
            hb_bytes / 1000.0,
            hb_bytes / hb_rate.max(1.0)
        )),
    );
    let pass_ms = if pass_count > 0.0 {
        pass_sum / pass_count * 1000.0
    } else {
        0.0
    };
    r.field(
        "reconcile_pass_mean_ms",
        json!(round3(pass_ms)),
        Some(format!("{pass_ms:.2} ms over {pass_count} passes")),
    );
    let fetch_ms = if fetch_count > 0.0 {
        fetch_sum / fetch_count * 1000.0
    } else {
        0.0
    };
    r.field(
        "inventory_fetch_mean_ms",
        json!(round3(fetch_ms)),
        Some(format!("{fetch_ms:.2} ms over {fetch_count} paged fetches")),
    );
    r.field(
        "scheduler_rss_mib",
        json!(round3(rss as f64 / 1048576.0)),
        Some(format!("{:.1} MiB", rss as f64 / 1048576.0)),
    );

    // Failover: a standby scheduler, then the leader SIGKILLed; the time until a claim succeeds
    // (the standby waits out the lease, takes it, loads the state from KV and serves).
    let standby = scheduler("s2", "off")?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    leader.kill();
    let killed = Instant::now();
    let request = hearth_messages::CreateSessionRequest {
        template: Some(template.clone()),
        wait_ms: Some(1_000),
        ..Default::default()
    };
    let failover = loop {
        if client.create_session(&request).await.is_ok() {
            break killed.elapsed();
        }
        if killed.elapsed() > Duration::from_secs(120) {
            anyhow::bail!("no claim succeeded within 120 s of killing the leader");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    r.field(
        "failover_s",
        json!(round3(failover.as_secs_f64())),
        Some(format!(
            "{:.2} s from SIGKILL of the leader to the next claim (lease_ttl 10 s)",
            failover.as_secs_f64()
        )),
    );
    r.field("nats_nodes", json!(nodes), Some(nodes.to_string()));
    drop(standby);
    for w in fleet {
        w.drain().await;
    }
    Ok(r)
}

/// Waits until the cluster's JetStream has a meta leader (an R3 bucket can be created).
async fn wait_for_jetstream(url: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let client = loop {
        match async_nats::connect(url).await {
            Ok(c) => break c,
            Err(e) if Instant::now() > deadline => return Err(e.into()),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    };
    let mut js = async_nats::jetstream::new(client);
    js.set_timeout(Duration::from_secs(2));
    loop {
        let created = js
            .create_key_value(async_nats::jetstream::kv::Config {
                bucket: "hearth_probe".into(),
                num_replicas: 3,
                ..Default::default()
            })
            .await;
        match created {
            Ok(_) => {
                let _ = js.delete_key_value("hearth_probe").await;
                return Ok(());
            }
            Err(e) if Instant::now() > deadline => {
                anyhow::bail!("the NATS cluster elected no JetStream leader in 60 s: {e}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}
