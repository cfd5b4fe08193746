//! The image unpacker against good images (OCI layout directory and archive, `docker save`) and
//! hostile ones: corrupt archives, absolute and `..` paths, device nodes, symlink escapes.

use std::os::unix::fs::PermissionsExt;

use super::*;

/// One entry of a hand-made layer. Names are written raw, so hostile ones are possible.
enum E<'a> {
    File(&'a str, &'a [u8]),
    Dir(&'a str),
    Symlink(&'a str, &'a str),
    Hardlink(&'a str, &'a str),
    Char(&'a str),
}

fn layer(entries: &[E]) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    for entry in entries {
        let mut header = tar::Header::new_gnu();
        let (name, data): (&str, &[u8]) = match entry {
            E::File(name, data) => {
                header.set_entry_type(tar::EntryType::Regular);
                header.set_mode(0o4755);
                (name, data)
            }
            E::Dir(name) => {
                header.set_entry_type(tar::EntryType::Directory);
                header.set_mode(0o755);
                (name, b"")
            }
            E::Symlink(name, target) | E::Hardlink(name, target) => {
                header.set_entry_type(if matches!(entry, E::Symlink(..)) {
                    tar::EntryType::Symlink
                } else {
                    tar::EntryType::Link
                });
                let link = &mut header.as_old_mut().linkname;
                link[..target.len()].copy_from_slice(target.as_bytes());
                header.set_mode(0o777);
                (name, b"")
            }
            E::Char(name) => {
                header.set_entry_type(tar::EntryType::Char);
                header.set_mode(0o666);
                header.set_device_major(1).unwrap();
                header.set_device_minor(3).unwrap();
                (name, b"")
            }
        };
        // Raw name bytes: the tar crate's own setters refuse `..` and absolute paths.
        let raw = &mut header.as_old_mut().name;
        raw.fill(0);
        raw[..name.len()].copy_from_slice(name.as_bytes());
        header.set_size(data.len() as u64);
        header.set_cksum();
        builder.append(&header, data).unwrap();
    }
    builder.into_inner().unwrap()
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    std::io::Write::write_all(&mut encoder, bytes).unwrap();
    encoder.finish().unwrap()
}

/// Tars up a directory (an image layout) as an archive file.
fn tar_dir(dir: &Path, out: &Path) {
    let mut builder = tar::Builder::new(File::create(out).unwrap());
    builder.append_dir_all(".", dir).unwrap();
    builder.finish().unwrap();
}

struct Scene {
    _tmp: tempfile::TempDir,
    cache: ImageCache,
    work: PathBuf,
    /// A directory outside the cache that attacks aim at.
    outside: PathBuf,
}

fn scene() -> Scene {
    let tmp = tempfile::tempdir().unwrap();
    let cache = ImageCache::open(tmp.path().join("cache")).unwrap();
    let work = tmp.path().join("work");
    let outside = tmp.path().join("outside");
    fs::create_dir_all(&work).unwrap();
    fs::create_dir_all(&outside).unwrap();
    fs::write(outside.join("keep"), b"precious").unwrap();
    fs::set_permissions(&outside, fs::Permissions::from_mode(0o700)).unwrap();
    Scene {
        _tmp: tmp,
        cache,
        work,
        outside,
    }
}

impl Scene {
    fn layout(&self, name: &str, layers: &[Vec<u8>]) -> PathBuf {
        let dir = self.work.join(name);
        write_layout(&dir, layers, &["PATH=/bin".into()]).unwrap();
        dir
    }

    /// Unpacking `layers` fails as unsafe, and nothing outside the cache changed or appeared.
    fn assert_refused(&self, layers: &[Vec<u8>], needle: &str) {
        let layout = self.layout(&format!("bad-{}", uuid::Uuid::new_v4()), layers);
        let err = self.cache.unpack(&layout).unwrap_err();
        assert!(matches!(err, ImageError::Unsafe { .. }), "{err:?}");
        assert!(err.to_string().contains(needle), "{err}");
        self.assert_outside_untouched();
        self.assert_cache_clean();
    }

    fn assert_outside_untouched(&self) {
        let names: Vec<_> = fs::read_dir(&self.outside)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["keep"], "something was written outside the cache");
        assert_eq!(fs::read(self.outside.join("keep")).unwrap(), b"precious");
        let mode = fs::metadata(&self.outside).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode, 0o700, "the outside directory's mode was changed");
    }

    /// A failed unpack leaves nothing: no image directory, an empty staging area.
    fn assert_cache_clean(&self) {
        let names: Vec<_> = fs::read_dir(self.cache.dir())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["tmp"], "{names:?}");
        assert_eq!(
            fs::read_dir(self.cache.dir().join("tmp")).unwrap().count(),
            0
        );
    }
}

fn two_layers() -> Vec<Vec<u8>> {
    vec![
        layer(&[
            E::Dir("etc/"),
            E::File("etc/gone", b"lower"),
            E::Dir("opaque/"),
            E::File("opaque/lower", b"lower"),
            E::Dir("usr/"),
            E::Dir("usr/bin/"),
            E::File("usr/bin/tool", b"v1"),
            E::Symlink("bin", "usr/bin"),
        ]),
        layer(&[
            E::File("etc/.wh.gone", b""),
            E::File("opaque/upper", b"upper"),
            E::File("opaque/.wh..wh..opq", b""),
            E::File("usr/bin/tool", b"v2"),
            E::Hardlink("usr/bin/tool2", "usr/bin/tool"),
            E::File("bin/via-link", b"through an in-image symlink"),
        ]),
    ]
}

#[test]
fn an_oci_layout_unpacks_with_whiteouts_and_opaque_dirs() {
    let s = scene();
    let layout = s.layout("good", &two_layers());
    assert!(is_image(&layout));
    let rootfs = s.cache.unpack(&layout).unwrap();
    let root = &rootfs.path;
    assert!(
        !root.join("etc/gone").exists(),
        "whiteout removes the lower file"
    );
    assert!(
        !root.join("opaque/lower").exists(),
        "opaque hides lower entries"
    );
    assert_eq!(fs::read(root.join("opaque/upper")).unwrap(), b"upper");
    assert_eq!(fs::read(root.join("usr/bin/tool")).unwrap(), b"v2");
    assert_eq!(fs::read(root.join("usr/bin/tool2")).unwrap(), b"v2");
    assert_eq!(
        fs::read(root.join("usr/bin/via-link")).unwrap(),
        b"through an in-image symlink"
    );
    let mode = fs::metadata(root.join("usr/bin/tool"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o7000, 0, "no setuid bits on the host");
    for dir in MOUNT_POINTS {
        assert!(root.join(dir).is_dir(), "{dir}");
    }
    assert_eq!(rootfs.info.env, ["PATH=/bin"]);
    assert_eq!(s.cache.get(&rootfs.info.id), Some(rootfs.clone()));
}

#[test]
fn the_same_image_from_an_archive_is_found_in_the_cache() {
    let s = scene();
    let layout = s.layout("good", &two_layers());
    let first = s.cache.unpack(&layout).unwrap();
    fs::write(first.path.join("marker"), b"x").unwrap();
    let archive = s.work.join("image.tar");
    tar_dir(&layout, &archive);
    assert!(is_image(&archive));
    let second = s.cache.unpack(&archive).unwrap();
    assert_eq!(second, first);
    assert!(second.path.join("marker").exists(), "not unpacked twice");
}

#[test]
fn gzip_layers_and_docker_save_archives_unpack() {
    let s = scene();
    let plain = layer(&[E::Dir("bin/"), E::File("bin/hello", b"hi")]);
    let layout = s.layout("gz", &[gzip(&plain)]);
    let rootfs = s.cache.unpack(&layout).unwrap();
    assert_eq!(fs::read(rootfs.path.join("bin/hello")).unwrap(), b"hi");

    // docker save: manifest.json, the config as a file, each layer as <id>/layer.tar.
    let dir = s.work.join("docker");
    fs::create_dir_all(dir.join("abc")).unwrap();
    let diff_id = sha256_hex(&plain);
    fs::write(dir.join("abc/layer.tar"), &plain).unwrap();
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "config": {"Env": ["A=b"]},
        "rootfs": {"type": "layers", "diff_ids": [format!("sha256:{diff_id}")]},
    }))
    .unwrap();
    fs::write(dir.join("cfg.json"), &config).unwrap();
    fs::write(
        dir.join("manifest.json"),
        br#"[{"Config":"cfg.json","RepoTags":["t:latest"],"Layers":["abc/layer.tar"]}]"#,
    )
    .unwrap();
    let archive = s.work.join("docker.tar");
    tar_dir(&dir, &archive);
    assert!(is_image(&archive));
    let rootfs = s.cache.unpack(&archive).unwrap();
    assert_eq!(rootfs.info.id, sha256_hex(&config));
    assert_eq!(rootfs.info.env, ["A=b"]);
    assert_eq!(fs::read(rootfs.path.join("bin/hello")).unwrap(), b"hi");
}

#[test]
fn a_plain_tarball_or_directory_is_not_an_image() {
    let s = scene();
    let archive = s.work.join("volume.tar");
    fs::write(&archive, layer(&[E::File("a", b"x")])).unwrap();
    assert!(!is_image(&archive));
    assert!(!is_image(&s.outside));
    let err = s.cache.unpack(&archive).unwrap_err();
    assert!(matches!(err, ImageError::NotAnImage(_)), "{err:?}");
}

#[test]
fn corrupt_archives_are_refused() {
    let s = scene();
    let garbage = s.work.join("garbage.tar");
    fs::write(&garbage, vec![0x5a; 3000]).unwrap();
    assert!(s.cache.unpack(&garbage).is_err());
    // A truncated archive of a good layout.
    let layout = s.layout("good", &two_layers());
    let archive = s.work.join("image.tar");
    tar_dir(&layout, &archive);
    let bytes = fs::read(&archive).unwrap();
    let truncated = s.work.join("truncated.tar");
    fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    assert!(s.cache.unpack(&truncated).is_err());
    s.assert_cache_clean();
}

#[test]
fn a_layer_that_does_not_match_its_digest_is_refused() {
    let s = scene();
    let layout = s.layout("tampered", &[layer(&[E::File("a", b"original")])]);
    // Swap the layer blob's content for another tar of the same length.
    let blobs = layout.join("blobs/sha256");
    for entry in fs::read_dir(&blobs).unwrap() {
        let path = entry.unwrap().path();
        let bytes = fs::read(&path).unwrap();
        if bytes.windows(8).any(|w| w == b"original") {
            fs::write(&path, layer(&[E::File("a", b"tampered")])).unwrap();
        }
    }
    let err = s.cache.unpack(&layout).unwrap_err();
    assert!(matches!(err, ImageError::Corrupt { .. }), "{err:?}");
    assert!(err.to_string().contains("digest"), "{err}");
    s.assert_cache_clean();
}

#[test]
fn absolute_paths_are_refused() {
    let s = scene();
    let target = format!("{}/pwned", s.outside.display());
    s.assert_refused(&[layer(&[E::File(&target, b"x")])], "absolute");
}

#[test]
fn dot_dot_paths_are_refused() {
    let s = scene();
    s.assert_refused(
        &[layer(&[E::File("../../../../outside/pwned", b"x")])],
        "'..'",
    );
    s.assert_refused(&[layer(&[E::File("a/../../pwned", b"x")])], "'..'");
}

#[test]
fn device_nodes_are_refused() {
    let s = scene();
    s.assert_refused(&[layer(&[E::Char("dev/null2")])], "device");
}

#[test]
fn writing_through_a_symlink_that_escapes_is_refused() {
    let s = scene();
    let outside = s.outside.display().to_string();
    // In one layer, and across two.
    s.assert_refused(
        &[layer(&[
            E::Symlink("esc", &outside),
            E::File("esc/pwned", b"x"),
        ])],
        "esc/pwned",
    );
    s.assert_refused(
        &[
            layer(&[E::Symlink("esc", &outside)]),
            layer(&[E::File("esc/pwned", b"x")]),
        ],
        "esc/pwned",
    );
    s.assert_refused(
        &[layer(&[E::Symlink("up", "../../../.."), E::Dir("up/x/")])],
        "up/x",
    );
}

#[test]
fn hard_links_and_whiteouts_through_symlinks_are_refused() {
    let s = scene();
    let outside = s.outside.display().to_string();
    s.assert_refused(
        &[layer(&[
            E::Symlink("esc", &outside),
            E::Hardlink("stolen", "esc/keep"),
        ])],
        "hard link",
    );
    s.assert_refused(
        &[layer(&[
            E::Symlink("esc", &outside),
            E::File("esc/.wh.keep", b""),
        ])],
        "symlink",
    );
    s.assert_refused(
        &[layer(&[
            E::Symlink("esc", &outside),
            E::File("esc/.wh..wh..opq", b""),
        ])],
        "symlink",
    );
}

#[test]
fn a_directory_entry_over_an_escaping_symlink_does_not_touch_its_target() {
    let s = scene();
    let outside = s.outside.display().to_string();
    let layout = s.layout(
        "dir-over-link",
        &[
            layer(&[E::Symlink("esc", &outside)]),
            layer(&[E::Dir("esc/")]),
        ],
    );
    let rootfs = s.cache.unpack(&layout).unwrap();
    assert!(rootfs.path.join("esc").is_dir());
    assert!(
        !fs::symlink_metadata(rootfs.path.join("esc"))
            .unwrap()
            .file_type()
            .is_symlink()
    );
    s.assert_outside_untouched();
}

#[test]
fn an_archive_with_escaping_entries_is_refused() {
    let s = scene();
    let archive = s.work.join("evil.tar");
    fs::write(
        &archive,
        layer(&[
            E::File("index.json", b"{}"),
            E::File("../outside/pwned", b"x"),
        ]),
    )
    .unwrap();
    let err = s.cache.unpack(&archive).unwrap_err();
    assert!(matches!(err, ImageError::Unsafe { .. }), "{err:?}");
    s.assert_outside_untouched();
    s.assert_cache_clean();
    // A symlinked blob leading out is refused when read.
    let layout = s.layout("linked", &[layer(&[E::File("a", b"x")])]);
    let index = layout.join("index.json");
    fs::remove_file(&index).unwrap();
    std::os::unix::fs::symlink(s.outside.join("keep"), &index).unwrap();
    let err = s.cache.unpack(&layout).unwrap_err();
    assert!(matches!(err, ImageError::Unsafe { .. }), "{err:?}");
}
