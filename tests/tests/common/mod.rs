//! A whole Hearth stack as real processes for end-to-end tests: one nats-server, the
//! `hearth-scheduler` binary and any number of `hearth-worker` binaries (process provider, or the
//! one [`Stack::start_with_worker_args`] names), each with its own data directory and log file.

#![allow(dead_code)]

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use std::collections::BTreeMap;

use futures::StreamExt;
use hearth_messages::*;
use hearth_testkit::{ChildProcess, NatsServer, workspace_bin, workspace_root};

/// The development password of `user` in deploy/nats/accounts.conf.
pub fn password(user: &str) -> String {
    hearth_natsd::accounts::password(user).unwrap()
}

/// A client logged in as `user` of deploy/nats/accounts.conf.
pub async fn connect_as(url: &str, user: &str) -> async_nats::Client {
    async_nats::ConnectOptions::with_user_and_password(user.into(), password(user))
        .connect(url)
        .await
        .unwrap_or_else(|e| panic!("connecting as {user}: {e}"))
}

/// A template whose bootstrap leaves a marker, pooled 2–4 ready.
pub const DEFAULT_TEMPLATE: &str = r#"
[[templates]]
name = "default"
min_ready = 2
max_ready = 4
bootstrap = ["sh", "-c", "echo built-once > .template-marker"]
"#;

/// Scheduler settings tuned for tests: fast heartbeats, reconcile and lease.
pub const FAST_SCHEDULER: &str = r#"
heartbeat_timeout_ms = 1500
reconcile_interval_ms = 300
lifecycle_interval_ms = 200
vm_missing_grace_ms = 1000
leak_grace_ms = 2000
lease_ttl_ms = 2000
claim_wait_ms = 10000
"#;

pub struct Stack {
    pub nats: NatsServer,
    pub dir: tempfile::TempDir,
    pub scheduler: Option<ChildProcess>,
    pub workers: Vec<(String, ChildProcess)>,
    pub client: HearthClient,
    scheduler_config: PathBuf,
    /// Running deploy/nats/single.conf (service account + tenants): the binaries log in with
    /// their role's user, `client` is tenant-a's.
    accounts: bool,
    /// Added to every worker's command line (e.g. `--provider oci`).
    worker_args: Vec<String>,
}

impl Stack {
    /// nats-server, a scheduler with `scheduler_toml` (appended to [`FAST_SCHEDULER`]) and the
    /// named workers.
    pub async fn start(workers: &[&str], scheduler_toml: &str) -> Stack {
        Stack::start_with_worker_args(workers, scheduler_toml, &[]).await
    }

    /// [`start`](Self::start) with `worker_args` added to every worker's command line.
    pub async fn start_with_worker_args(
        workers: &[&str],
        scheduler_toml: &str,
        worker_args: &[&str],
    ) -> Stack {
        let nats = NatsServer::builder()
            .config("max_payload: 8MB\n")
            .start()
            .expect("nats-server");
        let client = HearthClient::new(nats.connect().await.unwrap());
        let worker_args = worker_args.iter().map(|a| (*a).to_owned()).collect();
        Stack::start_on(nats, client, false, workers, scheduler_toml, worker_args)
    }

    /// The same stack on nats-server running deploy/nats/single.conf unchanged (accounts:
    /// HEARTH for the services, tenant-a and tenant-b importing the API): the scheduler logs in as
    /// `scheduler`, worker `worker-N` as itself, and `client` is tenant-a's `executor`.
    pub async fn start_with_accounts(workers: &[&str], scheduler_toml: &str) -> Stack {
        Stack::start_with_accounts_and_worker_args(workers, scheduler_toml, &[]).await
    }

    /// [`start_with_accounts`](Self::start_with_accounts) with `worker_args` added to every
    /// worker's command line.
    pub async fn start_with_accounts_and_worker_args(
        workers: &[&str],
        scheduler_toml: &str,
        worker_args: &[&str],
    ) -> Stack {
        let conf = workspace_root().join("deploy/nats/single.conf");
        let nats = NatsServer::builder()
            .arg("-c")
            .arg(conf.display().to_string())
            .arg("-m")
            .arg("-1")
            .start()
            .expect("nats-server with deploy/nats/single.conf");
        let client = HearthClient::new(connect_as(nats.url(), "executor").await);
        let worker_args = worker_args.iter().map(|a| (*a).to_owned()).collect();
        Stack::start_on(nats, client, true, workers, scheduler_toml, worker_args)
    }

    fn start_on(
        nats: NatsServer,
        client: HearthClient,
        accounts: bool,
        workers: &[&str],
        scheduler_toml: &str,
        worker_args: Vec<String>,
    ) -> Stack {
        let dir = tempfile::tempdir().unwrap();
        let scheduler_config = dir.path().join("scheduler.toml");
        std::fs::write(
            &scheduler_config,
            format!("{FAST_SCHEDULER}\n{scheduler_toml}"),
        )
        .unwrap();
        let mut stack = Stack {
            nats,
            dir,
            scheduler: None,
            workers: Vec::new(),
            client,
            scheduler_config,
            accounts,
            worker_args,
        };
        for w in workers {
            stack.add_worker(w, 32);
        }
        stack.scheduler = Some(stack.spawn_scheduler("s1"));
        stack
    }

    /// Logs a binary in as `user` when the stack runs the accounts config.
    fn login(&self, cmd: &mut Command, user: &str) {
        if self.accounts {
            cmd.env("HEARTH_NATS_USER", user)
                .env("HEARTH_NATS_PASSWORD", password(user));
        }
    }

    pub fn spawn_scheduler(&self, id: &str) -> ChildProcess {
        let mut cmd = Command::new(workspace_bin("hearth-scheduler").unwrap());
        cmd.args(["--nats-url", self.nats.url(), "--scheduler-id", id])
            .args(["--metrics-listen", "off"])
            .arg("--config")
            .arg(&self.scheduler_config)
            .env("RUST_LOG", "info");
        self.login(&mut cmd, "scheduler");
        ChildProcess::spawn(&format!("scheduler-{id}"), cmd, self.dir.path()).unwrap()
    }

    pub fn spawn_worker(&self, id: &str, max_vms: u32) -> ChildProcess {
        let mut cmd = Command::new(workspace_bin("hearth-worker").unwrap());
        cmd.args(["--nats-url", self.nats.url(), "--worker-id", id])
            .args(["--metrics-listen", "off", "--heartbeat-ms", "200"])
            .args(["--max-vms", &max_vms.to_string()])
            .arg("--data-dir")
            .arg(self.dir.path().join(id))
            .args(&self.worker_args)
            .env("RUST_LOG", "info");
        self.login(&mut cmd, id);
        ChildProcess::spawn(&format!("worker-{id}"), cmd, self.dir.path()).unwrap()
    }

    pub fn add_worker(&mut self, id: &str, max_vms: u32) {
        let child = self.spawn_worker(id, max_vms);
        self.workers.push((id.to_owned(), child));
    }

    pub fn worker(&mut self, id: &str) -> &mut ChildProcess {
        &mut self
            .workers
            .iter_mut()
            .find(|(w, _)| w == id)
            .expect("known worker")
            .1
    }

    /// Everything the processes logged, for failure messages.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        if let Some(s) = &self.scheduler {
            out.push_str(&format!("--- scheduler\n{}\n", tail(&s.log())));
        }
        for (id, w) in &self.workers {
            out.push_str(&format!("--- worker {id}\n{}\n", tail(&w.log())));
        }
        out
    }

    /// Waits until `template`'s pool satisfies `ok`.
    pub async fn wait_pool(
        &self,
        template: &str,
        timeout: Duration,
        ok: impl Fn(&PoolStatus) -> bool,
    ) -> PoolStatus {
        let template = TemplateName::new(template).unwrap();
        let deadline = Instant::now() + timeout;
        let mut last = None;
        while Instant::now() < deadline {
            if let Ok(status) = self.client.pool_status().await
                && let Some(pool) = status.pools.into_iter().find(|p| p.template == template)
            {
                if ok(&pool) {
                    return pool;
                }
                last = Some(pool);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!(
            "pool {template} never got there; last {last:?}\n{}",
            self.logs()
        );
    }
}

fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

/// The executor flow on a stack whose `default` template is [`DEFAULT_TEMPLATE`]: a warm claim,
/// exec (plain and streamed), files, listing by label, idempotent create, keepalive, release,
/// caller errors, and the pool refilling.
pub async fn executor_flow(stack: &Stack, worker: &str) {
    let c = &stack.client;
    stack
        .wait_pool("default", Duration::from_secs(30), |p| p.ready >= 2)
        .await;

    let session = c
        .create_session(&CreateSessionRequest {
            labels: BTreeMap::from([("agent".into(), "e2e".into())]),
            ttl_s: Some(60),
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(session.warm, "{session:?}");
    assert_eq!(session.state, SessionState::Running);
    assert_eq!(session.worker_id.as_str(), worker);
    let sid = session.session_id.clone();

    // The template's bootstrap ran once, before the snapshot the pool restores from.
    let r = c
        .exec(
            &sid,
            &ExecRequest::cmd("cat .template-marker; echo $((6*7))"),
        )
        .await
        .unwrap();
    assert_eq!(r.stdout.as_bytes(), b"built-once\n42\n", "{r:?}");

    c.put_file(&sid, "in/data.txt", b"payload".to_vec(), None)
        .await
        .unwrap();
    let r = c
        .exec(&sid, &ExecRequest::argv(["cat", "in/data.txt"]))
        .await
        .unwrap();
    assert_eq!(r.stdout.as_bytes(), b"payload");
    assert_eq!(c.get_file(&sid, "in/data.txt").await.unwrap(), b"payload");

    let streamed: Vec<ExecEvent> = c
        .exec_stream(&sid, &ExecRequest::cmd("echo a; echo b"))
        .await
        .unwrap()
        .map(|e| e.unwrap())
        .collect()
        .await;
    assert!(matches!(streamed.last(), Some(ExecEvent::Done(r)) if r.exit_code == 0));

    // Listing and labels.
    let listed = c
        .list_sessions(&ListSessionsRequest {
            labels: BTreeMap::from([("agent".into(), "e2e".into())]),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(listed.len(), 1);

    // Idempotent create: the same id returns the same session.
    let again = c
        .create_session(&CreateSessionRequest {
            session_id: Some(sid.clone()),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(again.session_id, sid);
    assert_eq!(again.created_ms, session.created_ms);

    let kept = c.keepalive(&sid, Some(600)).await.unwrap();
    assert!(kept.expires_ms > session.expires_ms);

    let released = c.release(&sid).await.unwrap();
    assert_eq!(released.state, SessionState::Released);
    assert_eq!(
        c.release(&sid).await.unwrap().state,
        SessionState::Released,
        "release is idempotent"
    );
    assert_eq!(
        c.get_session(&sid).await.unwrap().state,
        SessionState::Released
    );
    let err = c.exec(&sid, &ExecRequest::cmd("true")).await.unwrap_err();
    assert!(
        err.code() == Some(ErrorCode::Conflict) || matches!(err, ClientError::NoResponders { .. }),
        "{err:?}"
    );

    // Caller errors.
    let err = c
        .create_session(&CreateSessionRequest {
            template: Some(TemplateName::new("nope").unwrap()),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::NotFound));
    let err = c
        .get_session(&SessionId::new("never-was").unwrap())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::NotFound));

    // The pool refills after the claim.
    stack
        .wait_pool("default", Duration::from_secs(20), |p| p.ready >= 2)
        .await;
}
