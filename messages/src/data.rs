//! Data plane: exec and files, served by the worker that holds a session's VM, so exec traffic
//! never passes through the scheduler.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::blob::Blob;
use crate::error::WireError;

/// Header on streamed output chunks; its value is [`CHUNK_STDOUT`] or [`CHUNK_STDERR`].
pub const CHUNK_HEADER: &str = "Hearth-Chunk";
/// Chunk of standard output.
pub const CHUNK_STDOUT: &str = "stdout";
/// Chunk of standard error.
pub const CHUNK_STDERR: &str = "stderr";

/// Default command timeout.
pub const DEFAULT_EXEC_TIMEOUT_MS: u64 = 60_000;
/// Longest command timeout accepted (24 h).
pub const MAX_EXEC_TIMEOUT_MS: u64 = 24 * 3600 * 1000;
/// Default per-stream output cap.
pub const DEFAULT_MAX_OUTPUT_BYTES: u64 = 1 << 20;
/// Largest per-stream output cap accepted; the reply must also fit the server's max_payload.
pub const MAX_OUTPUT_BYTES: u64 = 64 << 20;
/// Default cap on `files.get`.
pub const DEFAULT_MAX_FILE_BYTES: u64 = 8 << 20;
/// Longest path accepted in files requests and `cwd`.
pub const MAX_PATH_LEN: usize = 4096;

/// `sessions.<sid>.exec`: run one command in the session's VM.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecRequest {
    /// Program and arguments, run directly (no shell). Exactly one of `argv` and `cmd`.
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
    /// Bytes written to the command's standard input, which is then closed.
    #[serde(default)]
    pub stdin: Option<Blob>,
    /// Kill the command's whole process group after this long (default 60000).
    #[serde(default)]
    pub timeout_ms: Option<u64>,
    /// Keep at most this many bytes of each of stdout and stderr (default 1048576).
    #[serde(default)]
    pub max_output_bytes: Option<u64>,
    /// Send output chunks as they come (see the streaming protocol), then the result.
    #[serde(default)]
    pub stream: bool,
}

/// What an exec runs, once validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Program<'a> {
    /// Run directly.
    Argv(&'a [String]),
    /// Run with `sh -c`.
    Shell(&'a str),
}

impl ExecRequest {
    /// A request running `argv` directly.
    pub fn argv<I, S>(argv: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Self {
            argv: Some(argv.into_iter().map(Into::into).collect()),
            ..Self::default()
        }
    }

    /// A request running `cmd` through the shell.
    pub fn cmd(cmd: impl Into<String>) -> Self {
        Self {
            cmd: Some(cmd.into()),
            ..Self::default()
        }
    }

    /// The effective timeout.
    pub fn timeout_ms(&self) -> u64 {
        self.timeout_ms.unwrap_or(DEFAULT_EXEC_TIMEOUT_MS)
    }

    /// The effective per-stream output cap.
    pub fn max_output_bytes(&self) -> u64 {
        self.max_output_bytes.unwrap_or(DEFAULT_MAX_OUTPUT_BYTES)
    }

    /// Validates and returns what to run.
    pub fn program(&self) -> Result<Program<'_>, WireError> {
        let program = program_of(&self.argv, &self.cmd)?;
        let timeout = self.timeout_ms();
        if timeout == 0 || timeout > MAX_EXEC_TIMEOUT_MS {
            return Err(WireError::bad_request(format!(
                "timeout_ms must be in 1..={MAX_EXEC_TIMEOUT_MS}"
            )));
        }
        if self.max_output_bytes() > MAX_OUTPUT_BYTES {
            return Err(WireError::bad_request(format!(
                "max_output_bytes must be at most {MAX_OUTPUT_BYTES}"
            )));
        }
        validate_cwd_and_env(self.cwd.as_deref(), &self.env)?;
        Ok(program)
    }
}

/// What a request's `argv` / `cmd` pair runs: exactly one of them, a non-empty argv.
pub(crate) fn program_of<'a>(
    argv: &'a Option<Vec<String>>,
    cmd: &'a Option<String>,
) -> Result<Program<'a>, WireError> {
    match (argv, cmd) {
        (Some(argv), None) => {
            if argv.is_empty() || argv[0].is_empty() {
                return Err(WireError::bad_request("argv must name a program"));
            }
            Ok(Program::Argv(argv))
        }
        (None, Some(cmd)) => Ok(Program::Shell(cmd)),
        (Some(_), Some(_)) => Err(WireError::bad_request("give either argv or cmd, not both")),
        (None, None) => Err(WireError::bad_request("give argv or cmd")),
    }
}

/// A command's `cwd` text and environment names, as every command request takes them.
pub(crate) fn validate_cwd_and_env(
    cwd: Option<&str>,
    env: &BTreeMap<String, String>,
) -> Result<(), WireError> {
    if let Some(cwd) = cwd {
        validate_path_text("cwd", cwd)?;
    }
    for key in env.keys() {
        if key.is_empty() || key.contains('=') || key.contains('\0') {
            return Err(WireError::bad_request(format!(
                "invalid environment variable name {key:?}"
            )));
        }
    }
    Ok(())
}

fn validate_path_text(field: &str, path: &str) -> Result<(), WireError> {
    if path.len() > MAX_PATH_LEN || path.contains('\0') {
        return Err(WireError::bad_request(format!(
            "{field} must be at most {MAX_PATH_LEN} bytes without NUL"
        )));
    }
    Ok(())
}

/// The result of an exec. With `stream: true`, `stdout`/`stderr` hold nothing already streamed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecResult {
    /// Exit status; `128 + signal` when killed by a signal, like a shell reports it.
    pub exit_code: i32,
    /// The signal that ended the command, if one did.
    #[serde(default)]
    pub signal: Option<i32>,
    /// Captured standard output (up to the cap).
    #[serde(default)]
    pub stdout: Blob,
    /// Captured standard error (up to the cap).
    #[serde(default)]
    pub stderr: Blob,
    /// Output beyond the cap was dropped.
    #[serde(default)]
    pub stdout_truncated: bool,
    /// Output beyond the cap was dropped.
    #[serde(default)]
    pub stderr_truncated: bool,
    /// The command outlived `timeout_ms` and its process group was killed.
    #[serde(default)]
    pub timed_out: bool,
    /// Wall time of the command itself (not the lock wait), ms.
    #[serde(default)]
    pub duration_ms: u64,
    /// The command (or something it started) hit the session's memory limit and was killed by
    /// the kernel's OOM killer.
    #[serde(default)]
    pub oom_killed: bool,
}

impl ExecResult {
    /// Exit code 0 and no timeout.
    pub fn success(&self) -> bool {
        self.exit_code == 0 && !self.timed_out
    }
}

/// `sessions.<sid>.files.put`: write a file in the VM's volume.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FilePutRequest {
    /// Path relative to the volume; `..`, absolute paths and escaping symlinks are rejected.
    pub path: String,
    /// The file's contents (replaces the file).
    #[serde(default)]
    pub data: Blob,
    /// Unix permission bits (default 0o644).
    #[serde(default)]
    pub mode: Option<u32>,
}

impl FilePutRequest {
    /// Checks what serde cannot.
    pub fn validate(&self) -> Result<(), WireError> {
        validate_path_text("path", &self.path)?;
        if self.path.is_empty() {
            return Err(WireError::bad_request("path must not be empty"));
        }
        if self.mode.is_some_and(|m| m > 0o7777) {
            return Err(WireError::bad_request("mode must be at most 0o7777"));
        }
        Ok(())
    }
}

/// Reply to `files.put`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FilePutResult {
    /// Bytes written.
    pub size: u64,
}

/// `sessions.<sid>.files.get`: read a file from the VM's volume.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileGetRequest {
    /// Path relative to the volume, confined like `files.put`.
    pub path: String,
    /// Fail with 400 if the file is larger (default 8 MiB, and never above the server's
    /// max_payload).
    #[serde(default)]
    pub max_bytes: Option<u64>,
}

impl FileGetRequest {
    /// Checks what serde cannot.
    pub fn validate(&self) -> Result<(), WireError> {
        validate_path_text("path", &self.path)?;
        if self.path.is_empty() {
            return Err(WireError::bad_request("path must not be empty"));
        }
        Ok(())
    }
}

/// Reply to `files.get`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileGetResult {
    /// The file's contents.
    pub data: Blob,
    /// Its size in bytes.
    #[serde(default)]
    pub size: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn program_requires_exactly_one_of_argv_and_cmd() {
        assert!(ExecRequest::default().program().is_err());
        assert!(ExecRequest::argv(Vec::<String>::new()).program().is_err());
        let both = ExecRequest {
            cmd: Some("true".into()),
            ..ExecRequest::argv(["true"])
        };
        assert!(both.program().is_err());
        assert_eq!(
            ExecRequest::cmd("echo hi").program().unwrap(),
            Program::Shell("echo hi")
        );
    }

    #[test]
    fn limits_are_checked() {
        let mut req = ExecRequest::cmd("true");
        req.timeout_ms = Some(0);
        assert!(req.program().is_err());
        req.timeout_ms = None;
        req.max_output_bytes = Some(MAX_OUTPUT_BYTES + 1);
        assert!(req.program().is_err());
        req.max_output_bytes = None;
        req.env.insert("A=B".into(), "x".into());
        assert!(req.program().is_err());
    }
}
