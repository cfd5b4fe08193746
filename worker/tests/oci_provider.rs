//! What the `oci` provider adds to the contract suite: its VMs really are crun containers (one
//! per VM from create to destroy, frozen while stopped), a container that dies fails its VM with the runtime's exit code, a
//! template base that is a container image runs on the image's root filesystem (on `oci` and on
//! the process provider's sandbox, through snapshots and restores), and a missing runtime or init
//! is `Unavailable` saying what to install. Skips, with the reason printed, without crun, tini or
//! busybox-static (`scripts/setup.sh` installs them).

mod oci_support;

use oci_support::{containers, wait_containers};

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use hearth_worker::provider::{
    ExecOutcome, ExecSpec, OciConfig, ProcessConfig, ProcessProvider, ProviderErrorKind,
    SnapshotId, VmId, VmProvider, VmQuery, VmSpec, VmState,
};

fn vm(id: &str) -> VmId {
    VmId::new(id).unwrap()
}

async fn sh(p: &ProcessProvider, vm_id: &VmId, script: &str) -> ExecOutcome {
    p.exec(vm_id, ExecSpec::shell(script), None).await.unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vms_are_crun_containers_only_while_they_run() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("oci");
    let Some(p) = oci_support::open(&root) else {
        return;
    };
    assert_eq!(p.name(), "oci");
    assert_eq!(VmProvider::isolation(&p).mode, "oci");
    assert!(p.version().unwrap().contains("crun"), "{:?}", p.version());
    let id = vm("box-1");
    p.create_vm(&id).await.unwrap();
    // crun records a container's state just after starting it: wait for the record.
    wait_containers(&root, |l| l.len() == 1).await;
    let list = containers(&root);
    assert_eq!(list.len(), 1, "{list:?}");
    assert!(list[0].0.starts_with("hearth-"), "{list:?}");
    assert_eq!(list[0].1, "running");
    // Inside: the init is pid 1, the agent its child, commands run as uid 1000 with no
    // capabilities, on a read-only root, without network interfaces but loopback.
    let out = sh(
        &p,
        &id,
        "cat /proc/1/cmdline | tr '\\0' ' '; echo; id -u; grep CapEff /proc/self/status; \
         touch /probe 2>&1; cat /proc/net/dev | tail -n +3 | cut -d: -f1 | tr -d ' '; hostname",
    )
    .await;
    let out = text(&out.stdout);
    assert!(out.starts_with("/.hearth/init -- "), "{out}");
    assert!(out.contains("\n1000\n"), "{out}");
    assert!(out.contains("CapEff:\t0000000000000000"), "{out}");
    assert!(out.contains("Read-only file system"), "{out}");
    assert!(
        out.contains("\nlo\nbox-1\n"),
        "only lo, own host name: {out}"
    );

    // Rename keeps the container (a Hearth-side id mapping): same container, files kept.
    p.put_file(&id, "kept.txt", b"kept", None).await.unwrap();
    let renamed = vm("session-1");
    p.rename_vm(&id, &renamed).await.unwrap();
    assert_eq!(containers(&root), list);
    assert_eq!(
        p.get_file(&renamed, "kept.txt", 100).await.unwrap(),
        b"kept"
    );

    // Stop freezes the container and start thaws it: the same container throughout (crun
    // lists it as running: Hearth's freezer cgroup, not crun's, holds it; see `oci_stop.rs`).
    p.stop_vm(&renamed).await.unwrap();
    assert_eq!(containers(&root), list);
    p.start_vm(&renamed).await.unwrap();
    assert_eq!(containers(&root), list);
    p.destroy_vm(&renamed).await.unwrap();
    wait_containers(&root, <[_]>::is_empty).await;
    let bundles = std::fs::read_dir(root.join("bundles")).unwrap().count();
    assert_eq!(bundles, 0, "bundles are removed with their containers");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_container_that_dies_fails_its_vm_with_the_runtime_exit_code() {
    let dir = tempfile::tempdir().unwrap();
    let id = vm("doomed");
    let Some((p, root)) = oci_support::open_with_vm(dir.path(), &id).await else {
        return;
    };
    let (container, _) = containers(&root).remove(0);
    // The container's init killed from the host, as an OOM kill or a crash would.
    oci_support::crun_kill(&root, &container);
    // Noticed without anyone touching the VM: it is a tombstone, not "assumed running".
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let view = p.get_vm(&id).await.unwrap().unwrap();
        if view.state == VmState::Destroyed {
            break;
        }
        assert!(Instant::now() < deadline, "still {view:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let err = p
        .exec(&id, ExecSpec::shell("true"), None)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ProviderErrorKind::InvalidState);
    assert!(
        err.to_string()
            .contains("vm doomed failed: the container exited with code 137"),
        "{err}"
    );
    // Its files are removed (in the background).
    let deadline = Instant::now() + Duration::from_secs(10);
    while root.join("vms/doomed").exists() {
        assert!(
            Instant::now() < deadline,
            "the failed vm's files are still there"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    wait_containers(&root, <[_]>::is_empty).await;
}

/// A busybox image layout under `dir`, or `None` (reason printed).
fn image(dir: &Path) -> Option<PathBuf> {
    oci_support::busybox_image(&dir.join("busybox-image"))
}

/// The VM runs on the image's root filesystem: busybox, no host `/usr`, the image's env.
async fn assert_on_the_image(p: &ProcessProvider, id: &VmId) {
    let out = sh(
        p,
        id,
        "test -d /usr && echo host-usr; echo image=$IMAGE; ls /bin/busybox; cat .built",
    )
    .await;
    assert_eq!(
        text(&out.stdout),
        "image=busybox\n/bin/busybox\nbootstrapped\n",
        "{out:?}"
    );
}

async fn image_base_runs_on_the_image(p: ProcessProvider, image: &Path) {
    let spec = VmSpec {
        base: Some(image.to_path_buf()),
        bootstrap: Some(vec![
            "sh".into(),
            "-c".into(),
            "echo bootstrapped > .built".into(),
        ]),
        ..VmSpec::default()
    };
    let id = vm("from-image");
    p.create_vm_with_spec(&id, &spec).await.unwrap();
    assert_on_the_image(&p, &id).await;
    // A snapshot records the image; its restores run on it too.
    let snap = SnapshotId::new("img-snap").unwrap();
    p.snapshot_vm(&id, &snap).await.unwrap();
    let restored = vm("restored");
    p.create_vm_with_spec(
        &restored,
        &VmSpec {
            restore_from: Some(snap),
            ..VmSpec::default()
        },
    )
    .await
    .unwrap();
    assert_on_the_image(&p, &restored).await;
    // A VM without a base still runs on the host's system directories.
    let plain = vm("plain");
    p.create_vm(&plain).await.unwrap();
    let out = sh(&p, &plain, "test -d /usr && echo host-usr").await;
    assert_eq!(out.stdout, b"host-usr\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_base_runs_on_its_rootfs_in_oci() {
    let dir = tempfile::tempdir().unwrap();
    let Some(image) = image(dir.path()) else {
        return;
    };
    let Some(p) = oci_support::open(&dir.path().join("oci")) else {
        return;
    };
    image_base_runs_on_the_image(p, &image).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_base_runs_on_its_rootfs_in_the_process_sandbox() {
    let dir = tempfile::tempdir().unwrap();
    let Some(image) = image(dir.path()) else {
        return;
    };
    if !Path::new("/usr/bin/bwrap").is_file() {
        eprintln!("skipping: bubblewrap is not installed");
        return;
    }
    let p = ProcessProvider::open(ProcessConfig::new(dir.path().join("root"))).unwrap();
    image_base_runs_on_the_image(p, &image).await;
}

#[tokio::test]
async fn a_bad_image_base_is_a_clear_error_and_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let Some(p) = oci_support::open(&dir.path().join("oci")) else {
        return;
    };
    let bad = dir.path().join("bad");
    std::fs::create_dir_all(bad.join("blobs/sha256")).unwrap();
    std::fs::write(bad.join("index.json"), b"{not json").unwrap();
    let spec = VmSpec {
        base: Some(bad),
        ..VmSpec::default()
    };
    let err = p.create_vm_with_spec(&vm("bad"), &spec).await.unwrap_err();
    assert_eq!(err.kind(), ProviderErrorKind::InvalidArgument, "{err}");
    assert!(err.to_string().contains("corrupt image"), "{err}");
    assert!(p.get_vm(&vm("bad")).await.unwrap().is_none());
    assert!(containers(&dir.path().join("oci")).is_empty());
}

#[test]
fn a_missing_runtime_or_init_says_what_to_install() {
    let dir = tempfile::tempdir().unwrap();
    for (config, needle) in [
        (
            OciConfig {
                runtime: "/nonexistent/crun".into(),
                ..OciConfig::default()
            },
            "/nonexistent/crun",
        ),
        (
            OciConfig {
                init: "/nonexistent/tini-static".into(),
                ..OciConfig::default()
            },
            "/nonexistent/tini-static",
        ),
    ] {
        if oci_support::config().is_err() && needle.ends_with("tini-static") {
            continue;
        }
        let err = ProcessProvider::open_oci(ProcessConfig::new(dir.path().join("r")), config)
            .unwrap_err();
        assert_eq!(err.kind(), ProviderErrorKind::Unavailable, "{err}");
        let message = err.to_string();
        assert!(message.contains(needle), "{message}");
        assert!(message.contains("apt-get install crun tini"), "{message}");
    }
}

/// `--provider oci` with a runtime that is not there (set in `[oci]` of the config file) exits
/// 64 with one line naming the binary and what to install, before anything else starts.
#[test]
fn the_worker_with_oci_selected_exits_64_naming_the_missing_runtime() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("worker.toml");
    std::fs::write(
        &config,
        format!(
            "[oci]\nruntime = \"{}\"\nseccomp = \"/nonexistent.json\"\n",
            dir.path().join("no-crun").display()
        ),
    )
    .unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_hearth-worker"))
        .args(["--provider", "oci", "--metrics-listen", "off"])
        .arg("--data-dir")
        .arg(dir.path())
        .arg("--config")
        .arg(&config)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(64), "{stderr}");
    for needle in ["no-crun", "apt-get install crun tini"] {
        assert!(stderr.contains(needle), "{needle}: {stderr}");
    }
}

/// `[oci] seccomp` replaces the default profile; one that is not JSON is refused at start.
#[test]
fn a_seccomp_profile_that_is_not_json_is_refused_at_start() {
    let Ok(oci) = oci_support::config() else {
        eprintln!("skipping: crun or tini missing");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let profile = dir.path().join("seccomp.json");
    std::fs::write(&profile, b"not json").unwrap();
    let err = ProcessProvider::open_oci(
        ProcessConfig::new(dir.path().join("r")),
        OciConfig {
            seccomp: Some(profile),
            ..oci
        },
    )
    .unwrap_err();
    assert_eq!(err.kind(), ProviderErrorKind::Unavailable, "{err}");
    assert!(err.to_string().contains("is not JSON"), "{err}");
}

/// A snapshot of an image VM imported by another worker (whose cache lacks the image) restores
/// there: the image is unpacked from the same source, and must be the same image.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_imported_image_snapshot_unpacks_its_image_from_the_same_source() {
    let dir = tempfile::tempdir().unwrap();
    let Some(image) = image(dir.path()) else {
        return;
    };
    let (Some(a), Some(b)) = (
        oci_support::open(&dir.path().join("a")),
        oci_support::open(&dir.path().join("b")),
    ) else {
        return;
    };
    let spec = VmSpec {
        base: Some(image.clone()),
        bootstrap: Some(vec![
            "sh".into(),
            "-c".into(),
            "echo bootstrapped > .built".into(),
        ]),
        ..VmSpec::default()
    };
    a.create_vm_with_spec(&vm("src"), &spec).await.unwrap();
    let snap = SnapshotId::new("shipped").unwrap();
    a.snapshot_vm(&vm("src"), &snap).await.unwrap();
    let mut stream = Vec::new();
    a.export_snapshot(&snap, &mut stream).await.unwrap();
    b.import_snapshot(&snap, &mut stream.as_slice())
        .await
        .unwrap();
    let restore = VmSpec {
        restore_from: Some(snap.clone()),
        ..VmSpec::default()
    };
    b.create_vm_with_spec(&vm("dst"), &restore).await.unwrap();
    assert_on_the_image(&b, &vm("dst")).await;
    // A different image at the source path now: the restore is refused, nothing left behind.
    let c = oci_support::open(&dir.path().join("c")).unwrap();
    c.import_snapshot(&snap, &mut stream.as_slice())
        .await
        .unwrap();
    std::fs::remove_dir_all(&image).unwrap();
    hearth_worker::image::write_layout(
        &image,
        &hearth_testkit::images::busybox_layers().unwrap(),
        &["OTHER=1".into()],
    )
    .unwrap();
    let err = c
        .create_vm_with_spec(&vm("dst"), &restore)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ProviderErrorKind::NotFound, "{err}");
    assert!(
        err.to_string().contains("not in this worker's image cache"),
        "{err}"
    );
    assert!(c.get_vm(&vm("dst")).await.unwrap().is_none());
}
