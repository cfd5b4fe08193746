//! `hearth bench`: the numbers Hearth exists for, measured side by side with a bare NATS
//! request/reply round trip taken in the same run (these machines are shared and noisy, so only
//! same-run ratios are comparable).
//!
//! By default every scenario starts its own stack as separate processes, the way production runs:
//! a nats-server, the `hearth-scheduler` and `hearth-worker` binaries found next to this one. With
//! `--nats-url` it drives a running stack instead (its `default` template must be large enough).
//! Percentiles come from an HDR histogram of microsecond samples; warm-up samples are dropped.

use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use futures::StreamExt;
use hdrhistogram::Histogram;
use hearth_messages::{
    CreateSessionRequest, ExecRequest, HearthClient, SessionId, Subjects, TemplateName,
};
use hearth_natsd::{ChildProcess, NatsServer};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;

/// Which measurement.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Scenario {
    /// Warm claim latency (sequential) and throughput (concurrent executors).
    Claims,
    /// Exec of `true`: latency on one session, throughput across many.
    Exec,
    /// Cold claims (empty pool) beside warm ones.
    Cold,
    /// Pool refill rate: restores per second per worker.
    Refill,
    /// Scheduler memory per live session.
    Memory,
    /// Real microVMs (qemu provider): cold boot, snapshot, restore, warm claim, exec, RSS. Needs a
    /// guest image (`scripts/setup-qemu.sh`); not part of `all`.
    Microvm,
    /// Pause to disk and fork on real microVMs (qemu provider): pause and resume p50, host RAM of
    /// a paused vs a stopped session, fork of 1/4/16 until every copy is ready, `pause_upload`'s
    /// upload and resume-elsewhere p50. Needs a guest image; not part of `all`.
    Pause,
    /// Tenants: claim latency as a tenant through the account imports vs as the operator, and a
    /// tenant's p99 while another floods creates (429s).
    Tenants,
    /// Background processes: start → first output byte, and reattach (follow from an offset →
    /// first byte), beside `exec echo` on the same session. `--provider qemu` runs it on a real
    /// guest (needs a guest image).
    Processes,
    /// OCI containers (the `oci` provider, crun) beside the process provider in the same run:
    /// cold create, restore, warm claim, exec, stop and start (on oci: freeze and thaw). Needs
    /// crun and tini; not part of `all`.
    Oci,
    /// Many workers (simulated in this process, each its own NATS connection, fake provider)
    /// under one scheduler process: claim latency with every VM pooled, scheduler CPU and bus
    /// bytes of heartbeats, reconcile pass, RSS, leader failover (a standby, the leader
    /// SIGKILLed). `--workers`, `--vms-per-worker`; `--cluster` for a 3-node NATS cluster.
    Scale,
    /// Every scenario, one after the other.
    All,
}

/// `hearth bench` flags.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// The scenario.
    #[arg(value_enum)]
    pub scenario: Scenario,
    /// Print one JSON object per scenario instead of tables.
    #[arg(long)]
    pub json: bool,
    /// Small sample counts: a smoke run (CI), not a measurement.
    #[arg(long)]
    pub quick: bool,
    /// Measured samples for the latency parts (after warm-up).
    #[arg(long)]
    pub samples: Option<usize>,
    /// Concurrent executors for the throughput parts.
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// Claims in the throughput part of `claims`.
    #[arg(long)]
    pub claims: Option<usize>,
    /// Execs in the throughput part of `exec`.
    #[arg(long)]
    pub execs: Option<usize>,
    /// Live sessions for `memory`.
    #[arg(long)]
    pub sessions: Option<usize>,
    /// Provider of the worker this bench starts (`memory` always uses `fake`: it measures the
    /// scheduler, and 10,000 process VMs would measure the disk; `microvm` always uses `qemu`).
    #[arg(long, value_enum, default_value = "process")]
    pub provider: hearth_worker::ProviderKind,
    /// Simulated workers for `scale`.
    #[arg(long, default_value_t = 200)]
    pub workers: usize,
    /// Pooled VMs per worker for `scale`.
    #[arg(long, default_value_t = 100)]
    pub vms_per_worker: usize,
    /// `scale` on a 3-node NATS cluster (KV replicated 3 times) instead of one server.
    #[arg(long)]
    pub cluster: bool,
    /// Guest image for `microvm` (default: $HEARTH_QEMU_IMAGE, else .tools/images/current).
    #[arg(long)]
    pub qemu_image: Option<PathBuf>,
}

struct Sizes {
    warmup: usize,
    samples: usize,
    claims: usize,
    execs: usize,
    cold: usize,
    refill: usize,
    sessions: usize,
}

impl Sizes {
    fn from(args: &BenchArgs) -> Self {
        let q = args.quick;
        Sizes {
            warmup: if q { 10 } else { 100 },
            samples: args.samples.unwrap_or(if q { 50 } else { 1000 }),
            claims: args.claims.unwrap_or(if q { 200 } else { 4000 }),
            execs: args.execs.unwrap_or(if q { 200 } else { 5000 }),
            cold: if q { 10 } else { 100 },
            refill: if q { 20 } else { 200 },
            sessions: args.sessions.unwrap_or(if q { 500 } else { 10_000 }),
        }
    }
}

/// Runs the chosen scenario(s).
pub async fn run(args: BenchArgs, nats_url: Option<String>, subjects: Subjects) -> Result<()> {
    let sizes = Sizes::from(&args);
    let scenarios = match args.scenario {
        Scenario::All => vec![
            Scenario::Claims,
            Scenario::Exec,
            Scenario::Cold,
            Scenario::Refill,
            Scenario::Memory,
            Scenario::Tenants,
            Scenario::Processes,
            Scenario::Scale,
        ],
        one => vec![one],
    };
    for scenario in scenarios {
        let report = match scenario {
            Scenario::Claims => claims(&args, &sizes, nats_url.as_deref(), &subjects).await?,
            Scenario::Exec => exec(&args, &sizes, nats_url.as_deref(), &subjects).await?,
            Scenario::Cold => cold(&args, &sizes, nats_url.as_deref(), &subjects).await?,
            Scenario::Refill => refill(&args, &sizes, nats_url.as_deref()).await?,
            Scenario::Memory => memory(&args, &sizes, nats_url.as_deref()).await?,
            Scenario::Microvm => microvm(&args, &sizes, nats_url.as_deref()).await?,
            Scenario::Pause => pause::run(&args, nats_url.as_deref()).await?,
            Scenario::Tenants => tenants::run(&sizes).await?,
            Scenario::Scale => scale::run(&args, nats_url.as_deref()).await?,
            Scenario::Processes => processes(&args, &sizes, nats_url.as_deref(), &subjects).await?,
            Scenario::Oci => oci(&args, &sizes, nats_url.as_deref()).await?,
            Scenario::All => continue,
        };
        report.print(args.json);
    }
    Ok(())
}

// ----- the stack the bench starts ----------------------------------------------------------

mod pause;
mod scale;
mod tenants;

struct OwnStack {
    _nats: NatsServer,
    _dir: tempfile::TempDir,
    scheduler: ChildProcess,
    _worker: ChildProcess,
    url: String,
}

fn sibling_bin(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let path = exe
        .parent()
        .map(|d| d.join(name))
        .ok_or_else(|| anyhow!("cannot locate {name}"))?;
    if !path.is_file() {
        bail!(
            "{} not found next to hearth: build all binaries (cargo build --release --bins)",
            path.display()
        );
    }
    Ok(path)
}

impl OwnStack {
    async fn start(
        provider: hearth_worker::ProviderKind,
        templates_toml: &str,
        max_vms: usize,
    ) -> Result<Self> {
        Self::start_with(provider, templates_toml, max_vms, None, None, false).await
    }

    /// A stack whose worker runs with `--isolation <isolation>` (process provider).
    async fn start_isolated(templates_toml: &str, isolation: &str) -> Result<Self> {
        let provider = hearth_worker::ProviderKind::Process;
        Self::start_with(provider, templates_toml, 16, None, Some(isolation), false).await
    }

    async fn start_with(
        provider: hearth_worker::ProviderKind,
        templates_toml: &str,
        max_vms: usize,
        qemu_image: Option<&std::path::Path>,
        isolation: Option<&str>,
        accounts: bool,
    ) -> Result<Self> {
        let dir = tempfile::Builder::new().prefix("hearth-bench-").tempdir()?;
        // With `accounts`, nats-server runs Hearth's accounts config (service account + tenants,
        // compiled into this binary) and the binaries log in with their roles.
        let accounts_conf = if accounts {
            Some(tenants::write_accounts_config(dir.path())?)
        } else {
            None
        };
        let nats = tokio::task::spawn_blocking(move || match accounts_conf {
            Some(conf) => NatsServer::builder()
                .arg("-c")
                .arg(conf.display().to_string())
                .arg("-m")
                .arg("-1")
                .start(),
            None => NatsServer::builder().config("max_payload: 8MB\n").start(),
        })
        .await??;
        let worker_id = if accounts { "worker-1" } else { "bench-w1" };
        let config = dir.path().join("scheduler.toml");
        std::fs::write(
            &config,
            format!(
                "claim_wait_ms = 30000\nrefill_parallelism = 8\n\n[sessions]\ndefault_idle_timeout_s = 0\n\n{templates_toml}"
            ),
        )?;
        let url = nats.url().to_owned();
        let mut worker = Command::new(sibling_bin("hearth-worker")?);
        worker
            .args(["--nats-url", &url, "--worker-id", worker_id])
            .args(["--metrics-listen", "off"])
            .args(["--max-vms", &max_vms.to_string()])
            .args(["--job-concurrency", "32"])
            .arg("--provider")
            .arg(provider.as_str())
            .arg("--data-dir")
            .arg(dir.path().join("worker"))
            .env("RUST_LOG", "warn");
        if let Some(image) = qemu_image {
            worker.arg("--qemu-image").arg(image);
        }
        if let Some(isolation) = isolation {
            worker.args(["--isolation", isolation]);
        }
        if accounts {
            tenants::login(&mut worker, worker_id);
        }
        let worker = ChildProcess::spawn("worker", worker, dir.path())?;
        let mut scheduler = Command::new(sibling_bin("hearth-scheduler")?);
        scheduler
            .args(["--nats-url", &url, "--metrics-listen", "off"])
            .arg("--config")
            .arg(&config)
            .env("RUST_LOG", "warn");
        if accounts {
            tenants::login(&mut scheduler, "scheduler");
        }
        let scheduler = ChildProcess::spawn("scheduler", scheduler, dir.path())?;
        Ok(Self {
            _nats: nats,
            _dir: dir,
            scheduler,
            _worker: worker,
            url,
        })
    }
}

impl OwnStack {
    /// The stack's data directory (`worker/` under it is the worker's).
    fn dir(&self) -> &std::path::Path {
        self._dir.path()
    }
}

async fn connect(url: &str, subjects: &Subjects) -> Result<HearthClient> {
    let auth = hearth_messages::transport::NatsAuth::from_env();
    let nats = hearth_messages::transport::connect(url, "hearth bench", &auth, false).await?;
    Ok(HearthClient::new(nats)
        .with_subjects(subjects.clone())
        .with_timeout(Duration::from_secs(30)))
}

fn template_toml(name: &str, min_ready: usize) -> String {
    format!(
        "[[templates]]\nname = \"{name}\"\nmin_ready = {min_ready}\nmax_ready = {min_ready}\n\
         bootstrap = [\"sh\", \"-c\", \"mkdir -p work && echo ready > .bench-template\"]\n\n"
    )
}

/// Waits until `template` has `ready` VMs, with a progress bar.
async fn wait_ready(client: &HearthClient, template: &str, ready: usize) -> Result<Duration> {
    let bar = progress(ready as u64, &format!("filling pool {template}"));
    let started = Instant::now();
    let deadline = started + Duration::from_secs(600);
    loop {
        if let Ok(status) = client.pool_status().await
            && let Some(p) = status
                .pools
                .iter()
                .find(|p| p.template.as_str() == template)
        {
            bar.set_position(p.ready as u64);
            if p.ready as usize >= ready {
                bar.finish_and_clear();
                return Ok(started.elapsed());
            }
        }
        if Instant::now() > deadline {
            bail!("pool {template} did not reach {ready} ready VMs in 10 minutes");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn progress(len: u64, message: &str) -> ProgressBar {
    let bar = ProgressBar::new(len);
    if let Ok(style) = ProgressStyle::with_template("{msg:>20} [{bar:40}] {pos}/{len} {per_sec}") {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message(message.to_owned());
    bar
}

// ----- measurements ------------------------------------------------------------------------

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid histogram bounds")
}

fn record(h: &mut Histogram<u64>, elapsed: Duration) {
    let _ = h.record((elapsed.as_micros() as u64).max(1));
}

fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

/// The floor: a bare request/reply through the same nats-server to a responder on its own
/// connection, sequential, same payload size as a claim.
async fn baseline(url: &str, samples: usize) -> Result<Histogram<u64>> {
    let auth = hearth_messages::transport::NatsAuth::from_env();
    let responder = hearth_messages::transport::connect(url, "bench echo", &auth, false).await?;
    let requester =
        hearth_messages::transport::connect(url, "bench requester", &auth, false).await?;
    let subject = format!("hearth-bench.echo.{}", std::process::id());
    let mut sub = responder.subscribe(subject.clone()).await?;
    responder.flush().await?;
    let echo = tokio::spawn(async move {
        while let Some(msg) = sub.next().await {
            if let Some(reply) = msg.reply {
                let _ = responder.publish(reply, msg.payload).await;
            }
        }
    });
    let payload = bytes_payload(200);
    // The responder's interest reaches the server asynchronously: wait until it answers.
    let ready_by = Instant::now() + Duration::from_secs(5);
    while requester
        .request(subject.clone(), payload.clone())
        .await
        .is_err()
    {
        if Instant::now() > ready_by {
            bail!("the baseline echo responder never answered");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut h = histogram();
    for i in 0..samples + samples / 10 {
        let t = Instant::now();
        requester
            .request(subject.clone(), payload.clone())
            .await
            .context("baseline request")?;
        if i >= samples / 10 {
            record(&mut h, t.elapsed());
        }
    }
    echo.abort();
    Ok(h)
}

/// The durable write of a claim, alone: sequential KV creates on a scratch bucket.
async fn kv_floor(url: &str, samples: usize) -> Result<Histogram<u64>> {
    let auth = hearth_messages::transport::NatsAuth::from_env();
    let nats = hearth_messages::transport::connect(url, "bench kv", &auth, false).await?;
    let js = async_nats::jetstream::new(nats);
    let bucket = format!("hearth_bench_{}", std::process::id());
    let kv = js
        .create_key_value(async_nats::jetstream::kv::Config {
            bucket: bucket.clone(),
            history: 1,
            ..Default::default()
        })
        .await
        .context("creating the scratch KV bucket")?;
    let value = bytes_payload(300);
    let mut h = histogram();
    for i in 0..samples + samples / 10 {
        let t = Instant::now();
        kv.create(format!("k{i}"), value.clone())
            .await
            .context("kv create")?;
        if i >= samples / 10 {
            record(&mut h, t.elapsed());
        }
    }
    let _ = js.delete_key_value(&bucket).await;
    Ok(h)
}

/// The worker hop of a claim without its work: a job the worker answers at once (404 for a VM
/// that does not exist) — request decode, dispatch, per-VM lock, provider lookup, reply.
async fn worker_hop_floor(
    client: &HearthClient,
    worker: &str,
    samples: usize,
) -> Result<Histogram<u64>> {
    let subject = client
        .subjects()
        .worker_jobs(&hearth_messages::WorkerId::new(worker)?);
    let mut h = histogram();
    for i in 0..samples + samples / 10 {
        let request = hearth_messages::JobRequest {
            job_id: hearth_messages::JobId::new(format!("bench-probe-{i}"))?,
            op: hearth_messages::JobOp::StartVm {
                vm_id: hearth_messages::VmId::new("bench-probe-missing")?,
            },
            lease_revision: 0,
            tenant: None,
        };
        let t = Instant::now();
        let reply: Result<hearth_messages::JobReply, _> = client
            .request(subject.clone(), &request, Duration::from_secs(5))
            .await;
        if !matches!(&reply, Err(e) if e.code() == Some(hearth_messages::ErrorCode::NotFound)) {
            bail!("the worker probe expected a 404, got {reply:?}");
        }
        if i >= samples / 10 {
            record(&mut h, t.elapsed());
        }
    }
    Ok(h)
}

fn bytes_payload(n: usize) -> bytes::Bytes {
    bytes::Bytes::from(vec![b'x'; n])
}

/// One scenario's results.
struct Report {
    scenario: &'static str,
    fields: serde_json::Map<String, serde_json::Value>,
    rows: Vec<(String, String)>,
}

impl Report {
    fn new(scenario: &'static str) -> Self {
        let mut fields = serde_json::Map::new();
        fields.insert("scenario".into(), json!(scenario));
        Report {
            scenario,
            fields,
            rows: Vec::new(),
        }
    }

    fn field(&mut self, key: &str, value: serde_json::Value, row: Option<String>) {
        if let Some(row) = row {
            self.rows.push((key.to_owned(), row));
        }
        self.fields.insert(key.to_owned(), value);
    }

    fn latency(&mut self, prefix: &str, h: &Histogram<u64>) {
        for (name, q) in [("p50", 0.5), ("p99", 0.99), ("p999", 0.999)] {
            let v = ms(h.value_at_quantile(q));
            self.field(
                &format!("{prefix}_{name}_ms"),
                json!(round3(v)),
                Some(format!("{v:.3} ms")),
            );
        }
        let max = ms(h.max());
        self.field(
            &format!("{prefix}_max_ms"),
            json!(round3(max)),
            Some(format!("{max:.3} ms")),
        );
        self.field(
            &format!("{prefix}_samples"),
            json!(h.len()),
            Some(h.len().to_string()),
        );
    }

    fn baseline(&mut self, h: &Histogram<u64>) {
        let p50 = ms(h.value_at_quantile(0.5));
        let p99 = ms(h.value_at_quantile(0.99));
        self.field(
            "baseline_rtt_p50_ms",
            json!(round3(p50)),
            Some(format!("{p50:.3} ms (bare NATS request/reply, same run)")),
        );
        self.field(
            "baseline_rtt_p99_ms",
            json!(round3(p99)),
            Some(format!("{p99:.3} ms")),
        );
    }

    /// A duration in seconds, with what it measured.
    fn seconds(&mut self, key: &str, s: f64, what: &str) {
        self.field(key, json!(round3(s)), Some(format!("{s:.3} s ({what})")));
    }

    fn ratio(&mut self, key: &str, num: f64, den: f64) {
        let r = if den > 0.0 { num / den } else { f64::NAN };
        self.field(key, json!(round3(r)), Some(format!("{r:.2}×")));
    }

    fn print(&self, as_json: bool) {
        if as_json {
            println!("{}", serde_json::Value::Object(self.fields.clone()));
            return;
        }
        println!("== {}", self.scenario);
        let width = self.rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
        for (k, v) in &self.rows {
            println!("  {k:<width$}  {v}");
        }
        println!();
    }
}

fn round3(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

/// Sequential claims; returns the latency histogram (warm-up dropped) and how many were cold.
async fn sequential_claims(
    client: &HearthClient,
    template: &TemplateName,
    warmup: usize,
    samples: usize,
    release_after: bool,
) -> Result<(Histogram<u64>, usize, Vec<SessionId>)> {
    let mut h = histogram();
    let mut cold = 0;
    let mut held = Vec::new();
    let bar = progress((warmup + samples) as u64, "claims");
    for i in 0..warmup + samples {
        let request = CreateSessionRequest {
            template: Some(template.clone()),
            wait_ms: Some(30_000),
            ..Default::default()
        };
        let t = Instant::now();
        let session = client.create_session(&request).await?;
        let elapsed = t.elapsed();
        if i >= warmup {
            record(&mut h, elapsed);
            if !session.warm {
                cold += 1;
            }
        }
        if release_after {
            client.release(&session.session_id).await?;
        } else {
            held.push(session.session_id);
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    Ok((h, cold, held))
}

/// `total` claims by `concurrency` executors; histogram, elapsed, cold count.
async fn concurrent_claims(
    client: &HearthClient,
    template: &TemplateName,
    total: usize,
    concurrency: usize,
) -> Result<(Histogram<u64>, Duration, usize)> {
    let next = Arc::new(AtomicU64::new(0));
    let cold = Arc::new(AtomicU64::new(0));
    let bar = progress(total as u64, "concurrent claims");
    let started = Instant::now();
    let tasks: Vec<_> = (0..concurrency)
        .map(|_| {
            let (client, template, next, cold, bar) = (
                client.clone(),
                template.clone(),
                next.clone(),
                cold.clone(),
                bar.clone(),
            );
            tokio::spawn(async move {
                let mut h = histogram();
                while (next.fetch_add(1, Ordering::Relaxed) as usize) < total {
                    let request = CreateSessionRequest {
                        template: Some(template.clone()),
                        wait_ms: Some(30_000),
                        ..Default::default()
                    };
                    let t = Instant::now();
                    let s = client.create_session(&request).await?;
                    record(&mut h, t.elapsed());
                    if !s.warm {
                        cold.fetch_add(1, Ordering::Relaxed);
                    }
                    bar.inc(1);
                }
                Ok::<_, anyhow::Error>(h)
            })
        })
        .collect();
    let mut h = histogram();
    for t in tasks {
        h.add(t.await??)?;
    }
    let elapsed = started.elapsed();
    bar.finish_and_clear();
    Ok((h, elapsed, cold.load(Ordering::Relaxed) as usize))
}

async fn claims(
    args: &BenchArgs,
    sizes: &Sizes,
    url: Option<&str>,
    subjects: &Subjects,
) -> Result<Report> {
    let needed = sizes.warmup + sizes.samples + sizes.claims;
    let stack = match url {
        Some(_) => None,
        None => Some(
            OwnStack::start(
                args.provider,
                &template_toml("default", needed + 16),
                needed + 64,
            )
            .await?,
        ),
    };
    let url = url
        .or(stack.as_ref().map(|s| s.url.as_str()))
        .unwrap_or_default();
    let client = connect(url, subjects).await?;
    let template = TemplateName::default_template();
    if stack.is_some() {
        wait_ready(&client, "default", needed).await?;
    }
    let base = baseline(url, sizes.samples).await?;
    let kv = kv_floor(url, sizes.samples).await?;
    let hop = match &stack {
        Some(_) => Some(worker_hop_floor(&client, "bench-w1", sizes.samples).await?),
        None => None,
    };
    let (seq, seq_cold, _) =
        sequential_claims(&client, &template, sizes.warmup, sizes.samples, false).await?;
    let (conc, elapsed, conc_cold) =
        concurrent_claims(&client, &template, sizes.claims, args.concurrency).await?;
    let mut r = Report::new("claims");
    r.baseline(&base);
    r.latency("claim", &seq);
    r.ratio(
        "claim_p50_to_baseline",
        seq.value_at_quantile(0.5) as f64,
        base.value_at_quantile(0.5) as f64,
    );
    r.field(
        "cold_in_sequential",
        json!(seq_cold),
        Some(seq_cold.to_string()),
    );
    let kv_p50 = ms(kv.value_at_quantile(0.5));
    r.field(
        "kv_create_p50_ms",
        json!(round3(kv_p50)),
        Some(format!("{kv_p50:.3} ms (JetStream KV create, same run)")),
    );
    if let Some(hop) = &hop {
        let hop_p50 = ms(hop.value_at_quantile(0.5));
        r.field(
            "worker_hop_p50_ms",
            json!(round3(hop_p50)),
            Some(format!(
                "{hop_p50:.3} ms (a worker job answered at once, same run)"
            )),
        );
        // A warm claim is the client's request, one worker job and one KV create, in sequence.
        let floor = ms(base.value_at_quantile(0.5)) + hop_p50 + kv_p50;
        r.field(
            "floor_p50_ms",
            json!(round3(floor)),
            Some(format!("{floor:.3} ms (baseline + worker hop + KV create)")),
        );
        r.ratio("claim_p50_to_floor", ms(seq.value_at_quantile(0.5)), floor);
    }
    let rate = sizes.claims as f64 / elapsed.as_secs_f64();
    r.field(
        "throughput_claims_per_s",
        json!(rate.round()),
        Some(format!("{rate:.0}/s with {} executors", args.concurrency)),
    );
    r.field("concurrency", json!(args.concurrency), None);
    r.latency("throughput_claim", &conc);
    r.field(
        "cold_in_throughput",
        json!(conc_cold),
        Some(conc_cold.to_string()),
    );
    Ok(r)
}

async fn exec(
    args: &BenchArgs,
    sizes: &Sizes,
    url: Option<&str>,
    subjects: &Subjects,
) -> Result<Report> {
    const SESSIONS: usize = 32;
    let stack = match url {
        Some(_) => None,
        None => Some(
            OwnStack::start(args.provider, &template_toml("default", SESSIONS + 1), 128).await?,
        ),
    };
    let url = url
        .or(stack.as_ref().map(|s| s.url.as_str()))
        .unwrap_or_default();
    let client = connect(url, subjects).await?;
    if stack.is_some() {
        wait_ready(&client, "default", SESSIONS).await?;
    }
    let template = TemplateName::default_template();
    let (_, _, sessions) = sequential_claims(&client, &template, 0, SESSIONS, false).await?;
    let base = baseline(url, sizes.samples).await?;
    let request = ExecRequest::argv(["true"]);
    let mut seq = histogram();
    let bar = progress((sizes.warmup + sizes.samples) as u64, "exec true");
    for i in 0..sizes.warmup + sizes.samples {
        let t = Instant::now();
        let r = client.exec(&sessions[0], &request).await?;
        if r.exit_code != 0 {
            bail!("exec true failed: {r:?}");
        }
        if i >= sizes.warmup {
            record(&mut seq, t.elapsed());
        }
        bar.inc(1);
    }
    bar.finish_and_clear();

    let next = Arc::new(AtomicU64::new(0));
    let total = sizes.execs;
    let bar = progress(total as u64, "concurrent execs");
    let started = Instant::now();
    let tasks: Vec<_> = sessions
        .iter()
        .cloned()
        .map(|sid| {
            let (client, next, request, bar) =
                (client.clone(), next.clone(), request.clone(), bar.clone());
            tokio::spawn(async move {
                let mut h = histogram();
                while (next.fetch_add(1, Ordering::Relaxed) as usize) < total {
                    let t = Instant::now();
                    client.exec(&sid, &request).await?;
                    record(&mut h, t.elapsed());
                    bar.inc(1);
                }
                Ok::<_, anyhow::Error>(h)
            })
        })
        .collect();
    let mut conc = histogram();
    for t in tasks {
        conc.add(t.await??)?;
    }
    let elapsed = started.elapsed();
    bar.finish_and_clear();

    let mut r = Report::new("exec");
    r.baseline(&base);
    r.latency("exec", &seq);
    r.ratio(
        "exec_p50_to_baseline",
        seq.value_at_quantile(0.5) as f64,
        base.value_at_quantile(0.5) as f64,
    );
    if stack.is_some() && args.provider == hearth_worker::ProviderKind::Process {
        // The price of isolation, same run: the default sandbox against `--isolation none`,
        // sampled in alternation so both see the same noise.
        let plain = OwnStack::start_isolated(&template_toml("default", 2), "none").await?;
        let plain_client = connect(&plain.url, subjects).await?;
        wait_ready(&plain_client, "default", 1).await?;
        let (_, _, plain_sessions) =
            sequential_claims(&plain_client, &template, 0, 1, false).await?;
        let (mut sandboxed, mut unsandboxed) = (histogram(), histogram());
        let bar = progress(
            (sizes.warmup + sizes.samples) as u64,
            "exec true, sandbox vs none",
        );
        for i in 0..sizes.warmup + sizes.samples {
            let t = Instant::now();
            client.exec(&sessions[0], &request).await?;
            let in_sandbox = t.elapsed();
            let t = Instant::now();
            plain_client.exec(&plain_sessions[0], &request).await?;
            let without = t.elapsed();
            if i >= sizes.warmup {
                record(&mut sandboxed, in_sandbox);
                record(&mut unsandboxed, without);
            }
            bar.inc(1);
        }
        bar.finish_and_clear();
        r.latency("exec_sandbox", &sandboxed);
        r.latency("exec_isolation_none", &unsandboxed);
        r.ratio(
            "exec_sandbox_p50_to_none",
            sandboxed.value_at_quantile(0.5) as f64,
            unsandboxed.value_at_quantile(0.5) as f64,
        );
    }
    let rate = total as f64 / elapsed.as_secs_f64();
    r.field(
        "throughput_execs_per_s",
        json!(rate.round()),
        Some(format!("{rate:.0}/s across {SESSIONS} sessions")),
    );
    r.latency("throughput_exec", &conc);
    Ok(r)
}

/// The guest image for a qemu stack: `--qemu-image`, else `$HEARTH_QEMU_IMAGE`, else
/// `.tools/images/current`.
fn qemu_image(args: &BenchArgs) -> Result<PathBuf> {
    let image = args
        .qemu_image
        .clone()
        .or_else(|| std::env::var_os("HEARTH_QEMU_IMAGE").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from(".tools/images/current"));
    if !image.join("vmlinuz").is_file() {
        bail!(
            "no guest image at {} (run scripts/setup-qemu.sh or pass --qemu-image)",
            image.display()
        );
    }
    Ok(image)
}

/// Background processes: start → first output byte, reattach → first byte, and `exec echo` on
/// the same session as the baseline (the same path through NATS, the worker and the agent).
async fn processes(
    args: &BenchArgs,
    sizes: &Sizes,
    url: Option<&str>,
    subjects: &Subjects,
) -> Result<Report> {
    use hearth_messages::ProcessEvent;
    use hearth_messages::processes::ProcessStartRequest;
    let qemu = args.provider == hearth_worker::ProviderKind::Qemu;
    let stack = match url {
        Some(_) => None,
        None => {
            let image = if qemu { Some(qemu_image(args)?) } else { None };
            Some(
                OwnStack::start_with(
                    args.provider,
                    &template_toml("default", 2),
                    8,
                    image.as_deref(),
                    None,
                    false,
                )
                .await?,
            )
        }
    };
    let url = url
        .or(stack.as_ref().map(|s| s.url.as_str()))
        .unwrap_or_default();
    let client = connect(url, subjects).await?;
    if stack.is_some() {
        if qemu {
            wait_template_built(&client, "default").await?;
        }
        wait_ready(&client, "default", 1).await?;
    }
    let template = TemplateName::default_template();
    let (_, _, sessions) = sequential_claims(&client, &template, 0, 1, false).await?;
    let sid = &sessions[0];
    // Fewer rounds than an exec bench: every round starts a process (and, on qemu, TCG is slow).
    let (warmup, samples) = if qemu {
        (3, sizes.samples.min(if args.quick { 10 } else { 100 }))
    } else {
        (
            sizes.warmup.min(20),
            sizes.samples.min(if args.quick { 50 } else { 300 }),
        )
    };
    let echo = ExecRequest::argv(["echo", "x"]);
    let start = ProcessStartRequest {
        argv: Some(vec!["echo".into(), "x".into()]),
        ..ProcessStartRequest::default()
    };
    let (mut exec_h, mut first_h, mut reattach_h) = (histogram(), histogram(), histogram());
    // A long runner to reattach to, with output already in its ring.
    let runner = client
        .start_process(
            sid,
            &ProcessStartRequest {
                cmd: Some("echo ready; exec sleep 3600".into()),
                ..ProcessStartRequest::default()
            },
        )
        .await?;
    let bar = progress((warmup + samples) as u64, "processes");
    for i in 0..warmup + samples {
        // Baseline: an exec of the same command, same session.
        let t = Instant::now();
        client.exec(sid, &echo).await?;
        let exec_t = t.elapsed();
        // Start -> first output byte (the follow is opened right after the start's reply).
        let t = Instant::now();
        let started = client.start_process(sid, &start).await?;
        let mut events = Box::pin(client.follow_process(sid, &started.process_id, 0).await?);
        let first_t = match events.next().await {
            Some(Ok(ProcessEvent::Output { .. })) => t.elapsed(),
            Some(Ok(ProcessEvent::Exited(info))) => bail!("no output from {info:?}"),
            Some(Err(e)) => return Err(e.into()),
            None => bail!("the follow ended early"),
        };
        drop(events);
        // Reattach: follow a running process from offset 0 -> its first byte.
        let t = Instant::now();
        let mut events = Box::pin(client.follow_process(sid, &runner.process_id, 0).await?);
        let reattach_t = match events.next().await {
            Some(Ok(ProcessEvent::Output { .. })) => t.elapsed(),
            other => bail!("reattach: {other:?}"),
        };
        drop(events);
        if i >= warmup {
            record(&mut exec_h, exec_t);
            record(&mut first_h, first_t);
            record(&mut reattach_h, reattach_t);
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    let _ = client.kill_process(sid, &runner.process_id).await;
    let _ = client.release(sid).await;
    let mut r = Report::new("processes");
    r.field(
        "provider",
        json!(args.provider.as_str()),
        Some(args.provider.as_str().to_owned()),
    );
    r.latency("exec_echo", &exec_h);
    r.latency("process_first_byte", &first_h);
    r.latency("reattach_first_byte", &reattach_h);
    let p50 = |h: &Histogram<u64>| h.value_at_quantile(0.5) as f64;
    r.ratio("first_byte_p50_to_exec", p50(&first_h), p50(&exec_h));
    r.ratio("reattach_p50_to_exec", p50(&reattach_h), p50(&exec_h));
    Ok(r)
}

async fn cold(
    args: &BenchArgs,
    sizes: &Sizes,
    url: Option<&str>,
    subjects: &Subjects,
) -> Result<Report> {
    if url.is_some() {
        bail!("the cold scenario starts its own stack (it needs an empty-pool template)");
    }
    let warm_needed = sizes.warmup + sizes.cold;
    let toml = format!(
        "{}{}",
        template_toml("default", warm_needed + 4),
        template_toml("cold", 0)
    );
    // Room for the warm pool plus every cold session: the scheduler counts a released VM's slot
    // free only once a heartbeat reports it gone, so releases do not hand slots back at once.
    let stack = OwnStack::start(args.provider, &toml, warm_needed + sizes.cold + 64).await?;
    let client = connect(&stack.url, subjects).await?;
    wait_ready(&client, "default", warm_needed).await?;
    wait_template_built(&client, "cold").await?;
    let base = baseline(&stack.url, sizes.samples).await?;
    let cold_template = TemplateName::new("cold")?;
    let (cold_h, cold_count, _) =
        sequential_claims(&client, &cold_template, 2, sizes.cold, true).await?;
    let (warm_h, _, _) = sequential_claims(
        &client,
        &TemplateName::default_template(),
        sizes.warmup,
        sizes.cold,
        true,
    )
    .await?;
    let mut r = Report::new("cold");
    r.baseline(&base);
    r.latency("cold_claim", &cold_h);
    r.latency("warm_claim", &warm_h);
    r.field(
        "cold_claims_served_cold",
        json!(cold_count),
        Some(cold_count.to_string()),
    );
    r.ratio(
        "cold_to_warm_p50",
        cold_h.value_at_quantile(0.5) as f64,
        warm_h.value_at_quantile(0.5) as f64,
    );
    Ok(r)
}

async fn wait_template_built(client: &HearthClient, template: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Ok(list) = client.list_templates().await
            && list
                .iter()
                .any(|t| t.name.as_str() == template && t.snapshot_id.is_some())
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("template {template} was not built within 2 minutes");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn refill(args: &BenchArgs, sizes: &Sizes, url: Option<&str>) -> Result<Report> {
    if url.is_some() {
        bail!("the refill scenario starts its own stack (it measures a pool filling from empty)");
    }
    let n = sizes.refill;
    let stack = OwnStack::start(args.provider, &template_toml("default", n), n + 16).await?;
    let client = connect(&stack.url, &Subjects::default()).await?;
    wait_template_built(&client, "default").await?;
    let elapsed = wait_ready(&client, "default", n).await?;
    let rate = n as f64 / elapsed.as_secs_f64();
    let mut r = Report::new("refill");
    r.field("pool_vms", json!(n), Some(n.to_string()));
    r.field(
        "fill_seconds",
        json!(round3(elapsed.as_secs_f64())),
        Some(format!("{:.2} s", elapsed.as_secs_f64())),
    );
    r.field(
        "restores_per_s_per_worker",
        json!(round3(rate)),
        Some(format!(
            "{rate:.1}/s (1 worker, {:?} provider)",
            args.provider
        )),
    );
    Ok(r)
}

fn rss_bytes(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .ok_or_else(|| anyhow!("no VmRSS for {pid}"))?;
    Ok(kib * 1024)
}

async fn memory(args: &BenchArgs, sizes: &Sizes, url: Option<&str>) -> Result<Report> {
    if url.is_some() {
        bail!("the memory scenario starts its own stack (it reads the scheduler's RSS)");
    }
    let n = sizes.sessions;
    let pool = 256;
    let stack = OwnStack::start(
        hearth_worker::ProviderKind::Fake,
        &template_toml("default", pool),
        n + pool + 64,
    )
    .await?;
    let client = connect(&stack.url, &Subjects::default()).await?;
    wait_ready(&client, "default", pool).await?;
    let pid = stack
        .scheduler
        .pid()
        .ok_or_else(|| anyhow!("scheduler not running"))?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = rss_bytes(pid)?;
    let (_, elapsed, _) = concurrent_claims(
        &client,
        &TemplateName::default_template(),
        n,
        args.concurrency,
    )
    .await?;
    wait_ready(&client, "default", pool).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = rss_bytes(pid)?;
    let per = after.saturating_sub(before) as f64 / n as f64;
    let mut r = Report::new("memory");
    r.field("live_sessions", json!(n), Some(n.to_string()));
    r.field(
        "scheduler_rss_before_mib",
        json!(round3(before as f64 / 1048576.0)),
        Some(format!("{:.1} MiB", before as f64 / 1048576.0)),
    );
    r.field(
        "scheduler_rss_after_mib",
        json!(round3(after as f64 / 1048576.0)),
        Some(format!("{:.1} MiB", after as f64 / 1048576.0)),
    );
    r.field(
        "bytes_per_session",
        json!(per.round()),
        Some(format!(
            "{per:.0} B (RSS delta / sessions; fake provider worker)"
        )),
    );
    r.field("claim_seconds", json!(round3(elapsed.as_secs_f64())), None);
    Ok(r)
}

/// One lifecycle job straight to the bench's worker, timed.
async fn timed_job(
    client: &HearthClient,
    op: hearth_messages::JobOp,
) -> Result<(Duration, hearth_messages::JobOutput)> {
    let subject = client
        .subjects()
        .worker_jobs(&hearth_messages::WorkerId::new("bench-w1")?);
    let request = hearth_messages::JobRequest {
        job_id: hearth_messages::JobId::new(uuid_like())?,
        op,
        lease_revision: 0,
        tenant: None,
    };
    let t = Instant::now();
    let reply: hearth_messages::JobReply = client
        .request(subject, &request, Duration::from_secs(180))
        .await?;
    Ok((t.elapsed(), reply.output))
}

fn uuid_like() -> String {
    use std::sync::atomic::AtomicU64;
    static N: AtomicU64 = AtomicU64::new(0);
    format!(
        "bench-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// RSS of every running QEMU process, MiB.
fn qemu_rss_mib() -> Vec<f64> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains("qemu-system"))
        })
        .filter_map(|pid| rss_bytes(pid).ok())
        .map(|b| b as f64 / 1048576.0)
        .collect()
}

fn median(mut xs: Vec<f64>) -> f64 {
    if xs.is_empty() {
        return f64::NAN;
    }
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

/// Destroys every VM of the bench's worker (QEMU VMs outlive their worker by design), repeating
/// until none is left: restores already sent finish after the scheduler is gone.
async fn destroy_every_vm(client: &HearthClient) {
    use hearth_messages::{JobOp, JobOutput};
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        let Ok((_, JobOutput::Vms { vms })) = timed_job(client, JobOp::ListVms {}).await else {
            break;
        };
        if vms.is_empty() {
            break;
        }
        for vm in vms {
            let _ = timed_job(
                client,
                JobOp::DestroyVm {
                    vm_id: vm.vm_id,
                    backup: false,
                    reason: None,
                },
            )
            .await;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// What [`lifecycle`] measured on one provider.
struct Lifecycle {
    base: Histogram<u64>,
    cold: Vec<f64>,
    restore: Vec<f64>,
    snapshot: Duration,
    snapshot_bytes: u64,
    warm: Histogram<u64>,
    exec: Histogram<u64>,
    /// Stop and start jobs of one VM (empty unless asked for).
    stop: Vec<f64>,
    start: Vec<f64>,
}

/// The VM life cycle on `provider`, on a stack of its own: cold create -> agent answers,
/// snapshot, restore -> agent answers (jobs timed on the worker), warm claims from the pool, and
/// exec of `true` in one session, and with `stop_start`, stop -> start cycles of one restored VM;
/// every VM is destroyed before the stack goes away (QEMU VMs outlive their worker by design).
/// `rss` is sampled while the VMs run.
async fn lifecycle(
    provider: hearth_worker::ProviderKind,
    qemu_image: Option<&std::path::Path>,
    args: &BenchArgs,
    sizes: &Sizes,
    stop_start: bool,
    rss: &mut dyn FnMut(),
) -> Result<Lifecycle> {
    use hearth_messages::{JobOp, JobOutput, SnapshotId, VmId, VmSpec};
    let rounds = if args.quick { 1 } else { 3 };
    let claims = sizes.cold.min(if args.quick { 2 } else { 10 });
    let stack = OwnStack::start_with(
        provider,
        &template_toml("default", claims + 1),
        claims * 2 + rounds + 8,
        qemu_image,
        None,
        false,
    )
    .await?;
    let client = connect(&stack.url, &Subjects::default()).await?;
    wait_template_built(&client, "default").await?;
    let base = baseline(&stack.url, 200).await?;

    // Cold create -> agent answers (the worker health-checks before replying).
    let mut cold = Vec::new();
    for i in 0..rounds {
        let (t, _) = timed_job(
            &client,
            JobOp::CreateVmWithSpec {
                vm_id: VmId::new(format!("bench-cold-{i}"))?,
                spec: VmSpec::default(),
                session: false,
            },
        )
        .await?;
        cold.push(t.as_secs_f64());
    }
    // Snapshot one of them.
    let (snapshot, out) = timed_job(
        &client,
        JobOp::SnapshotVm {
            vm_id: VmId::new("bench-cold-0")?,
            snapshot_id: SnapshotId::new("bench-snap")?,
            publish: false,
        },
    )
    .await?;
    let snapshot_bytes = match out {
        JobOutput::Snapshot { snapshot } => snapshot.size_bytes,
        other => bail!("snapshot answered {other:?}"),
    };
    // Restore -> agent answers (identity reset included).
    let mut restore = Vec::new();
    for i in 0..rounds {
        let (t, _) = timed_job(
            &client,
            JobOp::CreateVmWithSpec {
                vm_id: VmId::new(format!("bench-restored-{i}"))?,
                spec: VmSpec {
                    restore_from: Some(SnapshotId::new("bench-snap")?),
                    ..VmSpec::default()
                },
                session: false,
            },
        )
        .await?;
        restore.push(t.as_secs_f64());
    }
    rss();
    // Stop -> start of one VM (its agent idle), each job timed on the worker.
    let (mut stop, mut start) = (Vec::new(), Vec::new());
    let cycles = match (stop_start, args.quick) {
        (false, _) => 0,
        (true, true) => 3,
        (true, false) => 20,
    };
    for _ in 0..cycles {
        let vm_id = VmId::new("bench-restored-0")?;
        let (t, _) = timed_job(
            &client,
            JobOp::StopVm {
                vm_id: vm_id.clone(),
            },
        )
        .await?;
        stop.push(t.as_secs_f64());
        let (t, _) = timed_job(&client, JobOp::StartVm { vm_id }).await?;
        start.push(t.as_secs_f64());
    }
    for i in 0..rounds {
        for id in [format!("bench-cold-{i}"), format!("bench-restored-{i}")] {
            let _ = timed_job(
                &client,
                JobOp::DestroyVm {
                    vm_id: VmId::new(id)?,
                    backup: false,
                    reason: None,
                },
            )
            .await;
        }
    }
    // Warm claims from the pool, then exec `true` in one session.
    wait_ready(&client, "default", claims).await?;
    let (warm, _, sessions) =
        sequential_claims(&client, &TemplateName::default_template(), 0, claims, false).await?;
    let mut exec = histogram();
    for _ in 0..if args.quick { 5 } else { 50 } {
        let t = Instant::now();
        client
            .exec(&sessions[0], &ExecRequest::argv(["true"]))
            .await?;
        record(&mut exec, t.elapsed());
    }
    // Stop the scheduler (no more refills), then destroy every VM through the worker before the
    // stack goes away. Restores already sent finish after the scheduler is gone, so repeat until
    // none is left.
    let mut stack = stack;
    stack.scheduler.kill();
    destroy_every_vm(&client).await;
    Ok(Lifecycle {
        base,
        cold,
        restore,
        snapshot,
        snapshot_bytes,
        warm,
        exec,
        stop,
        start,
    })
}

async fn microvm(args: &BenchArgs, sizes: &Sizes, url: Option<&str>) -> Result<Report> {
    if url.is_some() {
        bail!("the microvm scenario starts its own stack (it times jobs on its own worker)");
    }
    let image = qemu_image(args)?;
    let mut rss = Vec::new();
    let l = lifecycle(
        hearth_worker::ProviderKind::Qemu,
        Some(&image),
        args,
        sizes,
        false,
        &mut || rss = qemu_rss_mib(),
    )
    .await?;
    let rounds = l.cold.len();
    let (cold_s, restore_s) = (median(l.cold), median(l.restore));
    let warm_ms = ms(l.warm.value_at_quantile(0.5));
    let mut r = Report::new("microvm");
    r.baseline(&l.base);
    r.field(
        "cold_boot_p50_s",
        json!(round3(cold_s)),
        Some(format!(
            "{cold_s:.3} s (boot -> guest agent answers; {rounds} runs)"
        )),
    );
    r.field(
        "restore_p50_s",
        json!(round3(restore_s)),
        Some(format!(
            "{restore_s:.3} s (restore + identity reset -> agent answers)"
        )),
    );
    r.field(
        "snapshot_s",
        json!(round3(l.snapshot.as_secs_f64())),
        Some(format!("{:.3} s", l.snapshot.as_secs_f64())),
    );
    r.field(
        "snapshot_mib",
        json!(round3(l.snapshot_bytes as f64 / 1048576.0)),
        Some(format!("{:.1} MiB", l.snapshot_bytes as f64 / 1048576.0)),
    );
    r.latency("warm_claim", &l.warm);
    r.latency("exec", &l.exec);
    let rss_mib = median(rss);
    r.field(
        "rss_per_vm_mib",
        json!(round3(rss_mib)),
        Some(format!(
            "{rss_mib:.0} MiB (median over running QEMU processes)"
        )),
    );
    r.ratio("cold_to_restore", cold_s, restore_s);
    r.ratio("restore_to_warm_claim", restore_s * 1000.0, warm_ms);
    Ok(r)
}

/// The `oci` provider (crun containers) beside the process provider, measured in the same run:
/// cold create, restore, warm claim, exec, stop and start on each (oci freezes and thaws its
/// container, process kills its sandbox and starts a new one), with oci/process ratios.
async fn oci(args: &BenchArgs, sizes: &Sizes, url: Option<&str>) -> Result<Report> {
    if url.is_some() {
        bail!("the oci scenario starts its own stacks (it times jobs on its own workers)");
    }
    let mut r = Report::new("oci");
    let mut medians = Vec::new();
    for provider in [
        hearth_worker::ProviderKind::Process,
        hearth_worker::ProviderKind::Oci,
    ] {
        let l = lifecycle(provider, None, args, sizes, true, &mut || {}).await?;
        let name = provider.as_str();
        if provider == hearth_worker::ProviderKind::Process {
            r.baseline(&l.base);
        }
        let (cold_ms, restore_ms) = (median(l.cold) * 1000.0, median(l.restore) * 1000.0);
        r.field(
            &format!("{name}_cold_create_p50_ms"),
            json!(round3(cold_ms)),
            Some(format!("{cold_ms:.1} ms ({name}: create -> agent answers)")),
        );
        r.field(
            &format!("{name}_restore_p50_ms"),
            json!(round3(restore_ms)),
            Some(format!(
                "{restore_ms:.1} ms ({name}: restore -> agent answers)"
            )),
        );
        r.latency(&format!("{name}_warm_claim"), &l.warm);
        r.latency(&format!("{name}_exec"), &l.exec);
        let (stop_ms, start_ms) = (median(l.stop) * 1000.0, median(l.start) * 1000.0);
        let (stop_how, start_how) = if provider == hearth_worker::ProviderKind::Oci {
            ("the container frozen", "thawed, agent answers")
        } else {
            ("the sandbox killed", "a new sandbox, agent answers")
        };
        r.field(
            &format!("{name}_stop_p50_ms"),
            json!(round3(stop_ms)),
            Some(format!("{stop_ms:.1} ms ({name}: stop job, {stop_how})")),
        );
        r.field(
            &format!("{name}_start_p50_ms"),
            json!(round3(start_ms)),
            Some(format!("{start_ms:.1} ms ({name}: start job, {start_how})")),
        );
        medians.push((
            cold_ms,
            restore_ms,
            ms(l.warm.value_at_quantile(0.5)),
            ms(l.exec.value_at_quantile(0.5)),
            stop_ms,
            start_ms,
        ));
    }
    let (p, o) = (medians[0], medians[1]);
    r.ratio("oci_to_process_cold_create", o.0, p.0);
    r.ratio("oci_to_process_restore", o.1, p.1);
    r.ratio("oci_to_process_warm_claim", o.2, p.2);
    r.ratio("oci_to_process_exec", o.3, p.3);
    r.ratio("oci_to_process_stop", o.4, p.4);
    r.ratio("oci_to_process_start", o.5, p.5);
    Ok(r)
}
