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

const ACCOUNTS_CONF: &str = include_str!("../../../deploy/nats/accounts.conf");
const PERMISSIONS_CONF: &str = include_str!("../../../deploy/nats/permissions.conf");

/// Writes the accounts config (and a server file including it) into `dir`; the server file.
pub(super) fn write_accounts_config(dir: &Path) -> Result<PathBuf> {
    std::fs::write(dir.join("accounts.conf"), ACCOUNTS_CONF)?;
    std::fs::write(dir.join("permissions.conf"), PERMISSIONS_CONF)?;
    let server = dir.join("nats-accounts.conf");
    std::fs::write(
        &server,
        "max_payload: 8MB\njetstream {}\ninclude accounts.conf\n",
    )?;
    Ok(server)
}

/// The development password of `user` in the accounts config.
fn password(user: &str) -> Result<String> {
    let needle = format!("user: {user}, password: ");
    let start = ACCOUNTS_CONF
        .find(&needle)
        .ok_or_else(|| anyhow!("no user {user} in accounts.conf"))?
        + needle.len();
    Ok(ACCOUNTS_CONF[start..]
        .split([',', ' ', '}'])
        .next()
        .unwrap_or_default()
        .to_owned())
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
    // Phase 1: operator and tenant-a interleaved; phase 2: tenant-a under the flood.
    let needed = 2 * (warmup + samples) + warmup + samples + 16;
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
    let flooder = client_as(&stack.url, "tenant-b").await?;
    wait_ready(&operator, "default", needed - 16).await?;

    let (mut as_operator, mut as_tenant) = (histogram(), histogram());
    for i in 0..warmup + samples {
        let measured = i >= warmup;
        timed_claim(&operator, measured.then_some(&mut as_operator)).await?;
        timed_claim(&tenant, measured.then_some(&mut as_tenant)).await?;
    }

    // Phase 2: tenant-b floods creates with 32 executors while tenant-a claims.
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, refused, other) = (
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
    );
    let flood_started = Instant::now();
    let floods: Vec<_> = (0..32)
        .map(|_| {
            let (client, stop, ok, refused, other) = (
                flooder.clone(),
                stop.clone(),
                ok.clone(),
                refused.clone(),
                other.clone(),
            );
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let req = CreateSessionRequest {
                        wait_ms: Some(0),
                        ..request()
                    };
                    match client.create_session(&req).await {
                        Ok(_) => ok.fetch_add(1, Ordering::Relaxed),
                        Err(e) if e.code() == Some(ErrorCode::Quota) => {
                            refused.fetch_add(1, Ordering::Relaxed)
                        }
                        Err(_) => other.fetch_add(1, Ordering::Relaxed),
                    };
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut under_flood = histogram();
    for i in 0..warmup + samples {
        timed_claim(&tenant, (i >= warmup).then_some(&mut under_flood)).await?;
    }
    stop.store(true, Ordering::Relaxed);
    let flood_elapsed = flood_started.elapsed();
    for f in floods {
        let _ = f.await;
    }
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
    r.latency("tenant_claim_under_flood", &under_flood);
    r.ratio(
        "under_flood_to_unloaded_p99",
        under_flood.value_at_quantile(0.99) as f64,
        as_tenant.value_at_quantile(0.99) as f64,
    );
    let requests = ok.load(Ordering::Relaxed)
        + refused.load(Ordering::Relaxed)
        + other.load(Ordering::Relaxed);
    let rate = requests as f64 / flood_elapsed.as_secs_f64();
    r.field(
        "flood_requests_per_s",
        json!(rate.round()),
        Some(format!(
            "{rate:.0}/s from 32 executors of tenant-b ({} created, {} refused 429, {} other)",
            ok.load(Ordering::Relaxed),
            refused.load(Ordering::Relaxed),
            other.load(Ordering::Relaxed)
        )),
    );
    r.field(
        "flood_refused",
        json!(refused.load(Ordering::Relaxed)),
        None,
    );
    r.field("flood_created", json!(ok.load(Ordering::Relaxed)), None);
    Ok(r)
}
