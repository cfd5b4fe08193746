//! Shared by the oci test suites: opens the `oci` provider where `crun` and `tini` are installed
//! (or says why the suite skips), and builds container images locally (no registry): a busybox
//! image from Debian's `busybox-static`, turned into an OCI layout by hand.

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

/// The busybox binary images are built from.
pub const BUSYBOX: &str = "/bin/busybox";

/// Applets linked in the test image.
const APPLETS: [&str; 14] = [
    "sh", "cat", "echo", "ls", "id", "sleep", "touch", "mkdir", "rm", "true", "false", "env",
    "grep", "wc",
];

/// Writes an OCI image layout at `dir` holding busybox and its applets in `/bin`, plus
/// `/etc/image-release` (so a test can tell the image's files from the host's), as two layers.
/// `None`, with the reason printed, without busybox-static.
pub fn busybox_image(dir: &Path) -> Option<PathBuf> {
    let Ok(busybox) = std::fs::read(BUSYBOX) else {
        eprintln!("skipping image test: {BUSYBOX} missing (apt-get install busybox-static)");
        return None;
    };
    let mut bin = tar::Builder::new(Vec::new());
    let mut header = tar::Header::new_gnu();
    header.set_entry_type(tar::EntryType::Directory);
    header.set_mode(0o755);
    header.set_size(0);
    bin.append_data(&mut header, "bin/", std::io::empty())
        .unwrap();
    let mut header = tar::Header::new_gnu();
    header.set_mode(0o755);
    header.set_size(busybox.len() as u64);
    bin.append_data(&mut header, "bin/busybox", busybox.as_slice())
        .unwrap();
    for applet in APPLETS {
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(tar::EntryType::Symlink);
        header.set_mode(0o777);
        header.set_size(0);
        bin.append_link(&mut header, format!("bin/{applet}"), "busybox")
            .unwrap();
    }
    let mut etc = tar::Builder::new(Vec::new());
    let release = b"hearth-test-busybox\n";
    let mut header = tar::Header::new_gnu();
    header.set_mode(0o644);
    header.set_size(release.len() as u64);
    etc.append_data(&mut header, "etc/image-release", &release[..])
        .unwrap();
    let layers = [bin.into_inner().unwrap(), etc.into_inner().unwrap()];
    hearth_worker::image::write_layout(dir, &layers, &["PATH=/bin".into(), "IMAGE=busybox".into()])
        .unwrap();
    Some(dir.to_path_buf())
}
