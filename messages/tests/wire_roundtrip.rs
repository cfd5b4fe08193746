//! Every message type of the v1 contract through a real nats-server, in MessagePack and JSON, and
//! what malformed payloads turn into (a 400 reply, never a panic). Also the client's error mapping
//! and the exec streaming protocol, against a responder written here by hand from PROTOCOL.md.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::time::Duration;

use async_nats::HeaderMap;
use futures::StreamExt;
use hearth_messages::codec::{CONTENT_TYPE_HEADER, JSON_CONTENT_TYPE};
use hearth_messages::data::{CHUNK_HEADER, CHUNK_STDERR, CHUNK_STDOUT};
use hearth_messages::error::{SERVICE_ERROR_CODE_HEADER, SERVICE_ERROR_HEADER};
use hearth_messages::transport::{self, Reply, decode_message};
use hearth_messages::*;
use hearth_testkit::NatsServer;
use serde::Serialize;
use serde::de::DeserializeOwned;

fn id<T: TryFrom<&'static str>>(s: &'static str) -> T
where
    T::Error: Debug,
{
    T::try_from(s).unwrap()
}

fn session() -> Session {
    Session {
        session_id: id("s-1"),
        template: id("default"),
        state: SessionState::Running,
        worker_id: id("w1"),
        warm: true,
        created_ms: 1_700_000_000_000,
        expires_ms: 1_700_000_600_000,
        last_used_ms: 1_700_000_000_001,
        labels: BTreeMap::from([("team".into(), "agents".into())]),
        isolation: Some(isolation()),
        tenant: Some(id("tenant-a")),
        paused_ms: Some(1_700_000_000_002),
        resumed_ms: Some(1_700_000_000_003),
        pause_uploaded: true,
        pause_upload_bytes: 94_000_000,
        unplaced: true,
        detail: Some("worker w1 lost".into()),
    }
}

fn isolation() -> IsolationReport {
    IsolationReport {
        mode: "sandbox".into(),
        limits: "cgroup_v1".into(),
        disk: "loop_ext4".into(),
    }
}

fn vm_info() -> VmInfo {
    VmInfo {
        vm_id: id("pool-default-1"),
        state: VmState::Running,
        template: Some(id("default")),
        session: false,
        created_ms: 1,
        last_activity_ms: 2,
        restored_from: Some(id("snap-1")),
        busy: true,
        notes: vec!["nix_profile not hydrated".into()],
    }
}

/// Starts an echo service on `subject` that decodes a `T` and replies with it re-encoded in the
/// request's encoding (or with the decode error).
async fn echo<T: DeserializeOwned + Serialize + Send + 'static>(
    client: &async_nats::Client,
    subject: &str,
) {
    let mut sub = client.subscribe(subject.to_owned()).await.unwrap();
    let responder = client.clone();
    tokio::spawn(async move {
        while let Some(msg) = sub.next().await {
            let (encoding, request) = decode_message::<T>(&msg);
            let reply = Reply::from_result(encoding, &request);
            if let Some(to) = msg.reply.clone() {
                reply.send(&responder, to).await.unwrap();
            }
        }
    });
    client.flush().await.unwrap();
}

fn next_subject() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    format!("echo.t{}", N.fetch_add(1, Ordering::Relaxed))
}

async fn roundtrip<T>(client: &async_nats::Client, value: T)
where
    T: DeserializeOwned + Serialize + PartialEq + Debug + Send + 'static,
{
    let subject = next_subject();
    echo::<T>(client, &subject).await;
    for encoding in [Encoding::MsgPack, Encoding::Json] {
        let mut headers = HeaderMap::new();
        if encoding == Encoding::Json {
            headers.insert(CONTENT_TYPE_HEADER, JSON_CONTENT_TYPE);
        }
        let payload = encoding.encode(&value).unwrap();
        let reply = client
            .request_with_headers(subject.clone(), headers, payload.into())
            .await
            .unwrap();
        let reply_encoding = transport::encoding_of(reply.headers.as_ref());
        assert_eq!(
            reply_encoding, encoding,
            "answered in the request's encoding"
        );
        let back: T = transport::decode_reply(&reply).unwrap();
        assert_eq!(
            back,
            value,
            "{encoding:?} round trip of {}",
            std::any::type_name::<T>()
        );
    }
}

#[tokio::test]
async fn every_message_type_round_trips_in_msgpack_and_json() {
    let server = NatsServer::start().unwrap();
    let c = server.connect().await.unwrap();

    roundtrip(
        &c,
        CreateSessionRequest {
            template: Some(id("py")),
            session_id: Some(id("s-1")),
            ttl_s: Some(600),
            idle_timeout_s: Some(60),
            labels: BTreeMap::from([("k".into(), "v".into())]),
            wait_ms: Some(2000),
        },
    )
    .await;
    roundtrip(&c, CreateSessionRequest::default()).await;
    roundtrip(
        &c,
        ListSessionsRequest {
            template: Some(id("default")),
            labels: BTreeMap::from([("k".into(), "v".into())]),
        },
    )
    .await;
    roundtrip(&c, session()).await;
    roundtrip(
        &c,
        SessionList {
            sessions: vec![session(), session()],
        },
    )
    .await;
    roundtrip(&c, Empty {}).await;
    roundtrip(&c, KeepaliveRequest { ttl_s: Some(30) }).await;
    roundtrip(
        &c,
        SnapshotSessionRequest {
            template: id("mine"),
            min_ready: Some(2),
            max_ready: Some(3),
        },
    )
    .await;
    let template = Template {
        name: id("default"),
        snapshot_id: Some(id("snap-1")),
        source_session: None,
        min_ready: 4,
        max_ready: 8,
        vcpus: 1,
        memory_mib: 256,
        disk_mib: 1024,
        max_processes: 64,
        network: Some("egress".into()),
        created_ms: 5,
        tenant: Some(id("tenant-a")),
        snapshot_bytes: 4096,
        deleting: true,
        notes: vec!["built".into()],
    };
    roundtrip(&c, template.clone()).await;
    roundtrip(
        &c,
        TemplateList {
            templates: vec![template],
        },
    )
    .await;
    roundtrip(
        &c,
        PoolsStatus {
            pools: vec![PoolStatus {
                template: id("default"),
                ready: 3,
                restoring: 1,
                target: 4,
                claimed: 7,
                isolation: vec![isolation()],
            }],
        },
    )
    .await;
    roundtrip(
        &c,
        ExecRequest {
            env: BTreeMap::from([("A".into(), "1".into())]),
            cwd: Some("sub/dir".into()),
            stdin: Some(Blob(vec![0, 1, 2, 255])),
            timeout_ms: Some(5000),
            max_output_bytes: Some(4096),
            stream: true,
            ..ExecRequest::argv(["ls", "-la"])
        },
    )
    .await;
    roundtrip(&c, ExecRequest::cmd("echo hi | tr a-z A-Z")).await;
    roundtrip(
        &c,
        ExecResult {
            exit_code: 137,
            signal: Some(9),
            stdout: Blob::from("out\n"),
            stderr: Blob(vec![0xff, 0xfe, 0x00]),
            stdout_truncated: true,
            stderr_truncated: false,
            timed_out: true,
            duration_ms: 1234,
            oom_killed: true,
        },
    )
    .await;
    roundtrip(
        &c,
        FilePutRequest {
            path: "a/b.txt".into(),
            data: Blob(vec![1, 2, 3, 0xff]),
            mode: Some(0o755),
        },
    )
    .await;
    roundtrip(&c, FilePutResult { size: 4 }).await;
    roundtrip(
        &c,
        FileGetRequest {
            path: "a/b.txt".into(),
            max_bytes: Some(10),
        },
    )
    .await;
    roundtrip(
        &c,
        FileGetResult {
            data: Blob::from("content"),
            size: 7,
        },
    )
    .await;
    let spec = VmSpec {
        template: Some(id("default")),
        vcpus: Some(2),
        memory_mib: Some(512),
        disk_mib: Some(2048),
        max_processes: Some(100),
        network: Some("none".into()),
        env: BTreeMap::from([("X".into(), "y".into())]),
        base: Some("/srv/base.tar.zst".into()),
        bootstrap: Some(vec!["sh".into(), "-c".into(), "echo boot".into()]),
        restore_from: Some(id("snap-1")),
        nix_profile: Some("github:owner/repo".into()),
    };
    let ops = vec![
        JobOp::CreateVm {
            vm_id: id("v1"),
            session: true,
        },
        JobOp::CreateVmWithSpec {
            vm_id: id("v1"),
            spec,
            session: false,
        },
        JobOp::StartVm { vm_id: id("v1") },
        JobOp::StopVm { vm_id: id("v1") },
        JobOp::SnapshotVm {
            vm_id: id("v1"),
            snapshot_id: id("snap-2"),
            publish: true,
        },
        JobOp::DestroyVm {
            vm_id: id("v1"),
            backup: true,
            reason: Some(TerminationReason::Idle),
        },
        JobOp::RenameVm {
            vm_id: id("pool-1"),
            new_vm_id: id("s-1"),
            session: true,
        },
        JobOp::ListVms {},
        JobOp::ListVmsPage {
            after: Some(VmId::new("vm-9").unwrap()),
            limit: 512,
            generation: Some(3),
        },
        JobOp::ListVmChanges {
            generation: 4,
            offset: 512,
            limit: 512,
        },
        JobOp::DeleteSnapshot {
            snapshot_id: id("snap-1"),
            unpublish: true,
        },
    ];
    for op in ops {
        roundtrip(
            &c,
            JobRequest {
                job_id: id("job-1"),
                op,
                lease_revision: 0,
                tenant: None,
            },
        )
        .await;
    }
    let snapshot = SnapshotInfo {
        snapshot_id: id("snap-2"),
        source_vm: Some(id("v1")),
        template: Some(id("default")),
        created_ms: 9,
        size_bytes: 1024,
        published: true,
    };
    for output in [
        JobOutput::Vm { vm: vm_info() },
        JobOutput::Snapshot { snapshot },
        JobOutput::Vms {
            vms: vec![vm_info()],
        },
        JobOutput::VmsPage {
            vms: vec![vm_info()],
            next: Some(VmId::new("vm-1").unwrap()),
            digest: hearth_messages::InventoryDigest {
                generation: 3,
                hash: 1,
                count: 2,
                delta: None,
                changes: 300,
            },
        },
        JobOutput::VmChanges {
            delta: hearth_messages::InventoryDelta {
                base: 3,
                changed: vec![vm_info()],
                removed: vec![VmId::new("gone").unwrap()],
            },
            next: Some(2),
        },
        JobOutput::Done {},
    ] {
        roundtrip(
            &c,
            JobReply {
                job_id: id("job-1"),
                output,
            },
        )
        .await;
    }
    roundtrip(
        &c,
        WorkerStatus {
            worker_id: id("w1"),
            seq: 42,
            at_ms: 10,
            started_ms: 1,
            provider: "process".into(),
            max_vms: 64,
            used_vms: 1,
            draining: false,
            jobs_in_flight: 0,
            execs_in_flight: 2,
            vms: vec![vm_info()],
            inventory: None,
            isolation: isolation(),
            versions: Versions {
                hearth: "0.1.0".into(),
                protocol: "v1".into(),
                provider: None,
            },
        },
    )
    .await;
    // The digest form (workers since the inventory digest).
    roundtrip(
        &c,
        WorkerStatus {
            worker_id: id("w1"),
            seq: 43,
            at_ms: 11,
            started_ms: 1,
            provider: "process".into(),
            max_vms: 64,
            used_vms: 1,
            draining: false,
            jobs_in_flight: 0,
            execs_in_flight: 0,
            vms: Vec::new(),
            inventory: Some(hearth_messages::InventoryDigest {
                generation: 7,
                hash: hearth_messages::inventory_hash([&vm_info()]),
                count: 1,
                delta: Some(hearth_messages::InventoryDelta {
                    base: 6,
                    changed: vec![vm_info()],
                    removed: vec![VmId::new("gone").unwrap()],
                }),
                changes: 0,
            }),
            isolation: isolation(),
            versions: Versions::default(),
        },
    )
    .await;
    for reason in [
        TerminationReason::Released,
        TerminationReason::Ttl,
        TerminationReason::Idle,
        TerminationReason::Evicted,
        TerminationReason::WorkerLost,
        TerminationReason::VmFailed,
        TerminationReason::Error,
    ] {
        roundtrip(
            &c,
            SessionEvent {
                session_id: id("s-1"),
                state: SessionState::Released,
                reason: Some(reason),
                at_ms: 3,
                tenant: Some(id("tenant-b")),
            },
        )
        .await;
    }
    roundtrip(
        &c,
        VmEvent {
            worker_id: id("w1"),
            vm_id: id("s-1"),
            state: VmState::Running,
            renamed_from: Some(id("pool-1")),
            reason: None,
            at_ms: 4,
        },
    )
    .await;
    roundtrip(&c, WireError::no_capacity("pool empty", 250)).await;
}

#[tokio::test]
async fn malformed_payloads_get_a_400_reply_not_a_panic() {
    let server = NatsServer::start().unwrap();
    let c = server.connect().await.unwrap();
    echo::<ExecRequest>(&c, "echo.exec").await;
    echo::<JobRequest>(&c, "echo.job").await;
    let cases: Vec<(&str, Option<&str>, &[u8])> = vec![
        ("echo.exec", None, b"\xc1\xc1"),
        ("echo.exec", None, b"\x93\x01\x02\x03"),
        ("echo.exec", Some(JSON_CONTENT_TYPE), b"{\"argv\": 5}"),
        ("echo.exec", Some(JSON_CONTENT_TYPE), b"not json at all"),
        (
            "echo.job",
            Some(JSON_CONTENT_TYPE),
            b"{\"job_id\":\"a.b\",\"op\":{\"kind\":\"list_vms\"}}",
        ),
        (
            "echo.job",
            Some(JSON_CONTENT_TYPE),
            b"{\"job_id\":\"j\",\"op\":{\"kind\":\"nope\"}}",
        ),
        ("echo.job", None, b""),
    ];
    for (subject, content_type, payload) in cases {
        let mut headers = HeaderMap::new();
        if let Some(ct) = content_type {
            headers.insert(CONTENT_TYPE_HEADER, ct);
        }
        let reply = c
            .request_with_headers(subject, headers, payload.to_vec().into())
            .await
            .unwrap();
        let h = reply.headers.as_ref().expect("error replies carry headers");
        assert_eq!(h.get(SERVICE_ERROR_CODE_HEADER).unwrap().as_str(), "400");
        assert!(!h.get(SERVICE_ERROR_HEADER).unwrap().as_str().is_empty());
        let err = transport::decode_reply::<ExecRequest>(&reply).unwrap_err();
        assert_eq!(err.code, ErrorCode::BadRequest, "{payload:?} -> {err}");
    }
    // The responder survived all of that.
    let ok = c
        .request(
            "echo.exec",
            Encoding::MsgPack
                .encode(&ExecRequest::cmd("x"))
                .unwrap()
                .into(),
        )
        .await
        .unwrap();
    assert!(transport::decode_reply::<ExecRequest>(&ok).is_ok());
}

/// A hand-written stand-in for the scheduler and a worker, answering from PROTOCOL.md.
async fn fake_service(c: &async_nats::Client) {
    let subjects = Subjects::default();
    let mut sub = c.subscribe("hearth.v1.>").await.unwrap();
    let client = c.clone();
    tokio::spawn(async move {
        while let Some(msg) = sub.next().await {
            let Some(reply_to) = msg.reply.clone() else {
                continue;
            };
            let subject = msg.subject.to_string();
            let reply = if subject == subjects.sessions_create() {
                let (enc, req) = decode_message::<CreateSessionRequest>(&msg);
                match req {
                    Ok(req) if req.template_or_default().as_str() == "empty" => Reply::error(
                        enc,
                        &WireError::no_capacity("no warm vm and no capacity", 250),
                    ),
                    Ok(req) if req.template_or_default().as_str() == "slow" => continue,
                    Ok(req) => {
                        let mut s = session();
                        s.session_id = req.session_id.expect("client always sends an id");
                        Reply::ok(enc, &s)
                    }
                    Err(e) => Reply::error(enc, &e),
                }
            } else if let Ok(Some((sid, op))) = subjects.parse_session(&subject) {
                match op {
                    SessionOp::Get => Reply::error(
                        Encoding::MsgPack,
                        &WireError::not_found(format!("unknown session {sid}")),
                    ),
                    SessionOp::Exec => {
                        let (_, req) = decode_message::<ExecRequest>(&msg);
                        let req = req.unwrap();
                        if req.stream {
                            for (kind, data) in [
                                (CHUNK_STDOUT, "a"),
                                (CHUNK_STDERR, "e"),
                                (CHUNK_STDOUT, "b"),
                            ] {
                                let mut h = HeaderMap::new();
                                h.insert(CHUNK_HEADER, kind);
                                client
                                    .publish_with_headers(reply_to.clone(), h, data.into())
                                    .await
                                    .unwrap();
                            }
                        }
                        let stdout = if req.stream {
                            Blob::default()
                        } else {
                            Blob::from("ab")
                        };
                        Reply::ok(
                            Encoding::MsgPack,
                            &ExecResult {
                                stdout,
                                ..Default::default()
                            },
                        )
                    }
                    _ => Reply::error(Encoding::MsgPack, &WireError::internal("unexpected")),
                }
            } else {
                continue;
            };
            reply.send(&client, reply_to).await.unwrap();
        }
    });
    c.flush().await.unwrap();
}

#[tokio::test]
async fn client_maps_errors_to_retryable_and_caller_errors() {
    let server = NatsServer::start().unwrap();
    let nats = server.connect().await.unwrap();
    let client = HearthClient::new(nats.clone()).with_timeout(Duration::from_millis(300));

    // No one serves the subject yet.
    let err = client
        .create_session(&CreateSessionRequest::default())
        .await
        .unwrap_err();
    assert!(matches!(err, ClientError::NoResponders { .. }), "{err:?}");
    assert!(err.is_retryable());

    fake_service(&nats).await;
    let s = client
        .create_session(&CreateSessionRequest::default())
        .await
        .unwrap();
    assert!(
        !s.session_id.as_str().is_empty(),
        "the client generated an idempotency key"
    );

    let err = client
        .create_session(&CreateSessionRequest {
            template: Some(id("empty")),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::NoCapacity));
    assert!(err.is_retryable());
    assert_eq!(err.retry_after(), Some(Duration::from_millis(250)));

    let err = client.get_session(&id("nobody")).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::NotFound));
    assert!(!err.is_retryable());

    let err = client
        .create_session(&CreateSessionRequest {
            template: Some(id("slow")),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(matches!(err, ClientError::Timeout { .. }), "{err:?}");
    assert!(err.is_retryable());
}

#[tokio::test]
async fn exec_streaming_yields_chunks_in_order_then_the_result() {
    let server = NatsServer::start().unwrap();
    let nats = server.connect().await.unwrap();
    fake_service(&nats).await;
    let client = HearthClient::new(nats);
    let sid: SessionId = id("s-1");

    let plain = client.exec(&sid, &ExecRequest::cmd("x")).await.unwrap();
    assert_eq!(plain.stdout.as_bytes(), b"ab");

    let events: Vec<ExecEvent> = client
        .exec_stream(&sid, &ExecRequest::cmd("x"))
        .await
        .unwrap()
        .map(|e| e.unwrap())
        .collect()
        .await;
    assert_eq!(
        events,
        vec![
            ExecEvent::Stdout("a".into()),
            ExecEvent::Stderr("e".into()),
            ExecEvent::Stdout("b".into()),
            ExecEvent::Done(ExecResult::default()),
        ]
    );
}
