//! The provider contract: one suite, written once, run against every adapter (`fake`, `process`,
//! `oci`, `qemu` and `firecracker`), so the fake the scheduler tests rely on cannot drift from the real
//! thing. The qemu instances skip, with the reason printed, where QEMU or the guest image is
//! missing; the firecracker ones unless `FIRECRACKER_BIN`, `FIRECRACKER_KERNEL` and
//! `FIRECRACKER_ROOTFS` are set and `/dev/kvm` exists; the oci ones where `crun` and `tini` are
//! not installed (`scripts/setup.sh` installs them).

mod oci_support;
mod qemu_support;

use std::path::Path;
use std::sync::Arc;

use hearth_worker::provider::{
    ExecSpec, FakeProvider, FirecrackerConfig, FirecrackerProvider, OutputStream, ProcessConfig,
    ProcessProvider, ProviderErrorKind, QemuProvider, SnapshotId, TemplateName, VmId, VmRuntime,
    VmSpec, VmState,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Fake,
    Process,
    Oci,
    Qemu,
    Firecracker,
}

/// One provider instance plus the scratch directory it (and the test) may use.
struct Harness {
    kind: Kind,
    rt: Arc<dyn VmRuntime>,
    dir: tempfile::TempDir,
}

impl Harness {
    fn new(kind: Kind) -> Self {
        Self::try_new(kind).expect("the adapter can run here")
    }

    /// `None`, with the reason printed, when the adapter cannot run on this host.
    fn try_new(kind: Kind) -> Option<Self> {
        let dir = tempfile::tempdir().unwrap();
        let rt: Arc<dyn VmRuntime> = match kind {
            Kind::Fake => Arc::new(FakeProvider::new()),
            Kind::Process => Arc::new(
                ProcessProvider::open(ProcessConfig::new(dir.path().join("root"))).unwrap(),
            ),
            Kind::Oci => Arc::new(oci_support::open(&dir.path().join("oci"))?),
            Kind::Qemu => Arc::new(
                QemuProvider::open(qemu_support::config(dir.path().join("qemu"))?).unwrap(),
            ),
            Kind::Firecracker => {
                let config = match FirecrackerConfig::from_env(dir.path().join("fc")) {
                    Ok(config) => config,
                    Err(reason) => {
                        eprintln!("skipping firecracker test: {reason}");
                        return None;
                    }
                };
                Arc::new(
                    FirecrackerProvider::open(FirecrackerConfig {
                        kill_on_drop: true,
                        ..config
                    })
                    .unwrap(),
                )
            }
        };
        Some(Self { kind, rt, dir })
    }

    /// A second, independent instance of the same adapter (another worker).
    fn another(&self) -> Harness {
        Harness::new(self.kind)
    }

    async fn running_vm(&self, id: &str) -> VmId {
        let vm_id = vm(id);
        let view = self.rt.create_vm(&vm_id).await.unwrap();
        assert_eq!(view.state, VmState::Running);
        vm_id
    }

    async fn put(&self, vm_id: &VmId, path: &str, data: &[u8]) {
        let n = self.rt.put_file(vm_id, path, data, None).await.unwrap();
        assert_eq!(n, data.len() as u64);
    }

    async fn get(&self, vm_id: &VmId, path: &str) -> Vec<u8> {
        self.rt.get_file(vm_id, path, 1 << 20).await.unwrap()
    }
}

fn vm(id: &str) -> VmId {
    VmId::new(id).unwrap()
}

fn snap(id: &str) -> SnapshotId {
    SnapshotId::new(id).unwrap()
}

/// The error kind of a failed call.
fn kind_of<T: std::fmt::Debug>(
    result: Result<T, hearth_worker::provider::ProviderError>,
) -> ProviderErrorKind {
    match result {
        Ok(v) => panic!("expected an error, got {v:?}"),
        Err(e) => {
            let message = e.to_string();
            assert!(
                !message.is_empty() && !message.ends_with('.'),
                "{message:?}"
            );
            e.kind()
        }
    }
}

macro_rules! contract_tests {
    ($($name:ident),* $(,)?) => {
        mod fake {
            $(
                #[tokio::test]
                async fn $name() {
                    super::$name(super::Harness::new(super::Kind::Fake)).await;
                }
            )*
        }
        mod process {
            $(
                #[tokio::test]
                async fn $name() {
                    super::$name(super::Harness::new(super::Kind::Process)).await;
                }
            )*
        }
        mod oci {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let Some(h) = super::Harness::try_new(super::Kind::Oci) else { return };
                    super::$name(h).await;
                }
            )*
        }
        mod qemu {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let Some(h) = super::Harness::try_new(super::Kind::Qemu) else { return };
                    super::$name(h).await;
                }
            )*
        }
        mod firecracker {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let Some(h) = super::Harness::try_new(super::Kind::Firecracker) else {
                        return;
                    };
                    super::$name(h).await;
                }
            )*
        }
    };
}

contract_tests!(
    create_get_and_list_sorted,
    create_duplicate_is_already_exists,
    start_and_stop_follow_the_state_machine,
    exec_and_files_on_a_stopped_vm_are_invalid_state,
    snapshot_duplicate_name_is_already_exists,
    snapshot_of_unknown_or_destroyed_vm_fails,
    restore_from_snapshot_gets_the_files,
    restore_from_unknown_snapshot_is_not_found_and_leaves_nothing,
    rename_keeps_files_and_state,
    rename_conflicts_and_unknowns,
    destroy_leaves_a_tombstone,
    file_paths_are_confined_to_the_volume,
    file_errors,
    exec_cwd_is_confined,
    exec_exit_codes_output_and_stdin,
    exec_bumps_activity_when_it_starts_and_when_it_ends,
    exec_output_cap_and_streaming,
    bootstrap_failure_leaves_nothing,
    backup_writes_the_volume_as_tar_zst,
    export_import_round_trips_into_another_instance,
    corrupt_import_is_rejected_and_leaves_nothing,
    delete_snapshot_keeps_restored_vms,
);

async fn create_get_and_list_sorted(h: Harness) {
    for id in ["vm-b", "vm-c", "vm-a"] {
        h.running_vm(id).await;
    }
    let ids: Vec<String> =
        h.rt.list_vms()
            .await
            .unwrap()
            .into_iter()
            .map(|v| v.vm_id.to_string())
            .collect();
    assert_eq!(ids, ["vm-a", "vm-b", "vm-c"]);
    let view = h.rt.get_vm(&vm("vm-a")).await.unwrap().unwrap();
    assert_eq!(view.state, VmState::Running);
    assert!(view.created_ms > 0);
    assert_eq!(view.stopped_ms, None);
    assert_eq!(view.restored_from, None);
    assert!(h.rt.get_vm(&vm("nope")).await.unwrap().is_none());
    assert_eq!(
        h.rt.list_snapshots(&vm("vm-a")).await.unwrap(),
        Some(Vec::new())
    );
    assert_eq!(h.rt.list_snapshots(&vm("nope")).await.unwrap(), None);

    let spec = VmSpec {
        template: Some(TemplateName::new("py").unwrap()),
        ..VmSpec::default()
    };
    let view = h.rt.create_vm_with_spec(&vm("t"), &spec).await.unwrap();
    assert_eq!(view.template, spec.template);
}

async fn create_duplicate_is_already_exists(h: Harness) {
    let id = h.running_vm("dup").await;
    h.put(&id, "keep", b"1").await;
    assert_eq!(
        kind_of(h.rt.create_vm(&id).await),
        ProviderErrorKind::AlreadyExists
    );
    assert_eq!(h.get(&id, "keep").await, b"1", "the original is untouched");
}

async fn start_and_stop_follow_the_state_machine(h: Harness) {
    let id = h.running_vm("sm").await;
    assert_eq!(
        kind_of(h.rt.start_vm(&id).await),
        ProviderErrorKind::InvalidState
    );
    let stopped = h.rt.stop_vm(&id).await.unwrap();
    assert_eq!(stopped.state, VmState::Stopped);
    assert!(stopped.stopped_ms.is_some());
    assert_eq!(
        h.rt.get_vm(&id).await.unwrap().unwrap().state,
        VmState::Stopped
    );
    assert_eq!(
        kind_of(h.rt.stop_vm(&id).await),
        ProviderErrorKind::InvalidState
    );
    let started = h.rt.start_vm(&id).await.unwrap();
    assert_eq!(started.state, VmState::Running);
    assert_eq!(started.stopped_ms, None);
    assert_eq!(
        kind_of(h.rt.start_vm(&vm("nope")).await),
        ProviderErrorKind::NotFound
    );
    assert_eq!(
        kind_of(h.rt.stop_vm(&vm("nope")).await),
        ProviderErrorKind::NotFound
    );
}

async fn exec_and_files_on_a_stopped_vm_are_invalid_state(h: Harness) {
    let id = h.running_vm("idle").await;
    h.put(&id, "f", b"data").await;
    h.rt.stop_vm(&id).await.unwrap();
    assert_eq!(
        kind_of(h.rt.exec(&id, ExecSpec::argv(["true"]), None).await),
        ProviderErrorKind::InvalidState
    );
    assert_eq!(
        kind_of(h.rt.put_file(&id, "g", b"x", None).await),
        ProviderErrorKind::InvalidState
    );
    assert_eq!(
        kind_of(h.rt.get_file(&id, "f", 100).await),
        ProviderErrorKind::InvalidState
    );
    assert_eq!(
        kind_of(h.rt.exec(&vm("nope"), ExecSpec::argv(["true"]), None).await),
        ProviderErrorKind::NotFound
    );
    // Bad input is rejected before the state is looked at, by every adapter.
    assert_eq!(
        kind_of(
            h.rt.exec(&id, ExecSpec::argv(["true"]).with_cwd("../x"), None)
                .await
        ),
        ProviderErrorKind::InvalidArgument
    );
    assert_eq!(
        kind_of(h.rt.get_file(&id, "/etc/passwd", 100).await),
        ProviderErrorKind::InvalidArgument
    );
    h.rt.start_vm(&id).await.unwrap();
    assert_eq!(h.get(&id, "f").await, b"data", "stop keeps the volume");
    let outcome =
        h.rt.exec(&id, ExecSpec::argv(["true"]), None)
            .await
            .unwrap();
    assert_eq!(outcome.exit_code, 0);
}

async fn snapshot_duplicate_name_is_already_exists(h: Harness) {
    let id = h.running_vm("src").await;
    let info = h.rt.snapshot_vm(&id, &snap("s1")).await.unwrap();
    assert_eq!(info.snapshot_id, snap("s1"));
    assert_eq!(info.source_vm, Some(id.clone()));
    assert_eq!(
        kind_of(h.rt.snapshot_vm(&id, &snap("s1")).await),
        ProviderErrorKind::AlreadyExists
    );
    // A stopped VM can be snapshotted too.
    h.rt.stop_vm(&id).await.unwrap();
    h.rt.snapshot_vm(&id, &snap("s2")).await.unwrap();
    assert_eq!(
        h.rt.list_snapshots(&id).await.unwrap(),
        Some(vec![snap("s1"), snap("s2")])
    );
    let all: Vec<SnapshotId> =
        h.rt.list_all_snapshots()
            .await
            .unwrap()
            .into_iter()
            .map(|s| s.snapshot_id)
            .collect();
    assert_eq!(all, [snap("s1"), snap("s2")]);
}

async fn snapshot_of_unknown_or_destroyed_vm_fails(h: Harness) {
    assert_eq!(
        kind_of(h.rt.snapshot_vm(&vm("nope"), &snap("s")).await),
        ProviderErrorKind::NotFound
    );
    let id = h.running_vm("gone").await;
    h.rt.destroy_vm(&id).await.unwrap();
    assert_eq!(
        kind_of(h.rt.snapshot_vm(&id, &snap("s")).await),
        ProviderErrorKind::InvalidState
    );
    assert!(h.rt.get_snapshot(&snap("s")).await.unwrap().is_none());
}

async fn restore_from_snapshot_gets_the_files(h: Harness) {
    let spec = VmSpec {
        template: Some(TemplateName::new("py").unwrap()),
        ..VmSpec::default()
    };
    let src = vm("tmpl-src");
    h.rt.create_vm_with_spec(&src, &spec).await.unwrap();
    h.put(&src, "app/main.py", b"print(1)").await;
    let info = h.rt.snapshot_vm(&src, &snap("py-v1")).await.unwrap();
    assert_eq!(info.template, spec.template);
    assert_eq!(h.rt.get_snapshot(&snap("py-v1")).await.unwrap(), Some(info));
    // Changes after the snapshot do not leak into restores.
    h.put(&src, "app/main.py", b"print(2)").await;

    let restore = VmSpec {
        restore_from: Some(snap("py-v1")),
        ..VmSpec::default()
    };
    let view =
        h.rt.create_vm_with_spec(&vm("clone"), &restore)
            .await
            .unwrap();
    assert_eq!(view.state, VmState::Running);
    assert_eq!(view.restored_from, Some(snap("py-v1")));
    assert_eq!(view.template, spec.template, "inherited from the snapshot");
    assert_eq!(h.get(&vm("clone"), "app/main.py").await, b"print(1)");
    // The clone is independent of its source.
    h.put(&vm("clone"), "app/main.py", b"print(3)").await;
    assert_eq!(h.get(&src, "app/main.py").await, b"print(2)");
}

async fn restore_from_unknown_snapshot_is_not_found_and_leaves_nothing(h: Harness) {
    let spec = VmSpec {
        restore_from: Some(snap("missing")),
        ..VmSpec::default()
    };
    assert_eq!(
        kind_of(h.rt.create_vm_with_spec(&vm("r"), &spec).await),
        ProviderErrorKind::NotFound
    );
    assert!(h.rt.get_vm(&vm("r")).await.unwrap().is_none());
    h.rt.create_vm(&vm("r")).await.unwrap();
}

async fn rename_keeps_files_and_state(h: Harness) {
    let pooled = h.running_vm("pool-1").await;
    h.put(&pooled, "warm/cache", b"hot").await;
    h.rt.snapshot_vm(&pooled, &snap("before")).await.unwrap();
    let view = h.rt.rename_vm(&pooled, &vm("session-1")).await.unwrap();
    assert_eq!(view.vm_id, vm("session-1"));
    assert_eq!(view.state, VmState::Running);
    assert!(h.rt.get_vm(&pooled).await.unwrap().is_none());
    assert_eq!(
        h.rt.get_vm(&vm("session-1")).await.unwrap().unwrap().state,
        VmState::Running
    );
    assert_eq!(h.get(&vm("session-1"), "warm/cache").await, b"hot");
    let outcome =
        h.rt.exec(&vm("session-1"), ExecSpec::argv(["true"]), None)
            .await
            .unwrap();
    assert_eq!(outcome.exit_code, 0);
    let ids: Vec<VmId> =
        h.rt.list_vms()
            .await
            .unwrap()
            .into_iter()
            .map(|v| v.vm_id)
            .collect();
    assert_eq!(ids, [vm("session-1")]);

    // A stopped VM stays stopped.
    h.rt.stop_vm(&vm("session-1")).await.unwrap();
    let view =
        h.rt.rename_vm(&vm("session-1"), &vm("session-2"))
            .await
            .unwrap();
    assert_eq!(view.state, VmState::Stopped);
    h.rt.start_vm(&vm("session-2")).await.unwrap();
    assert_eq!(h.get(&vm("session-2"), "warm/cache").await, b"hot");
}

async fn rename_conflicts_and_unknowns(h: Harness) {
    let a = h.running_vm("a").await;
    let b = h.running_vm("b").await;
    h.put(&a, "who", b"a").await;
    h.put(&b, "who", b"b").await;
    assert_eq!(
        kind_of(h.rt.rename_vm(&a, &b).await),
        ProviderErrorKind::AlreadyExists
    );
    assert_eq!(
        kind_of(h.rt.rename_vm(&a, &a).await),
        ProviderErrorKind::AlreadyExists
    );
    assert_eq!(h.get(&a, "who").await, b"a");
    assert_eq!(h.get(&b, "who").await, b"b");
    assert_eq!(
        kind_of(h.rt.rename_vm(&vm("nope"), &vm("c")).await),
        ProviderErrorKind::NotFound
    );
    h.rt.destroy_vm(&b).await.unwrap();
    assert_eq!(
        kind_of(h.rt.rename_vm(&b, &vm("c")).await),
        ProviderErrorKind::InvalidState
    );
    // A tombstoned id is free to take.
    let view = h.rt.rename_vm(&a, &b).await.unwrap();
    assert_eq!(view.state, VmState::Running);
    assert_eq!(h.get(&b, "who").await, b"a");
}

async fn destroy_leaves_a_tombstone(h: Harness) {
    let id = h.running_vm("doomed").await;
    h.put(&id, "f", b"x").await;
    h.rt.destroy_vm(&id).await.unwrap();
    let view = h.rt.get_vm(&id).await.unwrap().unwrap();
    assert_eq!(view.state, VmState::Destroyed);
    let listed = h.rt.list_vms().await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].state, VmState::Destroyed);
    for result in [
        h.rt.exec(&id, ExecSpec::argv(["true"]), None)
            .await
            .map(drop),
        h.rt.start_vm(&id).await.map(drop),
        h.rt.stop_vm(&id).await.map(drop),
        h.rt.get_file(&id, "f", 10).await.map(drop),
        h.rt.put_file(&id, "f", b"y", None).await.map(drop),
        h.rt.backup_vm(&id, &h.dir.path().join("backups"))
            .await
            .map(drop),
    ] {
        assert_eq!(kind_of(result), ProviderErrorKind::InvalidState);
    }
    h.rt.destroy_vm(&id).await.unwrap();
    assert_eq!(
        kind_of(h.rt.destroy_vm(&vm("nope")).await),
        ProviderErrorKind::NotFound
    );
    // The id can be reused; the new VM starts empty.
    let view = h.rt.create_vm(&id).await.unwrap();
    assert_eq!(view.state, VmState::Running);
    assert_eq!(
        kind_of(h.rt.get_file(&id, "f", 10).await),
        ProviderErrorKind::NotFound
    );
}

async fn file_paths_are_confined_to_the_volume(h: Harness) {
    let id = h.running_vm("files").await;
    for bad in ["../x", "/etc/passwd", "a/../../x", "..", "", ".", "a/.."] {
        assert_eq!(
            kind_of(h.rt.put_file(&id, bad, b"x", None).await),
            ProviderErrorKind::InvalidArgument,
            "put {bad:?}"
        );
        assert_eq!(
            kind_of(h.rt.get_file(&id, bad, 100).await),
            ProviderErrorKind::InvalidArgument,
            "get {bad:?}"
        );
    }
    h.put(&id, "./deep/er/file.txt", b"nested").await;
    assert_eq!(h.get(&id, "deep/er/file.txt").await, b"nested");
    h.put(&id, "deep/er/file.txt", b"replaced").await;
    assert_eq!(h.get(&id, "deep/./er/file.txt").await, b"replaced");
}

async fn file_errors(h: Harness) {
    let id = h.running_vm("errs").await;
    h.put(&id, "dir/file", b"0123456789").await;
    assert_eq!(
        kind_of(h.rt.get_file(&id, "missing", 100).await),
        ProviderErrorKind::NotFound
    );
    assert_eq!(
        kind_of(h.rt.get_file(&id, "dir", 100).await),
        ProviderErrorKind::InvalidArgument
    );
    let err = h.rt.get_file(&id, "dir/file", 5).await.unwrap_err();
    assert_eq!(err.kind(), ProviderErrorKind::InvalidArgument);
    assert!(err.to_string().contains("10"), "says the size: {err}");
    assert_eq!(h.rt.get_file(&id, "dir/file", 10).await.unwrap().len(), 10);
    assert_eq!(
        kind_of(h.rt.put_file(&id, "dir", b"x", None).await),
        ProviderErrorKind::InvalidArgument,
        "a directory is not replaced by a file"
    );
    assert_eq!(
        kind_of(h.rt.put_file(&id, "dir/file/below", b"x", None).await),
        ProviderErrorKind::InvalidArgument,
        "a file is not a directory"
    );
    assert_eq!(
        h.rt.put_file(&id, "empty", b"", Some(0o600)).await.unwrap(),
        0
    );
    assert_eq!(h.get(&id, "empty").await, b"");
}

async fn exec_cwd_is_confined(h: Harness) {
    let id = h.running_vm("cwd").await;
    h.put(&id, "sub/f", b"x").await;
    for bad in ["../", "/", "/tmp", "sub/../..", "missing", "sub/f"] {
        assert_eq!(
            kind_of(
                h.rt.exec(&id, ExecSpec::argv(["true"]).with_cwd(bad), None)
                    .await
            ),
            ProviderErrorKind::InvalidArgument,
            "cwd {bad:?}"
        );
    }
    for good in ["sub", "./sub/", ".", ""] {
        let outcome =
            h.rt.exec(&id, ExecSpec::argv(["true"]).with_cwd(good), None)
                .await
                .unwrap();
        assert_eq!(outcome.exit_code, 0, "cwd {good:?}");
    }
}

async fn exec_exit_codes_output_and_stdin(h: Harness) {
    let id = h.running_vm("ex").await;
    let run = |spec: ExecSpec| {
        let rt = h.rt.clone();
        let id = id.clone();
        async move { rt.exec(&id, spec, None).await.unwrap() }
    };
    assert_eq!(run(ExecSpec::argv(["false"])).await.exit_code, 1);
    assert_eq!(run(ExecSpec::shell("exit 3")).await.exit_code, 3);
    let outcome = run(ExecSpec::argv(["echo", "hello", "world"])).await;
    assert_eq!(outcome.exit_code, 0);
    assert_eq!(outcome.stdout, b"hello world\n");
    assert!(outcome.stderr.is_empty());
    assert!(outcome.success());
    let outcome = run(ExecSpec::argv(["cat"]).with_stdin(b"piped in".to_vec())).await;
    assert_eq!(outcome.stdout, b"piped in");
    assert_eq!(
        kind_of(
            h.rt.exec(&id, ExecSpec::argv(Vec::<String>::new()), None)
                .await
        ),
        ProviderErrorKind::InvalidArgument
    );
}

/// Unix ms now (the providers stamp activity with the wall clock).
fn wall_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

async fn exec_bumps_activity_when_it_starts_and_when_it_ends(h: Harness) {
    let id = h.running_vm("act").await;
    let activity = |rt: Arc<dyn VmRuntime>, id: VmId| async move {
        rt.get_vm(&id).await.unwrap().unwrap().last_activity_ms
    };
    // Let the create's own stamp age, so a bump is visible.
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    let before = wall_ms();
    let running = {
        let (rt, id) = (h.rt.clone(), id.clone());
        tokio::spawn(async move { rt.exec(&id, ExecSpec::argv(["sleep", "1"]), None).await })
    };
    // The start's bump, seen while the command still runs (however slowly a loaded host starts it).
    let mut during = activity(h.rt.clone(), id.clone()).await;
    while during < before && !running.is_finished() {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        during = activity(h.rt.clone(), id.clone()).await;
    }
    assert!(
        !running.is_finished() || during >= before,
        "no bump before the command ended"
    );
    assert!(during >= before, "bumped at the start: {during} < {before}");
    let outcome = running.await.unwrap().unwrap();
    assert!(outcome.success(), "{outcome:?}");
    let ended = wall_ms();
    let after = activity(h.rt.clone(), id.clone()).await;
    assert!(
        after >= before + 1000 && after <= ended,
        "bumped at the end: {after} not in [{}, {ended}]",
        before + 1000
    );
}

async fn exec_output_cap_and_streaming(h: Harness) {
    let id = h.running_vm("out").await;
    let outcome =
        h.rt.exec(
            &id,
            ExecSpec::argv(["echo", "hello"]).with_max_output_bytes(2),
            None,
        )
        .await
        .unwrap();
    assert_eq!(outcome.stdout, b"he");
    assert!(outcome.stdout_truncated);
    assert!(!outcome.stderr_truncated);

    let (tx, mut rx) = tokio::sync::mpsc::channel(16);
    let outcome =
        h.rt.exec(&id, ExecSpec::argv(["echo", "streamed"]), Some(tx))
            .await
            .unwrap();
    assert!(outcome.stdout.is_empty(), "streamed bytes are not repeated");
    let mut streamed = Vec::new();
    while let Some(chunk) = rx.recv().await {
        assert_eq!(chunk.stream, OutputStream::Stdout);
        streamed.extend_from_slice(&chunk.data);
    }
    assert_eq!(streamed, b"streamed\n");
}

async fn bootstrap_failure_leaves_nothing(h: Harness) {
    let failing = VmSpec {
        bootstrap: Some(vec!["false".into()]),
        ..VmSpec::default()
    };
    assert_eq!(
        kind_of(h.rt.create_vm_with_spec(&vm("boot"), &failing).await),
        ProviderErrorKind::CommandFailed
    );
    assert!(h.rt.get_vm(&vm("boot")).await.unwrap().is_none());
    assert!(h.rt.list_vms().await.unwrap().is_empty());
    let empty = VmSpec {
        bootstrap: Some(vec![]),
        ..VmSpec::default()
    };
    assert_eq!(
        kind_of(h.rt.create_vm_with_spec(&vm("boot"), &empty).await),
        ProviderErrorKind::InvalidArgument
    );
    let ok = VmSpec {
        bootstrap: Some(vec!["true".into()]),
        ..VmSpec::default()
    };
    let view = h.rt.create_vm_with_spec(&vm("boot"), &ok).await.unwrap();
    assert_eq!(view.state, VmState::Running);
}

async fn backup_writes_the_volume_as_tar_zst(h: Harness) {
    let id = h.running_vm("bk").await;
    h.put(&id, "data/file.txt", b"backed up").await;
    h.rt.stop_vm(&id).await.unwrap();
    let dest = h.dir.path().join("backups");
    let path = h.rt.backup_vm(&id, &dest).await.unwrap();
    assert_eq!(path.parent(), Some(dest.as_path()));
    let name = path.file_name().unwrap().to_str().unwrap();
    assert!(
        name.starts_with("bk-") && name.ends_with(".tar.zst"),
        "{name}"
    );
    let decoder = zstd::Decoder::new(std::fs::File::open(&path).unwrap()).unwrap();
    let mut archive = tar::Archive::new(decoder);
    let mut found = None;
    for entry in archive.entries().unwrap() {
        let mut entry = entry.unwrap();
        let entry_path = entry.path().unwrap().into_owned();
        if entry_path.ends_with("data/file.txt") {
            let mut data = Vec::new();
            std::io::Read::read_to_end(&mut entry, &mut data).unwrap();
            found = Some(data);
        }
    }
    assert_eq!(found.as_deref(), Some(&b"backed up"[..]));
    assert_eq!(
        kind_of(h.rt.backup_vm(&vm("nope"), &dest).await),
        ProviderErrorKind::NotFound
    );
}

async fn export_import_round_trips_into_another_instance(h: Harness) {
    let spec = VmSpec {
        template: Some(TemplateName::new("node").unwrap()),
        ..VmSpec::default()
    };
    let id = vm("exp");
    h.rt.create_vm_with_spec(&id, &spec).await.unwrap();
    h.put(&id, "lib/index.js", b"module.exports = 1").await;
    let original = h.rt.snapshot_vm(&id, &snap("node-v1")).await.unwrap();

    let mut stream = Vec::new();
    let written =
        h.rt.export_snapshot(&snap("node-v1"), &mut stream)
            .await
            .unwrap();
    assert_eq!(written, stream.len() as u64);
    assert_eq!(
        kind_of(h.rt.export_snapshot(&snap("nope"), &mut Vec::new()).await),
        ProviderErrorKind::NotFound
    );

    let other = h.another();
    let imported = other
        .rt
        .import_snapshot(&snap("node-v1"), &mut stream.as_slice())
        .await
        .unwrap();
    assert_eq!(imported.snapshot_id, original.snapshot_id);
    assert_eq!(imported.template, original.template);
    assert_eq!(imported.source_vm, original.source_vm);
    assert_eq!(
        other.rt.get_snapshot(&snap("node-v1")).await.unwrap(),
        Some(imported)
    );
    assert_eq!(
        kind_of(
            other
                .rt
                .import_snapshot(&snap("node-v1"), &mut stream.as_slice())
                .await
        ),
        ProviderErrorKind::AlreadyExists
    );
    let restore = VmSpec {
        restore_from: Some(snap("node-v1")),
        ..VmSpec::default()
    };
    let view = other
        .rt
        .create_vm_with_spec(&vm("elsewhere"), &restore)
        .await
        .unwrap();
    assert_eq!(view.template, spec.template);
    assert_eq!(
        other.get(&vm("elsewhere"), "lib/index.js").await,
        b"module.exports = 1"
    );
}

async fn corrupt_import_is_rejected_and_leaves_nothing(h: Harness) {
    let id = h.running_vm("c").await;
    h.put(&id, "payload", &noise(200_000)).await;
    h.rt.snapshot_vm(&id, &snap("s")).await.unwrap();
    let mut stream = Vec::new();
    h.rt.export_snapshot(&snap("s"), &mut stream).await.unwrap();

    let other = h.another();
    let truncated = &stream[..stream.len() / 2];
    let mut flipped = stream.clone();
    let at = flipped.len() * 3 / 4;
    flipped[at] ^= 0x5a;
    let garbage = b"this is not a snapshot".to_vec();
    for (what, bad) in [
        ("truncated", truncated.to_vec()),
        ("flipped", flipped),
        ("garbage", garbage),
        ("empty", Vec::new()),
    ] {
        assert_eq!(
            kind_of(
                other
                    .rt
                    .import_snapshot(&snap("s"), &mut bad.as_slice())
                    .await
            ),
            ProviderErrorKind::InvalidArgument,
            "{what}"
        );
        assert!(
            other.rt.get_snapshot(&snap("s")).await.unwrap().is_none(),
            "{what}"
        );
    }
    if other.kind == Kind::Process {
        assert_dir_empty(&other.dir.path().join("root/snapshots"));
    }
    // Nothing was left behind to block a good import.
    other
        .rt
        .import_snapshot(&snap("s"), &mut stream.as_slice())
        .await
        .unwrap();
}

async fn delete_snapshot_keeps_restored_vms(h: Harness) {
    let id = h.running_vm("src").await;
    h.put(&id, "f", b"v1").await;
    h.rt.snapshot_vm(&id, &snap("s")).await.unwrap();
    let restore = VmSpec {
        restore_from: Some(snap("s")),
        ..VmSpec::default()
    };
    h.rt.create_vm_with_spec(&vm("child"), &restore)
        .await
        .unwrap();
    h.rt.delete_snapshot(&snap("s")).await.unwrap();
    assert!(h.rt.get_snapshot(&snap("s")).await.unwrap().is_none());
    assert_eq!(
        kind_of(h.rt.delete_snapshot(&snap("s")).await),
        ProviderErrorKind::NotFound
    );
    assert_eq!(h.get(&vm("child"), "f").await, b"v1");
    // The name is free again.
    h.rt.snapshot_vm(&id, &snap("s")).await.unwrap();
}

/// Incompressible bytes, so a flipped byte lands in real archive data.
fn noise(len: usize) -> Vec<u8> {
    let mut x = 0x2545_f491_4f6c_dd1du64;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn assert_dir_empty(dir: &Path) {
    let entries: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(entries.is_empty(), "{}: {entries:?}", dir.display());
}
