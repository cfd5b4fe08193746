//! The dashboard and the alert rules can never silently rot: every metric name a Grafana panel,
//! dashboard variable or alert rule queries is exported by the running binaries.
//!
//! - `hearth_*`: a `hearth-worker` binary and (when built) a `hearth-scheduler` binary run against
//!   a real nats-server, are driven through jobs, execs, files, a claim and a release, and their
//!   `/metrics` are scraped (a raw HTTP GET) and compared with the names the queries use.
//! - `gnatsd_*` / `jetstream_*` (prometheus-nats-exporter): the exporter turns every numeric field
//!   of a monitoring endpoint into `gnatsd_<endpoint>_<field>`, so the fields must exist in a real
//!   nats-server's `/varz` or `/routez`; `jetstream_server_*` and `gnatsd_healthz_status` come from
//!   the exporter's fixed collectors.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::{Duration, Instant};

use futures::StreamExt;
use hearth_messages::transport::decode_reply;
use hearth_messages::{
    CreateSessionRequest, Encoding, ExecRequest, HearthClient, JobOp, JobOutput, JobReply,
    JobRequest, SessionId, Subjects, VmSpec,
};
use hearth_testkit::{ChildProcess, NatsServer, workspace_bin, workspace_root};
use serde_json::Value as Json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const PREFIXES: [&str; 3] = ["hearth_", "gnatsd_", "jetstream_"];

/// Every PromQL expression in the dashboard (panel queries and variable queries) and the alert
/// rules, with where it comes from.
fn queries() -> Vec<(String, String)> {
    let root = workspace_root().join("deploy");
    let mut out = Vec::new();
    let dash: Json = serde_json::from_str(
        &std::fs::read_to_string(root.join("grafana/dashboards/hearth.json")).unwrap(),
    )
    .unwrap();
    fn walk(v: &Json, path: &str, out: &mut Vec<(String, String)>) {
        match v {
            Json::Object(map) => {
                for (k, v) in map {
                    let here = format!("{path}.{k}");
                    match (k.as_str(), v) {
                        ("expr" | "definition" | "query", Json::String(s)) => {
                            out.push((here, s.clone()))
                        }
                        _ => walk(v, &here, out),
                    }
                }
            }
            Json::Array(items) => {
                for (i, v) in items.iter().enumerate() {
                    walk(v, &format!("{path}[{i}]"), out);
                }
            }
            _ => {}
        }
    }
    walk(&dash, "hearth.json", &mut out);
    let rules: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(root.join("prometheus/alerts.yml")).unwrap())
            .unwrap();
    for group in rules["groups"].as_sequence().unwrap() {
        for rule in group["rules"].as_sequence().unwrap() {
            let name = rule["alert"].as_str().unwrap();
            out.push((
                format!("alerts.yml {name}"),
                rule["expr"].as_str().unwrap().to_owned(),
            ));
        }
    }
    out
}

/// Metric names in a PromQL expression that belong to Hearth or the NATS exporter, with histogram
/// suffixes removed (`x_bucket` → `x`).
fn metric_names(expr: &str) -> BTreeSet<String> {
    // Drop string literals (label values and regexes).
    let mut text = String::with_capacity(expr.len());
    let mut quote: Option<char> = None;
    let mut escaped = false;
    for c in expr.chars() {
        match quote {
            Some(q) => {
                if escaped {
                    escaped = false;
                } else if c == '\\' {
                    escaped = true;
                } else if c == q {
                    quote = None;
                }
            }
            None if c == '"' || c == '\'' || c == '`' => {
                quote = Some(c);
                text.push(' ');
            }
            None => text.push(c),
        }
    }
    text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .filter(|word| PREFIXES.iter().any(|p| word.starts_with(p)))
        .map(base_name)
        .collect()
}

fn base_name(name: &str) -> String {
    for suffix in ["_bucket", "_sum", "_count"] {
        if let Some(base) = name.strip_suffix(suffix) {
            return base.to_owned();
        }
    }
    name.to_owned()
}

/// Which queries use each name.
fn used_names() -> BTreeMap<String, Vec<String>> {
    let mut used: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (source, expr) in queries() {
        for name in metric_names(&expr) {
            used.entry(name).or_default().push(source.clone());
        }
    }
    used
}

/// `GET path` over plain HTTP/1.0 (no chunking), returning the body of a 200 response.
async fn http_get(port: u16, path: &str) -> std::io::Result<String> {
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\n\r\n").as_bytes())
        .await?;
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut raw))
        .await
        .map_err(|_| std::io::Error::other("HTTP read timed out"))??;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| std::io::Error::other("no HTTP header end"))?;
    let status = head.lines().next().unwrap_or_default();
    if !status.contains(" 200") {
        return Err(std::io::Error::other(format!("{path}: {status}")));
    }
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        return Ok(dechunk(body));
    }
    Ok(body.to_owned())
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let size = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if size == 0 || rest.len() < size {
            break;
        }
        out.push_str(&rest[..size]);
        body = rest[size..].trim_start_matches("\r\n");
    }
    out
}

/// Metric names in a Prometheus text exposition (histogram series folded into their base name).
fn exposed_names(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(base_name)
        .collect()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn id<T: TryFrom<String>>(s: &str) -> T
where
    T::Error: std::fmt::Debug,
{
    T::try_from(s.to_owned()).unwrap()
}

struct Jobs {
    nats: async_nats::Client,
    worker: String,
    n: u32,
}

impl Jobs {
    async fn run(&mut self, op: JobOp) -> JobOutput {
        self.n += 1;
        let request = JobRequest {
            job_id: id(&format!("metrics-job-{}", self.n)),
            op,
            lease_revision: 0,
            tenant: None,
        };
        let payload = Encoding::MsgPack.encode(&request).unwrap();
        let msg = tokio::time::timeout(
            Duration::from_secs(30),
            self.nats.request(
                Subjects::default().worker_jobs(&id(&self.worker)),
                payload.into(),
            ),
        )
        .await
        .expect("job reply in time")
        .expect("job request");
        decode_reply::<JobReply>(&msg)
            .unwrap_or_else(|e| panic!("job {}: {e:?}", self.n))
            .output
    }
}

fn spawn_worker(
    nats_url: &str,
    worker_id: &str,
    metrics: u16,
    extra: &[&str],
    dir: &Path,
) -> ChildProcess {
    let bin = workspace_bin("hearth-worker").expect("hearth-worker binary");
    let mut cmd = std::process::Command::new(bin);
    cmd.args(["--nats-url", nats_url, "--worker-id", worker_id])
        .args(["--metrics-listen", &format!("127.0.0.1:{metrics}")])
        .args(["--heartbeat-ms", "200"])
        .arg("--data-dir")
        .arg(dir.join(worker_id))
        .args(extra)
        .env("RUST_LOG", "warn");
    ChildProcess::spawn(worker_id, cmd, dir).unwrap()
}

async fn wait_heartbeat(nats: &async_nats::Client, worker_id: &str, child: &mut ChildProcess) {
    let mut beats = nats
        .subscribe(format!("hearth.v1.workers.{worker_id}.status"))
        .await
        .unwrap();
    let beat = tokio::time::timeout(Duration::from_secs(30), beats.next()).await;
    assert!(
        matches!(beat, Ok(Some(_))),
        "{worker_id} sent no heartbeat (running: {}):\n{}",
        child.is_running(),
        child.log()
    );
}

/// Drives a worker binary through what the dashboard shows (create, snapshot, restore, rename,
/// eviction, exec with truncated output, files, a bad request) and returns its metric names.
async fn scrape_worker(server: &NatsServer, dir: &Path) -> BTreeSet<String> {
    let nats = server.connect().await.unwrap();
    let port = free_port();
    // Room for two VMs, so the third create evicts the stopped template VM.
    let mut child = spawn_worker(server.url(), "wm", port, &["--max-vms", "2"], dir);
    wait_heartbeat(&nats, "wm", &mut child).await;

    let mut jobs = Jobs {
        nats: nats.clone(),
        worker: "wm".into(),
        n: 0,
    };
    jobs.run(JobOp::CreateVmWithSpec {
        vm_id: id("tmpl"),
        spec: VmSpec {
            bootstrap: Some(vec!["sh".into(), "-c".into(), "echo ok > boot.txt".into()]),
            ..Default::default()
        },
        session: false,
    })
    .await;
    jobs.run(JobOp::SnapshotVm {
        vm_id: id("tmpl"),
        snapshot_id: id("snap-m"),
        publish: true,
    })
    .await;
    jobs.run(JobOp::StopVm { vm_id: id("tmpl") }).await;
    jobs.run(JobOp::CreateVmWithSpec {
        vm_id: id("pool-1"),
        spec: VmSpec {
            restore_from: Some(id("snap-m")),
            ..Default::default()
        },
        session: false,
    })
    .await;
    jobs.run(JobOp::RenameVm {
        vm_id: id("pool-1"),
        new_vm_id: id("sess-m"),
        session: true,
    })
    .await;
    // Full: evicts the stopped template VM.
    jobs.run(JobOp::CreateVm {
        vm_id: id("extra"),
        session: false,
    })
    .await;

    let client = HearthClient::new(nats.clone());
    let sid: SessionId = id("sess-m");
    let result = client
        .exec(
            &sid,
            &ExecRequest {
                cmd: Some("cat boot.txt; echo more output".into()),
                max_output_bytes: Some(2),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert!(result.stdout_truncated);
    client
        .put_file(&sid, "f.txt", b"x".to_vec(), None)
        .await
        .unwrap();
    // A request that cannot be decoded: answered 400 and counted.
    let bad = nats
        .request("hearth.v1.workers.wm.jobs", "not msgpack".into())
        .await
        .unwrap();
    assert!(decode_reply::<JobReply>(&bad).is_err());

    // Heartbeats refresh the VM gauges; give them a beat.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let text = http_get(port, "/metrics")
        .await
        .unwrap_or_else(|e| panic!("scraping the worker: {e}\n{}", child.log()));
    child.terminate(Duration::from_secs(10)).unwrap();
    exposed_names(&text)
}

/// Runs a `hearth-scheduler` binary with deploy/hearth/scheduler.toml and a worker, claims, execs
/// and releases a session, and returns the scheduler's metric names once `want` are all there
/// (or whatever it has after a deadline).
async fn scrape_scheduler(
    scheduler_bin: &Path,
    server: &NatsServer,
    dir: &Path,
    want: &BTreeSet<String>,
) -> BTreeSet<String> {
    let nats = server.connect().await.unwrap();
    let mut worker = spawn_worker(server.url(), "ws", free_port(), &[], dir);
    wait_heartbeat(&nats, "ws", &mut worker).await;

    let port = free_port();
    let mut cmd = std::process::Command::new(scheduler_bin);
    cmd.arg("--config")
        .arg(workspace_root().join("deploy/hearth/scheduler.toml"))
        .args(["--nats-url", server.url()])
        .args(["--metrics-listen", &format!("127.0.0.1:{port}")])
        .args(["--reconcile-interval-ms", "200", "--lease-ttl-ms", "3000"])
        .env("RUST_LOG", "warn");
    let mut scheduler = ChildProcess::spawn("scheduler", cmd, dir).unwrap();

    let client = HearthClient::new(nats.clone());
    // Wait for a warm pool, then claim from it.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let ready = client
            .pool_status()
            .await
            .map(|s| s.pools.iter().any(|p| p.ready > 0))
            .unwrap_or(false);
        if ready {
            break;
        }
        assert!(
            Instant::now() < deadline && scheduler.is_running(),
            "no warm VM within 60 s:\n{}\n{}",
            scheduler.log(),
            worker.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let session = client
        .create_session(&CreateSessionRequest::default())
        .await
        .unwrap_or_else(|e| panic!("claim: {e}\n{}", scheduler.log()));
    let result = client
        .exec(
            &session.session_id,
            &ExecRequest {
                cmd: Some("true".into()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(result.exit_code, 0);
    client.release(&session.session_id).await.unwrap();

    // Gauges and the refill histogram appear as the scheduler gets to them.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let names = match http_get(port, "/metrics").await {
            Ok(text) => exposed_names(&text),
            Err(_) => BTreeSet::new(),
        };
        if want.is_subset(&names) || Instant::now() > deadline {
            let _ = scheduler.terminate(Duration::from_secs(20));
            return names;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The metric names a source file declares as `pub const X: &str = "hearth_...";`.
fn declared(path: &str) -> BTreeSet<String> {
    let text = std::fs::read_to_string(workspace_root().join(path)).unwrap_or_default();
    text.lines()
        .filter(|l| l.trim_start().starts_with("pub const") && l.contains(": &str = \"hearth_"))
        .filter_map(|l| l.split('"').nth(1))
        .map(str::to_owned)
        .collect()
}

#[tokio::test]
async fn every_metric_the_dashboard_and_alerts_query_is_exported() {
    let used = used_names();
    let hearth: BTreeSet<String> = used
        .keys()
        .filter(|n| n.starts_with("hearth_"))
        .cloned()
        .collect();
    assert!(hearth.len() > 20, "too few names found: {hearth:?}");

    let worker_declared: BTreeSet<String> = hearth_worker::metrics::ALL
        .iter()
        .map(|s| s.to_string())
        .collect();
    let scheduler_declared = declared("scheduler/src/metrics.rs");
    // Every name belongs to one of the binaries.
    for name in &hearth {
        assert!(
            worker_declared.contains(name) || scheduler_declared.contains(name),
            "{name} (used by {:?}) is declared by neither worker/src/metrics.rs nor \
             scheduler/src/metrics.rs",
            used[name]
        );
    }

    let server = NatsServer::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let worker_names = scrape_worker(&server, dir.path()).await;
    let from_worker: BTreeSet<String> = hearth
        .iter()
        .filter(|n| worker_declared.contains(*n))
        .cloned()
        .collect();
    let missing: Vec<_> = from_worker.difference(&worker_names).collect();
    assert!(
        missing.is_empty(),
        "the worker does not export {missing:?}; it exports {worker_names:?}"
    );

    let from_scheduler: BTreeSet<String> = hearth.difference(&from_worker).cloned().collect();
    match workspace_bin("hearth-scheduler") {
        Err(why) => eprintln!(
            "SKIPPED the scheduler half: {why:#}. Its names {from_scheduler:?} were only checked \
             against scheduler/src/metrics.rs"
        ),
        Ok(bin) => {
            let names = scrape_scheduler(&bin, &server, dir.path(), &from_scheduler).await;
            let missing: Vec<_> = from_scheduler.difference(&names).collect();
            assert!(
                missing.is_empty(),
                "the scheduler does not export {missing:?} (used by {:?}); it exports {names:?}",
                missing.iter().map(|n| &used[*n]).collect::<Vec<_>>()
            );
        }
    }
}

/// The JetStream collector's server-level gauges in prometheus-nats-exporter 0.17
/// (collector/jsz.go): `jetstream_server_<name>`.
const JETSTREAM_SERVER_GAUGES: &[&str] = &[
    "jetstream_server_jetstream_disabled",
    "jetstream_server_total_streams",
    "jetstream_server_total_consumers",
    "jetstream_server_total_messages",
    "jetstream_server_total_message_bytes",
    "jetstream_server_max_memory",
    "jetstream_server_max_storage",
];

#[tokio::test]
async fn nats_exporter_metrics_exist_on_a_real_nats_server() {
    let server = NatsServer::builder().arg("-m").arg("-1").start().unwrap();
    // The harness asked for a ports file: it lists the monitoring URL too.
    let ports = std::fs::read_dir(server.temp_dir().join("ports"))
        .unwrap()
        .flatten()
        .find(|e| e.path().extension().is_some_and(|x| x == "ports"))
        .map(|e| std::fs::read_to_string(e.path()).unwrap())
        .unwrap();
    let ports: Json = serde_json::from_str(&ports).unwrap();
    let monitoring = ports["monitoring"][0].as_str().unwrap();
    let port: u16 = monitoring.rsplit(':').next().unwrap().parse().unwrap();

    let mut endpoints: BTreeMap<String, Json> = BTreeMap::new();
    for name in used_names().keys().filter(|n| !n.starts_with("hearth_")) {
        if JETSTREAM_SERVER_GAUGES.contains(&name.as_str()) || name == "gnatsd_healthz_status" {
            continue;
        }
        let rest = name
            .strip_prefix("gnatsd_")
            .unwrap_or_else(|| panic!("{name}: not a metric prometheus-nats-exporter exports"));
        let (endpoint, field) = rest
            .split_once('_')
            .unwrap_or_else(|| panic!("{name}: expected gnatsd_<endpoint>_<field>"));
        assert!(
            ["varz", "routez", "connz", "subsz"].contains(&endpoint),
            "{name}: unknown endpoint {endpoint}"
        );
        if !endpoints.contains_key(endpoint) {
            let body = http_get(port, &format!("/{endpoint}")).await.unwrap();
            endpoints.insert(endpoint.to_owned(), serde_json::from_str(&body).unwrap());
        }
        assert!(
            endpoints[endpoint][field].is_number(),
            "{name}: /{endpoint} has no numeric field {field:?}"
        );
    }
    // The endpoints the exporter's fixed collectors read answer as expected.
    let health: Json = serde_json::from_str(&http_get(port, "/healthz").await.unwrap()).unwrap();
    assert_eq!(health["status"], "ok");
    let jsz: Json = serde_json::from_str(&http_get(port, "/jsz").await.unwrap()).unwrap();
    assert!(jsz["streams"].is_number(), "{jsz}");
}

#[test]
fn metric_name_extraction() {
    assert_eq!(
        metric_names(
            r#"histogram_quantile(0.99, sum by (le) (rate(hearth_claim_duration_seconds_bucket{launch_type="warm", x="hearth_fake"}[5m]))) > 0.05 and up{job="hearth-worker"} == 0"#
        ),
        BTreeSet::from(["hearth_claim_duration_seconds".to_owned()])
    );
    assert_eq!(
        metric_names("label_values(hearth_pool_target, template)"),
        BTreeSet::from(["hearth_pool_target".to_owned()])
    );
    assert_eq!(
        metric_names("delta(gnatsd_varz_slow_consumers[$__rate_interval])"),
        BTreeSet::from(["gnatsd_varz_slow_consumers".to_owned()])
    );
    assert_eq!(
        exposed_names("# TYPE a counter\na_total{x=\"1\"} 3\nb_bucket{le=\"1\"} 2\nb_sum 1\nc 4\n"),
        BTreeSet::from(["a_total".into(), "b".into(), "c".into()])
    );
    assert_eq!(dechunk("5\r\nhello\r\n3\r\nabc\r\n0\r\n\r\n"), "helloabc");
}

/// The counters (`_total`) and histograms (`_seconds`) the dashboard and the alerts query.
fn queried_counters_and_histograms() -> BTreeSet<String> {
    used_names()
        .into_keys()
        .filter(|n| n.starts_with("hearth_") && (n.ends_with("_total") || n.ends_with("_seconds")))
        .collect()
}

/// The first `/metrics` a process on `port` answers (retrying only while nothing listens yet).
async fn first_scrape(port: u16, child: &mut ChildProcess) -> BTreeSet<String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match http_get(port, "/metrics").await {
            Ok(text) => return exposed_names(&text),
            Err(err) => assert!(
                Instant::now() < deadline && child.is_running(),
                "no /metrics on {port}: {err}\n{}",
                child.log()
            ),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_fresh_worker_and_scheduler_export_every_queried_counter_and_histogram_at_once() {
    let wanted = queried_counters_and_histograms();
    assert!(
        wanted.contains("hearth_files_total") && wanted.contains("hearth_worker_evictions_total"),
        "the dashboard no longer queries what this test was written for: {wanted:?}"
    );
    let worker_declared: BTreeSet<String> = hearth_worker::metrics::ALL
        .iter()
        .map(|s| s.to_string())
        .collect();
    let server = NatsServer::start().unwrap();
    let dir = tempfile::tempdir().unwrap();

    let port = free_port();
    let mut worker = spawn_worker(server.url(), "fresh", port, &[], dir.path());
    let names = first_scrape(port, &mut worker).await;
    let from_worker: BTreeSet<String> = wanted.intersection(&worker_declared).cloned().collect();
    let missing: Vec<_> = from_worker.difference(&names).collect();
    assert!(
        missing.is_empty(),
        "a fresh worker does not export {missing:?}; it exports {names:?}"
    );
    worker.terminate(Duration::from_secs(10)).unwrap();

    let from_scheduler: BTreeSet<String> = wanted.difference(&from_worker).cloned().collect();
    let bin = match workspace_bin("hearth-scheduler") {
        Ok(bin) => bin,
        Err(why) => {
            eprintln!("SKIPPED the scheduler half: {why:#}");
            return;
        }
    };
    let port = free_port();
    let mut cmd = std::process::Command::new(bin);
    cmd.arg("--config")
        .arg(workspace_root().join("deploy/hearth/scheduler.toml"))
        .args(["--nats-url", server.url()])
        .args(["--metrics-listen", &format!("127.0.0.1:{port}")])
        .env("RUST_LOG", "warn");
    let mut scheduler = ChildProcess::spawn("fresh-scheduler", cmd, dir.path()).unwrap();
    let names = first_scrape(port, &mut scheduler).await;
    let missing: Vec<_> = from_scheduler.difference(&names).collect();
    assert!(
        missing.is_empty(),
        "a fresh scheduler does not export {missing:?}; it exports {names:?}"
    );
    let _ = scheduler.terminate(Duration::from_secs(20));
}
