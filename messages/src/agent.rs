//! The guest agent protocol: what a worker's VM provider and the Hearth guest agent inside a VM say
//! to each other over the VMM's host↔guest channel (a virtio-serial port under QEMU, vsock under
//! Firecracker).
//!
//! Framing: every message is one frame, a `u32` big-endian length followed by that many bytes of
//! MessagePack with field names (`rmp_serde::to_vec_named`), like every other Hearth payload. A
//! frame longer than [`MAX_FRAME_BYTES`] is a protocol error: the reader drops the connection.
//!
//! The host sends [`HostFrame`]s, each with a request `id` of its choosing; the agent answers with
//! [`AgentFrame`]s carrying the same `id`. Every request gets exactly one final reply; an exec may
//! be preceded by any number of [`AgentReply::Output`] chunks (in order per stream). Requests may
//! be pipelined and are answered in any order. Ids are per connection: after a reconnect (a
//! snapshot restore, a worker restart) the host ignores replies to ids it no longer waits for.
//!
//! A host that stops waiting for a request (its caller went away, a timeout) sends
//! [`AgentRequest::Cancel`] for it, so that the guest stops the work too: a command is killed with
//! its process group. The cancelled request still gets exactly one final reply, and nothing after
//! it: its own, if it finished first, else [`AgentErrorKind::Cancelled`].
//!
//! Compatibility: a request the agent cannot decode (an `op` it does not know, from a newer host)
//! is answered with [`AgentErrorKind::Unsupported`] when its `id` can be read. Agents older than
//! `Cancel` only log and skip such a frame without answering, so a host never waits for the
//! answer to a `Cancel`.
//!
//! Exec, files and their results reuse the data-plane types ([`ExecRequest`], [`ExecResult`],
//! [`FilePutRequest`], …), so the agent implements exactly the exec contract of the wire API.
//!
//! The guest is untrusted: a host must bound everything it reads from an agent (frame size, output
//! beyond the exec's cap, time).

use std::collections::BTreeMap;
use std::io::{Read, Write};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::blob::Blob;
use crate::data::{ExecRequest, ExecResult, FileGetRequest, FileGetResult, FilePutRequest};
use crate::data::{FilePutResult, MAX_OUTPUT_BYTES};
use crate::processes::{
    ProcessInfo, ProcessList, ProcessOutput, ProcessStartRequest, ProcessStarted,
    ProcessStdinResult, PtySize,
};

/// Version of this protocol, reported by [`AgentReply::Pong`]. A host refuses an agent that speaks
/// another version.
pub const PROTOCOL_VERSION: u32 = 1;

/// Largest frame either side accepts: room for a non-streamed exec result carrying both streams at
/// the largest output cap, plus headroom.
pub const MAX_FRAME_BYTES: usize = 2 * MAX_OUTPUT_BYTES as usize + (1 << 20);

/// Largest output chunk an agent sends in one [`AgentReply::Output`].
pub const OUTPUT_CHUNK_BYTES: usize = 64 * 1024;

/// Name of the virtio-serial port the agent listens on (`/sys/class/virtio-ports/*/name`).
pub const VIRTIO_PORT_NAME: &str = "org.hearth.agent.0";

/// Default vsock port of the agent (Firecracker).
pub const VSOCK_PORT: u32 = 1024;

/// Host → agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostFrame {
    /// Chosen by the host; echoed in every reply to this request.
    pub id: u64,
    /// What to do.
    pub request: AgentRequest,
}

/// Agent → host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentFrame {
    /// The id of the request this answers.
    pub id: u64,
    /// The answer (or one output chunk of it).
    pub reply: AgentReply,
}

/// What the host asks of the agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum AgentRequest {
    /// Health check; answered with [`AgentReply::Pong`].
    Ping {},
    /// Run one command, exactly as the data-plane `exec` (argv or `sh -c` cmd, env, cwd relative to
    /// the work directory, stdin, timeout killing the process group, per-stream output cap).
    /// Answered with zero or more [`AgentReply::Output`] chunks when `stream` is set, then
    /// [`AgentReply::Exited`] (whose output then holds nothing already streamed).
    Exec(ExecRequest),
    /// Write a file under the work directory; answered with [`AgentReply::FileWritten`].
    PutFile(FilePutRequest),
    /// Read a file under the work directory; answered with [`AgentReply::FileRead`].
    GetFile(FileGetRequest),
    /// Give the VM a new identity (after every restore and on rename); answered with
    /// [`AgentReply::IdentitySet`].
    ResetIdentity(Identity),
    /// Set the guest's wall clock (after a pause); answered with [`AgentReply::ClockSet`].
    SetClock {
        /// Host time, unix milliseconds.
        now_ms: u64,
    },
    /// Cancels the request with this id (of this connection) if it is still running: an exec's
    /// process group is killed (under `--sandbox` every leftover process too); a file operation
    /// already under way may still complete, but its reply is dropped. The cancelled request gets
    /// a final [`AgentErrorKind::Cancelled`] error and nothing after it. An id that is unknown or
    /// already answered is fine. Answered, after that error, with [`AgentReply::Cancelled`].
    Cancel {
        /// The id of the request to cancel.
        id: u64,
    },
    /// A background-process operation ([`ProcessCall`]); answered with [`AgentReply::Process`].
    /// Background processes belong to the agent, not to the request or the connection: they run
    /// on when the host disconnects, and the agent keeps their output in a ring buffer each.
    Process(ProcessCall),
}

/// Operations on the agent's background processes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "call", rename_all = "snake_case")]
pub enum ProcessCall {
    /// Start a process; answered with [`ProcessAnswer::Started`]. `Quota` when `max_running`
    /// processes already run.
    Start {
        /// What to run (the wire request, validated by the host).
        request: ProcessStartRequest,
        /// Size of the process's output ring buffer.
        ring_bytes: u64,
        /// Most processes running at once in this agent.
        max_running: u32,
    },
    /// Every process the agent holds; answered with [`ProcessAnswer::List`].
    List {},
    /// Output from `offset`: answered with [`ProcessAnswer::Output`] as soon as there is any at
    /// or past `offset` (at most `max_bytes`), the process has ended with nothing more to read,
    /// or `wait_ms` passed (then empty).
    Read {
        /// The process.
        process_id: String,
        /// First byte wanted.
        offset: u64,
        /// Most bytes in the answer.
        max_bytes: u64,
        /// Longest wait for output (0 = answer at once).
        wait_ms: u64,
    },
    /// Waits up to `timeout_ms` for the process to end; answered with [`ProcessAnswer::Info`]
    /// either way (`exited` says which).
    Wait {
        /// The process.
        process_id: String,
        /// Longest wait.
        timeout_ms: u64,
    },
    /// Writes to the process's stdin; answered with [`ProcessAnswer::Stdin`]. `Conflict` without
    /// an open stdin.
    Stdin {
        /// The process.
        process_id: String,
        /// Bytes to write.
        #[serde(default)]
        data: Blob,
        /// Close stdin afterwards.
        #[serde(default)]
        eof: bool,
    },
    /// Sends signal `signal` (a Linux signal number) to the process's group; answered with
    /// [`ProcessAnswer::Info`].
    Signal {
        /// The process.
        process_id: String,
        /// The signal number.
        signal: i32,
    },
    /// Resizes a process's PTY; answered with [`ProcessAnswer::Done`]. `Conflict` without one.
    Resize {
        /// The process.
        process_id: String,
        /// The new size.
        size: PtySize,
    },
}

/// Answers to [`ProcessCall`]s.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "answer", rename_all = "snake_case")]
pub enum ProcessAnswer {
    /// A process started.
    Started(ProcessStarted),
    /// The agent's processes.
    List(ProcessList),
    /// Output read.
    Output(ProcessOutput),
    /// One process.
    Info(ProcessInfo),
    /// Stdin written.
    Stdin(ProcessStdinResult),
    /// Done, nothing to say.
    Done {},
}

impl AgentRequest {
    /// Short name for logs.
    pub fn name(&self) -> &'static str {
        match self {
            AgentRequest::Ping {} => "ping",
            AgentRequest::Exec(_) => "exec",
            AgentRequest::PutFile(_) => "put_file",
            AgentRequest::GetFile(_) => "get_file",
            AgentRequest::ResetIdentity(_) => "reset_identity",
            AgentRequest::SetClock { .. } => "set_clock",
            AgentRequest::Cancel { .. } => "cancel",
            AgentRequest::Process(_) => "process",
        }
    }
}

/// A VM's identity, pushed by the host after every restore (clones of one snapshot must not share
/// it) and on rename.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    /// New host name (`sethostname`), at most 64 bytes.
    pub hostname: String,
    /// New `/etc/machine-id`: 32 lowercase hex digits.
    pub machine_id: String,
    /// The session (or pooled VM) id, exported to commands as `HEARTH_SESSION_ID`.
    pub session_id: String,
    /// Environment added to every later command (under the request's own `env`); replaces the
    /// previous identity's.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Fresh host randomness mixed into the guest kernel's RNG, credited, then a reseed forced.
    #[serde(default)]
    pub entropy: Blob,
    /// Host time, unix milliseconds: the guest clock is set to it.
    pub now_ms: u64,
}

/// What the agent answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum AgentReply {
    /// Answer to [`AgentRequest::Ping`].
    Pong(Pong),
    /// A chunk of a streamed exec's output (not final).
    Output {
        /// Which stream.
        stream: OutputStreamName,
        /// At most [`OUTPUT_CHUNK_BYTES`].
        data: Blob,
    },
    /// An exec finished (final).
    Exited(ExecResult),
    /// A file was written (final).
    FileWritten(FilePutResult),
    /// A file was read (final).
    FileRead(FileGetResult),
    /// The identity was applied (final).
    IdentitySet {
        /// The host name now in effect.
        hostname: String,
    },
    /// The clock was set (final).
    ClockSet {},
    /// Answer to [`AgentRequest::Cancel`] (final).
    Cancelled {
        /// Whether the request was still running, and so was cancelled here; `false` for an id
        /// that is unknown or already answered.
        #[serde(default)]
        running: bool,
    },
    /// Answer to [`AgentRequest::Process`] (final).
    Process(ProcessAnswer),
    /// The request failed (final).
    Error(AgentError),
}

impl AgentReply {
    /// Whether this is the last frame for its request id.
    pub fn is_final(&self) -> bool {
        !matches!(self, AgentReply::Output { .. })
    }
}

/// Answer to a ping: who is talking.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pong {
    /// [`PROTOCOL_VERSION`] of the agent.
    pub protocol: u32,
    /// The agent's build version.
    pub agent_version: String,
    /// The agent's pid in the guest.
    pub pid: u32,
    /// The guest's current host name.
    pub hostname: String,
}

/// Which output stream a chunk belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OutputStreamName {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
}

/// A failed request, classified so the host can map it onto its own errors.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message}")]
pub struct AgentError {
    /// The class of failure.
    pub kind: AgentErrorKind,
    /// Lowercase, no trailing period.
    pub message: String,
}

impl AgentError {
    /// An error of `kind`.
    pub fn new(kind: AgentErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }
}

/// Classes of agent failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AgentErrorKind {
    /// A bad request: a path escaping the work directory, a missing cwd, an empty argv.
    InvalidArgument,
    /// The file does not exist.
    NotFound,
    /// The request is not implemented by this agent.
    Unsupported,
    /// The guest could not do it (I/O error, permission).
    Io,
    /// A write ran out of space: the volume's file system is full or its quota is used up
    /// (`ENOSPC`, `EDQUOT`). Hosts answer it as 507 Insufficient Storage.
    NoSpace,
    /// The request was cancelled by an [`AgentRequest::Cancel`] before it finished.
    Cancelled,
    /// The request does not fit the state (stdin to a process without one, resize without a
    /// PTY). Hosts answer it as 409.
    Conflict,
    /// A limit was reached (too many processes running). Hosts answer it as 429.
    Quota,
    /// Anything a newer agent may send that this version does not know.
    #[serde(other)]
    Other,
}

/// A frame could not be read or decoded.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The channel failed.
    #[error("agent channel: {0}")]
    Io(#[from] std::io::Error),
    /// The length prefix exceeds [`MAX_FRAME_BYTES`].
    #[error("frame of {0} bytes exceeds the limit of {MAX_FRAME_BYTES}")]
    TooLarge(usize),
    /// The channel ended inside a frame.
    #[error("channel closed inside a frame")]
    Truncated,
    /// The body is not the expected MessagePack.
    #[error("malformed frame: {0}")]
    Malformed(String),
}

/// Encodes `message` as one frame: length prefix and named MessagePack body.
pub fn encode_frame<T: Serialize>(message: &T) -> Result<Vec<u8>, FrameError> {
    let mut out = vec![0u8; 4];
    rmp_serde::encode::write_named(&mut out, message)
        .map_err(|e| FrameError::Malformed(e.to_string()))?;
    let len = out.len() - 4;
    if len > MAX_FRAME_BYTES {
        return Err(FrameError::TooLarge(len));
    }
    out[..4].copy_from_slice(&(len as u32).to_be_bytes());
    Ok(out)
}

/// The body length announced by a frame header, checked against [`MAX_FRAME_BYTES`].
pub fn frame_len(header: [u8; 4]) -> Result<usize, FrameError> {
    let len = u32::from_be_bytes(header) as usize;
    if len > MAX_FRAME_BYTES {
        return Err(FrameError::TooLarge(len));
    }
    Ok(len)
}

/// Decodes a frame body (without its length prefix).
pub fn decode_frame<T: DeserializeOwned>(body: &[u8]) -> Result<T, FrameError> {
    rmp_serde::from_slice(body).map_err(|e| FrameError::Malformed(e.to_string()))
}

/// Reads one frame from a blocking reader. `Ok(None)` on a clean end of stream between frames.
/// The body buffer grows as bytes arrive, so a lying length prefix costs no memory up front.
pub fn read_frame<R: Read, T: DeserializeOwned>(reader: &mut R) -> Result<Option<T>, FrameError> {
    match read_frame_body(reader)? {
        Some(body) => decode_frame(&body).map(Some),
        None => Ok(None),
    }
}

/// Reads one frame's body (without its length prefix) from a blocking reader, undecoded, like
/// [`read_frame`].
pub fn read_frame_body<R: Read>(reader: &mut R) -> Result<Option<Vec<u8>>, FrameError> {
    let mut header = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        match reader.read(&mut header[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => return Err(FrameError::Truncated),
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    let len = frame_len(header)?;
    let mut body = Vec::with_capacity(len.min(1 << 20));
    reader.take(len as u64).read_to_end(&mut body)?;
    if body.len() < len {
        return Err(FrameError::Truncated);
    }
    Ok(Some(body))
}

/// The `id` of a host frame body whose request could not be decoded (an `op` from a newer host),
/// so that it can be answered with an error; `None` if not even that can be read.
pub fn host_frame_id(body: &[u8]) -> Option<u64> {
    #[derive(Deserialize)]
    struct IdOnly {
        id: u64,
    }
    decode_frame::<IdOnly>(body).ok().map(|f| f.id)
}

/// Writes one frame to a blocking writer and flushes it.
pub fn write_frame<W: Write, T: Serialize>(writer: &mut W, message: &T) -> Result<(), FrameError> {
    let bytes = encode_frame(message)?;
    writer.write_all(&bytes)?;
    writer.flush()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip<T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug>(value: T) {
        let bytes = encode_frame(&value).unwrap();
        assert_eq!(
            u32::from_be_bytes(bytes[..4].try_into().unwrap()) as usize,
            bytes.len() - 4
        );
        // A named map, so other implementations (and future fields) work.
        assert_eq!(bytes[4] & 0xf0, 0x80, "fixmap");
        let back: T = read_frame(&mut bytes.as_slice()).unwrap().unwrap();
        assert_eq!(back, value);
    }

    #[test]
    fn every_request_and_reply_round_trips() {
        let mut exec = ExecRequest::argv(["echo", "hi"]);
        exec.env.insert("A".into(), "b".into());
        exec.stdin = Some(Blob(vec![0, 159, 255]));
        exec.stream = true;
        for request in [
            AgentRequest::Ping {},
            AgentRequest::Exec(exec),
            AgentRequest::PutFile(FilePutRequest {
                path: "a/b".into(),
                data: Blob(vec![1, 2, 3]),
                mode: Some(0o600),
            }),
            AgentRequest::GetFile(FileGetRequest {
                path: "a/b".into(),
                max_bytes: Some(10),
            }),
            AgentRequest::ResetIdentity(Identity {
                hostname: "vm-1".into(),
                machine_id: "0".repeat(32),
                session_id: "vm-1".into(),
                env: BTreeMap::from([("K".into(), "V".into())]),
                entropy: Blob(vec![7; 64]),
                now_ms: 1_700_000_000_000,
            }),
            AgentRequest::SetClock { now_ms: 5 },
            AgentRequest::Cancel { id: 7 },
            AgentRequest::Process(ProcessCall::Start {
                request: ProcessStartRequest {
                    cmd: Some("sleep 1".into()),
                    pty: Some(PtySize { cols: 80, rows: 24 }),
                    ..ProcessStartRequest::default()
                },
                ring_bytes: 1 << 20,
                max_running: 4,
            }),
            AgentRequest::Process(ProcessCall::Read {
                process_id: "p1".into(),
                offset: 5,
                max_bytes: 10,
                wait_ms: 100,
            }),
            AgentRequest::Process(ProcessCall::List {}),
        ] {
            round_trip(HostFrame { id: 9, request });
        }
        for reply in [
            AgentReply::Pong(Pong {
                protocol: PROTOCOL_VERSION,
                agent_version: "0.1.0".into(),
                pid: 42,
                hostname: "h".into(),
            }),
            AgentReply::Output {
                stream: OutputStreamName::Stderr,
                data: Blob(b"err".to_vec()),
            },
            AgentReply::Exited(ExecResult {
                exit_code: 137,
                signal: Some(9),
                timed_out: true,
                ..ExecResult::default()
            }),
            AgentReply::FileWritten(FilePutResult { size: 3 }),
            AgentReply::FileRead(FileGetResult {
                data: Blob(vec![1]),
                size: 1,
            }),
            AgentReply::IdentitySet {
                hostname: "vm-1".into(),
            },
            AgentReply::ClockSet {},
            AgentReply::Cancelled { running: true },
            AgentReply::Process(ProcessAnswer::Done {}),
            AgentReply::Process(ProcessAnswer::Started(ProcessStarted {
                process_id: "p1".into(),
                pid: 7,
            })),
            AgentReply::Error(AgentError::new(AgentErrorKind::NotFound, "no such file")),
            AgentReply::Error(AgentError::new(AgentErrorKind::Cancelled, "cancelled")),
            AgentReply::Error(AgentError::new(AgentErrorKind::NoSpace, "disk full")),
        ] {
            let is_final = reply.is_final();
            assert_eq!(is_final, !matches!(reply, AgentReply::Output { .. }));
            round_trip(AgentFrame {
                id: u64::MAX,
                reply,
            });
        }
    }

    #[test]
    fn the_op_tag_is_readable_and_unknown_error_kinds_are_kept() {
        let bytes = encode_frame(&HostFrame {
            id: 1,
            request: AgentRequest::Ping {},
        })
        .unwrap();
        assert!(String::from_utf8_lossy(&bytes).contains("ping"));
        #[derive(Serialize)]
        struct Future<'a> {
            kind: &'a str,
            message: &'a str,
        }
        let body = rmp_serde::to_vec_named(&Future {
            kind: "teleport_denied",
            message: "x",
        })
        .unwrap();
        let err: AgentError = decode_frame(&body).unwrap();
        assert_eq!(err.kind, AgentErrorKind::Other);
    }

    #[test]
    fn an_unknown_op_is_malformed_but_its_id_is_readable() {
        #[derive(Serialize)]
        struct Request<'a> {
            op: &'a str,
        }
        #[derive(Serialize)]
        struct Frame<'a> {
            id: u64,
            request: Request<'a>,
        }
        let body = rmp_serde::to_vec_named(&Frame {
            id: 17,
            request: Request { op: "teleport" },
        })
        .unwrap();
        assert!(matches!(
            decode_frame::<HostFrame>(&body),
            Err(FrameError::Malformed(_))
        ));
        assert_eq!(host_frame_id(&body), Some(17));
        assert_eq!(host_frame_id(b"\xc1"), None);
    }

    #[test]
    fn bad_frames_are_errors_not_panics() {
        // Clean end of stream between frames.
        assert!(read_frame::<_, HostFrame>(&mut &b""[..]).unwrap().is_none());
        // Ends inside the header or the body.
        assert!(matches!(
            read_frame::<_, HostFrame>(&mut &[0u8, 0][..]),
            Err(FrameError::Truncated)
        ));
        assert!(matches!(
            read_frame::<_, HostFrame>(&mut &[0u8, 0, 0, 9, 1][..]),
            Err(FrameError::Truncated)
        ));
        // A length beyond the limit is refused before reading the body.
        let huge = ((MAX_FRAME_BYTES + 1) as u32).to_be_bytes();
        assert!(matches!(
            read_frame::<_, HostFrame>(&mut &huge[..]),
            Err(FrameError::TooLarge(_))
        ));
        // Garbage body.
        let mut garbage = vec![0, 0, 0, 3];
        garbage.extend_from_slice(b"\xc1\xc1\xc1");
        assert!(matches!(
            read_frame::<_, HostFrame>(&mut garbage.as_slice()),
            Err(FrameError::Malformed(_))
        ));
        // Frames back to back are read one at a time.
        let mut two = encode_frame(&HostFrame {
            id: 1,
            request: AgentRequest::Ping {},
        })
        .unwrap();
        two.extend(
            encode_frame(&HostFrame {
                id: 2,
                request: AgentRequest::SetClock { now_ms: 1 },
            })
            .unwrap(),
        );
        let mut reader = two.as_slice();
        let a: HostFrame = read_frame(&mut reader).unwrap().unwrap();
        let b: HostFrame = read_frame(&mut reader).unwrap().unwrap();
        assert_eq!((a.id, b.id), (1, 2));
        assert!(read_frame::<_, HostFrame>(&mut reader).unwrap().is_none());
    }
}
