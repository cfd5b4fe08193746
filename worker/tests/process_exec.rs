//! The process adapter with real commands: the exec engine's guarantees (process-group kills,
//! bounded output, streaming, no hangs), bootstrap and bases, reconcile on reopen, symlink
//! confinement and the default sandbox (the attacks on it are in `escape.rs`).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use hearth_worker::provider::{
    ExecOutcome, ExecSpec, Isolation, OutputChunk, OutputStream, ProcessConfig, ProcessProvider,
    ProviderErrorKind, SnapshotId, VmId, VmProvider, VmQuery, VmSpec, VmState,
};

struct Setup {
    provider: ProcessProvider,
    dir: tempfile::TempDir,
}

impl Setup {
    fn new() -> Self {
        Self::with(|_| {})
    }

    fn with(tweak: impl FnOnce(&mut ProcessConfig)) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut config = ProcessConfig::new(dir.path().join("root"));
        tweak(&mut config);
        Self {
            provider: ProcessProvider::open(config).unwrap(),
            dir,
        }
    }

    fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }

    fn volume(&self, vm_id: &VmId) -> PathBuf {
        self.root().join("vms").join(vm_id.as_str()).join("volume")
    }

    async fn vm(&self, id: &str) -> VmId {
        let vm_id = VmId::new(id).unwrap();
        self.provider.create_vm(&vm_id).await.unwrap();
        vm_id
    }

    async fn sh(&self, vm_id: &VmId, script: &str) -> ExecOutcome {
        self.run(vm_id, ExecSpec::shell(script)).await
    }

    async fn run(&self, vm_id: &VmId, spec: ExecSpec) -> ExecOutcome {
        self.provider.exec(vm_id, spec, None).await.unwrap()
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[tokio::test]
async fn shell_and_argv_differ_in_interpretation() {
    let s = Setup::new();
    let id = s.vm("a").await;
    assert_eq!(s.sh(&id, "echo $((1+2))").await.stdout, b"3\n");
    let outcome = s.run(&id, ExecSpec::argv(["echo", "$((1+2))"])).await;
    assert_eq!(outcome.stdout, b"$((1+2))\n");
    let outcome = s.run(&id, ExecSpec::argv(["no-such-program-hearth"])).await;
    assert_eq!(outcome.exit_code, 127);
    assert!(text(&outcome.stderr).contains("no-such-program-hearth"));
    let outcome = s.sh(&id, "echo out; echo err >&2; exit 4").await;
    assert_eq!(
        (outcome.exit_code, outcome.stdout, outcome.stderr),
        (4, b"out\n".to_vec(), b"err\n".to_vec())
    );
}

#[tokio::test]
async fn environment_is_layered_and_clean() {
    let s = Setup::with(|c| {
        c.env.insert("LAYER".into(), "provider".into());
        c.env.insert("FROM_PROVIDER".into(), "p".into());
    });
    let vm_id = VmId::new("env").unwrap();
    let spec = VmSpec {
        env: [
            ("LAYER".to_owned(), "vm".to_owned()),
            ("FROM_VM".to_owned(), "v".to_owned()),
        ]
        .into(),
        ..VmSpec::default()
    };
    s.provider.create_vm_with_spec(&vm_id, &spec).await.unwrap();
    let outcome = s
        .run(
            &vm_id,
            ExecSpec::shell(r#"echo "$LAYER $FROM_PROVIDER $FROM_VM $REQ $HOME"; echo "${CARGO_PKG_NAME:-clean}""#)
                .with_env("REQ", "r"),
        )
        .await;
    assert_eq!(
        text(&outcome.stdout),
        "vm p v r /workspace\nclean\n",
        "HOME is the volume at its fixed path"
    );
    let outcome = s
        .run(
            &vm_id,
            ExecSpec::shell("echo $LAYER").with_env("LAYER", "request"),
        )
        .await;
    assert_eq!(outcome.stdout, b"request\n");
    assert!(s.sh(&vm_id, "command -v ls").await.success(), "PATH is set");
}

#[tokio::test]
async fn cwd_and_stdin() {
    let s = Setup::new();
    let id = s.vm("cwd").await;
    assert!(s.sh(&id, "mkdir -p sub/dir").await.success());
    let outcome = s
        .run(&id, ExecSpec::argv(["pwd"]).with_cwd("sub/dir"))
        .await;
    assert_eq!(text(&outcome.stdout).trim(), "/workspace/sub/dir");
    let outcome = s
        .run(
            &id,
            ExecSpec::argv(["wc", "-c"]).with_stdin(b"12345".to_vec()),
        )
        .await;
    assert_eq!(text(&outcome.stdout).trim(), "5");
    // A command that ignores a large stdin does not hang.
    let outcome = s
        .run(&id, ExecSpec::argv(["true"]).with_stdin(vec![0u8; 4 << 20]))
        .await;
    assert!(outcome.success());
}

#[tokio::test]
async fn exit_by_signal_is_128_plus_signal() {
    let s = Setup::new();
    let id = s.vm("sig").await;
    let outcome = s.sh(&id, "kill -9 $$").await;
    assert_eq!(outcome.exit_code, 137);
    assert_eq!(outcome.signal, Some(9));
    assert!(!outcome.timed_out);
    let outcome = s.sh(&id, "kill -TERM $$").await;
    assert_eq!((outcome.exit_code, outcome.signal), (143, Some(15)));
}

#[tokio::test]
async fn timeout_kills_the_whole_process_tree() {
    let s = Setup::new();
    let id = s.vm("tmo").await;
    let started = Instant::now();
    let outcome = s
        .run(
            &id,
            ExecSpec::shell("sleep 300 & echo $! > pid; sleep 300")
                .with_timeout(Duration::from_millis(500)),
        )
        .await;
    assert!(outcome.timed_out);
    assert_eq!((outcome.exit_code, outcome.signal), (137, Some(9)));
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(
        sleepers(&s, &id).await,
        0,
        "a background sleep survived the timeout"
    );
}

#[tokio::test]
async fn background_child_holding_the_pipes_does_not_hang_the_exec() {
    let s = Setup::new();
    let id = s.vm("bg").await;
    let started = Instant::now();
    let outcome = s.sh(&id, "sleep 300 & echo $! > pid; echo done").await;
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(outcome.exit_code, 0);
    assert!(!outcome.timed_out);
    assert_eq!(outcome.stdout, b"done\n");
    assert_eq!(
        sleepers(&s, &id).await,
        0,
        "nothing from an exec outlives it"
    );
}

/// `sleep` processes running in the VM's sandbox (seen from inside: its own pid namespace).
async fn sleepers(s: &Setup, id: &VmId) -> usize {
    let outcome = s
        .sh(
            id,
            "for p in /proc/[0-9]*; do cat $p/comm 2>/dev/null; done",
        )
        .await;
    text(&outcome.stdout)
        .lines()
        .filter(|l| *l == "sleep")
        .count()
}

#[tokio::test]
async fn huge_output_is_capped_and_drained() {
    let s = Setup::new();
    let id = s.vm("big").await;
    let started = Instant::now();
    let outcome = s
        .run(
            &id,
            ExecSpec::shell("head -c 100000000 /dev/zero; echo tail >&2")
                .with_max_output_bytes(1 << 20),
        )
        .await;
    assert_eq!(outcome.exit_code, 0);
    assert_eq!(outcome.stdout.len(), 1 << 20);
    assert!(outcome.stdout_truncated);
    assert_eq!(outcome.stderr, b"tail\n");
    assert!(!outcome.stderr_truncated);
    // Not a benchmark, a hang detector: draining 100 MB takes well under a second here.
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn streamed_chunks_arrive_in_order_and_are_not_repeated() {
    let s = Setup::new();
    let id = s.vm("stream").await;
    let (tx, mut rx) = tokio::sync::mpsc::channel::<OutputChunk>(4);
    let collector = tokio::spawn(async move {
        let (mut out, mut err) = (Vec::new(), Vec::new());
        while let Some(chunk) = rx.recv().await {
            match chunk.stream {
                OutputStream::Stdout => out.extend_from_slice(&chunk.data),
                OutputStream::Stderr => err.extend_from_slice(&chunk.data),
            }
        }
        (out, err)
    });
    let script = "i=0; while [ $i -lt 2000 ]; do echo line$i; i=$((i+1)); done; echo bye >&2";
    let outcome = s
        .provider
        .exec(&id, ExecSpec::shell(script), Some(tx))
        .await
        .unwrap();
    assert_eq!(outcome.exit_code, 0);
    assert!(
        outcome.stdout.is_empty() && outcome.stderr.is_empty(),
        "{outcome:?}"
    );
    let (out, err) = collector.await.unwrap();
    let expected: String = (0..2000).map(|i| format!("line{i}\n")).collect();
    assert_eq!(text(&out), expected);
    assert_eq!(err, b"bye\n");
}

#[tokio::test]
async fn stop_kills_what_runs_in_the_vm() {
    let s = Setup::new();
    let id = s.vm("stop").await;
    let exec = {
        let provider_exec =
            s.provider
                .exec(&id, ExecSpec::shell("touch started; exec sleep 300"), None);
        // Run the exec and, once it has started, stop the VM.
        let stopper = async {
            while !s.volume(&id).join("started").exists() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            s.provider.stop_vm(&id).await.unwrap()
        };
        tokio::time::timeout(Duration::from_secs(20), async {
            tokio::join!(provider_exec, stopper)
        })
        .await
        .expect("stop did not end the exec")
    };
    let (outcome, view) = exec;
    let err = outcome.unwrap_err();
    assert_eq!(err.kind(), ProviderErrorKind::InvalidState, "{err}");
    assert!(err.to_string().contains("stopped or destroyed"), "{err}");
    assert_eq!(view.state, VmState::Stopped);
}

#[tokio::test]
async fn dropping_an_exec_kills_its_process_group() {
    let s = Setup::new();
    let id = s.vm("drop").await;
    let pid_file = s.volume(&id).join("pid");
    let exec = s.provider.exec(
        &id,
        ExecSpec::shell("sleep 300 & echo $! > pid; wait"),
        None,
    );
    let wait_for_pid = async {
        while !std::fs::read_to_string(&pid_file).is_ok_and(|s| s.ends_with('\n')) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::select! {
        _ = exec => panic!("the exec should not finish"),
        _ = wait_for_pid => {}
    }
    // The cancel reaches the agent as a message and the killed group is reaped by the sandbox's
    // init: under load a killed `sleep` may still show in /proc for a moment. One look, after a
    // second (not a poll: every exec ends with a sweep of leftovers, which would hide a cancel
    // that killed nothing).
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        sleepers(&s, &id).await,
        0,
        "a cancelled exec left its sleep running"
    );
}

#[tokio::test]
async fn bootstrap_runs_once_in_the_volume_and_failure_leaves_nothing_on_disk() {
    let s = Setup::new();
    let failing = VmSpec {
        bootstrap: Some(vec![
            "sh".into(),
            "-c".into(),
            "touch partial; echo boom >&2; exit 3".into(),
        ]),
        ..VmSpec::default()
    };
    let id = VmId::new("boot").unwrap();
    let err = s
        .provider
        .create_vm_with_spec(&id, &failing)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ProviderErrorKind::CommandFailed);
    let message = err.to_string();
    assert!(
        message.contains("boom") && message.contains('3'),
        "{message}"
    );
    assert!(s.provider.get_vm(&id).await.unwrap().is_none());
    // The half-built directory is moved out of vms/ at once and deleted in the background.
    assert!(!s.root().join("vms/boot").exists());

    let ok = VmSpec {
        bootstrap: Some(vec!["sh".into(), "-c".into(), "echo ready > marker".into()]),
        ..VmSpec::default()
    };
    s.provider.create_vm_with_spec(&id, &ok).await.unwrap();
    assert_eq!(
        s.provider.get_file(&id, "marker", 100).await.unwrap(),
        b"ready\n"
    );
    // Restores skip the bootstrap.
    s.provider
        .snapshot_vm(&id, &SnapshotId::new("s").unwrap())
        .await
        .unwrap();
    let restore = VmSpec {
        restore_from: Some(SnapshotId::new("s").unwrap()),
        ..failing
    };
    s.provider
        .create_vm_with_spec(&VmId::new("restored").unwrap(), &restore)
        .await
        .unwrap();
}

#[tokio::test]
async fn base_seeds_the_volume_from_a_directory_or_tarball() {
    let s = Setup::new();
    let base = s.dir.path().join("base");
    std::fs::create_dir_all(base.join("bin")).unwrap();
    std::fs::write(base.join("bin/tool"), "#!/bin/sh\necho tool ran\n").unwrap();
    std::fs::set_permissions(
        base.join("bin/tool"),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    std::os::unix::fs::symlink("bin/tool", base.join("link")).unwrap();

    let from_dir = VmId::new("from-dir").unwrap();
    let spec = VmSpec {
        base: Some(base.clone()),
        ..VmSpec::default()
    };
    s.provider
        .create_vm_with_spec(&from_dir, &spec)
        .await
        .unwrap();
    assert_eq!(s.sh(&from_dir, "./link").await.stdout, b"tool ran\n");

    let tarball = s.dir.path().join("base.tar.zst");
    let status = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "tar -C {} -cf - . | zstd -q -o {} || tar -C {} --zstd -cf {} .",
            base.display(),
            tarball.display(),
            base.display(),
            tarball.display()
        ))
        .status();
    if !status.is_ok_and(|s| s.success()) {
        eprintln!("skipping the .tar.zst base: no zstd tool to build one");
        return;
    }
    let from_tar = VmId::new("from-tar").unwrap();
    let spec = VmSpec {
        base: Some(tarball),
        ..VmSpec::default()
    };
    s.provider
        .create_vm_with_spec(&from_tar, &spec)
        .await
        .unwrap();
    assert_eq!(s.sh(&from_tar, "bin/tool").await.stdout, b"tool ran\n");

    let bad = VmSpec {
        base: Some(s.dir.path().join("missing")),
        ..VmSpec::default()
    };
    let err = s
        .provider
        .create_vm_with_spec(&VmId::new("bad").unwrap(), &bad)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ProviderErrorKind::InvalidArgument);
    assert!(!s.root().join("vms/bad").exists());
}

#[tokio::test]
async fn reopen_reconciles_vms_snapshots_and_leftovers() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    {
        let p = ProcessProvider::open(ProcessConfig::new(&root)).unwrap();
        for id in ["running", "stopped", "pool-7"] {
            p.create_vm(&VmId::new(id).unwrap()).await.unwrap();
        }
        let running = VmId::new("running").unwrap();
        p.put_file(&running, "state/file", b"persisted", None)
            .await
            .unwrap();
        p.stop_vm(&VmId::new("stopped").unwrap()).await.unwrap();
        p.rename_vm(
            &VmId::new("pool-7").unwrap(),
            &VmId::new("claimed").unwrap(),
        )
        .await
        .unwrap();
        p.snapshot_vm(&running, &SnapshotId::new("snap").unwrap())
            .await
            .unwrap();
        p.destroy_vm(&VmId::new("stopped").unwrap()).await.ok();
        p.create_vm(&VmId::new("stopped").unwrap()).await.unwrap();
        p.stop_vm(&VmId::new("stopped").unwrap()).await.unwrap();
    }
    // Debris of a crash: a half-created VM, a staging dir, a meta temp file, and a VM whose meta
    // still carries its pre-rename id.
    std::fs::create_dir_all(root.join("vms/half/volume")).unwrap();
    std::fs::create_dir_all(root.join("tmp/snapshot-deadbeef")).unwrap();
    std::fs::write(root.join("vms/running/meta.json.tmp"), b"{").unwrap();
    let claimed_meta = root.join("vms/claimed/meta.json");
    let meta = std::fs::read_to_string(&claimed_meta).unwrap();
    std::fs::write(&claimed_meta, meta.replace("\"claimed\"", "\"pool-7\"")).unwrap();

    let p = ProcessProvider::open(ProcessConfig::new(&root)).unwrap();
    let vms: Vec<(String, VmState)> = p
        .list_vms()
        .await
        .unwrap()
        .into_iter()
        .map(|v| (v.vm_id.to_string(), v.state))
        .collect();
    assert_eq!(
        vms,
        [
            ("claimed".to_owned(), VmState::Running),
            ("running".to_owned(), VmState::Running),
            ("stopped".to_owned(), VmState::Stopped),
        ]
    );
    let running = VmId::new("running").unwrap();
    assert_eq!(
        p.get_file(&running, "state/file", 100).await.unwrap(),
        b"persisted"
    );
    assert!(
        p.get_snapshot(&SnapshotId::new("snap").unwrap())
            .await
            .unwrap()
            .is_some()
    );
    assert!(!root.join("vms/half").exists());
    assert!(!root.join("vms/running/meta.json.tmp").exists());
    assert_eq!(std::fs::read_dir(root.join("tmp")).unwrap().count(), 0);
    let meta = std::fs::read_to_string(&claimed_meta).unwrap();
    assert!(
        meta.contains("\"claimed\"") && !meta.contains("pool-7"),
        "{meta}"
    );
    // The reopened VMs work.
    let outcome = p
        .exec(
            &VmId::new("claimed").unwrap(),
            ExecSpec::argv(["true"]),
            None,
        )
        .await
        .unwrap();
    assert!(outcome.success());
}

#[tokio::test]
async fn symlinks_cannot_escape_the_volume() {
    let s = Setup::new();
    let id = s.vm("esc").await;
    let outside = s.dir.path().join("outside");
    std::fs::create_dir(&outside).unwrap();
    std::fs::write(outside.join("secret"), b"host").unwrap();
    let script = format!(
        "ln -s {} escape && ln -s {}/secret leak",
        outside.display(),
        outside.display()
    );
    assert!(s.sh(&id, &script).await.success());
    let p = &s.provider;
    for result in [
        p.get_file(&id, "escape/secret", 100).await.map(drop),
        p.get_file(&id, "leak", 100).await.map(drop),
        p.put_file(&id, "escape/new", b"x", None).await.map(drop),
        p.put_file(&id, "escape/sub/new", b"x", None)
            .await
            .map(drop),
        p.exec(&id, ExecSpec::argv(["true"]).with_cwd("escape"), None)
            .await
            .map(drop),
    ] {
        // Refused (the path leaves the volume) or not found (inside the sandbox the host
        // path does not exist): never the host file.
        let kind = result.unwrap_err().kind();
        assert!(
            matches!(
                kind,
                ProviderErrorKind::InvalidArgument | ProviderErrorKind::NotFound
            ),
            "{kind:?}"
        );
    }
    assert!(!outside.join("new").exists() && !outside.join("sub").exists());
    // Writing onto the symlink itself replaces the link, not the file it points to.
    p.put_file(&id, "leak", b"inside", None).await.unwrap();
    assert_eq!(std::fs::read(outside.join("secret")).unwrap(), b"host");
    assert_eq!(p.get_file(&id, "leak", 100).await.unwrap(), b"inside");
    // Symlinks inside the volume are fine.
    assert!(s.sh(&id, "mkdir real && ln -s real inner").await.success());
    p.put_file(&id, "inner/f", b"ok", None).await.unwrap();
    assert_eq!(p.get_file(&id, "real/f", 100).await.unwrap(), b"ok");
}

#[tokio::test]
async fn put_file_applies_the_mode() {
    let s = Setup::new();
    let id = s.vm("mode").await;
    s.provider
        .put_file(&id, "bin/run.sh", b"#!/bin/sh\necho ran\n", Some(0o755))
        .await
        .unwrap();
    assert_eq!(s.sh(&id, "stat -c %a bin/run.sh").await.stdout, b"755\n");
    assert_eq!(s.sh(&id, "bin/run.sh").await.stdout, b"ran\n");
    // Replacing without a mode keeps the existing one.
    s.provider
        .put_file(&id, "bin/run.sh", b"#!/bin/sh\necho again\n", None)
        .await
        .unwrap();
    assert_eq!(s.sh(&id, "bin/run.sh").await.stdout, b"again\n");
    assert!(s.sh(&id, "mkfifo pipe").await.success());
    let err = s.provider.get_file(&id, "pipe", 100).await.unwrap_err();
    assert_eq!(err.kind(), ProviderErrorKind::InvalidArgument);
}

#[tokio::test]
async fn the_default_sandbox_isolates_commands() {
    let s = Setup::new();
    assert_eq!(s.provider.isolation(), Isolation::Sandbox);
    let id = s.vm("sandboxed").await;

    let outcome = s.run(&id, ExecSpec::argv(["hostname"])).await;
    assert_eq!(text(&outcome.stdout).trim(), "sandboxed", "{outcome:?}");
    let outcome = s.run(&id, ExecSpec::argv(["cat", "/proc/net/dev"])).await;
    let interfaces: Vec<String> = text(&outcome.stdout)
        .lines()
        .skip(2)
        .filter_map(|l| l.split(':').next().map(|i| i.trim().to_owned()))
        .collect();
    assert_eq!(interfaces, ["lo"], "{outcome:?}");

    // Outside /tmp: inside the sandbox /tmp (and /var/tmp) is a private tmpfs, so writes there
    // succeed but vanish.
    let outside = PathBuf::from(format!("/opt/hearth-bwrap-test-{}", std::process::id()));
    let outcome = s.sh(&id, &format!("echo x > {}", outside.display())).await;
    assert_ne!(outcome.exit_code, 0);
    assert!(!outside.exists(), "the host is read-only");
    let outcome = s
        .sh(
            &id,
            "echo inside > f && cat f && echo tmp > /tmp/t && cat /tmp/t",
        )
        .await;
    assert_eq!(outcome.stdout, b"inside\ntmp\n", "{outcome:?}");
    assert_eq!(
        s.provider.get_file(&id, "f", 100).await.unwrap(),
        b"inside\n"
    );
    let outcome = s.sh(&id, "ps -e -o pid= | wc -l").await;
    let visible: u32 = text(&outcome.stdout).trim().parse().unwrap_or(0);
    assert!(
        visible > 0 && visible < 10,
        "own pid namespace: {outcome:?}"
    );

    let outcome = s.run(&id, ExecSpec::argv(["no-such-program-hearth"])).await;
    assert_eq!(outcome.exit_code, 127, "{outcome:?}");
    let outcome = s
        .run(
            &id,
            ExecSpec::shell("sleep 300 & sleep 300").with_timeout(Duration::from_millis(300)),
        )
        .await;
    assert!(outcome.timed_out);
}

#[tokio::test]
async fn the_provider_reports_its_version_with_the_sandbox_tools() {
    let sandboxed = Setup::new();
    let version = sandboxed.provider.version().expect("a version");
    assert!(
        version.starts_with(&format!("process {}", env!("CARGO_PKG_VERSION"))),
        "{version}"
    );
    assert!(version.contains("bubblewrap"), "{version}");
    let open = Setup::with(|c| c.isolation = hearth_worker::provider::Isolation::None);
    let version = open.provider.version().expect("a version");
    assert_eq!(version, format!("process {}", env!("CARGO_PKG_VERSION")));
}
