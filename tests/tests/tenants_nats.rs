//! Tenants for real: nats-server runs deploy/nats/single.conf unchanged (the service account HEARTH
//! exporting the API, accounts tenant-a and tenant-b importing it), the scheduler and worker
//! binaries log in with their roles, and executors log in as tenants.
//!
//! Tenant B tries everything against tenant A's session and template — by id, by listing, by
//! listening to its own `_INBOX.>` and events, by spoofing `Nats-Request-Info` — and gets 404 or
//! nothing; A works as before; the operator (a user of the service account) sees both. Quotas are
//! enforced through the imports (429, 400 for absurd pool sizes).

mod common;

use std::time::Duration;

use common::{Stack, connect_as};
use futures::StreamExt;
use hearth_messages::*;

fn id<T: TryFrom<String>>(s: impl Into<String>) -> T
where
    T::Error: std::fmt::Debug,
{
    T::try_from(s.into()).unwrap()
}

const CONFIG: &str = r#"
# A deleted template's snapshot is kept for a restore timeout + claim wait (cold claims that read
# it before the delete), then deleted everywhere.
[jobs]
restore_timeout_ms = 5000

[[templates]]
name = "default"
min_ready = 2
max_ready = 3

[tenants.quotas.tenant-b]
max_sessions = 2
creates_per_s = 1
create_burst = 3
max_templates = 1
max_ready_per_template = 1
max_ready_total = 1
"#;

fn code(err: &ClientError) -> Option<ErrorCode> {
    err.code()
}

async fn nothing_arrives(sub: &mut async_nats::Subscriber, what: &str) {
    if let Ok(Some(msg)) = tokio::time::timeout(Duration::from_millis(500), sub.next()).await {
        panic!(
            "{what}: {} must not have been delivered ({:?})",
            msg.subject, msg.payload
        );
    }
}

#[tokio::test]
async fn tenant_b_cannot_see_or_touch_tenant_a() {
    let stack = Stack::start_with_accounts(&["worker-1"], CONFIG).await;
    let url = stack.nats.url().to_owned();
    stack
        .wait_pool("default", Duration::from_secs(60), |p| p.ready >= 2)
        .await;
    let a = &stack.client;
    let a_nats = connect_as(&url, "tenant-a").await;
    let b_nats = connect_as(&url, "tenant-b").await;
    let b = HearthClient::new(b_nats.clone());
    let operator = HearthClient::new(connect_as(&url, "operator").await);
    let mut a_events = a_nats
        .subscribe("hearth.v1.events.sessions.*")
        .await
        .unwrap();
    let mut b_events = b_nats
        .subscribe("hearth.v1.events.sessions.*")
        .await
        .unwrap();
    b_nats.flush().await.unwrap();
    a_nats.flush().await.unwrap();

    // A's session, with a secret in a file and in memory of its output.
    let sid: SessionId = id("a-secret-session");
    let session = a
        .create_session(&CreateSessionRequest {
            session_id: Some(sid.clone()),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(session.tenant, Some(id("tenant-a")));
    a.put_file(&sid, "secret.txt", b"secret-a".to_vec(), None)
        .await
        .unwrap();
    let event = tokio::time::timeout(Duration::from_secs(5), a_events.next())
        .await
        .expect("tenant-a sees its own session's event")
        .unwrap();
    assert_eq!(
        event.subject.as_str(),
        "hearth.v1.events.sessions.a-secret-session"
    );

    // B, by id: every operation is 404, as for an id that never existed.
    let unknown: SessionId = id("never-existed");
    // A's session answers 404 everywhere. (The data plane of an id no worker serves has no
    // responders at all, so there only the control plane can be compared; session ids carry 74
    // random bits, so existence is not guessable.)
    let expect_404 =
        |what: &str, data_plane: bool, a_session: bool, r: Result<(), ClientError>| match r {
            Err(e) if code(&e) == Some(ErrorCode::NotFound) => {}
            Err(ClientError::NoResponders { .. }) if data_plane && !a_session => {}
            other => panic!("{what}: expected 404, got {other:?}"),
        };
    for target in [&sid, &unknown] {
        let mine = target == &sid;
        let message_of = |r: Result<Session, ClientError>| r.unwrap_err().to_string();
        let theirs = message_of(b.get_session(target).await);
        assert!(theirs.contains("unknown session"), "{theirs}");
        expect_404("get", false, mine, b.get_session(target).await.map(|_| ()));
        expect_404(
            "keepalive",
            false,
            mine,
            b.keepalive(target, Some(60)).await.map(|_| ()),
        );
        expect_404("release", false, mine, b.release(target).await.map(|_| ()));
        expect_404(
            "snapshot",
            false,
            mine,
            b.snapshot_session(target, id("b-steals"), None)
                .await
                .map(|_| ()),
        );
        expect_404(
            "exec",
            true,
            mine,
            b.exec(target, &ExecRequest::cmd("cat secret.txt"))
                .await
                .map(|_| ()),
        );
        expect_404(
            "files.get",
            true,
            mine,
            b.get_file(target, "secret.txt").await.map(|_| ()),
        );
        expect_404(
            "files.put",
            true,
            mine,
            b.put_file(target, "planted.txt", b"x".to_vec(), None)
                .await
                .map(|_| ()),
        );
        let first = b
            .exec_stream(target, &ExecRequest::cmd("cat secret.txt"))
            .await;
        let first = match first {
            Err(e) => Err(e),
            Ok(stream) => match Box::pin(stream).next().await {
                Some(Err(e)) => Err(e),
                other => panic!("streamed exec into another tenant's session: {other:?}"),
            },
        };
        expect_404("exec_stream", true, mine, first);
    }
    // The same messages for A's id and one that never existed: nothing tells them apart.
    let m1 = b.get_session(&sid).await.unwrap_err().to_string();
    let m2 = b.get_session(&unknown).await.unwrap_err().to_string();
    assert_eq!(
        m1.replace(sid.as_str(), "X"),
        m2.replace(unknown.as_str(), "X")
    );
    // B cannot take over A's id with a create either.
    let err = b
        .create_session(&CreateSessionRequest {
            session_id: Some(sid.clone()),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(code(&err), Some(ErrorCode::Conflict), "{err}");
    assert!(!err.to_string().contains("default"), "{err}");
    // A spoofed Nats-Request-Info naming tenant-a is overwritten by the server.
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Nats-Request-Info", r#"{"acc":"tenant-a"}"#);
    let reply = b_nats
        .request_with_headers(
            Subjects::default().session(&sid, SessionOp::Get),
            headers,
            "".into(),
        )
        .await
        .unwrap();
    assert_eq!(
        reply
            .headers
            .as_ref()
            .and_then(|h| h.get("Nats-Service-Error-Code"))
            .map(|v| v.as_str()),
        Some("404")
    );
    // B lists nothing of A's.
    assert!(
        b.list_sessions(&ListSessionsRequest::default())
            .await
            .unwrap()
            .is_empty()
    );

    // A's template: invisible and unusable for B.
    let template = a
        .snapshot_session(&sid, id("a-template"), None)
        .await
        .unwrap();
    assert_eq!(template.tenant, Some(id("tenant-a")));
    let b_templates = b.list_templates().await.unwrap();
    assert!(
        b_templates.iter().all(|t| t.name.as_str() != "a-template"),
        "{b_templates:?}"
    );
    assert!(b_templates.iter().any(|t| t.name.as_str() == "default"));
    let b_pools = b.pool_status().await.unwrap();
    assert!(
        b_pools
            .pools
            .iter()
            .all(|p| p.template.as_str() != "a-template")
    );
    let err = b
        .create_session(&CreateSessionRequest {
            template: Some(id("a-template")),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(code(&err), Some(ErrorCode::NotFound), "{err}");
    let err = b
        .delete_template(&id("a-template"), true)
        .await
        .unwrap_err();
    assert_eq!(code(&err), Some(ErrorCode::NotFound), "{err}");
    // The operator's template is visible to B but not B's to delete.
    let err = b.delete_template(&id("default"), false).await.unwrap_err();
    assert_eq!(code(&err), Some(ErrorCode::Conflict), "{err}");
    // Admin endpoints are not exported to tenants at all.
    // (A tenant's users may not even publish there; with another account's permissions the
    // request would find no responder.)
    let err = b
        .request::<_, QuotasStatus>(
            Subjects::default().admin_quotas_get(),
            &Empty {},
            Duration::from_secs(1),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            ClientError::NoResponders { .. } | ClientError::Timeout { .. }
        ),
        "{err:?}"
    );

    // Everything B can listen to stays silent while A works.
    let mut b_inbox = b_nats.subscribe("_INBOX.>").await.unwrap();
    b_nats.flush().await.unwrap();
    let streamed: Vec<ExecEvent> = a
        .exec_stream(&sid, &ExecRequest::cmd("cat secret.txt; echo; echo more"))
        .await
        .unwrap()
        .map(|e| e.unwrap())
        .collect()
        .await;
    assert!(matches!(streamed.last(), Some(ExecEvent::Done(r)) if r.exit_code == 0));
    let r = a
        .exec(&sid, &ExecRequest::cmd("cat secret.txt"))
        .await
        .unwrap();
    assert_eq!(r.stdout.as_bytes(), b"secret-a");
    a.keepalive(&sid, Some(120)).await.unwrap();
    nothing_arrives(&mut b_inbox, "tenant-b's _INBOX.>").await;
    nothing_arrives(&mut b_events, "tenant-b's events").await;

    // The operator sees every tenant's sessions and can act on them.
    let b_session = b
        .create_session(&CreateSessionRequest::default())
        .await
        .unwrap();
    assert_eq!(b_session.tenant, Some(id("tenant-b")));
    let all = operator
        .list_sessions(&ListSessionsRequest::default())
        .await
        .unwrap();
    for s in [&sid, &b_session.session_id] {
        assert!(all.iter().any(|x| &x.session_id == s), "{all:?}");
    }
    assert_eq!(
        operator.get_session(&sid).await.unwrap().tenant,
        Some(id("tenant-a"))
    );
    // A cannot see B's either.
    assert_eq!(
        code(&a.get_session(&b_session.session_id).await.unwrap_err()),
        Some(ErrorCode::NotFound)
    );

    // A deletes its template (its source session is not made from it, so no force needed).
    let deleting = a.delete_template(&id("a-template"), false).await.unwrap();
    assert!(deleting.deleting);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let names: Vec<_> = operator
            .list_templates()
            .await
            .unwrap()
            .into_iter()
            .map(|t| t.name)
            .collect();
        if !names.iter().any(|n| n.as_str() == "a-template") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "a-template still there: {names:?}\n{}",
            stack.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    a.release(&sid).await.unwrap();
}

#[tokio::test]
async fn tenant_quotas_hold_through_the_imports() {
    let stack = Stack::start_with_accounts(&["worker-1"], CONFIG).await;
    let url = stack.nats.url().to_owned();
    stack
        .wait_pool("default", Duration::from_secs(60), |p| p.ready >= 2)
        .await;
    let b = HearthClient::new(connect_as(&url, "tenant-b").await);
    let operator = HearthClient::new(connect_as(&url, "operator").await);
    let req = || CreateSessionRequest {
        wait_ms: Some(20_000),
        ..Default::default()
    };

    // Live sessions: 2, then 429 (no retry hint: waiting does not help, releasing does).
    let s1 = b.create_session(&req()).await.unwrap();
    let s2 = b.create_session(&req()).await.unwrap();
    let err = b.create_session(&req()).await.unwrap_err();
    assert_eq!(code(&err), Some(ErrorCode::Quota), "{err}");
    // Tenant A is not affected by B's quota.
    let a_session = stack.client.create_session(&req()).await.unwrap();
    stack.client.release(&a_session.session_id).await.unwrap();

    // Absurd pool sizes: 400 at the global cap, 429 over the tenant's.
    let huge = SnapshotSessionRequest {
        template: id("b-huge"),
        min_ready: Some(100_000),
        max_ready: None,
    };
    let raw: Result<Template, _> = b
        .request(
            Subjects::default().session(&s1.session_id, SessionOp::Snapshot),
            &huge,
            Duration::from_secs(10),
        )
        .await;
    assert_eq!(code(&raw.unwrap_err()), Some(ErrorCode::BadRequest));
    let err = b
        .snapshot_session(&s1.session_id, id("b-two"), Some(2))
        .await
        .unwrap_err();
    assert_eq!(code(&err), Some(ErrorCode::Quota), "{err}");
    // Within quota: one template, one warm VM; then the template count is reached.
    b.snapshot_session(&s1.session_id, id("b-one"), Some(1))
        .await
        .unwrap();
    let err = b
        .snapshot_session(&s1.session_id, id("b-again"), None)
        .await
        .unwrap_err();
    assert_eq!(code(&err), Some(ErrorCode::Quota), "{err}");

    // The operator raises B's session quota at run time; it holds at once.
    let mut quota = operator
        .quotas()
        .await
        .unwrap()
        .tenants
        .into_iter()
        .find(|t| t.tenant.as_str() == "tenant-b")
        .expect("tenant-b is configured")
        .quota;
    assert_eq!(quota.max_sessions, 2);
    quota.max_sessions = 3;
    operator
        .set_quota(id("tenant-b"), Some(quota))
        .await
        .unwrap();
    // The create rate (1/s, burst 3) was spent by the creates above: wait for a token.
    let s3 = loop {
        match b.create_session(&req()).await {
            Ok(s) => break s,
            Err(e) if code(&e) == Some(ErrorCode::Quota) && e.retry_after().is_some() => {
                tokio::time::sleep(e.retry_after().unwrap()).await;
            }
            Err(e) => panic!("{e}"),
        }
    };
    for s in [&s1, &s2, &s3] {
        b.release(&s.session_id).await.unwrap();
    }
    // An invalid quota is refused and changes nothing.
    quota.max_fleet_share_pct = 500;
    let err = operator
        .set_quota(id("tenant-b"), Some(quota))
        .await
        .unwrap_err();
    assert_eq!(code(&err), Some(ErrorCode::BadRequest), "{err}");
}

/// A Python with nats-py and msgpack: the project's venv (scripts/setup.sh), else none.
fn python() -> Option<std::path::PathBuf> {
    let venv = hearth_testkit::workspace_root().join(".tools/venv/bin/python");
    let ok = std::process::Command::new(&venv)
        .args(["-c", "import nats, msgpack"])
        .output()
        .is_ok_and(|o| o.status.success());
    ok.then_some(venv)
}

#[tokio::test]
async fn the_cli_and_the_python_example_work_as_a_tenant_unchanged() {
    let stack = Stack::start_with_accounts(&["worker-1"], CONFIG).await;
    stack
        .wait_pool("default", Duration::from_secs(60), |p| p.ready >= 2)
        .await;
    let port = stack.nats.port();
    // The Python example of docs/PROTOCOL.md, with tenant credentials in its URL.
    match python() {
        Some(python) => {
            let url = format!(
                "nats://tenant-a:{}@127.0.0.1:{port}",
                common::password("tenant-a")
            );
            let out = tokio::process::Command::new(python)
                .arg(hearth_testkit::workspace_root().join("docs/examples/hearth_example.py"))
                .args(["--url", &url])
                .output()
                .await
                .unwrap();
            let stdout = String::from_utf8_lossy(&out.stdout);
            assert!(
                out.status.success(),
                "example failed as tenant-a:\n{stdout}\n{}\n{}",
                String::from_utf8_lossy(&out.stderr),
                stack.logs()
            );
            assert!(stdout.trim_end().ends_with("OK"), "{stdout}");
        }
        None => println!("SKIP python example: no .tools/venv with nats-py and msgpack"),
    }
    // The CLI, logged in as tenant-b through its usual variables: its session is its own.
    let cli = |user: &str, args: &[&str]| {
        let mut cmd = std::process::Command::new(hearth_testkit::workspace_bin("hearth").unwrap());
        cmd.args(["--nats-url", stack.nats.url()])
            .args(args)
            .env("HEARTH_NATS_USER", user)
            .env("HEARTH_NATS_PASSWORD", common::password(user));
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "hearth {args:?} as {user}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let created = cli("tenant-b", &["session", "create"]);
    let session: Session = serde_json::from_str(&created).expect("session JSON");
    assert_eq!(session.tenant, Some(id("tenant-b")));
    let sid = session.session_id.to_string();
    let out = cli("tenant-b", &["exec", &sid, "--", "echo", "from-b"]);
    assert!(out.contains("from-b"), "{out}");
    let theirs = cli("tenant-a", &["session", "list"]);
    assert!(
        !theirs.contains(&sid),
        "tenant-a lists tenant-b's session: {theirs}"
    );
    cli("tenant-b", &["session", "release", &sid]);
}
