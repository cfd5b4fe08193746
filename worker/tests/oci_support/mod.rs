//! Shared by the oci test suites: opens the `oci` provider where `crun` and `tini` are installed
//! (or says why the suite skips), and writes a busybox image built locally (no registry) as an
//! OCI layout.

#![allow(dead_code)]

use std::path::{Path, PathBuf};

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
