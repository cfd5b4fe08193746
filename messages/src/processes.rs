//! Background processes (contract v1 addition): commands that outlive the request that started
//! them, served by the worker holding the session's VM and run by the guest agent, which keeps
//! each process's output in a bounded ring buffer.
//!
//! Subjects (see [`crate::subjects::Subjects::process`]):
//! `sessions.<sid>.processes.start|list` and `sessions.<sid>.processes.<process_id>.wait|output|
//! stdin|signal|resize`. Output offsets count bytes of the process's combined output (stdout and
//! stderr interleaved as they arrived; a PTY has only stdout) from its start.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::blob::Blob;
use crate::data::{MAX_EXEC_TIMEOUT_MS, Program};
use crate::error::WireError;

/// Header on a followed output chunk: the offset of its first byte (decimal). Beside
/// [`crate::data::CHUNK_HEADER`], which says the stream as for exec.
pub const OFFSET_HEADER: &str = "Hearth-Offset";
/// Default `timeout_ms` of `processes.<id>.wait`, and of one `output` follow window.
pub const DEFAULT_PROCESS_WAIT_MS: u64 = 60_000;
/// Longest `wait` or follow window accepted (1 h): a follower that went away holds nothing
/// longer than that.
pub const MAX_PROCESS_WAIT_MS: u64 = 3600 * 1000;
/// Largest terminal dimension accepted.
pub const MAX_PTY_DIMENSION: u16 = 4096;
/// Longest `tag`.
pub const MAX_TAG_LEN: usize = 256;

/// Terminal size, in character cells.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PtySize {
    /// Columns, 1..=4096.
    pub cols: u16,
    /// Rows, 1..=4096.
    pub rows: u16,
}

impl PtySize {
    /// Checks the dimensions.
    pub fn validate(&self) -> Result<(), WireError> {
        let ok = |n: u16| (1..=MAX_PTY_DIMENSION).contains(&n);
        if ok(self.cols) && ok(self.rows) {
            Ok(())
        } else {
            Err(WireError::bad_request(format!(
                "cols and rows must be in 1..={MAX_PTY_DIMENSION}"
            )))
        }
    }
}

/// `sessions.<sid>.processes.start`: start a background process; answered at once with
/// [`ProcessStarted`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessStartRequest {
    /// Program and arguments, run directly. Exactly one of `argv` and `cmd`.
    #[serde(default)]
    pub argv: Option<Vec<String>>,
    /// A command line run by the VM's shell (`sh -c`). Exactly one of `argv` and `cmd`.
    #[serde(default)]
    pub cmd: Option<String>,
    /// Extra environment variables.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Working directory relative to the VM's volume (default: the volume root).
    #[serde(default)]
    pub cwd: Option<String>,
    /// Keep the process's standard input open for `processes.<id>.stdin`; otherwise it reads
    /// `/dev/null`. (A PTY always has its terminal as stdin.)
    #[serde(default)]
    pub stdin: bool,
    /// Run on a new pseudo-terminal of this size (stdin, stdout and stderr are the terminal; the
    /// process leads a session with it as controlling terminal).
    #[serde(default)]
    pub pty: Option<PtySize>,
    /// Kill the process's group after this long; 0 or absent = run until it exits or its session
    /// ends.
    #[serde(default)]
    pub timeout_ms: Option<u64>,
    /// A label of the caller's, returned by `list`.
    #[serde(default)]
    pub tag: Option<String>,
}

impl ProcessStartRequest {
    /// Validates and returns what to run.
    pub fn program(&self) -> Result<Program<'_>, WireError> {
        let program = crate::data::program_of(&self.argv, &self.cmd)?;
        if self.timeout_ms.unwrap_or(0) > MAX_EXEC_TIMEOUT_MS {
            return Err(WireError::bad_request(format!(
                "timeout_ms must be at most {MAX_EXEC_TIMEOUT_MS}"
            )));
        }
        if let Some(pty) = &self.pty {
            pty.validate()?;
        }
        if self.tag.as_ref().is_some_and(|t| t.len() > MAX_TAG_LEN) {
            return Err(WireError::bad_request(format!(
                "tag must be at most {MAX_TAG_LEN} bytes"
            )));
        }
        crate::data::validate_cwd_and_env(self.cwd.as_deref(), &self.env)?;
        Ok(program)
    }
}

/// Answer to `processes.start`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessStarted {
    /// The process's id within its session (letters, digits and `-`): the token of its subjects.
    pub process_id: String,
    /// Its pid inside the VM.
    pub pid: u32,
}

/// One background process, as `list` and `wait` describe it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessInfo {
    /// Its id.
    pub process_id: String,
    /// Its pid inside the VM.
    pub pid: u32,
    /// What it runs (a `cmd` shows as the shell's argv).
    pub argv: Vec<String>,
    /// The caller's label, if given.
    #[serde(default)]
    pub tag: Option<String>,
    /// Started at (unix ms).
    pub started_ms: u64,
    /// It runs on a PTY.
    #[serde(default)]
    pub pty: bool,
    /// Its stdin is open for `stdin` requests.
    #[serde(default)]
    pub stdin: bool,
    /// It has ended.
    #[serde(default)]
    pub exited: bool,
    /// Exit status once ended; `128 + signal` when a signal ended it.
    #[serde(default)]
    pub exit_code: Option<i32>,
    /// The signal that ended it, if one did.
    #[serde(default)]
    pub signal: Option<i32>,
    /// It outlived its `timeout_ms` and was killed.
    #[serde(default)]
    pub timed_out: bool,
    /// Ended at (unix ms).
    #[serde(default)]
    pub ended_ms: Option<u64>,
}

/// Answer to `processes.list`: every process of the session the VM's agent still holds (running,
/// and the most recent ended ones).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessList {
    /// Oldest first.
    pub processes: Vec<ProcessInfo>,
}

/// `processes.<id>.wait`: the process's [`ProcessInfo`] once it has ended; 504 if it still runs
/// after `timeout_ms` (it keeps running).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessWaitRequest {
    /// How long to wait (default 60000, at most 3600000; 0 = just look).
    #[serde(default)]
    pub timeout_ms: Option<u64>,
}

impl ProcessWaitRequest {
    /// The effective wait, validated.
    pub fn timeout_ms(&self) -> Result<u64, WireError> {
        bounded_wait(self.timeout_ms)
    }
}

fn bounded_wait(ms: Option<u64>) -> Result<u64, WireError> {
    let ms = ms.unwrap_or(DEFAULT_PROCESS_WAIT_MS);
    if ms > MAX_PROCESS_WAIT_MS {
        return Err(WireError::bad_request(format!(
            "timeout_ms must be at most {MAX_PROCESS_WAIT_MS}"
        )));
    }
    Ok(ms)
}

/// `processes.<id>.output`: output from `offset` out of the process's ring buffer.
///
/// Without `follow`: one reply, [`ProcessOutput`] with the chunks (at most `max_bytes`). With
/// `follow`: the chunks as they come, as messages with the `Hearth-Chunk` header (`stdout` or
/// `stderr`) and `Hearth-Offset` (offset of their first byte), then one final [`ProcessOutput`]
/// (without chunks) when the process has ended and everything was sent, or when the follow window
/// `timeout_ms` is over (then `process.exited` is false: follow again from `next_offset`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessOutputRequest {
    /// First byte wanted (default 0). Bytes already dropped from the ring are skipped (see
    /// `first_offset`); an offset beyond the end gives nothing (not an error).
    #[serde(default)]
    pub offset: Option<u64>,
    /// Stream output until the process ends (or the window closes).
    #[serde(default)]
    pub follow: bool,
    /// Without `follow`: most bytes in the reply (default and cap: what a reply can carry).
    #[serde(default)]
    pub max_bytes: Option<u64>,
    /// With `follow`: the window's length (default 60000, at most 3600000).
    #[serde(default)]
    pub timeout_ms: Option<u64>,
}

impl ProcessOutputRequest {
    /// The follow window, validated.
    pub fn timeout_ms(&self) -> Result<u64, WireError> {
        bounded_wait(self.timeout_ms)
    }
}

/// Which stream a chunk belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StreamName {
    /// Standard output (and everything a PTY says).
    Stdout,
    /// Standard error.
    Stderr,
}

impl StreamName {
    /// The `Hearth-Chunk` header value.
    pub fn as_str(self) -> &'static str {
        match self {
            StreamName::Stdout => crate::data::CHUNK_STDOUT,
            StreamName::Stderr => crate::data::CHUNK_STDERR,
        }
    }
}

/// A piece of output.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessChunk {
    /// Its stream.
    pub stream: StreamName,
    /// Offset of its first byte.
    pub offset: u64,
    /// The bytes.
    pub data: Blob,
}

/// Answer to `processes.<id>.output` (the final message of a follow).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessOutput {
    /// The output (empty in a follow's final message: it was streamed).
    #[serde(default)]
    pub chunks: Vec<ProcessChunk>,
    /// Oldest offset still in the ring buffer: output before it was dropped (the ring is full).
    /// A reader whose `offset` was below it missed `first_offset - offset` bytes.
    pub first_offset: u64,
    /// Where the next read continues (the end of what was returned).
    pub next_offset: u64,
    /// The process now (`exited` says whether more output can come).
    pub process: ProcessInfo,
}

/// `processes.<id>.stdin`: bytes for the process's stdin (a PTY's terminal input), and/or its
/// end. 409 if the process was started without `stdin` (and not on a PTY), or after `eof`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessStdinRequest {
    /// Bytes to write (at most the worker's `max_stdin_bytes` per request; 400 beyond).
    #[serde(default)]
    pub data: Option<Blob>,
    /// Close stdin after writing (a PTY gets its EOF character, ^D).
    #[serde(default)]
    pub eof: bool,
}

/// Answer to `stdin`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessStdinResult {
    /// Bytes written.
    pub written: u64,
}

/// `processes.<id>.signal`: send a signal to the process's group.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessSignalRequest {
    /// Its name, with or without `SIG`: one of [`SIGNALS`]; 400 for anything else.
    pub signal: String,
}

/// The signals `signal` takes, by name, with their Linux numbers.
pub const SIGNALS: &[(&str, i32)] = &[
    ("HUP", 1),
    ("INT", 2),
    ("QUIT", 3),
    ("KILL", 9),
    ("USR1", 10),
    ("USR2", 12),
    ("PIPE", 13),
    ("ALRM", 14),
    ("TERM", 15),
    ("CONT", 18),
    ("STOP", 19),
    ("TSTP", 20),
    ("WINCH", 28),
];

impl ProcessSignalRequest {
    /// The signal's number, or 400 for a name that is not in [`SIGNALS`].
    pub fn number(&self) -> Result<i32, WireError> {
        let name = self.signal.trim();
        let name = name.strip_prefix("SIG").unwrap_or(name);
        SIGNALS
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, number)| *number)
            .ok_or_else(|| {
                WireError::bad_request(format!(
                    "unknown signal {:?}: use one of {}",
                    self.signal,
                    SIGNALS
                        .iter()
                        .map(|(n, _)| *n)
                        .collect::<Vec<_>>()
                        .join(", ")
                ))
            })
    }
}

/// `processes.<id>.resize`: a PTY's new size (its foreground process group gets `SIGWINCH`).
/// 409 for a process without a PTY.
pub type ProcessResizeRequest = PtySize;

/// Whether `id` has the form of a process id: 1..=64 letters, digits, `-` or `_`.
pub fn valid_process_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signals_parse_by_name_with_or_without_sig() {
        let sig = |s: &str| {
            ProcessSignalRequest {
                signal: s.to_owned(),
            }
            .number()
        };
        assert_eq!(sig("TERM").unwrap(), 15);
        assert_eq!(sig("SIGINT").unwrap(), 2);
        assert_eq!(sig("KILL").unwrap(), 9);
        assert_eq!(sig("BOGUS").unwrap_err().code, crate::ErrorCode::BadRequest);
        assert!(sig("").is_err());
    }

    #[test]
    fn start_requests_are_validated() {
        let mut r = ProcessStartRequest {
            cmd: Some("true".into()),
            ..ProcessStartRequest::default()
        };
        assert!(r.program().is_ok());
        r.pty = Some(PtySize { cols: 0, rows: 24 });
        assert!(r.program().is_err());
        r.pty = Some(PtySize { cols: 80, rows: 24 });
        r.timeout_ms = Some(MAX_EXEC_TIMEOUT_MS + 1);
        assert!(r.program().is_err());
        r.timeout_ms = Some(0);
        r.argv = Some(vec!["x".into()]);
        assert!(r.program().is_err(), "argv and cmd");
        assert!(valid_process_id("p-1a2b"));
        assert!(!valid_process_id("a.b") && !valid_process_id("") && !valid_process_id("*"));
    }
}
