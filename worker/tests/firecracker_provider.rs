//! The firecracker provider against a real Firecracker: runs only where `FIRECRACKER_BIN`,
//! `FIRECRACKER_KERNEL` (an uncompressed `vmlinux` with virtio-mmio and vsock) and
//! `FIRECRACKER_ROOTFS` (an ext4 image whose init runs `hearth-guest-agent`) are set and
//! `/dev/kvm` exists; skips with the reason printed everywhere else (these machines have no
//! hardware KVM and no Firecracker). The shared contract suite runs on it too
//! (`provider_contract`, module `firecracker`).

use std::time::{Duration, Instant};

use hearth_worker::provider::{
    ExecSpec, FirecrackerConfig, FirecrackerProvider, ProviderErrorKind, SnapshotId, VmId,
    VmProvider, VmQuery, VmSpec, VmState,
};

fn provider() -> Option<(FirecrackerProvider, tempfile::TempDir)> {
    let dir = tempfile::tempdir().unwrap();
    match FirecrackerConfig::from_env(dir.path().join("fc")) {
        Ok(config) => {
            let config = FirecrackerConfig {
                kill_on_drop: true,
                ..config
            };
            Some((FirecrackerProvider::open(config).unwrap(), dir))
        }
        Err(reason) => {
            eprintln!("skipping firecracker test: {reason}");
            None
        }
    }
}

fn vm(id: &str) -> VmId {
    VmId::new(id).unwrap()
}

fn snap(id: &str) -> SnapshotId {
    SnapshotId::new(id).unwrap()
}

async fn sh(p: &FirecrackerProvider, id: &VmId, cmd: &str) -> String {
    let outcome = p.exec(id, ExecSpec::shell(cmd), None).await.unwrap();
    assert_eq!(outcome.exit_code, 0, "{cmd}: {outcome:?}");
    String::from_utf8(outcome.stdout).unwrap().trim().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clones_of_one_snapshot_get_their_own_identity() {
    let Some((p, dir)) = provider() else {
        return;
    };
    let template = vm("template");
    p.create_vm(&template).await.unwrap();
    p.put_file(&template, "state", b"from the template", None)
        .await
        .unwrap();
    p.snapshot_vm(&template, &snap("tpl")).await.unwrap();
    let mut seen = Vec::new();
    for clone in ["clone-a", "clone-b"] {
        let spec = VmSpec {
            restore_from: Some(snap("tpl")),
            ..VmSpec::default()
        };
        p.create_vm_with_spec(&vm(clone), &spec).await.unwrap();
        let out = sh(
            &p,
            &vm(clone),
            "hostname; cat /etc/machine-id; head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo; cat state",
        )
        .await;
        let lines: Vec<String> = out.lines().map(str::to_owned).collect();
        assert_eq!(lines[0], clone);
        assert_eq!(lines[3], "from the template");
        seen.push(lines);
    }
    assert_ne!(seen[0][1], seen[1][1], "machine ids differ");
    assert_ne!(seen[0][2], seen[1][2], "random streams differ");
    for id in ["template", "clone-a", "clone-b"] {
        p.destroy_vm(&vm(id)).await.unwrap();
    }
    let left: Vec<_> = std::fs::read_dir(dir.path().join("fc/run"))
        .unwrap()
        .flatten()
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_resume_timeout_and_a_dead_vmm() {
    let Some((p, _dir)) = provider() else {
        return;
    };
    let id = vm("vm");
    p.create_vm(&id).await.unwrap();
    p.stop_vm(&id).await.unwrap();
    assert_eq!(
        p.exec(&id, ExecSpec::argv(["true"]), None)
            .await
            .unwrap_err()
            .kind(),
        ProviderErrorKind::InvalidState
    );
    p.start_vm(&id).await.unwrap();
    let outcome = p
        .exec(
            &id,
            ExecSpec::shell("sleep 30").with_timeout(Duration::from_millis(300)),
            None,
        )
        .await
        .unwrap();
    assert!(outcome.timed_out);
    // Kill the VMM: the VM is reported failed, not hung.
    let pid: i32 = std::fs::read_dir(_dir.path().join("fc/run"))
        .unwrap()
        .flatten()
        .find_map(|e| std::fs::read_to_string(e.path().join("firecracker.pid")).ok())
        .and_then(|p| p.trim().parse().ok())
        .unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while p.get_vm(&id).await.unwrap().unwrap().state != VmState::Destroyed {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let err = p
        .exec(&id, ExecSpec::argv(["true"]), None)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("failed"), "{err}");
}

/// Selecting the provider on a host that lacks what it needs (here: everything) exits 64 with one
/// line that names each missing piece, before anything else starts.
#[test]
fn the_worker_with_firecracker_selected_exits_64_saying_what_is_missing() {
    let dir = tempfile::tempdir().unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_hearth-worker"))
        .args(["--provider", "firecracker", "--metrics-listen", "off"])
        .arg("--data-dir")
        .arg(dir.path())
        .arg("--firecracker-bin")
        .arg(dir.path().join("no-firecracker"))
        .arg("--firecracker-kernel")
        .arg(dir.path().join("no-vmlinux"))
        .env_remove("HEARTH_WORKER_CONFIG")
        .env_remove("HEARTH_FIRECRACKER_ROOTFS")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(64), "{stderr}");
    for needle in [
        "firecracker cannot start",
        "no-firecracker",
        "no-vmlinux",
        "no rootfs",
    ] {
        assert!(stderr.contains(needle), "{needle}: {stderr}");
    }
}
