//! The VM adapters' snapshot export format (`qemu`, `firecracker`), for the fleet's object store,
//! and the tar framing every adapter's export shares (the process adapter's format is its own, built
//! from the same primitives in `process/archive.rs`).
//!
//! A plain tar stream of regular files in a fixed order: `meta.json` (the snapshot's metadata, at
//! most [`MAX_META_BYTES`], including the SHA-256 and size of every raw file), then the adapter's
//! files, each zstd-compressed with a frame checksum (`state.zst` for qemu; `vmstate.zst`,
//! `mem.zst`, `rootfs.zst` for firecracker), then the end-of-archive marker. On import every file
//! is decompressed and its SHA-256 and size checked against the metadata, so a truncated, flipped
//! or foreign stream is refused before it exists as a snapshot. `tar -t` lists one.

use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::Path;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::provider::ProviderError;

pub(crate) const META_ENTRY: &str = "meta.json";
/// Largest `meta.json` accepted on import.
pub(crate) const MAX_META_BYTES: u64 = 1024 * 1024;
/// A tar block.
pub(crate) const BLOCK: usize = 512;

/// Compresses `state` into `dest` (zstd with a content checksum). Blocking.
pub(crate) fn compress(state: &Path, dest: &Path, level: i32) -> io::Result<u64> {
    let mut input = BufReader::new(std::fs::File::open(state)?);
    let mut encoder = zstd::Encoder::new(BufWriter::new(std::fs::File::create(dest)?), level)?;
    encoder.include_checksum(true)?;
    io::copy(&mut input, &mut encoder)?;
    let mut writer = encoder.finish()?;
    writer.flush()?;
    Ok(std::fs::metadata(dest)?.len())
}

/// Decompresses `src` into `dest`, returning the SHA-256 (hex) and size of what was written.
/// Blocking.
pub(crate) fn decompress(src: &Path, dest: &Path) -> io::Result<(String, u64)> {
    let mut decoder = zstd::Decoder::new(std::fs::File::open(src)?)?;
    let mut out = BufWriter::new(std::fs::File::create(dest)?);
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = decoder.read(&mut buf)?;
        if n == 0 {
            break;
        }
        ctx.update(&buf[..n]);
        out.write_all(&buf[..n])?;
        size += n as u64;
    }
    out.flush()?;
    Ok((
        super::registry::state_root::hex(ctx.finish().as_ref()),
        size,
    ))
}

/// A ustar header for a regular file entry.
pub(crate) fn entry_header(name: &str, size: u64) -> io::Result<tar::Header> {
    let mut header = tar::Header::new_ustar();
    header.set_path(name)?;
    header.set_size(size);
    header.set_mode(0o644);
    header.set_entry_type(tar::EntryType::Regular);
    header.set_mtime(crate::provider::now_ms() / 1000);
    header.set_cksum();
    Ok(header)
}

/// Zero bytes after an entry of `size` bytes, up to the next block.
pub(crate) fn padding(size: u64) -> usize {
    (BLOCK - (size % BLOCK as u64) as usize) % BLOCK
}

/// Writes the export stream: `meta`, then each `(name, file)` in order.
pub(crate) async fn write_export(
    meta: &[u8],
    entries: &[(&str, &Path)],
    out: &mut (dyn AsyncWrite + Unpin + Send),
) -> io::Result<u64> {
    let zeros = [0u8; BLOCK * 2];
    let header = entry_header(META_ENTRY, meta.len() as u64)?;
    out.write_all(header.as_bytes()).await?;
    out.write_all(meta).await?;
    out.write_all(&zeros[..padding(meta.len() as u64)]).await?;
    let mut written = (BLOCK + meta.len() + padding(meta.len() as u64)) as u64;
    for (name, path) in entries {
        let mut file = tokio::fs::File::open(path).await?;
        let size = file.metadata().await?.len();
        out.write_all(entry_header(name, size)?.as_bytes()).await?;
        let copied = tokio::io::copy(&mut (&mut file).take(size), out).await?;
        if copied != size {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("snapshot file {name} shrank while being exported"),
            ));
        }
        out.write_all(&zeros[..padding(size)]).await?;
        written += BLOCK as u64 + size + padding(size) as u64;
    }
    out.write_all(&zeros).await?;
    out.flush().await?;
    Ok(written + zeros.len() as u64)
}

/// A read failure of an import stream: early EOF is a corrupt snapshot, anything else I/O.
pub(crate) fn read_error(e: io::Error) -> ProviderError {
    if e.kind() == io::ErrorKind::UnexpectedEof {
        ProviderError::corrupt_snapshot("stream ends early")
    } else {
        ProviderError::io("cannot read snapshot stream", e)
    }
}

/// Reads one entry header and checks its checksum, type and name; returns the entry's size.
pub(crate) async fn read_entry_header(
    input: &mut (dyn AsyncRead + Unpin + Send),
    expected: &str,
) -> Result<u64, ProviderError> {
    let mut block = [0u8; BLOCK];
    input.read_exact(&mut block).await.map_err(read_error)?;
    let stored: u32 = block[..148]
        .iter()
        .chain([b' '; 8].iter())
        .chain(block[156..].iter())
        .map(|&b| u32::from(b))
        .sum();
    let header = tar::Header::from_byte_slice(&block);
    if header.cksum().ok() != Some(stored) {
        return Err(ProviderError::corrupt_snapshot(format!(
            "bad header checksum for {expected}"
        )));
    }
    let path = header.path().map_err(ProviderError::corrupt_snapshot)?;
    if path != Path::new(expected) || header.entry_type() != tar::EntryType::Regular {
        return Err(ProviderError::corrupt_snapshot(format!(
            "expected entry {expected}, found {}",
            path.display()
        )));
    }
    header.size().map_err(ProviderError::corrupt_snapshot)
}

/// Skips the padding after an entry of `size` bytes.
pub(crate) async fn skip_padding(
    input: &mut (dyn AsyncRead + Unpin + Send),
    size: u64,
) -> Result<(), ProviderError> {
    let mut pad = [0u8; BLOCK];
    input
        .read_exact(&mut pad[..padding(size)])
        .await
        .map_err(read_error)
        .map(drop)
}

/// Reads an export stream: returns the `meta.json` bytes and stores each of `names` (which must
/// follow in this order) as `dest_dir/<name>`. Checks the framing only.
pub(crate) async fn read_export(
    input: &mut (dyn AsyncRead + Unpin + Send),
    names: &[&str],
    dest_dir: &Path,
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
    for name in names {
        let size = read_entry_header(input, name).await?;
        let mut file = tokio::fs::File::create(dest_dir.join(name))
            .await
            .map_err(|e| ProviderError::io("cannot create snapshot file", e))?;
        let copied = tokio::io::copy(&mut (&mut *input).take(size), &mut file)
            .await
            .map_err(|e| ProviderError::io("cannot store snapshot file", e))?;
        if copied != size {
            return Err(ProviderError::corrupt_snapshot("stream ends early"));
        }
        file.flush()
            .await
            .map_err(|e| ProviderError::io("cannot store snapshot file", e))?;
        skip_padding(input, size).await?;
    }
    let mut end = [0u8; BLOCK * 2];
    input.read_exact(&mut end).await.map_err(read_error)?;
    if end.iter().any(|&b| b != 0) {
        return Err(ProviderError::corrupt_snapshot(
            "unexpected data after the last file",
        ));
    }
    Ok(meta)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn export_round_trips_and_damage_is_detected() {
        let tmp = tempfile::tempdir().unwrap();
        let state = tmp.path().join("state");
        let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
        std::fs::write(&state, &data).unwrap();
        let zst = tmp.path().join("state.zst");
        compress(&state, &zst, 1).unwrap();
        let mut stream = Vec::new();
        let n = write_export(b"{}", &[("state.zst", &zst)], &mut stream)
            .await
            .unwrap();
        assert_eq!(n, stream.len() as u64);

        let into = tmp.path().join("into");
        std::fs::create_dir(&into).unwrap();
        let got = into.join("state.zst");
        let meta = read_export(&mut stream.as_slice(), &["state.zst"], &into)
            .await
            .unwrap();
        assert_eq!(meta, b"{}");
        let out = tmp.path().join("out");
        let (sha, size) = decompress(&got, &out).unwrap();
        assert_eq!(size, data.len() as u64);
        assert_eq!(
            sha,
            crate::provider::registry::state_root::sha256_file(&state).unwrap()
        );

        let cut = &stream[..stream.len() / 2];
        assert!(matches!(
            read_export(&mut &cut[..], &["state.zst"], &into).await,
            Err(ProviderError::InvalidArgument(_))
        ));
        assert!(matches!(
            read_export(&mut stream.as_slice(), &["other.zst"], &into).await,
            Err(ProviderError::InvalidArgument(_))
        ));
        let mut flipped = stream.clone();
        // Past the meta entry (header + one block) and the state's header: inside the data.
        let at = BLOCK * 3 + 100;
        flipped[at] ^= 0x40;
        read_export(&mut flipped.as_slice(), &["state.zst"], &into)
            .await
            .unwrap();
        assert!(
            decompress(&got, &out).is_err(),
            "the zstd checksum catches it"
        );
    }
}
