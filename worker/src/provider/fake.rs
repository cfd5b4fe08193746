//! The fake adapter: an in-memory, honest state machine with exactly the transitions and errors of
//! the process adapter (the contract suite runs against both), for fast scheduler logic tests.
//!
//! Files live in a map per VM and survive rename and snapshot/restore; snapshots copy the map;
//! export/import serialise a snapshot as JSON. Optional artificial latency per operation and one-shot
//! injected failures make slow restores and flaky workers reproducible.
//!
//! `exec` interprets a tiny command language (everything else exits 0 with no output):
//! - argv `true` → 0, `false` → 1, `echo ARGS…` → prints ARGS, `cat` → echoes stdin, `cat PATH` →
//!   prints a file of the VM (exit 1 if missing), `sleep SECS` → sleeps (subject to the timeout);
//! - shell `exit N` → N; any other shell command is split on whitespace and interpreted as argv.
//!
//! Size: an honest state machine for every operation plus its command interpreter and fault
//! injection, kept in one file so that the whole fake reads as one model; tests are in
//! `fake/tests.rs`.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::Path;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

use super::paths;
use super::{
    ExecOutcome, ExecSpec, OutputChunk, OutputStream, Program, ProviderError, SnapshotId,
    SnapshotInfo, Tombstones, VmId, VmProvider, VmQuery, VmSpec, VmState, VmView, lifecycle,
    now_ms, tail_lossy,
};

/// Largest export stream the fake accepts on import.
const MAX_IMPORT_BYTES: u64 = 256 * 1024 * 1024;
/// How long a streamed chunk waits for a full channel before it goes into the outcome instead.
const FLUSH_GRACE: Duration = Duration::from_secs(5);
/// Marks the fake's export format.
const EXPORT_FORMAT: &str = "hearth-fake-snapshot-v1";

/// An operation of the fake, for latency and failure injection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FakeOp {
    Create,
    Start,
    Stop,
    Pause,
    Snapshot,
    Destroy,
    Rename,
    Exec,
    PutFile,
    GetFile,
    Backup,
    Export,
    Import,
    DeleteSnapshot,
}

/// Artificial latency of the fake's operations (all zero by default).
#[derive(Debug, Clone, Default)]
pub struct FakeConfig {
    /// Latency of every operation without an entry in `latency`.
    pub default_latency: Duration,
    pub latency: HashMap<FakeOp, Duration>,
}

impl FakeConfig {
    pub fn with_latency(mut self, op: FakeOp, latency: Duration) -> Self {
        self.latency.insert(op, latency);
        self
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct FakeFile {
    data: Vec<u8>,
    mode: u32,
}

/// Files keyed by their normalised relative path (`a/b/c`); directories are implicit.
type FileMap = BTreeMap<String, FakeFile>;

#[derive(Debug, Clone)]
struct FakeVm {
    view: VmView,
    files: FileMap,
    env: BTreeMap<String, String>,
    /// Bumped by stop and destroy, so a sleeping exec knows it was killed.
    epoch: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct FakeSnapshot {
    info: SnapshotInfo,
    files: FileMap,
    env: BTreeMap<String, String>,
}

#[derive(Debug, Serialize, Deserialize)]
struct ExportDoc {
    format: String,
    snapshot: FakeSnapshot,
}

/// A paused VM as `export_paused` writes it.
#[derive(Debug, Serialize, Deserialize)]
struct PausedDoc {
    format: String,
    template: Option<String>,
    created_ms: u64,
    restored_from: Option<String>,
    files: FileMap,
    env: BTreeMap<String, String>,
}

/// Marks the fake's paused-VM export format.
const PAUSED_FORMAT: &str = "hearth-fake-paused-v1";

#[derive(Debug, Default)]
struct FakeState {
    vms: BTreeMap<VmId, FakeVm>,
    tombstones: Tombstones,
    snapshots: BTreeMap<SnapshotId, FakeSnapshot>,
    failures: HashMap<FakeOp, VecDeque<ProviderError>>,
}

impl FakeState {
    fn vm(&self, vm_id: &VmId) -> Result<&FakeVm, ProviderError> {
        match self.vms.get(vm_id) {
            Some(vm) => Ok(vm),
            None if self.tombstones.get(vm_id).is_some() => Err(ProviderError::vm_destroyed(vm_id)),
            None => Err(ProviderError::vm_not_found(vm_id)),
        }
    }

    fn vm_mut(&mut self, vm_id: &VmId) -> Result<&mut FakeVm, ProviderError> {
        let destroyed = self.tombstones.get(vm_id).is_some();
        self.vms.get_mut(vm_id).ok_or_else(|| {
            if destroyed {
                ProviderError::vm_destroyed(vm_id)
            } else {
                ProviderError::vm_not_found(vm_id)
            }
        })
    }

    fn running_mut(&mut self, vm_id: &VmId) -> Result<&mut FakeVm, ProviderError> {
        let vm = self.vm_mut(vm_id)?;
        lifecycle::require_running(vm_id, vm.view.state)?;
        vm.view.last_activity_ms = now_ms();
        Ok(vm)
    }
}

/// The in-memory adapter.
#[derive(Debug, Default)]
pub struct FakeProvider {
    config: FakeConfig,
    state: Mutex<FakeState>,
}

impl FakeProvider {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn with_config(config: FakeConfig) -> Self {
        Self {
            config,
            state: Mutex::default(),
        }
    }

    /// Makes the next `op` fail with `error` (queued: several calls fail several times).
    pub fn fail_next(&self, op: FakeOp, error: ProviderError) {
        self.state
            .lock()
            .failures
            .entry(op)
            .or_default()
            .push_back(error);
    }

    /// Applies the configured latency of `op`, then any injected failure.
    async fn enter(&self, op: FakeOp) -> Result<(), ProviderError> {
        let latency = self
            .config
            .latency
            .get(&op)
            .copied()
            .unwrap_or(self.config.default_latency);
        if !latency.is_zero() {
            tokio::time::sleep(latency).await;
        }
        match self
            .state
            .lock()
            .failures
            .get_mut(&op)
            .and_then(VecDeque::pop_front)
        {
            Some(error) => Err(error),
            None => Ok(()),
        }
    }
}

fn file_key(rel: &Path) -> String {
    rel.to_string_lossy().into_owned()
}

fn is_dir(files: &FileMap, key: &str) -> bool {
    if key.is_empty() {
        return true;
    }
    let prefix = format!("{key}/");
    files
        .range(prefix.clone()..)
        .next()
        .is_some_and(|(k, _)| k.starts_with(&prefix))
}

/// The interpreted result of a fake command, before capping.
struct Interpreted {
    exit_code: i32,
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    sleep: Option<Duration>,
}

fn interpret(program: &Program, stdin: Option<&[u8]>, files: &FileMap) -> Interpreted {
    let mut result = Interpreted {
        exit_code: 0,
        stdout: Vec::new(),
        stderr: Vec::new(),
        sleep: None,
    };
    let argv: Vec<String> = match program {
        Program::Shell(cmd) => {
            let words: Vec<&str> = cmd.split_whitespace().collect();
            if let ["exit", code] = words.as_slice() {
                result.exit_code = code.parse().unwrap_or(2);
                return result;
            }
            words.into_iter().map(str::to_owned).collect()
        }
        Program::Argv(argv) => argv.clone(),
    };
    let Some((program, args)) = argv.split_first() else {
        return result;
    };
    match program.as_str() {
        "true" => {}
        "false" => result.exit_code = 1,
        "echo" => result.stdout = format!("{}\n", args.join(" ")).into_bytes(),
        "cat" if args.is_empty() => result.stdout = stdin.unwrap_or_default().to_vec(),
        "cat" => {
            for arg in args {
                let found = paths::file_path(arg)
                    .ok()
                    .and_then(|rel| files.get(&file_key(&rel)));
                match found {
                    Some(file) => result.stdout.extend_from_slice(&file.data),
                    None => {
                        result.exit_code = 1;
                        result
                            .stderr
                            .extend_from_slice(format!("cat: {arg}: no such file\n").as_bytes());
                    }
                }
            }
        }
        "sleep" => {
            result.sleep = args
                .first()
                .and_then(|s| s.parse::<f64>().ok())
                .filter(|s| s.is_finite() && *s >= 0.0)
                .map(Duration::from_secs_f64);
        }
        _ => {}
    }
    result
}

/// Applies the output cap (and streaming) to one interpreted stream.
async fn deliver(
    data: Vec<u8>,
    stream: OutputStream,
    cap: usize,
    chunks: &Option<mpsc::Sender<OutputChunk>>,
) -> (Vec<u8>, bool) {
    let truncated = data.len() > cap;
    let mut kept = data;
    kept.truncate(cap);
    if kept.is_empty() {
        return (kept, truncated);
    }
    match chunks {
        Some(tx) => {
            let chunk = OutputChunk {
                stream,
                data: Bytes::from(kept),
            };
            // Like the process adapter: a receiver that does not take the chunk gets it back in
            // the outcome instead of hanging the exec.
            match tx.send_timeout(chunk, FLUSH_GRACE).await {
                Ok(()) => (Vec::new(), truncated),
                Err(
                    mpsc::error::SendTimeoutError::Timeout(chunk)
                    | mpsc::error::SendTimeoutError::Closed(chunk),
                ) => (chunk.data.to_vec(), truncated),
            }
        }
        None => (kept, truncated),
    }
}

#[async_trait]
impl VmProvider for FakeProvider {
    fn name(&self) -> &'static str {
        "fake"
    }

    fn version(&self) -> Option<String> {
        Some(format!("fake {}", env!("CARGO_PKG_VERSION")))
    }

    fn isolation(&self) -> hearth_messages::IsolationReport {
        hearth_messages::IsolationReport {
            mode: "fake".into(),
            limits: "none".into(),
            disk: "none".into(),
        }
    }

    async fn create_vm_with_spec(
        &self,
        vm_id: &VmId,
        spec: &VmSpec,
    ) -> Result<VmView, ProviderError> {
        self.enter(FakeOp::Create).await?;
        spec.validate()?;
        let base_files = match (&spec.restore_from, &spec.base) {
            (None, Some(base)) => load_base(base)?,
            _ => FileMap::new(),
        };
        let mut state = self.state.lock();
        let restore = match &spec.restore_from {
            Some(snapshot_id) => Some(
                state
                    .snapshots
                    .get(snapshot_id)
                    .cloned()
                    .ok_or_else(|| ProviderError::snapshot_not_found(snapshot_id))?,
            ),
            None => None,
        };
        if state.vms.contains_key(vm_id) {
            return Err(ProviderError::vm_exists(vm_id));
        }
        let (files, mut env, template) = match &restore {
            Some(snapshot) => (
                snapshot.files.clone(),
                snapshot.env.clone(),
                spec.template.clone().or(snapshot.info.template.clone()),
            ),
            None => (base_files, BTreeMap::new(), spec.template.clone()),
        };
        env.extend(spec.env.iter().map(|(k, v)| (k.clone(), v.clone())));
        if let (None, Some(bootstrap)) = (&restore, &spec.bootstrap) {
            let result = interpret(&Program::Argv(bootstrap.clone()), None, &files);
            if result.exit_code != 0 {
                return Err(ProviderError::CommandFailed(format!(
                    "bootstrap of vm {vm_id} exited with code {}: {}",
                    result.exit_code,
                    tail_lossy(&result.stderr, 2000)
                )));
            }
        }
        let now = now_ms();
        let view = VmView {
            vm_id: vm_id.clone(),
            state: VmState::Running,
            template,
            created_ms: now,
            last_activity_ms: now,
            stopped_ms: None,
            restored_from: spec.restore_from.clone(),
        };
        state.tombstones.remove(vm_id);
        state.vms.insert(
            vm_id.clone(),
            FakeVm {
                view: view.clone(),
                files,
                env,
                epoch: 0,
            },
        );
        Ok(view)
    }

    async fn start_vm(&self, vm_id: &VmId) -> Result<VmView, ProviderError> {
        self.enter(FakeOp::Start).await?;
        let mut state = self.state.lock();
        let vm = state.vm_mut(vm_id)?;
        lifecycle::check_start(vm_id, vm.view.state)?;
        vm.view.state = VmState::Running;
        vm.view.stopped_ms = None;
        vm.view.last_activity_ms = now_ms();
        Ok(vm.view.clone())
    }

    async fn stop_vm(&self, vm_id: &VmId) -> Result<VmView, ProviderError> {
        self.enter(FakeOp::Stop).await?;
        let mut state = self.state.lock();
        let vm = state.vm_mut(vm_id)?;
        lifecycle::check_stop(vm_id, vm.view.state)?;
        let now = now_ms();
        vm.view.state = VmState::Stopped;
        vm.view.stopped_ms = Some(now);
        vm.view.last_activity_ms = now;
        vm.epoch += 1;
        Ok(vm.view.clone())
    }

    async fn pause_vm(&self, vm_id: &VmId) -> Result<VmView, ProviderError> {
        self.enter(FakeOp::Pause).await?;
        let mut state = self.state.lock();
        let vm = state.vm_mut(vm_id)?;
        lifecycle::check_pause(vm_id, vm.view.state)?;
        let now = now_ms();
        vm.view.state = VmState::Paused;
        vm.view.stopped_ms = Some(now);
        vm.view.last_activity_ms = now;
        vm.epoch += 1;
        Ok(vm.view.clone())
    }

    async fn snapshot_vm(
        &self,
        vm_id: &VmId,
        snapshot_id: &SnapshotId,
    ) -> Result<SnapshotInfo, ProviderError> {
        self.enter(FakeOp::Snapshot).await?;
        let mut state = self.state.lock();
        let vm = state.vm(vm_id)?;
        if state.snapshots.contains_key(snapshot_id) {
            return Err(ProviderError::snapshot_exists(snapshot_id));
        }
        let size_bytes = vm.files.values().map(|f| f.data.len() as u64).sum();
        let snapshot = FakeSnapshot {
            info: SnapshotInfo {
                snapshot_id: snapshot_id.clone(),
                source_vm: Some(vm_id.clone()),
                template: vm.view.template.clone(),
                created_ms: now_ms(),
                size_bytes,
            },
            files: vm.files.clone(),
            env: vm.env.clone(),
        };
        let info = snapshot.info.clone();
        state.snapshots.insert(snapshot_id.clone(), snapshot);
        Ok(info)
    }

    async fn destroy_vm(&self, vm_id: &VmId) -> Result<(), ProviderError> {
        self.enter(FakeOp::Destroy).await?;
        let mut state = self.state.lock();
        match state.vms.remove(vm_id) {
            Some(vm) => {
                let mut view = vm.view;
                view.last_activity_ms = now_ms();
                state.tombstones.insert(view);
                Ok(())
            }
            None if state.tombstones.get(vm_id).is_some() => Ok(()),
            None => Err(ProviderError::vm_not_found(vm_id)),
        }
    }

    async fn rename_vm(&self, old: &VmId, new: &VmId) -> Result<VmView, ProviderError> {
        self.enter(FakeOp::Rename).await?;
        let mut state = self.state.lock();
        state.vm(old)?;
        if state.vms.contains_key(new) {
            return Err(ProviderError::vm_exists(new));
        }
        let mut vm = state
            .vms
            .remove(old)
            .ok_or_else(|| ProviderError::vm_not_found(old))?;
        vm.view.vm_id = new.clone();
        vm.view.last_activity_ms = now_ms();
        let view = vm.view.clone();
        state.tombstones.remove(new);
        state.vms.insert(new.clone(), vm);
        Ok(view)
    }

    async fn exec(
        &self,
        vm_id: &VmId,
        spec: ExecSpec,
        chunks: Option<mpsc::Sender<OutputChunk>>,
    ) -> Result<ExecOutcome, ProviderError> {
        self.enter(FakeOp::Exec).await?;
        spec.validate()?;
        let rel_cwd = paths::relative_path("cwd", spec.cwd.as_deref().unwrap_or(""))?;
        let started = Instant::now();
        let (result, epoch) = {
            let mut state = self.state.lock();
            let vm = state.running_mut(vm_id)?;
            let cwd = file_key(&rel_cwd);
            if !is_dir(&vm.files, &cwd) {
                return Err(ProviderError::InvalidArgument(format!(
                    "cwd {cwd:?} does not exist in the volume"
                )));
            }
            (
                interpret(&spec.program, spec.stdin.as_deref(), &vm.files),
                vm.epoch,
            )
        };
        let mut outcome = ExecOutcome {
            exit_code: result.exit_code,
            ..ExecOutcome::default()
        };
        if let Some(sleep) = result.sleep {
            if sleep > spec.timeout {
                tokio::time::sleep(spec.timeout).await;
                outcome.timed_out = true;
                (outcome.exit_code, outcome.signal) = (137, Some(9));
            } else {
                tokio::time::sleep(sleep).await;
            }
        }
        {
            let mut state = self.state.lock();
            let killed = match state.vms.get_mut(vm_id) {
                Some(vm) => {
                    vm.view.last_activity_ms = now_ms();
                    vm.epoch != epoch
                }
                None => true,
            };
            if killed && !outcome.timed_out {
                (outcome.exit_code, outcome.signal) = (137, Some(9));
            }
        }
        let cap = spec.max_output_bytes;
        (outcome.stdout, outcome.stdout_truncated) =
            deliver(result.stdout, OutputStream::Stdout, cap, &chunks).await;
        (outcome.stderr, outcome.stderr_truncated) =
            deliver(result.stderr, OutputStream::Stderr, cap, &chunks).await;
        outcome.duration = started.elapsed();
        Ok(outcome)
    }

    async fn put_file(
        &self,
        vm_id: &VmId,
        path: &str,
        data: &[u8],
        mode: Option<u32>,
    ) -> Result<u64, ProviderError> {
        self.enter(FakeOp::PutFile).await?;
        let rel = paths::file_path(path)?;
        let mut state = self.state.lock();
        let vm = state.running_mut(vm_id)?;
        let key = file_key(&rel);
        if is_dir(&vm.files, &key) {
            return Err(ProviderError::InvalidArgument(format!(
                "path {path:?} is a directory"
            )));
        }
        let mut parent = rel.parent();
        while let Some(dir) = parent.filter(|p| !p.as_os_str().is_empty()) {
            if vm.files.contains_key(&file_key(dir)) {
                return Err(ProviderError::InvalidArgument(format!(
                    "a parent of path {path:?} is not a directory"
                )));
            }
            parent = dir.parent();
        }
        let mode = mode
            .map(|m| m & 0o777)
            .or_else(|| vm.files.get(&key).map(|f| f.mode))
            .unwrap_or(0o644);
        vm.files.insert(
            key,
            FakeFile {
                data: data.to_vec(),
                mode,
            },
        );
        Ok(data.len() as u64)
    }

    async fn get_file(
        &self,
        vm_id: &VmId,
        path: &str,
        max_bytes: u64,
    ) -> Result<Vec<u8>, ProviderError> {
        self.enter(FakeOp::GetFile).await?;
        let rel = paths::file_path(path)?;
        let mut state = self.state.lock();
        let vm = state.running_mut(vm_id)?;
        let key = file_key(&rel);
        match vm.files.get(&key) {
            Some(file) if file.data.len() as u64 > max_bytes => {
                Err(ProviderError::InvalidArgument(format!(
                    "file {path:?} is {} bytes, more than the limit of {max_bytes}",
                    file.data.len()
                )))
            }
            Some(file) => Ok(file.data.clone()),
            None if is_dir(&vm.files, &key) => Err(ProviderError::InvalidArgument(format!(
                "path {path:?} is a directory"
            ))),
            None => Err(ProviderError::NotFound(format!("file {path:?} not found"))),
        }
    }

    async fn backup_vm(
        &self,
        vm_id: &VmId,
        dest_dir: &Path,
    ) -> Result<std::path::PathBuf, ProviderError> {
        self.enter(FakeOp::Backup).await?;
        let files = self.state.lock().vm(vm_id)?.files.clone();
        let dest = dest_dir.join(format!("{vm_id}-{}.tar.zst", now_ms()));
        let dest_dir = dest_dir.to_path_buf();
        let path = dest.clone();
        tokio::task::spawn_blocking(move || write_backup(&dest_dir, &dest, &files))
            .await
            .map_err(|e| ProviderError::internal("the backup task failed", e))?
            .map_err(|e| ProviderError::io("cannot write backup", e))?;
        Ok(path)
    }

    async fn export_snapshot(
        &self,
        snapshot_id: &SnapshotId,
        out: &mut (dyn AsyncWrite + Unpin + Send),
    ) -> Result<u64, ProviderError> {
        self.enter(FakeOp::Export).await?;
        let snapshot = self
            .state
            .lock()
            .snapshots
            .get(snapshot_id)
            .cloned()
            .ok_or_else(|| ProviderError::snapshot_not_found(snapshot_id))?;
        let doc = ExportDoc {
            format: EXPORT_FORMAT.to_owned(),
            snapshot,
        };
        let bytes = serde_json::to_vec(&doc)
            .map_err(|e| ProviderError::internal("cannot encode snapshot", e))?;
        out.write_all(&bytes)
            .await
            .map_err(|e| ProviderError::io("cannot write snapshot stream", e))?;
        out.flush()
            .await
            .map_err(|e| ProviderError::io("cannot write snapshot stream", e))?;
        Ok(bytes.len() as u64)
    }

    async fn export_paused(
        &self,
        vm_id: &VmId,
        out: &mut (dyn AsyncWrite + Unpin + Send),
    ) -> Result<u64, ProviderError> {
        self.enter(FakeOp::Export).await?;
        let doc = {
            let state = self.state.lock();
            let vm = state.vm(vm_id)?;
            if vm.view.state != VmState::Paused {
                return Err(ProviderError::InvalidState(format!(
                    "vm {vm_id} is {}, not paused",
                    vm.view.state
                )));
            }
            PausedDoc {
                format: PAUSED_FORMAT.to_owned(),
                template: vm.view.template.as_ref().map(ToString::to_string),
                created_ms: vm.view.created_ms,
                restored_from: vm.view.restored_from.as_ref().map(ToString::to_string),
                files: vm.files.clone(),
                env: vm.env.clone(),
            }
        };
        let bytes = serde_json::to_vec(&doc)
            .map_err(|e| ProviderError::internal("cannot encode paused vm", e))?;
        out.write_all(&bytes)
            .await
            .and(out.flush().await)
            .map_err(|e| ProviderError::io("cannot write paused vm stream", e))?;
        Ok(bytes.len() as u64)
    }

    async fn import_paused(
        &self,
        vm_id: &VmId,
        input: &mut (dyn AsyncRead + Unpin + Send),
    ) -> Result<VmView, ProviderError> {
        self.enter(FakeOp::Import).await?;
        let mut bytes = Vec::new();
        input
            .take(MAX_IMPORT_BYTES + 1)
            .read_to_end(&mut bytes)
            .await
            .map_err(|e| ProviderError::io("cannot read paused vm stream", e))?;
        let doc: PausedDoc = serde_json::from_slice(&bytes)
            .ok()
            .filter(|d: &PausedDoc| d.format == PAUSED_FORMAT)
            .ok_or_else(|| ProviderError::InvalidArgument("corrupt paused vm stream".to_owned()))?;
        let bad = |what: &str| ProviderError::InvalidArgument(format!("corrupt paused vm {what}"));
        let view = VmView {
            vm_id: vm_id.clone(),
            state: VmState::Paused,
            template: doc
                .template
                .map(hearth_messages::TemplateName::new)
                .transpose()
                .map_err(|_| bad("template"))?,
            created_ms: doc.created_ms,
            last_activity_ms: now_ms(),
            stopped_ms: Some(now_ms()),
            restored_from: doc
                .restored_from
                .map(SnapshotId::new)
                .transpose()
                .map_err(|_| bad("snapshot"))?,
        };
        let mut state = self.state.lock();
        if state.vms.contains_key(vm_id) {
            return Err(ProviderError::vm_exists(vm_id));
        }
        state.tombstones.remove(vm_id);
        state.vms.insert(
            vm_id.clone(),
            FakeVm {
                view: view.clone(),
                files: doc.files,
                env: doc.env,
                epoch: 0,
            },
        );
        Ok(view)
    }

    async fn import_snapshot(
        &self,
        snapshot_id: &SnapshotId,
        input: &mut (dyn AsyncRead + Unpin + Send),
    ) -> Result<SnapshotInfo, ProviderError> {
        self.enter(FakeOp::Import).await?;
        if self.state.lock().snapshots.contains_key(snapshot_id) {
            return Err(ProviderError::snapshot_exists(snapshot_id));
        }
        let mut bytes = Vec::new();
        input
            .take(MAX_IMPORT_BYTES + 1)
            .read_to_end(&mut bytes)
            .await
            .map_err(|e| ProviderError::io("cannot read snapshot stream", e))?;
        if bytes.len() as u64 > MAX_IMPORT_BYTES {
            return Err(ProviderError::corrupt_snapshot("stream too large"));
        }
        let doc: ExportDoc =
            serde_json::from_slice(&bytes).map_err(ProviderError::corrupt_snapshot)?;
        if doc.format != EXPORT_FORMAT {
            return Err(ProviderError::corrupt_snapshot(format!(
                "unsupported format {:?}",
                doc.format
            )));
        }
        let mut snapshot = doc.snapshot;
        snapshot.info.snapshot_id = snapshot_id.clone();
        let info = snapshot.info.clone();
        let mut state = self.state.lock();
        if state.snapshots.contains_key(snapshot_id) {
            return Err(ProviderError::snapshot_exists(snapshot_id));
        }
        state.snapshots.insert(snapshot_id.clone(), snapshot);
        Ok(info)
    }

    async fn delete_snapshot(&self, snapshot_id: &SnapshotId) -> Result<(), ProviderError> {
        self.enter(FakeOp::DeleteSnapshot).await?;
        match self.state.lock().snapshots.remove(snapshot_id) {
            Some(_) => Ok(()),
            None => Err(ProviderError::snapshot_not_found(snapshot_id)),
        }
    }
}

#[async_trait]
impl VmQuery for FakeProvider {
    async fn list_vms(&self) -> Result<Vec<VmView>, ProviderError> {
        let state = self.state.lock();
        let mut views: Vec<VmView> = state
            .vms
            .values()
            .map(|vm| vm.view.clone())
            .chain(state.tombstones.views().cloned())
            .collect();
        views.sort_by(|a, b| a.vm_id.cmp(&b.vm_id));
        Ok(views)
    }

    async fn count_vms(&self) -> Result<usize, ProviderError> {
        Ok(self.state.lock().vms.len())
    }

    async fn get_vm(&self, vm_id: &VmId) -> Result<Option<VmView>, ProviderError> {
        let state = self.state.lock();
        Ok(match state.vms.get(vm_id) {
            Some(vm) => Some(vm.view.clone()),
            None => state.tombstones.get(vm_id).cloned(),
        })
    }

    async fn list_snapshots(&self, vm_id: &VmId) -> Result<Option<Vec<SnapshotId>>, ProviderError> {
        let state = self.state.lock();
        if !state.vms.contains_key(vm_id) && state.tombstones.get(vm_id).is_none() {
            return Ok(None);
        }
        Ok(Some(
            state
                .snapshots
                .values()
                .filter(|s| s.info.source_vm.as_ref() == Some(vm_id))
                .map(|s| s.info.snapshot_id.clone())
                .collect(),
        ))
    }

    async fn get_snapshot(
        &self,
        snapshot_id: &SnapshotId,
    ) -> Result<Option<SnapshotInfo>, ProviderError> {
        Ok(self
            .state
            .lock()
            .snapshots
            .get(snapshot_id)
            .map(|s| s.info.clone()))
    }

    async fn list_all_snapshots(&self) -> Result<Vec<SnapshotInfo>, ProviderError> {
        Ok(self
            .state
            .lock()
            .snapshots
            .values()
            .map(|s| s.info.clone())
            .collect())
    }
}

/// Reads a base (directory, `.tar` or `.tar.zst`) into a file map. Test-sized bases only: this
/// runs inline.
fn load_base(base: &Path) -> Result<FileMap, ProviderError> {
    use std::os::unix::fs::PermissionsExt;
    let bad = |e: std::io::Error| {
        ProviderError::InvalidArgument(format!("base {} is not usable: {e}", base.display()))
    };
    let mut files = FileMap::new();
    let meta = std::fs::metadata(base).map_err(bad)?;
    if meta.is_dir() {
        let mut stack = vec![base.to_path_buf()];
        while let Some(dir) = stack.pop() {
            for entry in std::fs::read_dir(&dir).map_err(bad)? {
                let entry = entry.map_err(bad)?;
                let kind = entry.file_type().map_err(bad)?;
                if kind.is_dir() {
                    stack.push(entry.path());
                } else if kind.is_file() {
                    let rel = entry.path().strip_prefix(base).map(Path::to_path_buf);
                    let Ok(rel) = rel else { continue };
                    let mode = entry.metadata().map_err(bad)?.permissions().mode() & 0o7777;
                    let data = std::fs::read(entry.path()).map_err(bad)?;
                    files.insert(file_key(&rel), FakeFile { data, mode });
                }
            }
        }
        return Ok(files);
    }
    let name = base.to_string_lossy();
    let file = std::fs::File::open(base).map_err(bad)?;
    let reader: Box<dyn std::io::Read> = if name.ends_with(".tar.zst") || name.ends_with(".tzst") {
        Box::new(zstd::Decoder::new(file).map_err(bad)?)
    } else if name.ends_with(".tar") {
        Box::new(file)
    } else {
        return Err(ProviderError::InvalidArgument(format!(
            "base {} must be a directory, .tar or .tar.zst",
            base.display()
        )));
    };
    let mut archive = tar::Archive::new(reader);
    for entry in archive.entries().map_err(bad)? {
        let mut entry = entry.map_err(bad)?;
        if entry.header().entry_type() != tar::EntryType::Regular {
            continue;
        }
        let path = entry.path().map_err(bad)?.to_string_lossy().into_owned();
        let Ok(rel) = paths::file_path(&path) else {
            continue;
        };
        let mode = entry.header().mode().unwrap_or(0o644) & 0o7777;
        let mut data = Vec::new();
        std::io::Read::read_to_end(&mut entry, &mut data).map_err(bad)?;
        files.insert(file_key(&rel), FakeFile { data, mode });
    }
    Ok(files)
}

/// Writes the file map as a real `tar.zst` (so backups of fake VMs can be inspected).
fn write_backup(dest_dir: &Path, dest: &Path, files: &FileMap) -> std::io::Result<()> {
    std::fs::create_dir_all(dest_dir)?;
    let encoder = zstd::Encoder::new(std::fs::File::create(dest)?, 3)?;
    let mut builder = tar::Builder::new(encoder);
    for (path, file) in files {
        let mut header = tar::Header::new_gnu();
        header.set_size(file.data.len() as u64);
        header.set_mode(file.mode);
        header.set_entry_type(tar::EntryType::Regular);
        builder.append_data(&mut header, path, file.data.as_slice())?;
    }
    builder.into_inner()?.finish()?;
    Ok(())
}

#[cfg(test)]
mod tests;
