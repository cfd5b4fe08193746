//! Shared by the oci test suites: opens the `oci` provider where `crun` and `tini` are installed
//! (or says why the suite skips), and writes a busybox image built locally (no registry) as an
//! OCI layout.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use hearth_worker::provider::{OciConfig, ProcessConfig, ProcessProvider};

/// The default `[oci]` settings, or why the oci tests skip here.
pub fn config() -> Result<OciConfig, String> {
    let config = OciConfig::default();
    for (bin, package) in [(&config.runtime, "crun"), (&config.init, "tini")] {
        if !bin.is_file() {
            return Err(format!(
                "{} is not installed (apt-get install {package}, or run scripts/setup.sh)",
                bin.display()
            ));
        }
    }
    Ok(config)
}

/// The oci provider rooted at `root`, or `None` with the reason printed.
pub fn open(root: &Path) -> Option<ProcessProvider> {
    match config() {
        Ok(oci) => Some(ProcessProvider::open_oci(ProcessConfig::new(root), oci).unwrap()),
        Err(reason) => {
            eprintln!("skipping oci test: {reason}");
            None
        }
    }
}

/// A busybox image (see `hearth_testkit::images`) as an OCI layout at `dir`, with `IMAGE=busybox`
/// in its environment; `None`, with the reason printed, without busybox-static.
pub fn busybox_image(dir: &Path) -> Option<PathBuf> {
    let layers = match hearth_testkit::images::busybox_layers() {
        Ok(layers) => layers,
        Err(reason) => {
            eprintln!("skipping image test: {reason}");
            return None;
        }
    };
    hearth_worker::image::write_layout(dir, &layers, &["PATH=/bin".into(), "IMAGE=busybox".into()])
        .unwrap();
    Some(dir.to_path_buf())
}

/// Our containers crun lists in the provider's runtime state directory: (id, status).
pub fn containers(root: &Path) -> Vec<(String, String)> {
    let out = std::process::Command::new("/usr/bin/crun")
        .arg("--root")
        .arg(root.join("runtime"))
        .args(["list", "--format", "json"])
        .output()
        .unwrap();
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    list.as_array()
        .into_iter()
        .flatten()
        .map(|c| {
            (
                c["id"].as_str().unwrap_or_default().to_owned(),
                c["status"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

/// Waits (bounded) until `ok` holds for the container list.
pub async fn wait_containers(root: &Path, ok: impl Fn(&[(String, String)]) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let list = containers(root);
        if ok(&list) {
            return;
        }
        assert!(Instant::now() < deadline, "containers: {list:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `crun kill <container> KILL` in the provider's runtime state directory, as an OOM kill, a
/// crash or an operator would.
pub fn crun_kill(root: &Path, container: &str) {
    let status = std::process::Command::new("/usr/bin/crun")
        .arg("--root")
        .arg(root.join("runtime"))
        .args(["kill", container, "KILL"])
        .status()
        .unwrap();
    assert!(status.success());
}

/// The oci provider at `<dir>/oci` with one VM `id` created, its container listed; or `None`
/// (reason printed).
pub async fn open_with_vm(
    dir: &Path,
    id: &hearth_worker::provider::VmId,
) -> Option<(ProcessProvider, PathBuf)> {
    use hearth_worker::provider::VmProvider;
    let root = dir.join("oci");
    let p = open(&root)?;
    p.create_vm(id).await.unwrap();
    wait_containers(&root, |l| l.len() == 1).await;
    Some((p, root))
}
