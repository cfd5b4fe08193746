//! Every NATS subject Hearth uses, built in one place from a configurable prefix (default `hearth`).
//! No other module builds subject strings.

use crate::ids::{SessionId, WorkerId};

/// The scheduler's NATS micro service name (`$SRV.PING.hearth-scheduler`).
pub const SCHEDULER_SERVICE: &str = "hearth-scheduler";
/// The worker's NATS micro service name (`$SRV.PING.hearth-worker`).
pub const WORKER_SERVICE: &str = "hearth-worker";

/// The default subject prefix.
pub const DEFAULT_PREFIX: &str = "hearth";
/// The protocol version token, second in every subject.
pub const PROTOCOL_VERSION: &str = "v1";

/// The per-session operations, i.e. the last token(s) of `<prefix>.v1.sessions.<sid>.<op>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SessionOp {
    /// Served by the scheduler.
    Get,
    /// Served by the scheduler.
    Keepalive,
    /// Served by the scheduler.
    Release,
    /// Served by the scheduler.
    Snapshot,
    /// Served by the scheduler: pause the session's VM to disk.
    Pause,
    /// Served by the scheduler: branch the session into new ones.
    Fork,
    /// Data plane: served by the worker that holds the session's VM.
    Exec,
    /// Data plane.
    FilesPut,
    /// Data plane.
    FilesGet,
    /// Data plane: `processes.start`.
    ProcessesStart,
    /// Data plane: `processes.list`.
    ProcessesList,
    /// Data plane: `processes.<id>.wait` (its [`SessionOp::suffix`] has `*` for the id).
    ProcessWait,
    /// Data plane: `processes.<id>.output`.
    ProcessOutput,
    /// Data plane: `processes.<id>.stdin`.
    ProcessStdin,
    /// Data plane: `processes.<id>.signal`.
    ProcessSignal,
    /// Data plane: `processes.<id>.resize`.
    ProcessResize,
}

impl SessionOp {
    /// Operations served by the scheduler.
    pub const CONTROL: [SessionOp; 6] = [
        SessionOp::Get,
        SessionOp::Keepalive,
        SessionOp::Release,
        SessionOp::Snapshot,
        SessionOp::Pause,
        SessionOp::Fork,
    ];
    /// Operations served by the worker holding the VM.
    pub const DATA: [SessionOp; 10] = [
        SessionOp::Exec,
        SessionOp::FilesPut,
        SessionOp::FilesGet,
        SessionOp::ProcessesStart,
        SessionOp::ProcessesList,
        SessionOp::ProcessWait,
        SessionOp::ProcessOutput,
        SessionOp::ProcessStdin,
        SessionOp::ProcessSignal,
        SessionOp::ProcessResize,
    ];

    /// Whether the operation names one process (its subject has the process id before the op).
    pub fn per_process(self) -> bool {
        matches!(
            self,
            SessionOp::ProcessWait
                | SessionOp::ProcessOutput
                | SessionOp::ProcessStdin
                | SessionOp::ProcessSignal
                | SessionOp::ProcessResize
        )
    }

    /// The subject suffix for this operation.
    pub fn suffix(self) -> &'static str {
        match self {
            SessionOp::Get => "get",
            SessionOp::Keepalive => "keepalive",
            SessionOp::Release => "release",
            SessionOp::Snapshot => "snapshot",
            SessionOp::Pause => "pause",
            SessionOp::Fork => "fork",
            SessionOp::Exec => "exec",
            SessionOp::FilesPut => "files.put",
            SessionOp::FilesGet => "files.get",
            SessionOp::ProcessesStart => "processes.start",
            SessionOp::ProcessesList => "processes.list",
            SessionOp::ProcessWait => "processes.*.wait",
            SessionOp::ProcessOutput => "processes.*.output",
            SessionOp::ProcessStdin => "processes.*.stdin",
            SessionOp::ProcessSignal => "processes.*.signal",
            SessionOp::ProcessResize => "processes.*.resize",
        }
    }

    fn from_suffix(suffix: &str) -> Option<Self> {
        Some(match suffix {
            "get" => SessionOp::Get,
            "keepalive" => SessionOp::Keepalive,
            "release" => SessionOp::Release,
            "snapshot" => SessionOp::Snapshot,
            "pause" => SessionOp::Pause,
            "fork" => SessionOp::Fork,
            "exec" => SessionOp::Exec,
            "files.put" => SessionOp::FilesPut,
            "files.get" => SessionOp::FilesGet,
            "processes.start" => SessionOp::ProcessesStart,
            "processes.list" => SessionOp::ProcessesList,
            other => {
                let (id, op) = other.strip_prefix("processes.")?.split_once('.')?;
                if !crate::processes::valid_process_id(id) {
                    return None;
                }
                match op {
                    "wait" => SessionOp::ProcessWait,
                    "output" => SessionOp::ProcessOutput,
                    "stdin" => SessionOp::ProcessStdin,
                    "signal" => SessionOp::ProcessSignal,
                    "resize" => SessionOp::ProcessResize,
                    _ => return None,
                }
            }
        })
    }
}

/// Why a prefix cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid subject prefix {0:?}: use dot-separated tokens of letters, digits, '-' and '_'")]
pub struct PrefixError(pub String);

/// Subject builder for one prefix. Cheap to clone; build once per process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subjects {
    /// `<prefix>.v1`, precomputed since every subject starts with it.
    root: String,
}

impl Default for Subjects {
    fn default() -> Self {
        Self {
            root: format!("{DEFAULT_PREFIX}.{PROTOCOL_VERSION}"),
        }
    }
}

impl Subjects {
    /// Subjects under `prefix` (e.g. `hearth`, or `acme.hearth` for a shared account).
    pub fn new(prefix: &str) -> Result<Self, PrefixError> {
        let valid = !prefix.is_empty()
            && prefix.split('.').all(|token| {
                !token.is_empty()
                    && token
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            });
        if !valid {
            return Err(PrefixError(prefix.to_owned()));
        }
        Ok(Self {
            root: format!("{prefix}.{PROTOCOL_VERSION}"),
        })
    }

    /// `<prefix>.v1`.
    pub fn root(&self) -> &str {
        &self.root
    }

    /// The prefix the subjects were built from.
    pub fn prefix(&self) -> &str {
        self.root
            .strip_suffix(PROTOCOL_VERSION)
            .and_then(|p| p.strip_suffix('.'))
            .unwrap_or(&self.root)
    }

    /// `<prefix>.v1.sessions.create`.
    pub fn sessions_create(&self) -> String {
        format!("{}.sessions.create", self.root)
    }

    /// `<prefix>.v1.sessions.list`.
    pub fn sessions_list(&self) -> String {
        format!("{}.sessions.list", self.root)
    }

    /// `<prefix>.v1.sessions.<sid>.<op>`.
    pub fn session(&self, session_id: &SessionId, op: SessionOp) -> String {
        format!("{}.sessions.{}.{}", self.root, session_id, op.suffix())
    }

    /// What a worker subscribes to serve session `session_id`'s data plane, with the endpoint
    /// name of each: three subjects for the ten [`SessionOp::DATA`] operations (`exec`,
    /// `files.*`, `processes.>`), never a control operation's. One subscription per operation
    /// cost a worker ~120 KB per session; [`Subjects::parse_session`] tells the operations apart.
    pub fn session_data(&self, session_id: &SessionId) -> [(&'static str, String); 3] {
        let base = format!("{}.sessions.{}", self.root, session_id);
        [
            ("exec", format!("{base}.exec")),
            ("files", format!("{base}.files.*")),
            ("processes", format!("{base}.processes.>")),
        ]
    }

    /// `<prefix>.v1.sessions.<sid>.processes.<process_id>.<op>` for a per-process operation
    /// ([`SessionOp::per_process`]); other operations as [`Subjects::session`].
    pub fn process(&self, session_id: &SessionId, process_id: &str, op: SessionOp) -> String {
        let suffix = op.suffix().replacen('*', process_id, 1);
        format!("{}.sessions.{}.{}", self.root, session_id, suffix)
    }

    /// The process id of a per-process subject (`…sessions.<sid>.processes.<id>.<op>`).
    pub fn parse_process_id<'a>(&self, subject: &'a str) -> Option<&'a str> {
        let rest = subject
            .strip_prefix(self.root.as_str())?
            .strip_prefix(".sessions.")?;
        let (_sid, rest) = rest.split_once('.')?;
        let (id, _op) = rest.strip_prefix("processes.")?.split_once('.')?;
        crate::processes::valid_process_id(id).then_some(id)
    }

    /// `<prefix>.v1.sessions.*.<op>`: what the scheduler subscribes for a control operation.
    pub fn session_wildcard(&self, op: SessionOp) -> String {
        format!("{}.sessions.*.{}", self.root, op.suffix())
    }

    /// Splits `<prefix>.v1.sessions.<sid>.<op>` into its session id and operation.
    /// `Ok(None)` if the subject is not a per-session subject; `Err` if the id token is invalid.
    pub fn parse_session(
        &self,
        subject: &str,
    ) -> Result<Option<(SessionId, SessionOp)>, crate::IdError> {
        let Some(rest) = subject
            .strip_prefix(self.root.as_str())
            .and_then(|r| r.strip_prefix(".sessions."))
        else {
            return Ok(None);
        };
        let Some((sid, suffix)) = rest.split_once('.') else {
            return Ok(None);
        };
        let Some(op) = SessionOp::from_suffix(suffix) else {
            return Ok(None);
        };
        Ok(Some((SessionId::new(sid)?, op)))
    }

    /// `<prefix>.v1.templates.list`.
    pub fn templates_list(&self) -> String {
        format!("{}.templates.list", self.root)
    }

    /// `<prefix>.v1.templates.<name>.delete`.
    pub fn template_delete(&self, name: &crate::TemplateName) -> String {
        format!("{}.templates.{}.delete", self.root, name)
    }

    /// `<prefix>.v1.templates.*.delete`: what the scheduler subscribes.
    pub fn template_delete_wildcard(&self) -> String {
        format!("{}.templates.*.delete", self.root)
    }

    /// The template named by `<prefix>.v1.templates.<name>.delete`; `Ok(None)` for any other
    /// subject, `Err` for an invalid name.
    pub fn parse_template_delete(
        &self,
        subject: &str,
    ) -> Result<Option<crate::TemplateName>, crate::IdError> {
        let Some(name) = subject
            .strip_prefix(self.root.as_str())
            .and_then(|r| r.strip_prefix(".templates."))
            .and_then(|r| r.strip_suffix(".delete"))
        else {
            return Ok(None);
        };
        crate::TemplateName::new(name).map(Some)
    }

    /// `<prefix>.v1.admin.quotas.get`: every tenant's quota and usage (operator only; not
    /// exported to tenant accounts).
    pub fn admin_quotas_get(&self) -> String {
        format!("{}.admin.quotas.get", self.root)
    }

    /// `<prefix>.v1.admin.quotas.set`: change one tenant's quota at run time (operator only).
    pub fn admin_quotas_set(&self) -> String {
        format!("{}.admin.quotas.set", self.root)
    }

    /// `<prefix>.v1.admin.maintenance`: run the session lifecycle pass (TTL, idle stop, backup,
    /// prune, retention) now instead of at its next tick (operator only).
    pub fn admin_maintenance(&self) -> String {
        format!("{}.admin.maintenance", self.root)
    }

    /// `<prefix>.v1.admin.workers`: every worker as the scheduler sees it (operator only).
    pub fn admin_workers(&self) -> String {
        format!("{}.admin.workers", self.root)
    }

    /// `<prefix>.v1.pools.status`.
    pub fn pools_status(&self) -> String {
        format!("{}.pools.status", self.root)
    }

    /// `<prefix>.v1.workers.<wid>.jobs`: lifecycle jobs for one worker.
    pub fn worker_jobs(&self, worker_id: &WorkerId) -> String {
        format!("{}.workers.{}.jobs", self.root, worker_id)
    }

    /// `<prefix>.v1.workers.<wid>.status`: one worker's heartbeats.
    pub fn worker_status(&self, worker_id: &WorkerId) -> String {
        format!("{}.workers.{}.status", self.root, worker_id)
    }

    /// `<prefix>.v1.workers.*.status`: every worker's heartbeats.
    pub fn worker_status_all(&self) -> String {
        format!("{}.workers.*.status", self.root)
    }

    /// `<prefix>.v1.events.sessions.<sid>`: one session's state changes.
    pub fn session_events(&self, session_id: &SessionId) -> String {
        format!("{}.events.sessions.{}", self.root, session_id)
    }

    /// `<prefix>.v1.events.sessions.*`.
    pub fn session_events_all(&self) -> String {
        format!("{}.events.sessions.*", self.root)
    }

    /// `<prefix>.v1.events.tenants.<tenant>.sessions.<sid>`: one tenant's session events (also
    /// published, for the operator, on [`Subjects::session_events`]). The service account exports
    /// `<prefix>.v1.events.tenants.*.sessions.*` with the account token in position 5, so a
    /// tenant's import can only name its own.
    pub fn tenant_session_events(
        &self,
        tenant: &crate::TenantId,
        session_id: &SessionId,
    ) -> String {
        format!(
            "{}.events.tenants.{}.sessions.{}",
            self.root, tenant, session_id
        )
    }

    /// `<prefix>.v1.events.vms.<wid>`: VM state changes on one worker.
    pub fn vm_events(&self, worker_id: &WorkerId) -> String {
        format!("{}.events.vms.{}", self.root, worker_id)
    }

    /// `<prefix>.v1.events.vms.*`: VM state changes on every worker.
    pub fn vm_events_all(&self) -> String {
        format!("{}.events.vms.*", self.root)
    }

    /// The worker a heartbeat subject (`<prefix>.v1.workers.<wid>.status`) belongs to; `None`
    /// for any other subject or an invalid id. The subject, not the body, names the sender: NATS
    /// permissions confine a worker's credentials to its own subjects.
    pub fn parse_worker_status(&self, subject: &str) -> Option<WorkerId> {
        let wid = subject
            .strip_prefix(self.root.as_str())?
            .strip_prefix(".workers.")?
            .strip_suffix(".status")?;
        WorkerId::new(wid).ok()
    }

    /// The worker a VM event subject (`<prefix>.v1.events.vms.<wid>`) belongs to; `None` for any
    /// other subject or an invalid id.
    pub fn parse_vm_events(&self, subject: &str) -> Option<WorkerId> {
        let wid = subject
            .strip_prefix(self.root.as_str())?
            .strip_prefix(".events.vms.")?;
        WorkerId::new(wid).ok()
    }

    /// `<prefix>.v1.events.>`: everything observers may watch.
    pub fn events_all(&self) -> String {
        format!("{}.events.>", self.root)
    }

    /// The name of a JetStream KV bucket or object store: `<prefix>_<name>` with the prefix's dots
    /// turned into underscores (bucket names cannot hold dots). See [`Bucket`].
    pub fn bucket(&self, bucket: Bucket) -> String {
        format!("{}_{}", self.prefix().replace('.', "_"), bucket.suffix())
    }
}

/// Hearth's durable stores in JetStream. The names are part of the contract because the scheduler
/// and every worker share them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Bucket {
    /// KV: session records, key = session id.
    Sessions,
    /// KV: warm pool entries, key = VM id.
    Pool,
    /// KV: templates, key = template name.
    Templates,
    /// KV: the scheduler leader lease, key `leader`.
    Leader,
    /// KV: tenant quotas set at run time (`admin.quotas.set`), key = tenant.
    Tenants,
    /// Object store: template snapshots, object name = snapshot id; written by the worker that
    /// took the snapshot, read by any worker that restores it.
    Snapshots,
}

impl Bucket {
    fn suffix(self) -> &'static str {
        match self {
            Bucket::Sessions => "sessions",
            Bucket::Pool => "pool",
            Bucket::Templates => "templates",
            Bucket::Leader => "leader",
            Bucket::Tenants => "tenants",
            Bucket::Snapshots => "snapshots",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sid(s: &str) -> SessionId {
        SessionId::new(s).unwrap()
    }

    #[test]
    fn builds_the_documented_subjects() {
        let s = Subjects::default();
        assert_eq!(s.sessions_create(), "hearth.v1.sessions.create");
        assert_eq!(
            s.session(&sid("abc"), SessionOp::FilesPut),
            "hearth.v1.sessions.abc.files.put"
        );
        assert_eq!(
            s.session_wildcard(SessionOp::Get),
            "hearth.v1.sessions.*.get"
        );
        assert_eq!(
            s.worker_jobs(&WorkerId::new("w1").unwrap()),
            "hearth.v1.workers.w1.jobs"
        );
        assert_eq!(s.events_all(), "hearth.v1.events.>");
        assert_eq!(s.prefix(), "hearth");
    }

    #[test]
    fn custom_prefix_and_validation() {
        let s = Subjects::new("acme.hearth").unwrap();
        assert_eq!(s.pools_status(), "acme.hearth.v1.pools.status");
        assert_eq!(s.prefix(), "acme.hearth");
        assert_eq!(s.bucket(Bucket::Snapshots), "acme_hearth_snapshots");
        assert_eq!(
            Subjects::default().bucket(Bucket::Sessions),
            "hearth_sessions"
        );
        for bad in ["", "a..b", "a.*", ">", "a b", ".a"] {
            assert!(Subjects::new(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn parses_worker_subjects() {
        let s = Subjects::new("acme.hearth").unwrap();
        let w = WorkerId::new("w-1").unwrap();
        assert_eq!(s.parse_worker_status(&s.worker_status(&w)), Some(w.clone()));
        assert_eq!(s.parse_vm_events(&s.vm_events(&w)), Some(w.clone()));
        for bad in [
            "acme.hearth.v1.workers.w-1.jobs",
            "acme.hearth.v1.workers.a.b.status",
            "hearth.v1.workers.w-1.status",
            "acme.hearth.v1.events.vms.a.b",
            "acme.hearth.v1.events.sessions.w-1",
        ] {
            assert_eq!(s.parse_worker_status(bad), None, "{bad}");
            assert_eq!(s.parse_vm_events(bad), None, "{bad}");
        }
    }

    #[test]
    fn process_subjects_build_and_parse() {
        let s = Subjects::default();
        let subject = s.process(&sid("s1"), "p-1", SessionOp::ProcessOutput);
        assert_eq!(subject, "hearth.v1.sessions.s1.processes.p-1.output");
        assert_eq!(s.parse_process_id(&subject), Some("p-1"));
        assert_eq!(
            s.parse_session(&subject).unwrap(),
            Some((sid("s1"), SessionOp::ProcessOutput))
        );
        assert_eq!(
            s.session(&sid("s1"), SessionOp::ProcessesStart),
            "hearth.v1.sessions.s1.processes.start"
        );
        assert_eq!(
            s.parse_process_id("hearth.v1.sessions.s1.processes.start"),
            None
        );
        assert_eq!(
            s.parse_process_id("hearth.v1.sessions.s1.processes.*.wait"),
            None
        );
    }

    #[test]
    fn parses_session_subjects() {
        let s = Subjects::default();
        assert_eq!(
            s.parse_session("hearth.v1.sessions.x1.files.get").unwrap(),
            Some((sid("x1"), SessionOp::FilesGet))
        );
        assert_eq!(s.parse_session("hearth.v1.sessions.create").unwrap(), None);
        assert_eq!(s.parse_session("hearth.v1.sessions.x1.nope").unwrap(), None);
        assert_eq!(s.parse_session("other.v1.sessions.x1.get").unwrap(), None);
        for op in SessionOp::CONTROL.into_iter().chain(SessionOp::DATA) {
            let subject = s.process(&sid("s-9"), "p-1", op);
            assert_eq!(s.parse_session(&subject).unwrap(), Some((sid("s-9"), op)));
        }
    }
}
