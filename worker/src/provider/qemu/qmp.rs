//! A small QMP (QEMU Machine Protocol) client: JSON lines over the VM's Unix socket.
//!
//! One reader task per connection routes replies to their commands by `id` (QEMU echoes it) and
//! drops asynchronous events. The connection ending is how the provider learns that a QEMU process
//! died, whether or not it is the worker's child (VMs adopted after a worker restart are not).

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::net::unix::OwnedWriteHalf;
use tokio::sync::oneshot;
use tokio::task::AbortHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::trace;

/// Longest line accepted from QEMU (replies are small; this bounds a confused peer).
const MAX_LINE: usize = 1 << 20;

/// A failed QMP exchange.
#[derive(Debug, thiserror::Error)]
pub(crate) enum QmpError {
    #[error("qmp connection closed")]
    Closed,
    #[error("qmp {0} did not answer within {1:?}")]
    Timeout(String, Duration),
    #[error("qmp {command}: {desc}")]
    Command { command: String, desc: String },
    #[error("qmp: {0}")]
    Io(#[from] std::io::Error),
    #[error("qmp: {0}")]
    Protocol(String),
}

type Reply = Result<Value, String>;

#[derive(Debug, Default)]
struct Shared {
    pending: Mutex<HashMap<u64, oneshot::Sender<Reply>>>,
    closed: CancellationToken,
}

/// One QMP connection. Dropping it stops its reader (QEMU keeps running).
#[derive(Debug)]
pub(crate) struct Qmp {
    /// `None` once detached.
    writer: tokio::sync::Mutex<Option<OwnedWriteHalf>>,
    shared: Arc<Shared>,
    next_id: AtomicU64,
    reader: AbortHandle,
}

impl Drop for Qmp {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

impl Qmp {
    /// Connects to `path` (retrying until `deadline` while QEMU creates the socket), reads the
    /// greeting and leaves capability negotiation mode.
    pub(crate) async fn connect(path: &Path, deadline: Instant) -> Result<Qmp, QmpError> {
        let stream = loop {
            match UnixStream::connect(path).await {
                Ok(stream) => break stream,
                Err(e) if Instant::now() >= deadline => return Err(QmpError::Io(e)),
                Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
            }
        };
        let (read, write) = stream.into_split();
        let mut lines = BufReader::new(read);
        let mut greeting = String::new();
        tokio::time::timeout_at(deadline, read_line(&mut lines, &mut greeting))
            .await
            .map_err(|_| QmpError::Timeout("greeting".into(), Duration::ZERO))??;
        if !greeting.contains("\"QMP\"") {
            return Err(QmpError::Protocol(format!(
                "unexpected greeting {:?}",
                greeting.trim()
            )));
        }
        let shared = Arc::new(Shared::default());
        let reader = tokio::spawn(read_loop(lines, shared.clone())).abort_handle();
        let qmp = Qmp {
            writer: tokio::sync::Mutex::new(Some(write)),
            shared,
            next_id: AtomicU64::new(1),
            reader,
        };
        let remaining = deadline.saturating_duration_since(Instant::now());
        qmp.execute(
            "qmp_capabilities",
            json!({}),
            remaining.max(Duration::from_secs(5)),
        )
        .await?;
        Ok(qmp)
    }

    /// Runs one command and returns its `return` value.
    pub(crate) async fn execute(
        &self,
        command: &str,
        arguments: Value,
        timeout: Duration,
    ) -> Result<Value, QmpError> {
        if self.shared.closed.is_cancelled() {
            return Err(QmpError::Closed);
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.shared.pending.lock().insert(id, tx);
        let mut line = serde_json::to_vec(&json!({
            "execute": command,
            "arguments": arguments,
            "id": id,
        }))
        .map_err(|e| QmpError::Protocol(e.to_string()))?;
        line.push(b'\n');
        let written = async {
            let mut writer = self.writer.lock().await;
            let writer = writer.as_mut().ok_or(std::io::ErrorKind::NotConnected)?;
            writer.write_all(&line).await?;
            writer.flush().await
        }
        .await;
        if let Err(e) = written {
            self.shared.pending.lock().remove(&id);
            return Err(if self.shared.closed.is_cancelled() {
                QmpError::Closed
            } else {
                QmpError::Io(e)
            });
        }
        let reply = tokio::select! {
            reply = rx => reply,
            _ = tokio::time::sleep(timeout) => {
                self.shared.pending.lock().remove(&id);
                return Err(QmpError::Timeout(command.to_owned(), timeout));
            }
        };
        match reply {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(desc)) => Err(QmpError::Command {
                command: command.to_owned(),
                desc,
            }),
            Err(_) => Err(QmpError::Closed),
        }
    }

    /// Closes the connection without touching QEMU (so another client, e.g. the next worker, can
    /// connect). Best effort: a command being written keeps the socket until it is done.
    pub(crate) fn detach(&self) {
        self.reader.abort();
        if let Ok(mut writer) = self.writer.try_lock() {
            writer.take();
        }
    }

    /// Resolves when the connection has ended (QEMU exited or closed the monitor).
    pub(crate) fn closed(&self) -> CancellationToken {
        self.shared.closed.clone()
    }
}

async fn read_line<R: tokio::io::AsyncBufRead + Unpin>(
    reader: &mut R,
    line: &mut String,
) -> Result<(), QmpError> {
    line.clear();
    let n = reader.read_line(line).await?;
    if n == 0 {
        return Err(QmpError::Closed);
    }
    if line.len() > MAX_LINE {
        return Err(QmpError::Protocol("line too long".into()));
    }
    Ok(())
}

async fn read_loop(mut lines: BufReader<tokio::net::unix::OwnedReadHalf>, shared: Arc<Shared>) {
    let mut line = String::new();
    while read_line(&mut lines, &mut line).await.is_ok() {
        let Ok(message) = serde_json::from_str::<Value>(&line) else {
            continue;
        };
        if let Some(event) = message.get("event") {
            trace!(%event, "qmp event");
            continue;
        }
        let Some(id) = message.get("id").and_then(Value::as_u64) else {
            continue;
        };
        let reply = match (message.get("return"), message.get("error")) {
            (Some(ret), _) => Ok(ret.clone()),
            (None, Some(err)) => Err(err
                .get("desc")
                .and_then(Value::as_str)
                .unwrap_or("unknown error")
                .to_owned()),
            (None, None) => Err("malformed reply".to_owned()),
        };
        if let Some(tx) = shared.pending.lock().remove(&id) {
            let _ = tx.send(reply);
        }
    }
    shared.closed.cancel();
    shared.pending.lock().clear();
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::UnixListener;

    /// A fake QMP server answering every command with its name, and `fail` with an error.
    async fn fake_server(listener: UnixListener, close_after: usize) {
        let (stream, _) = listener.accept().await.unwrap();
        let (read, mut write) = stream.into_split();
        write
            .write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": []}}\n")
            .await
            .unwrap();
        let mut lines = BufReader::new(read);
        let mut line = String::new();
        for _ in 0..close_after {
            line.clear();
            if lines.read_line(&mut line).await.unwrap() == 0 {
                return;
            }
            let req: Value = serde_json::from_str(&line).unwrap();
            let id = req["id"].clone();
            let cmd = req["execute"].as_str().unwrap().to_owned();
            // An event first: it must be skipped.
            write
                .write_all(b"{\"event\": \"RESUME\", \"timestamp\": {}}\n")
                .await
                .unwrap();
            let reply = if cmd == "fail" {
                json!({"error": {"class": "GenericError", "desc": "it failed"}, "id": id})
            } else {
                json!({"return": {"cmd": cmd}, "id": id})
            };
            let mut bytes = serde_json::to_vec(&reply).unwrap();
            bytes.push(b'\n');
            write.write_all(&bytes).await.unwrap();
        }
    }

    #[tokio::test]
    async fn commands_errors_and_a_closed_connection() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let server = tokio::spawn(fake_server(listener, 3));
        let deadline = Instant::now() + Duration::from_secs(5);
        let qmp = Qmp::connect(&path, deadline).await.unwrap();
        let t = Duration::from_secs(5);
        let value = qmp.execute("query-status", json!({}), t).await.unwrap();
        assert_eq!(value["cmd"], "query-status");
        let err = qmp.execute("fail", json!({}), t).await.unwrap_err();
        assert!(err.to_string().contains("it failed"), "{err}");
        server.await.unwrap();
        qmp.closed().cancelled().await;
        assert!(matches!(
            qmp.execute("cont", json!({}), t).await,
            Err(QmpError::Closed)
        ));
    }
}
