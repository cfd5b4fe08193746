//! `hearth bench tenants`: what tenancy costs and what it protects.
//!
//! nats-server runs Hearth's accounts config (deploy/nats/accounts.conf, compiled in): the
//! scheduler and worker log in to the service account, executors to tenant accounts and reach the
//! API through the imports. Measured in one run, interleaved so drift hits both alike:
//! - warm claim latency as the operator (same account, no `Nats-Request-Info`) vs as a tenant
//!   (through the import: one more hop inside nats-server, one header parse, the quota check);
//! - a tenant's claim p99 while another tenant floods creates as fast as it can (it gets 429s),
//!   against the same tenant's unloaded p99.
//!
//! The worker runs the `fake` provider: this measures the scheduler's path and the imports, and
//! thousands of pooled VMs would otherwise measure the provider's refill.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow};
use hdrhistogram::Histogram;
use hearth_messages::{CreateSessionRequest, ErrorCode, HearthClient, TemplateName};
use serde_json::json;

use super::{OwnStack, Report, Sizes, histogram, record, wait_ready};

use hearth_natsd::accounts::password;

/// Writes the accounts config into `dir`; the server file.
pub(super) fn write_accounts_config(dir: &Path) -> Result<PathBuf> {
    hearth_natsd::accounts::write_config(dir)
}

/// Logs a binary in as `user` (through its `HEARTH_NATS_*` variables).
pub(super) fn login(cmd: &mut Command, user: &str) {
    cmd.env("HEARTH_NATS_USER", user)
        .env("HEARTH_NATS_PASSWORD", password(user).unwrap_or_default());
}

async fn client_as(url: &str, user: &str) -> Result<HearthClient> {
    let nats = async_nats::ConnectOptions::with_user_and_password(user.into(), password(user)?)
        .connect(url)
        .await
        .with_context(|| format!("connecting as {user}"))?;
    Ok(HearthClient::new(nats).with_timeout(Duration::from_secs(30)))
}

fn request() -> CreateSessionRequest {
    CreateSessionRequest {
        template: Some(TemplateName::default_template()),
        wait_ms: Some(30_000),
        ..Default::default()
    }
}

async fn timed_claim(client: &HearthClient, h: Option<&mut Histogram<u64>>) -> Result<()> {
    let t = Instant::now();
    client.create_session(&request()).await?;
    if let Some(h) = h {
        record(h, t.elapsed());
    }
    Ok(())
}

pub(super) async fn run(sizes: &Sizes) -> Result<Report> {
    let (warmup, samples) = (sizes.warmup, sizes.samples);
    // Phase 1: operator and tenant-a interleaved; phase 2: tenant-a under two floods.
    let needed = 4 * (warmup + samples) + 16;
    let toml = format!(
        "[[templates]]\nname = \"default\"\nmin_ready = {needed}\nmax_ready = {needed}\n\n\
         [tenants.quotas.tenant-a]\nmax_sessions = {needed}\ncreates_per_s = 100000\n\
         create_burst = 100000\n\n\
         [tenants.quotas.tenant-b]\nmax_sessions = 10\ncreates_per_s = 50\ncreate_burst = 50\n"
    );
    let stack = OwnStack::start_with(
        hearth_worker::ProviderKind::Fake,
        &toml,
        needed + 64,
        None,
        None,
        true,
    )
    .await?;
    let operator = client_as(&stack.url, "operator").await?;
    let tenant = client_as(&stack.url, "tenant-a").await?;
    wait_ready(&operator, "default", needed - 16).await?;

    let (mut as_operator, mut as_tenant) = (histogram(), histogram());
    for i in 0..warmup + samples {
        let measured = i >= warmup;
        timed_claim(&operator, measured.then_some(&mut as_operator)).await?;
        timed_claim(&tenant, measured.then_some(&mut as_tenant)).await?;
    }

    // Phase 2: tenant-b floods creates while tenant-a claims: as fast as 32 executors can, then
    // paced at 5,000 requests/s.
    let unbounded = flood_phase(&stack.url, &tenant, warmup, samples, None).await?;
    let paced = flood_phase(&stack.url, &tenant, warmup, samples, Some(5000)).await?;
    drop(stack);

    let mut r = Report::new("tenants");
    r.latency("operator_claim", &as_operator);
    r.latency("tenant_claim", &as_tenant);
    for q in [("p50", 0.5), ("p99", 0.99)] {
        r.ratio(
            &format!("tenant_to_operator_{}", q.0),
            as_tenant.value_at_quantile(q.1) as f64,
            as_operator.value_at_quantile(q.1) as f64,
        );
    }
    for (name, flood) in [("flood", &unbounded), ("paced_flood", &paced)] {
        r.latency(&format!("tenant_claim_under_{name}"), &flood.claims);
        for q in [("p50", 0.5), ("p99", 0.99)] {
            r.ratio(
                &format!("under_{name}_to_unloaded_{}", q.0),
                flood.claims.value_at_quantile(q.1) as f64,
                as_tenant.value_at_quantile(q.1) as f64,
            );
        }
        let [ok, refused, other] = flood.counts;
        let rate = (ok + refused + other) as f64 / flood.elapsed.as_secs_f64();
        r.field(
            &format!("{name}_requests_per_s"),
            json!(rate.round()),
            Some(format!(
                "{rate:.0}/s from 32 executors of tenant-b ({ok} created, {refused} refused 429, {other} other)"
            )),
        );
        r.field(&format!("{name}_refused"), json!(refused), None);
    }
    Ok(r)
}

/// What a flood phase measured.
struct Flood {
    /// Tenant-a's claims meanwhile.
    claims: Histogram<u64>,
    /// Tenant-b's creates: made, refused with 429, failed otherwise.
    counts: [u64; 3],
    elapsed: Duration,
}

/// Tenant-b's 32 executors create as fast as they can (or, with `rate`, that many per second in
/// all) while tenant-a makes `warmup + samples` claims. The flood runs on a thread of its own at the
/// lowest CPU priority with its own connection: it stands for executors on other machines, whose
/// client CPU is not the servers'. What it costs Hearth and nats-server (each request gets its
/// 429) runs at normal priority, as in production.
async fn flood_phase(
    url: &str,
    tenant: &HearthClient,
    warmup: usize,
    samples: usize,
    rate: Option<u32>,
) -> Result<Flood> {
    let stop = Arc::new(AtomicBool::new(false));
    let counts = Arc::new([AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0)]);
    let flood = {
        let (url, stop, counts) = (url.to_owned(), stop.clone(), counts.clone());
        std::thread::spawn(move || -> Result<Duration> {
            let tid = nix::unistd::gettid().to_string();
            let _ = Command::new("renice")
                .args(["-n", "19", "-p", &tid])
                .stdout(std::process::Stdio::null())
                .status();
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(async move {
                let flooder = client_as(&url, "tenant-b").await?;
                let pace = rate.map(|r| Duration::from_secs_f64(32.0 / f64::from(r.max(1))));
                let started = Instant::now();
                let tasks: Vec<_> = (0..32)
                    .map(|_| {
                        let (client, stop, counts) =
                            (flooder.clone(), stop.clone(), counts.clone());
                        tokio::spawn(async move {
                            let mut next = tokio::time::Instant::now();
                            while !stop.load(Ordering::Relaxed) {
                                if let Some(pace) = pace {
                                    next += pace;
                                    tokio::time::sleep_until(next).await;
                                }
                                let req = CreateSessionRequest {
                                    wait_ms: Some(0),
                                    ..request()
                                };
                                let i = match client.create_session(&req).await {
                                    Ok(_) => 0,
                                    Err(e) if e.code() == Some(ErrorCode::Quota) => 1,
                                    Err(_) => 2,
                                };
                                counts[i].fetch_add(1, Ordering::Relaxed);
                            }
                        })
                    })
                    .collect();
                for t in tasks {
                    let _ = t.await;
                }
                Ok(started.elapsed())
            })
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut claims = histogram();
    for i in 0..warmup + samples {
        timed_claim(tenant, (i >= warmup).then_some(&mut claims)).await?;
    }
    stop.store(true, Ordering::Relaxed);
    let elapsed = flood
        .join()
        .map_err(|_| anyhow!("the flood thread panicked"))??;
    Ok(Flood {
        claims,
        counts: [0, 1, 2].map(|i| counts[i].load(Ordering::Relaxed)),
        elapsed,
    })
}
