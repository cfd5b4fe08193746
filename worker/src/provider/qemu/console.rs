//! A VM's serial console, kept on disk with a hard size bound.
//!
//! QEMU does not write the log itself (a `-serial file:` grows as long as the guest prints, and
//! the guest is untrusted). The serial port is a listening socket chardev (`server=on,wait=off`:
//! with nobody connected QEMU drops the bytes, it never blocks the guest); the worker connects and
//! appends what it reads to `console.log`. When that file would pass the cap it becomes
//! `console.log.1` (replacing the previous one) and a fresh `console.log` starts: at most two
//! caps of disk per VM. After a worker restart the adopted VM's console is reconnected and the
//! log continues. Bytes the guest prints while no worker is connected (the first milliseconds
//! before the connection, a worker restart) are dropped by QEMU.

use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tracing::debug;

/// Smallest cap accepted (smaller settings are raised to it).
pub(crate) const MIN_CONSOLE_BYTES: u64 = 4096;
/// How often a lost or not yet listening console socket is retried.
const RECONNECT: Duration = Duration::from_millis(10);

/// The rotated file next to `path`.
pub(crate) fn rotated(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_os_string();
    name.push(".1");
    PathBuf::from(name)
}

/// `console.log` with its cap: appends, rotating once into `console.log.1` when full.
#[derive(Debug)]
pub(crate) struct ConsoleLog {
    path: PathBuf,
    cap: u64,
    file: std::fs::File,
    size: u64,
}

impl ConsoleLog {
    /// Opens (appending to) the log at `path`, holding at most `cap` bytes per file.
    pub(crate) fn open(path: &Path, cap: u64) -> io::Result<Self> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        let size = file.metadata()?.len();
        Ok(Self {
            path: path.to_path_buf(),
            cap: cap.max(MIN_CONSOLE_BYTES),
            file,
            size,
        })
    }

    /// Appends `data`, rotating whenever the current file is full.
    pub(crate) fn write(&mut self, mut data: &[u8]) -> io::Result<()> {
        while !data.is_empty() {
            if self.size >= self.cap {
                self.rotate()?;
            }
            let room = usize::try_from(self.cap - self.size).unwrap_or(usize::MAX);
            let n = room.min(data.len());
            self.file.write_all(&data[..n])?;
            self.size += n as u64;
            data = &data[n..];
        }
        Ok(())
    }

    fn rotate(&mut self) -> io::Result<()> {
        std::fs::rename(&self.path, rotated(&self.path))?;
        self.file = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .open(&self.path)?;
        self.size = 0;
        Ok(())
    }
}

/// How long the pump keeps trying to reach a console it had, after the connection ended (QEMU
/// closes it only when it exits).
pub(crate) const PATIENCE_AFTER_EOF: Duration = Duration::from_secs(2);

/// Copies the console socket at `socket` into the capped log at `log` until `stop` resolves, or
/// until the socket cannot be reached for `patience` (QEMU gone; [`PATIENCE_AFTER_EOF`] once a
/// connection ended). Reconnects whenever the connection is lost.
pub(crate) async fn pump(
    socket: PathBuf,
    log: PathBuf,
    cap: u64,
    patience: Duration,
    stop: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(stop);
    let mut buf = vec![0u8; 64 * 1024];
    let mut out: Option<ConsoleLog> = None;
    let mut trying_since = tokio::time::Instant::now();
    let mut patience = patience;
    loop {
        let stream = tokio::select! {
            () = &mut stop => return,
            stream = tokio::net::UnixStream::connect(&socket) => stream,
        };
        let Ok(mut stream) = stream else {
            if trying_since.elapsed() > patience {
                debug!(path = %socket.display(), "console socket gone; console log closed");
                return;
            }
            tokio::select! {
                () = &mut stop => return,
                () = tokio::time::sleep(RECONNECT) => continue,
            }
        };
        loop {
            let n = tokio::select! {
                () = &mut stop => return,
                n = stream.read(&mut buf) => n,
            };
            let n = match n {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if out.is_none() {
                match ConsoleLog::open(&log, cap) {
                    Ok(opened) => out = Some(opened),
                    Err(e) => {
                        debug!(path = %log.display(), %e, "cannot open the console log");
                        continue;
                    }
                }
            }
            if let Some(file) = &mut out
                && let Err(e) = file.write(&buf[..n])
            {
                // The run directory is gone (the VM was destroyed): reopen on the next bytes.
                debug!(path = %log.display(), %e, "cannot write the console log");
                out = None;
            }
        }
        trying_since = tokio::time::Instant::now();
        patience = PATIENCE_AFTER_EOF;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;
    use tokio_util::sync::CancellationToken;

    fn len(path: &Path) -> u64 {
        std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
    }

    #[test]
    fn the_log_is_capped_and_rotated_once() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("console.log");
        let mut log = ConsoleLog::open(&path, 10_000).unwrap();
        log.write(&[b'a'; 6000]).unwrap();
        assert_eq!(len(&path), 6000);
        log.write(&[b'b'; 6000]).unwrap();
        assert_eq!(len(&path), 2000, "the rest went into a fresh file");
        assert_eq!(len(&rotated(&path)), 10_000);
        // A flood: never more than two caps on disk, and the newest bytes are kept.
        for _ in 0..100 {
            log.write(&[b'c'; 7777]).unwrap();
            assert!(len(&path) <= 10_000 && len(&rotated(&path)) <= 10_000);
        }
        log.write(b"tail").unwrap();
        let text = std::fs::read(&path).unwrap();
        assert!(text.ends_with(b"ctail"));
        // Reopened (a worker restart): appends where it was, same cap.
        drop(log);
        let before = std::fs::read(&path).unwrap();
        let mut log = ConsoleLog::open(&path, 10_000).unwrap();
        log.write(b"more").unwrap();
        assert_eq!(
            std::fs::read(&path).unwrap(),
            [&before[..], b"more"].concat()
        );
        assert_eq!(
            ConsoleLog::open(&path, 1).unwrap().cap,
            MIN_CONSOLE_BYTES,
            "tiny caps are raised"
        );
    }

    /// A stand-in for QEMU's socket chardev: the pump connects before it listens, reconnects when
    /// the connection drops, and keeps the log within its cap.
    #[tokio::test]
    async fn the_pump_reconnects_and_keeps_the_log_bounded() {
        let tmp = tempfile::tempdir().unwrap();
        let socket = tmp.path().join("console.sock");
        let log = tmp.path().join("console.log");
        let stop = CancellationToken::new();
        let pump = tokio::spawn(pump(
            socket.clone(),
            log.clone(),
            8192,
            Duration::from_secs(30),
            stop.clone().cancelled_owned(),
        ));
        tokio::time::sleep(Duration::from_millis(50)).await;
        let listener = tokio::net::UnixListener::bind(&socket).unwrap();
        let (mut guest, _) = listener.accept().await.unwrap();
        guest.write_all(b"booting\n").await.unwrap();
        // A hostile guest prints 1 MiB.
        for _ in 0..64 {
            guest.write_all(&[b'x'; 16 * 1024]).await.unwrap();
        }
        guest.write_all(b"last line\n").await.unwrap();
        drop(guest);
        let (mut guest, _) = listener.accept().await.unwrap();
        guest.write_all(b"after reconnect\n").await.unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !std::fs::read(&log)
            .unwrap_or_default()
            .ends_with(b"after reconnect\n")
        {
            assert!(std::time::Instant::now() < deadline, "log never caught up");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(len(&log) <= 8192 && len(&rotated(&log)) <= 8192);
        let text = [
            std::fs::read(rotated(&log)).unwrap(),
            std::fs::read(&log).unwrap(),
        ]
        .concat();
        assert!(text.ends_with(b"xlast line\nafter reconnect\n"));
        stop.cancel();
        tokio::time::timeout(Duration::from_secs(5), pump)
            .await
            .expect("the pump stops")
            .unwrap();
    }

    #[tokio::test]
    async fn the_pump_gives_up_on_a_console_that_never_appears() {
        let tmp = tempfile::tempdir().unwrap();
        let done = pump(
            tmp.path().join("console.sock"),
            tmp.path().join("console.log"),
            8192,
            Duration::from_millis(100),
            std::future::pending(),
        );
        tokio::time::timeout(Duration::from_secs(5), done)
            .await
            .expect("the pump ends by itself");
        assert!(!tmp.path().join("console.log").exists());
    }
}
