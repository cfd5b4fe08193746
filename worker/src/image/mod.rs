//! Container images as templates' `base`: an OCI image layout (directory or tar archive) or a
//! `docker save` / `podman save` tarball, unpacked into a content-addressed root filesystem cache on
//! the worker. The `oci` provider runs containers on these root filesystems; the process provider's
//! sandbox uses one as its root (its system directories) instead of the host's.
//!
//! On disk, under the cache directory:
//! ```text
//! <image id>/rootfs/       the image's layers applied in order, whiteouts honoured
//! <image id>/image.json    ImageInfo: id, the config's env / cmd / workdir; written last (commit)
//! tmp/                     staging of archives and half-unpacked images; emptied on open
//! ```
//! The image id is the SHA-256 of the image's config blob, which names every layer by the digest
//! of its content (`rootfs.diff_ids`): the same image from any archive lands in the same place and
//! is unpacked once.
//!
//! Hostile input: parsing uses `oci-spec` (validated digests, so a digest is safe as a file name),
//! every blob is checked against its digest, and layers are applied with the `tar` crate entry by
//! entry after checks of our own. An absolute or `..` path, a device node, a hard link or whiteout
//! reaching through a symlink, or a write through a symlink that leads out of the root filesystem is
//! an [`ImageError::Unsafe`] naming the entry; nothing is written outside the cache, and a failed
//! unpack leaves nothing behind in it. Permissions keep only the `0o777` bits (no setuid files
//! from an image on the host) and files belong to the worker's user.

use std::collections::HashSet;
use std::fs::{self, File};
use std::io::{self, BufReader, Read};
use std::path::{Component, Path, PathBuf};

use oci_spec::image::{Descriptor, DigestAlgorithm, ImageConfiguration, ImageIndex, ImageManifest};
use serde::{Deserialize, Serialize};
use tracing::info;

#[cfg(test)]
mod tests;

/// Directories every unpacked root filesystem gets (mount points of the sandboxes built on it).
pub const MOUNT_POINTS: [&str; 6] = ["proc", "dev", "tmp", "workspace", ".hearth", "etc"];

/// Why an image could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// Not an image at all, or a format this worker does not read.
    #[error("{0}")]
    NotAnImage(String),
    /// The image is damaged: bad JSON, a missing blob, a digest that does not match.
    #[error("corrupt image {path}: {detail}")]
    Corrupt { path: String, detail: String },
    /// An entry that would write outside the root filesystem or create something no image may
    /// (device nodes).
    #[error("unsafe image {path}: {detail}")]
    Unsafe { path: String, detail: String },
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
}

impl ImageError {
    fn io(context: impl Into<String>, source: io::Error) -> Self {
        ImageError::Io {
            context: context.into(),
            source,
        }
    }
}

/// An unpacked image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageInfo {
    /// SHA-256 (hex) of the image config: the cache key.
    pub id: String,
    /// `KEY=value` entries of the image's `Env`.
    #[serde(default)]
    pub env: Vec<String>,
    /// The image's `Entrypoint` + `Cmd` (informational: Hearth runs its own agent).
    #[serde(default)]
    pub cmd: Vec<String>,
    /// The image's `WorkingDir`.
    #[serde(default)]
    pub workdir: Option<String>,
}

/// An unpacked image and where its root filesystem is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rootfs {
    pub info: ImageInfo,
    pub path: PathBuf,
}

/// The root filesystem cache of one worker (or one provider root).
#[derive(Debug, Clone)]
pub struct ImageCache {
    dir: PathBuf,
}

impl ImageCache {
    /// Opens (creating) the cache at `dir` and empties its staging area.
    pub fn open(dir: impl Into<PathBuf>) -> Result<Self, ImageError> {
        let dir = dir.into();
        let tmp = dir.join("tmp");
        if tmp.exists() {
            fs::remove_dir_all(&tmp)
                .map_err(|e| ImageError::io(format!("cannot empty {}", tmp.display()), e))?;
        }
        fs::create_dir_all(&tmp)
            .map_err(|e| ImageError::io(format!("cannot create {}", tmp.display()), e))?;
        Ok(Self { dir })
    }

    /// The cache directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The root filesystem of image `id` if it is in the cache.
    pub fn get(&self, id: &str) -> Option<Rootfs> {
        if id.len() != 64 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        let dir = self.dir.join(id);
        let info: ImageInfo =
            serde_json::from_slice(&fs::read(dir.join("image.json")).ok()?).ok()?;
        Some(Rootfs {
            info,
            path: dir.join("rootfs"),
        })
    }

    /// Unpacks the image at `source` (a layout directory, or an archive) into the cache, or finds
    /// it there already. Blocking.
    pub fn unpack(&self, source: &Path) -> Result<Rootfs, ImageError> {
        let staging = tempdir_in(&self.dir.join("tmp"))?;
        let result = self.unpack_staged(source, &staging);
        let _ = fs::remove_dir_all(&staging);
        result
    }

    fn unpack_staged(&self, source: &Path, staging: &Path) -> Result<Rootfs, ImageError> {
        let meta = fs::metadata(source)
            .map_err(|e| ImageError::io(format!("cannot read image {}", source.display()), e))?;
        let layout = if meta.is_dir() {
            source.to_path_buf()
        } else {
            let layout = staging.join("archive");
            extract_archive(source, &layout)?;
            layout
        };
        let image = Image::read(&layout, source)?;
        if let Some(found) = self.get(&image.id) {
            return Ok(found);
        }
        let work = staging.join("image");
        let rootfs = work.join("rootfs");
        fs::create_dir_all(&rootfs).map_err(|e| ImageError::io("cannot create a rootfs", e))?;
        for layer in &image.layers {
            let (reader, digests) = layer.open(&layout, source)?;
            apply_layer(reader, &rootfs, &layer.name)?;
            layer.verify(digests, source)?;
        }
        make_mount_points(&rootfs)?;
        let info = ImageInfo {
            id: image.id.clone(),
            env: image.env,
            cmd: image.cmd,
            workdir: image.workdir,
        };
        let json = serde_json::to_vec_pretty(&info).map_err(|e| ImageError::Corrupt {
            path: source.display().to_string(),
            detail: e.to_string(),
        })?;
        fs::write(work.join("image.json"), json)
            .map_err(|e| ImageError::io("cannot write image.json", e))?;
        let dest = self.dir.join(&image.id);
        match fs::rename(&work, &dest) {
            Ok(()) => {}
            // Unpacked meanwhile by someone else: theirs is as good.
            Err(_) if self.get(&image.id).is_some() => {}
            Err(e) => return Err(ImageError::io("cannot publish the rootfs", e)),
        }
        info!(image = %image.id, source = %source.display(), "unpacked image");
        self.get(&image.id).ok_or_else(|| ImageError::Corrupt {
            path: source.display().to_string(),
            detail: "the unpacked image vanished".into(),
        })
    }
}

/// Whether `path` holds an image (rather than a plain directory or tarball for a volume): a
/// directory with `index.json` (OCI layout) or `manifest.json` (an unpacked `docker save`), or a
/// tar archive with one of those at its top.
pub fn is_image(path: &Path) -> bool {
    if path.is_dir() {
        return path.join("index.json").is_file() || path.join("manifest.json").is_file();
    }
    let Ok(file) = File::open(path) else {
        return false;
    };
    let Ok(reader) = decompressed(BufReader::new(file)) else {
        return false;
    };
    let mut archive = tar::Archive::new(reader);
    let Ok(entries) = archive.entries() else {
        return false;
    };
    for entry in entries {
        let Ok(entry) = entry else { return false };
        let Ok(path) = entry.path() else { return false };
        let name = path.to_string_lossy();
        let name = name.trim_start_matches("./");
        if name == "index.json" || name == "manifest.json" {
            return true;
        }
    }
    false
}

/// One image read from a layout: its id, its layers in order and the config's run settings.
struct Image {
    id: String,
    layers: Vec<Layer>,
    env: Vec<String>,
    cmd: Vec<String>,
    workdir: Option<String>,
}

/// A layer blob inside the layout, and the SHA-256 it must have.
struct Layer {
    name: String,
    path: PathBuf,
    /// SHA-256 (hex) of the blob as stored (OCI), or of its plain tar (`docker save`'s diff ids).
    expected: String,
    /// Whether `expected` is the digest of the decompressed stream.
    of_uncompressed: bool,
}

/// A running SHA-256, shared between a reader and whoever checks it afterwards.
type Digesting = std::sync::Arc<parking_lot::Mutex<ring::digest::Context>>;

/// The running digests of a layer being read: of the stored blob and of the plain tar.
struct LayerDigests {
    raw: Digesting,
    plain: Digesting,
}

impl Image {
    fn read(layout: &Path, source: &Path) -> Result<Self, ImageError> {
        if layout.join("index.json").is_file() {
            Self::read_oci(layout, source)
        } else if layout.join("manifest.json").is_file() {
            Self::read_docker(layout, source)
        } else {
            Err(ImageError::NotAnImage(format!(
                "{} is not a container image: no index.json (OCI layout) or manifest.json \
                 (docker save) at its top",
                source.display()
            )))
        }
    }

    fn read_oci(layout: &Path, source: &Path) -> Result<Self, ImageError> {
        let corrupt = |detail: String| ImageError::Corrupt {
            path: source.display().to_string(),
            detail,
        };
        let index = ImageIndex::from_reader(open_inside(layout, Path::new("index.json"), source)?)
            .map_err(|e| corrupt(format!("index.json: {e}")))?;
        let mut manifest_desc = pick_manifest(index.manifests())
            .ok_or_else(|| corrupt("index.json lists no linux/amd64 image".into()))?;
        // One level of nested index (an image index referenced from index.json).
        let nested_index = "application/vnd.oci.image.index.v1+json";
        if manifest_desc.media_type().to_string() == nested_index {
            let bytes = read_blob(layout, &manifest_desc, source)?;
            let nested = ImageIndex::from_reader(&bytes[..])
                .map_err(|e| corrupt(format!("nested index: {e}")))?;
            manifest_desc = pick_manifest(nested.manifests())
                .ok_or_else(|| corrupt("the nested index lists no linux/amd64 image".into()))?;
        }
        let manifest_bytes = read_blob(layout, &manifest_desc, source)?;
        let manifest = ImageManifest::from_reader(&manifest_bytes[..])
            .map_err(|e| corrupt(format!("manifest: {e}")))?;
        let config_bytes = read_blob(layout, manifest.config(), source)?;
        let config = ImageConfiguration::from_reader(&config_bytes[..])
            .map_err(|e| corrupt(format!("config: {e}")))?;
        let mut layers = Vec::new();
        for desc in manifest.layers() {
            layers.push(Layer {
                name: desc.digest().to_string(),
                path: blob_path(desc, source)?,
                expected: desc.digest().digest().to_owned(),
                of_uncompressed: false,
            });
        }
        Ok(Self::with_config(
            sha256_hex(&config_bytes),
            layers,
            &config,
        ))
    }

    fn read_docker(layout: &Path, source: &Path) -> Result<Self, ImageError> {
        #[derive(Deserialize)]
        #[serde(rename_all = "PascalCase")]
        struct Entry {
            config: String,
            layers: Vec<String>,
        }
        let corrupt = |detail: String| ImageError::Corrupt {
            path: source.display().to_string(),
            detail,
        };
        let mut bytes = Vec::new();
        open_inside(layout, Path::new("manifest.json"), source)?
            .read_to_end(&mut bytes)
            .map_err(|e| ImageError::io("cannot read manifest.json", e))?;
        let entries: Vec<Entry> =
            serde_json::from_slice(&bytes).map_err(|e| corrupt(format!("manifest.json: {e}")))?;
        let [entry] = <[Entry; 1]>::try_from(entries).map_err(|entries| {
            corrupt(format!(
                "manifest.json must list exactly one image, it lists {}",
                entries.len()
            ))
        })?;
        let mut config_bytes = Vec::new();
        open_inside(layout, &relative(&entry.config, source)?, source)?
            .read_to_end(&mut config_bytes)
            .map_err(|e| ImageError::io("cannot read the image config", e))?;
        let config = ImageConfiguration::from_reader(&config_bytes[..])
            .map_err(|e| corrupt(format!("config: {e}")))?;
        let diff_ids = config.rootfs().diff_ids();
        if diff_ids.len() != entry.layers.len() {
            return Err(corrupt(format!(
                "the config names {} layers, manifest.json {}",
                diff_ids.len(),
                entry.layers.len()
            )));
        }
        let mut layers = Vec::new();
        for (path, diff_id) in entry.layers.iter().zip(diff_ids) {
            let hex = diff_id
                .strip_prefix("sha256:")
                .filter(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
                .ok_or_else(|| corrupt(format!("bad layer digest {diff_id:?}")))?;
            layers.push(Layer {
                name: path.clone(),
                path: relative(path, source)?,
                expected: hex.to_owned(),
                of_uncompressed: true,
            });
        }
        Ok(Self::with_config(
            sha256_hex(&config_bytes),
            layers,
            &config,
        ))
    }

    fn with_config(id: String, layers: Vec<Layer>, config: &ImageConfiguration) -> Self {
        let run = config.config().as_ref();
        let env = run.and_then(|c| c.env().clone()).unwrap_or_default();
        let mut cmd = run.and_then(|c| c.entrypoint().clone()).unwrap_or_default();
        cmd.extend(run.and_then(|c| c.cmd().clone()).unwrap_or_default());
        let workdir = run
            .and_then(|c| c.working_dir().clone())
            .filter(|w| !w.is_empty());
        Self {
            id,
            layers,
            env,
            cmd,
            workdir,
        }
    }
}

impl Layer {
    /// The layer's tar stream, decompressed, digested as it is read.
    fn open(
        &self,
        layout: &Path,
        source: &Path,
    ) -> Result<(Box<dyn Read>, LayerDigests), ImageError> {
        let file = open_inside(layout, &self.path, source)?;
        let new = || -> Digesting {
            std::sync::Arc::new(parking_lot::Mutex::new(ring::digest::Context::new(
                &ring::digest::SHA256,
            )))
        };
        let digests = LayerDigests {
            raw: new(),
            plain: new(),
        };
        let raw = Hashing {
            inner: file,
            ctx: digests.raw.clone(),
        };
        let plain = decompressed(BufReader::new(raw))
            .map_err(|e| ImageError::io(format!("cannot read layer {}", self.name), e))?;
        let reader = Hashing {
            inner: plain,
            ctx: digests.plain.clone(),
        };
        Ok((Box::new(reader), digests))
    }

    /// Checks the digest of what was read (the whole stream must have been read).
    fn verify(&self, digests: LayerDigests, source: &Path) -> Result<(), ImageError> {
        let ctx = if self.of_uncompressed {
            digests.plain
        } else {
            digests.raw
        };
        let actual = hex(ctx.lock().clone().finish().as_ref());
        if actual != self.expected {
            return Err(ImageError::Corrupt {
                path: source.display().to_string(),
                detail: format!("layer {} does not match its digest", self.name),
            });
        }
        Ok(())
    }
}

/// A reader that feeds what passes through it into a digest.
struct Hashing<R> {
    inner: R,
    ctx: std::sync::Arc<parking_lot::Mutex<ring::digest::Context>>,
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.ctx.lock().update(&buf[..n]);
        Ok(n)
    }
}

/// The linux/amd64 manifest of an index (or its only manifest when platforms are not given).
fn pick_manifest(manifests: &[Descriptor]) -> Option<Descriptor> {
    let fits = |d: &&Descriptor| {
        d.platform().as_ref().is_none_or(|p| {
            p.os().to_string() == "linux" && p.architecture().to_string() == "amd64"
        })
    };
    manifests.iter().find(fits).cloned()
}

/// `blobs/sha256/<hex>` of a descriptor; only SHA-256 digests are accepted.
fn blob_path(desc: &Descriptor, source: &Path) -> Result<PathBuf, ImageError> {
    let digest = desc.digest();
    if *digest.algorithm() != DigestAlgorithm::Sha256 {
        return Err(ImageError::Corrupt {
            path: source.display().to_string(),
            detail: format!("unsupported digest algorithm in {digest}"),
        });
    }
    // oci-spec guarantees 64 lowercase hex characters for sha256: safe as a file name.
    Ok(Path::new("blobs").join("sha256").join(digest.digest()))
}

/// A small blob (manifest, config), read whole and checked against its digest.
fn read_blob(layout: &Path, desc: &Descriptor, source: &Path) -> Result<Vec<u8>, ImageError> {
    const MAX: u64 = 16 << 20;
    let path = blob_path(desc, source)?;
    let mut bytes = Vec::new();
    open_inside(layout, &path, source)?
        .take(MAX + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| ImageError::io(format!("cannot read blob {}", desc.digest()), e))?;
    if bytes.len() as u64 > MAX || sha256_hex(&bytes) != desc.digest().digest() {
        return Err(ImageError::Corrupt {
            path: source.display().to_string(),
            detail: format!("blob {} does not match its digest", desc.digest()),
        });
    }
    Ok(bytes)
}

/// Opens `rel` inside `layout`, refusing a path that leads out of it through a symlink.
fn open_inside(layout: &Path, rel: &Path, source: &Path) -> Result<File, ImageError> {
    let path = layout.join(rel);
    let canonical = path.canonicalize().map_err(|e| ImageError::Corrupt {
        path: source.display().to_string(),
        detail: format!("{} is missing: {e}", rel.display()),
    })?;
    let root = layout
        .canonicalize()
        .map_err(|e| ImageError::io("cannot resolve the image layout", e))?;
    if !canonical.starts_with(&root) {
        return Err(ImageError::Unsafe {
            path: source.display().to_string(),
            detail: format!("{} leads out of the image", rel.display()),
        });
    }
    File::open(&canonical).map_err(|e| ImageError::io(format!("cannot open {}", rel.display()), e))
}

/// A path named inside an image's JSON, which must be relative and stay inside.
fn relative(text: &str, source: &Path) -> Result<PathBuf, ImageError> {
    checked_relative(Path::new(text)).map_err(|detail| ImageError::Unsafe {
        path: source.display().to_string(),
        detail: format!("{text:?}: {detail}"),
    })
}

/// `path` without `.` components; an error for an absolute path or one with `..`.
fn checked_relative(path: &Path) -> Result<PathBuf, &'static str> {
    let mut out = PathBuf::new();
    for component in path.components() {
        match component {
            Component::Normal(part) => out.push(part),
            Component::CurDir => {}
            Component::ParentDir => return Err("the path contains '..'"),
            Component::RootDir | Component::Prefix(_) => return Err("the path is absolute"),
        }
    }
    Ok(out)
}

/// `reader` decompressed by its magic bytes: gzip, zstd, or plain.
fn decompressed<'a, R: io::BufRead + 'a>(mut reader: R) -> io::Result<Box<dyn Read + 'a>> {
    let head = reader.fill_buf()?;
    if head.starts_with(&[0x1f, 0x8b]) {
        Ok(Box::new(flate2::bufread::MultiGzDecoder::new(reader)))
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Ok(Box::new(zstd::stream::read::Decoder::with_buffer(reader)?))
    } else {
        Ok(Box::new(reader))
    }
}

/// Unpacks the outer archive (a tarred layout) into `dest`: directories and regular files only.
fn extract_archive(source: &Path, dest: &Path) -> Result<(), ImageError> {
    let unsafe_entry = |entry: &Path, detail: &str| ImageError::Unsafe {
        path: source.display().to_string(),
        detail: format!("entry {}: {detail}", entry.display()),
    };
    let corrupt = |e: io::Error| ImageError::Corrupt {
        path: source.display().to_string(),
        detail: format!("not a readable tar archive: {e}"),
    };
    fs::create_dir_all(dest).map_err(|e| ImageError::io("cannot create staging", e))?;
    let file = File::open(source)
        .map_err(|e| ImageError::io(format!("cannot open {}", source.display()), e))?;
    let mut archive = tar::Archive::new(decompressed(BufReader::new(file)).map_err(corrupt)?);
    archive.set_preserve_permissions(false);
    archive.set_unpack_xattrs(false);
    let mut seen = 0usize;
    for entry in archive.entries().map_err(corrupt)? {
        let mut entry = entry.map_err(corrupt)?;
        let path = entry.path().map_err(corrupt)?.into_owned();
        let rel = checked_relative(&path).map_err(|d| unsafe_entry(&path, d))?;
        seen += 1;
        match entry.header().entry_type() {
            tar::EntryType::Directory | tar::EntryType::Regular | tar::EntryType::Continuous => {}
            // Old `docker save` links identical layers: the symlink is resolved on read and
            // refused there if it leads out.
            tar::EntryType::Symlink => {}
            other => {
                return Err(unsafe_entry(
                    &path,
                    &format!("an image archive holds only files and directories, not {other:?}"),
                ));
            }
        }
        if rel.as_os_str().is_empty() {
            continue;
        }
        let unpacked = entry.unpack_in(dest).map_err(|e| ImageError::Unsafe {
            path: source.display().to_string(),
            detail: format!("entry {}: {e}", path.display()),
        })?;
        if !unpacked {
            return Err(unsafe_entry(&path, "the path leads out of the archive"));
        }
    }
    if seen == 0 {
        return Err(ImageError::Corrupt {
            path: source.display().to_string(),
            detail: "the archive is empty".into(),
        });
    }
    Ok(())
}

/// Applies one layer's tar stream onto `rootfs`: whiteouts remove what lower layers put there,
/// opaque markers empty a directory of lower layers' entries, everything else is unpacked after
/// the checks in the module docs. Reads the stream to its end (so its digest can be checked).
fn apply_layer(reader: Box<dyn Read>, rootfs: &Path, layer: &str) -> Result<(), ImageError> {
    let unsafe_entry = |entry: &Path, detail: &str| ImageError::Unsafe {
        path: format!("layer {layer}"),
        detail: format!("entry {}: {detail}", entry.display()),
    };
    let corrupt = |e: io::Error| ImageError::Corrupt {
        path: format!("layer {layer}"),
        detail: format!("not a readable tar stream: {e}"),
    };
    let mut archive = tar::Archive::new(reader);
    archive.set_preserve_permissions(false);
    archive.set_preserve_mtime(true);
    archive.set_unpack_xattrs(false);
    archive.set_overwrite(true);
    // What this layer wrote: an opaque marker hides lower layers' entries only.
    let mut written: HashSet<PathBuf> = HashSet::new();
    for entry in archive.entries().map_err(corrupt)? {
        let mut entry = entry.map_err(corrupt)?;
        let path = entry.path().map_err(corrupt)?.into_owned();
        let rel = checked_relative(&path).map_err(|d| unsafe_entry(&path, d))?;
        if rel.as_os_str().is_empty() {
            continue;
        }
        let name = rel
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let parent = rel.parent().unwrap_or(Path::new(""));
        if name == ".wh..wh..opq" {
            let dir = inside_no_symlinks(rootfs, parent).map_err(|d| unsafe_entry(&path, &d))?;
            if let Ok(children) = fs::read_dir(&dir) {
                for child in children.flatten() {
                    if !written.contains(&parent.join(child.file_name())) {
                        remove_any(&child.path()).map_err(|e| {
                            ImageError::io(format!("cannot apply whiteout {}", path.display()), e)
                        })?;
                    }
                }
            }
            continue;
        }
        if let Some(hidden) = name.strip_prefix(".wh.") {
            let dir = inside_no_symlinks(rootfs, parent).map_err(|d| unsafe_entry(&path, &d))?;
            if hidden.is_empty() || hidden == "." || hidden == ".." {
                return Err(unsafe_entry(&path, "a whiteout without a name"));
            }
            remove_any(&dir.join(hidden)).map_err(|e| {
                ImageError::io(format!("cannot apply whiteout {}", path.display()), e)
            })?;
            continue;
        }
        let kind = entry.header().entry_type();
        match kind {
            tar::EntryType::Char | tar::EntryType::Block => {
                return Err(unsafe_entry(
                    &path,
                    "device nodes are not allowed in images",
                ));
            }
            tar::EntryType::Link => {
                let target = entry
                    .link_name()
                    .map_err(corrupt)?
                    .ok_or_else(|| unsafe_entry(&path, "a hard link without a target"))?;
                let target = checked_relative(&target)
                    .map_err(|d| unsafe_entry(&path, &format!("hard link target: {d}")))?;
                inside_no_symlinks(rootfs, target.parent().unwrap_or(Path::new("")))
                    .map_err(|d| unsafe_entry(&path, &format!("hard link target: {d}")))?;
            }
            tar::EntryType::Regular
            | tar::EntryType::Continuous
            | tar::EntryType::Directory
            | tar::EntryType::Symlink
            | tar::EntryType::Fifo
            | tar::EntryType::GNUSparse => {}
            // Metadata entries (pax, GNU long names) are consumed by the tar crate itself.
            _ => continue,
        }
        // Never write or chmod through a symlink left at the entry's own path.
        let dest = rootfs.join(&rel);
        if fs::symlink_metadata(&dest).is_ok_and(|m| m.file_type().is_symlink()) {
            fs::remove_file(&dest)
                .map_err(|e| ImageError::io(format!("cannot replace {}", rel.display()), e))?;
        }
        let unpacked = entry
            .unpack_in(rootfs)
            .map_err(|e| unsafe_entry(&path, &e.to_string()))?;
        if !unpacked {
            return Err(unsafe_entry(
                &path,
                "the path leads out of the root filesystem",
            ));
        }
        written.insert(rel);
    }
    // The rest of the stream (tar padding), so the digest covers all of it.
    io::copy(archive.into_inner().by_ref(), &mut io::sink()).map_err(corrupt)?;
    Ok(())
}

/// `rootfs/rel`, provided no component of `rel` is a symlink (so nothing is reached outside).
fn inside_no_symlinks(rootfs: &Path, rel: &Path) -> Result<PathBuf, String> {
    let mut path = rootfs.to_path_buf();
    for part in rel.components() {
        path.push(part);
        match fs::symlink_metadata(&path) {
            Ok(m) if m.file_type().is_symlink() => {
                return Err(format!(
                    "{} is a symlink: nothing may be reached through it",
                    rel.display()
                ));
            }
            _ => {}
        }
    }
    Ok(path)
}

/// Removes a file, symlink or directory tree; absent is fine.
fn remove_any(path: &Path) -> io::Result<()> {
    match fs::symlink_metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
        Ok(m) if m.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
    }
}

/// Creates the directories sandboxes mount over, replacing whatever the image has there that is
/// not a directory (a symlink at `/tmp` must not steer a mount).
fn make_mount_points(rootfs: &Path) -> Result<(), ImageError> {
    for dir in MOUNT_POINTS {
        let path = rootfs.join(dir);
        match fs::symlink_metadata(&path) {
            Ok(m) if m.is_dir() => continue,
            Ok(_) => remove_any(&path),
            Err(_) => Ok(()),
        }
        .and_then(|()| fs::create_dir(&path))
        .map_err(|e| ImageError::io(format!("cannot create /{dir} in the rootfs"), e))?;
    }
    Ok(())
}

/// A new uniquely named directory under `parent`.
fn tempdir_in(parent: &Path) -> Result<PathBuf, ImageError> {
    let dir = parent.join(uuid::Uuid::new_v4().simple().to_string());
    fs::create_dir_all(&dir).map_err(|e| ImageError::io("cannot create staging", e))?;
    Ok(dir)
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex(ring::digest::digest(&ring::digest::SHA256, bytes).as_ref())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Writes a single-image OCI layout at `dir` from plain layer tarballs (lowest first), with
/// `env` as the config's `Env`. Returns the image id (the config's SHA-256) the cache will file it
/// under. Used to turn a root filesystem built on this host into an image (tests, benchmarks).
pub fn write_layout(dir: &Path, layers: &[Vec<u8>], env: &[String]) -> io::Result<String> {
    let blobs = dir.join("blobs").join("sha256");
    fs::create_dir_all(&blobs)?;
    let put = |bytes: &[u8]| -> io::Result<(String, u64)> {
        let digest = sha256_hex(bytes);
        fs::write(blobs.join(&digest), bytes)?;
        Ok((format!("sha256:{digest}"), bytes.len() as u64))
    };
    let mut layer_descs = Vec::new();
    let mut diff_ids = Vec::new();
    for layer in layers {
        let (digest, size) = put(layer)?;
        diff_ids.push(digest.clone());
        layer_descs.push(serde_json::json!({
            "mediaType": "application/vnd.oci.image.layer.v1.tar",
            "digest": digest,
            "size": size,
        }));
    }
    let config = serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {"Env": env, "Cmd": ["/bin/sh"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    });
    let config = serde_json::to_vec(&config)?;
    let (config_digest, config_size) = put(&config)?;
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": config_digest,
            "size": config_size,
        },
        "layers": layer_descs,
    }))?;
    let (manifest_digest, manifest_size) = put(&manifest)?;
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": manifest_digest,
            "size": manifest_size,
            "platform": {"architecture": "amd64", "os": "linux"},
        }],
    });
    fs::write(dir.join("index.json"), serde_json::to_vec(&index)?)?;
    fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    Ok(sha256_hex(&config))
}
