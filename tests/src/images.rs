//! Container images built locally for tests (no registry): a busybox root filesystem from
//! Debian's `busybox-static`, as layer tarballs, and tar archives of image layouts.

use std::path::Path;

/// The busybox binary the test images are built from.
pub const BUSYBOX: &str = "/bin/busybox";

/// Applets linked in `/bin` of the test image.
const APPLETS: [&str; 15] = [
    "sh", "cat", "echo", "ls", "id", "sleep", "touch", "mkdir", "rm", "true", "false", "env",
    "grep", "wc", "test",
];

/// Two layers: busybox with its applets in `/bin`, then `/etc/image-release`
/// (`hearth-test-busybox`), so a test can tell the image's files from the host's. `Err` says why
/// not (busybox-static missing).
pub fn busybox_layers() -> Result<Vec<Vec<u8>>, String> {
    let busybox = std::fs::read(BUSYBOX).map_err(|e| {
        format!(
            "{BUSYBOX} is missing ({e}): apt-get install busybox-static, or run scripts/setup.sh"
        )
    })?;
    let mut bin = tar::Builder::new(Vec::new());
    let mut header = tar::Header::new_gnu();
    header.set_entry_type(tar::EntryType::Directory);
    header.set_mode(0o755);
    header.set_size(0);
    append(&mut bin, &mut header, "bin/", &[]);
    let mut header = tar::Header::new_gnu();
    header.set_mode(0o755);
    header.set_size(busybox.len() as u64);
    append(&mut bin, &mut header, "bin/busybox", &busybox);
    for applet in APPLETS {
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(tar::EntryType::Symlink);
        header.set_mode(0o777);
        header.set_size(0);
        bin.append_link(&mut header, format!("bin/{applet}"), "busybox")
            .map_err(|e| e.to_string())?;
    }
    let mut etc = tar::Builder::new(Vec::new());
    let release = b"hearth-test-busybox\n";
    let mut header = tar::Header::new_gnu();
    header.set_mode(0o644);
    header.set_size(release.len() as u64);
    append(&mut etc, &mut header, "etc/image-release", release);
    Ok(vec![
        bin.into_inner().map_err(|e| e.to_string())?,
        etc.into_inner().map_err(|e| e.to_string())?,
    ])
}

fn append(builder: &mut tar::Builder<Vec<u8>>, header: &mut tar::Header, path: &str, data: &[u8]) {
    builder
        .append_data(header, path, data)
        .expect("appending to an in-memory tar");
}

/// Writes `dir` (an image layout) as the tar archive `out`, as `skopeo copy oci-archive:` would.
pub fn tar_dir(dir: &Path, out: &Path) -> std::io::Result<()> {
    let mut builder = tar::Builder::new(std::fs::File::create(out)?);
    builder.follow_symlinks(false);
    builder.append_dir_all(".", dir)?;
    builder.finish()
}
