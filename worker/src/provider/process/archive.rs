//! Volume archives for the process adapter: `tar.zst` pack/unpack (snapshots, restores, backups,
//! bases), directory copies, and the export stream format.
//!
//! Everything here streams (no whole-volume buffers). The synchronous parts run inside
//! `spawn_blocking`; the export/import framing is async because it talks to the caller's stream.
//!
//! Export format: a plain (uncompressed) tar stream holding exactly two regular files, in order:
//! `meta.json` (at most [`MAX_META_BYTES`]) and `volume.tar.zst` (the snapshot's volume archive, a
//! zstd frame with a content checksum), then the end-of-archive marker. Operators can inspect one
//! with `tar -t`.

use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::provider::ProviderError;
use crate::provider::snapshot_archive::{
    BLOCK, entry_header, padding, read_entry_header, read_error, skip_padding,
};

/// Name of the metadata entry in an export stream, and the limit on its size.
pub(crate) use crate::provider::snapshot_archive::{MAX_META_BYTES, META_ENTRY};
/// Name of the volume archive, in a snapshot directory and in an export stream.
pub(crate) const VOLUME_ENTRY: &str = "volume.tar.zst";

/// Archives the contents of `src_dir` into a new `dest` file as tar + zstd (with a checksum).
/// Symlinks are stored as symlinks, never followed; fifos, sockets and devices are skipped.
/// Returns the archive's size in bytes.
///
/// The volume belongs to the guest, and a process in it may swap a file for a symlink to a host
/// path while this runs. So the walk never resolves a path: every directory and file is opened
/// relative to its parent's descriptor with `O_NOFOLLOW`, and what is archived is what the
/// opened descriptor is (`fstat`), never what a path pointed to a moment earlier.
pub(crate) fn pack_dir(src_dir: &Path, dest: &Path, level: i32) -> io::Result<u64> {
    let file = File::create(dest)?;
    let mut encoder = zstd::Encoder::new(BufWriter::new(file), level)?;
    encoder.include_checksum(true)?;
    let mut builder = tar::Builder::new(encoder);
    let root = File::open(src_dir)?;
    append_tree(&mut builder, root, Path::new("."))?;
    let encoder = builder.into_inner()?;
    let mut writer = encoder.finish()?;
    writer.flush()?;
    let file = writer.into_inner().map_err(|e| e.into_error())?;
    file.sync_all()?;
    Ok(file.metadata()?.len())
}

/// Appends the directory open as `dir` (named `name` in the archive) and everything under it.
fn append_tree<W: Write>(builder: &mut tar::Builder<W>, dir: File, name: &Path) -> io::Result<()> {
    use nix::fcntl::{OFlag, openat, readlinkat};
    use nix::sys::stat::{Mode, SFlag};

    let meta = dir.metadata()?;
    if !meta.is_dir() {
        return Ok(());
    }
    let mut header = tar::Header::new_gnu();
    header.set_metadata_in_mode(&meta, tar::HeaderMode::Complete);
    builder.append_data(&mut header, name, io::empty())?;

    let entries: Vec<std::ffi::OsString> = {
        let mut listing = nix::dir::Dir::from_fd(dir.try_clone()?.into())?;
        listing
            .iter()
            .filter_map(Result::ok)
            .map(|e| std::ffi::OsStr::from_bytes(e.file_name().to_bytes()).to_owned())
            .filter(|n| n != "." && n != "..")
            .collect()
    };
    for entry in entries {
        let path = name.join(&entry);
        let stat = match nix::sys::stat::fstatat(
            &dir,
            entry.as_os_str(),
            nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
        ) {
            Ok(stat) => stat,
            // Gone meanwhile.
            Err(nix::errno::Errno::ENOENT) => continue,
            Err(e) => return Err(e.into()),
        };
        let kind = SFlag::from_bits_truncate(stat.st_mode & SFlag::S_IFMT.bits());
        let open = |extra: OFlag| {
            openat(
                &dir,
                entry.as_os_str(),
                OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | extra,
                Mode::empty(),
            )
        };
        match kind {
            SFlag::S_IFDIR => match open(OFlag::O_DIRECTORY) {
                Ok(fd) => append_tree(builder, File::from(fd), &path)?,
                // Swapped for something else meanwhile: skipped, never followed.
                Err(nix::errno::Errno::ENOENT | nix::errno::Errno::ENOTDIR) => {}
                Err(nix::errno::Errno::ELOOP) => {}
                Err(e) => return Err(e.into()),
            },
            SFlag::S_IFREG => {
                let file = match open(OFlag::O_NONBLOCK) {
                    Ok(fd) => File::from(fd),
                    Err(nix::errno::Errno::ENOENT | nix::errno::Errno::ELOOP) => continue,
                    Err(e) => return Err(e.into()),
                };
                let meta = file.metadata()?;
                if !meta.is_file() {
                    continue;
                }
                let mut header = tar::Header::new_gnu();
                header.set_metadata_in_mode(&meta, tar::HeaderMode::Complete);
                let size = meta.len();
                // Exactly `size` bytes whatever the file does meanwhile: cut if it grew,
                // zero-padded if it shrank.
                let data = file.take(size).chain(io::repeat(0)).take(size);
                builder.append_data(&mut header, &path, data)?;
            }
            SFlag::S_IFLNK => {
                let target = match readlinkat(&dir, entry.as_os_str()) {
                    Ok(target) => target,
                    Err(nix::errno::Errno::ENOENT | nix::errno::Errno::EINVAL) => continue,
                    Err(e) => return Err(e.into()),
                };
                let mut header = tar::Header::new_gnu();
                header.set_entry_type(tar::EntryType::Symlink);
                header.set_size(0);
                header.set_mode(0o777);
                header.set_uid(u64::from(stat.st_uid));
                header.set_gid(u64::from(stat.st_gid));
                header.set_mtime(u64::try_from(stat.st_mtime).unwrap_or(0));
                builder.append_link(&mut header, &path, &target)?;
            }
            _ => {}
        }
    }
    Ok(())
}

/// Extracts a `tar.zst` archive into the existing directory `dest`. Entries that would land outside
/// `dest` are refused by the tar reader.
pub(crate) fn unpack_tar_zst(src: &Path, dest: &Path) -> io::Result<()> {
    let decoder = zstd::Decoder::new(File::open(src)?)?;
    unpack_tar(decoder, dest)
}

/// Extracts a plain tar stream into the existing directory `dest`.
pub(crate) fn unpack_tar(reader: impl Read, dest: &Path) -> io::Result<()> {
    let mut archive = tar::Archive::new(reader);
    archive.set_preserve_permissions(true);
    archive.set_preserve_mtime(true);
    archive.set_unpack_xattrs(false);
    archive.set_overwrite(true);
    archive.unpack(dest)
}

/// Reads a `tar.zst` archive end to end (checksums included) without extracting it.
pub(crate) fn verify_tar_zst(src: &Path) -> io::Result<()> {
    let decoder = zstd::Decoder::new(File::open(src)?)?;
    let mut archive = tar::Archive::new(decoder);
    for entry in archive.entries()? {
        let mut entry = entry?;
        entry.path()?;
        io::copy(&mut entry, &mut io::sink())?;
    }
    // Read to the end of the zstd frame: its content checksum is only checked there.
    io::copy(&mut archive.into_inner(), &mut io::sink())?;
    Ok(())
}

/// Seeds `dest` (an existing empty directory) from `base`: a directory (copied), a `.tar`, or a
/// `.tar.zst` / `.tzst` archive.
pub(crate) fn seed_from_base(base: &Path, dest: &Path) -> Result<(), ProviderError> {
    let meta = std::fs::metadata(base).map_err(|e| {
        ProviderError::InvalidArgument(format!("base {} is not usable: {e}", base.display()))
    })?;
    let name = base.to_string_lossy();
    let result = if meta.is_dir() {
        copy_tree(base, dest)
    } else if name.ends_with(".tar.zst") || name.ends_with(".tzst") {
        unpack_tar_zst(base, dest)
    } else if name.ends_with(".tar") {
        File::open(base).and_then(|f| unpack_tar(BufReader::new(f), dest))
    } else {
        return Err(ProviderError::InvalidArgument(format!(
            "base {} must be a directory, .tar or .tar.zst",
            base.display()
        )));
    };
    result.map_err(|e| ProviderError::io(format!("cannot seed volume from {}", base.display()), e))
}

/// Gives `dir` and everything under it to `uid:gid`, never following a symlink (a volume's
/// contents are the guest's: a link may point anywhere on the host).
pub(crate) fn chown_tree(dir: &Path, uid: u32, gid: u32) -> io::Result<()> {
    std::os::unix::fs::lchown(dir, Some(uid), Some(gid))?;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir)? {
            let entry = entry?;
            let path = entry.path();
            std::os::unix::fs::lchown(&path, Some(uid), Some(gid))?;
            if entry.file_type()?.is_dir() {
                stack.push(path);
            }
        }
    }
    Ok(())
}

/// Copies the contents of `src` into the existing directory `dest`: files (with permissions),
/// directories and symlinks (as symlinks). Sockets, fifos and devices are skipped.
pub(crate) fn copy_tree(src: &Path, dest: &Path) -> io::Result<()> {
    for entry in std::fs::read_dir(src)? {
        let entry = entry?;
        let kind = entry.file_type()?;
        let from = entry.path();
        let to = dest.join(entry.file_name());
        if kind.is_dir() {
            std::fs::create_dir(&to)?;
            copy_tree(&from, &to)?;
            let mode = std::fs::metadata(&from)?.permissions().mode();
            std::fs::set_permissions(&to, std::fs::Permissions::from_mode(mode))?;
        } else if kind.is_file() {
            std::fs::copy(&from, &to)?;
        } else if kind.is_symlink() {
            std::os::unix::fs::symlink(std::fs::read_link(&from)?, &to)?;
        }
    }
    Ok(())
}

/// Writes an export stream: `meta` then the file at `volume`. Returns the bytes written.
pub(crate) async fn write_export(
    meta: &[u8],
    volume: &Path,
    out: &mut (dyn AsyncWrite + Unpin + Send),
) -> io::Result<u64> {
    let zeros = [0u8; BLOCK * 2];
    let mut written = 0u64;

    let header = entry_header(META_ENTRY, meta.len() as u64)?;
    out.write_all(header.as_bytes()).await?;
    out.write_all(meta).await?;
    out.write_all(&zeros[..padding(meta.len() as u64)]).await?;
    written += (BLOCK + meta.len() + padding(meta.len() as u64)) as u64;

    let mut file = tokio::fs::File::open(volume).await?;
    let size = file.metadata().await?.len();
    let header = entry_header(VOLUME_ENTRY, size)?;
    out.write_all(header.as_bytes()).await?;
    let copied = tokio::io::copy(&mut (&mut file).take(size), out).await?;
    if copied != size {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "snapshot volume shrank while being exported",
        ));
    }
    out.write_all(&zeros[..padding(size)]).await?;
    out.write_all(&zeros).await?;
    out.flush().await?;
    written += BLOCK as u64 + size + padding(size) as u64 + zeros.len() as u64;
    Ok(written)
}

/// Maps a read error on an import stream: running out of bytes means a truncated (corrupt) stream.
/// Reads an export stream: returns the `meta.json` bytes and streams the volume archive into the new
/// file `volume_dest`. Checks the framing only; the caller verifies the archive itself.
pub(crate) async fn read_export(
    input: &mut (dyn AsyncRead + Unpin + Send),
    volume_dest: &Path,
) -> Result<Vec<u8>, ProviderError> {
    let meta_size = read_entry_header(input, META_ENTRY).await?;
    if meta_size > MAX_META_BYTES {
        return Err(ProviderError::corrupt_snapshot(format!(
            "{META_ENTRY} is {meta_size} bytes"
        )));
    }
    let mut meta = vec![0u8; meta_size as usize];
    input.read_exact(&mut meta).await.map_err(read_error)?;
    skip_padding(input, meta_size).await?;

    let volume_size = read_entry_header(input, VOLUME_ENTRY).await?;
    let mut file = tokio::fs::File::create(volume_dest)
        .await
        .map_err(|e| ProviderError::io("cannot create snapshot file", e))?;
    let copied = tokio::io::copy(&mut input.take(volume_size), &mut file)
        .await
        .map_err(|e| ProviderError::io("cannot store snapshot volume", e))?;
    if copied != volume_size {
        return Err(ProviderError::corrupt_snapshot("stream ends early"));
    }
    file.sync_all()
        .await
        .map_err(|e| ProviderError::io("cannot store snapshot volume", e))?;
    skip_padding(input, volume_size).await?;

    let mut end = [0u8; BLOCK * 2];
    input.read_exact(&mut end).await.map_err(read_error)?;
    if end.iter().any(|&b| b != 0) {
        return Err(ProviderError::corrupt_snapshot(
            "unexpected data after the volume",
        ));
    }
    Ok(meta)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pack_then_unpack_round_trips_files_modes_and_symlinks() {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("src");
        std::fs::create_dir_all(src.join("d")).unwrap();
        std::fs::write(src.join("d/f"), b"hello").unwrap();
        std::fs::set_permissions(src.join("d/f"), std::fs::Permissions::from_mode(0o751)).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", src.join("link")).unwrap();
        let archive = tmp.path().join("a.tar.zst");
        let size = pack_dir(&src, &archive, 3).unwrap();
        assert_eq!(size, std::fs::metadata(&archive).unwrap().len());
        verify_tar_zst(&archive).unwrap();

        let dest = tmp.path().join("dest");
        std::fs::create_dir(&dest).unwrap();
        unpack_tar_zst(&archive, &dest).unwrap();
        assert_eq!(std::fs::read(dest.join("d/f")).unwrap(), b"hello");
        let mode = std::fs::metadata(dest.join("d/f"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o751);
        assert_eq!(
            std::fs::read_link(dest.join("link")).unwrap(),
            Path::new("/etc/passwd")
        );
    }

    #[test]
    fn a_damaged_archive_fails_verification() {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("src");
        std::fs::create_dir(&src).unwrap();
        std::fs::write(src.join("f"), vec![7u8; 100_000]).unwrap();
        let archive = tmp.path().join("a.tar.zst");
        pack_dir(&src, &archive, 3).unwrap();
        let mut bytes = std::fs::read(&archive).unwrap();
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0xff;
        std::fs::write(&archive, &bytes).unwrap();
        assert!(verify_tar_zst(&archive).is_err());
    }

    #[tokio::test]
    async fn export_framing_round_trips_and_rejects_truncation() {
        let tmp = tempfile::tempdir().unwrap();
        let volume = tmp.path().join("v");
        std::fs::write(&volume, vec![1u8; 1234]).unwrap();
        let mut stream = Vec::new();
        let n = write_export(b"{\"a\":1}", &volume, &mut stream)
            .await
            .unwrap();
        assert_eq!(n, stream.len() as u64);
        assert_eq!(stream.len() % BLOCK, 0);

        let dest = tmp.path().join("out");
        let meta = read_export(&mut stream.as_slice(), &dest).await.unwrap();
        assert_eq!(meta, b"{\"a\":1}");
        assert_eq!(std::fs::read(&dest).unwrap(), vec![1u8; 1234]);

        for cut in [10, BLOCK + 3, stream.len() - 1] {
            let err = read_export(&mut &stream[..cut], &dest).await.unwrap_err();
            assert!(
                matches!(err, ProviderError::InvalidArgument(_)),
                "{cut}: {err}"
            );
        }
        let mut flipped = stream.clone();
        flipped[0] ^= 1;
        assert!(read_export(&mut flipped.as_slice(), &dest).await.is_err());
    }
}
