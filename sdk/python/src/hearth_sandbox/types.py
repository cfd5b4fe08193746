"""Plain data the service returns, decoded leniently (unknown fields ignored, missing ones
defaulted), as docs/PROTOCOL.md asks of clients. Enumerations (``state``, ``network``…) stay
strings so a newer server's values never break an older SDK."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional

__all__ = [
    "Chunk",
    "ExecResult",
    "ProcessChunk",
    "ProcessInfo",
    "ProcessOutput",
    "IsolationReport",
    "PoolStatus",
    "SessionInfo",
    "Template",
    "TERMINAL_STATES",
]

#: Session states after which the session can never be used again.
TERMINAL_STATES = frozenset({"released", "lost"})


def _int(wire: Mapping[str, Any], key: str, default: int = 0) -> int:
    value = wire.get(key)
    return value if isinstance(value, int) else default


def _opt_int(wire: Mapping[str, Any], key: str) -> Optional[int]:
    value = wire.get(key)
    return value if isinstance(value, int) else None


def _str(wire: Mapping[str, Any], key: str, default: str = "") -> str:
    value = wire.get(key)
    return value if isinstance(value, str) else default


def _opt_str(wire: Mapping[str, Any], key: str) -> Optional[str]:
    value = wire.get(key)
    return value if isinstance(value, str) else None


def _bytes(wire: Mapping[str, Any], key: str) -> bytes:
    value = wire.get(key)
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode()
    return b""


def _labels(wire: Mapping[str, Any], key: str) -> Dict[str, str]:
    value = wire.get(key)
    return dict(value) if isinstance(value, dict) else {}


@dataclass(frozen=True)
class IsolationReport:
    """What separates a session from the host and from other sessions."""

    #: ``sandbox``, ``vm``, ``none`` or ``fake``.
    mode: str = ""
    #: How memory / process / CPU limits are enforced (``cgroup_v2``, ``rlimit``, ``vm``, ``none``…).
    limits: str = ""
    #: How the disk quota is enforced (``loop_ext4``, ``vm``, ``none``).
    disk: str = ""

    @classmethod
    def from_wire(cls, wire: Any) -> Optional["IsolationReport"]:
        if not isinstance(wire, dict):
            return None
        return cls(_str(wire, "mode"), _str(wire, "limits"), _str(wire, "disk"))


@dataclass(frozen=True)
class SessionInfo:
    """A session as the scheduler records it (``sessions.create`` / ``get`` / ``list`` reply)."""

    session_id: str
    template: str = ""
    #: ``running``, ``stopped``, ``paused``, ``released`` or ``lost`` (or a newer value: treat as
    #: unusable). ``stopped`` and ``paused`` sessions are resumed by the next exec or file transfer.
    state: str = ""
    #: The worker holding the VM (informational).
    worker_id: str = ""
    #: Served from the warm pool (``False``: restored cold).
    warm: bool = False
    created_ms: int = 0
    #: When it expires unless kept alive (unix ms).
    expires_ms: int = 0
    last_used_ms: int = 0
    labels: Dict[str, str] = field(default_factory=dict)
    isolation: Optional[IsolationReport] = None
    #: When it was paused (unix ms), while ``paused``.
    paused_ms: Optional[int] = None
    #: When it was last resumed from a pause (unix ms).
    resumed_ms: Optional[int] = None
    #: Its paused state is in the fleet's object store (``pause_upload``): it survives the loss
    #: of its worker.
    pause_uploaded: bool = False
    #: Bytes of the uploaded paused state (0 unless ``pause_uploaded``).
    pause_upload_bytes: int = 0
    #: Paused, and its worker was lost: the next exec, file transfer or keepalive resumes it on
    #: another worker.
    unplaced: bool = False
    #: Why the session is as it is, in words (a pause upload that failed, why it was lost).
    detail: Optional[str] = None

    @property
    def is_terminal(self) -> bool:
        """Whether the session is over (released or lost)."""
        return self.state in TERMINAL_STATES

    @classmethod
    def from_wire(cls, wire: Mapping[str, Any]) -> "SessionInfo":
        return cls(
            session_id=_str(wire, "session_id"),
            template=_str(wire, "template"),
            state=_str(wire, "state"),
            worker_id=_str(wire, "worker_id"),
            warm=bool(wire.get("warm", False)),
            created_ms=_int(wire, "created_ms"),
            expires_ms=_int(wire, "expires_ms"),
            last_used_ms=_int(wire, "last_used_ms"),
            labels=_labels(wire, "labels"),
            isolation=IsolationReport.from_wire(wire.get("isolation")),
            paused_ms=_opt_int(wire, "paused_ms"),
            resumed_ms=_opt_int(wire, "resumed_ms"),
            pause_uploaded=bool(wire.get("pause_uploaded", False)),
            pause_upload_bytes=_int(wire, "pause_upload_bytes"),
            unplaced=bool(wire.get("unplaced", False)),
            detail=_opt_str(wire, "detail"),
        )


@dataclass(frozen=True)
class Template:
    """A snapshot sessions are restored from."""

    name: str
    #: ``None`` while the template is being built.
    snapshot_id: Optional[str] = None
    #: The session captured, for templates made by :meth:`Session.snapshot`.
    source_session: Optional[str] = None
    min_ready: int = 0
    max_ready: int = 0
    vcpus: int = 0
    memory_mib: int = 0
    disk_mib: int = 0
    max_processes: int = 0
    #: ``none`` or ``egress`` (``None`` = ``none``).
    network: Optional[str] = None
    created_ms: int = 0

    @classmethod
    def from_wire(cls, wire: Mapping[str, Any]) -> "Template":
        return cls(
            name=_str(wire, "name"),
            snapshot_id=_opt_str(wire, "snapshot_id"),
            source_session=_opt_str(wire, "source_session"),
            min_ready=_int(wire, "min_ready"),
            max_ready=_int(wire, "max_ready"),
            vcpus=_int(wire, "vcpus"),
            memory_mib=_int(wire, "memory_mib"),
            disk_mib=_int(wire, "disk_mib"),
            max_processes=_int(wire, "max_processes"),
            network=_opt_str(wire, "network"),
            created_ms=_int(wire, "created_ms"),
        )


@dataclass(frozen=True)
class PoolStatus:
    """One template's warm pool."""

    template: str
    #: VMs restored and waiting to be claimed.
    ready: int = 0
    restoring: int = 0
    #: The number of ready VMs the scheduler aims for.
    target: int = 0
    #: Live sessions claimed from this template.
    claimed: int = 0
    isolation: List[IsolationReport] = field(default_factory=list)

    @classmethod
    def from_wire(cls, wire: Mapping[str, Any]) -> "PoolStatus":
        reports = wire.get("isolation")
        return cls(
            template=_str(wire, "template"),
            ready=_int(wire, "ready"),
            restoring=_int(wire, "restoring"),
            target=_int(wire, "target"),
            claimed=_int(wire, "claimed"),
            isolation=[
                r for r in map(IsolationReport.from_wire, reports or []) if r is not None
            ],
        )


@dataclass(frozen=True)
class ExecResult:
    """What a command did. A non-zero ``exit_code`` is a normal result, not an exception."""

    exit_code: int
    #: The signal that ended the command, if one did.
    signal: Optional[int] = None
    stdout: bytes = b""
    stderr: bytes = b""
    #: Output beyond ``max_output_bytes`` was dropped.
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    #: The command outlived ``timeout_ms`` and was killed with its process group.
    timed_out: bool = False
    #: Wall time of the command itself (not of waiting for the VM).
    duration_ms: int = 0
    #: The session's memory limit was hit while it ran.
    oom_killed: bool = False

    @property
    def ok(self) -> bool:
        """``exit_code == 0`` and not timed out."""
        return self.exit_code == 0 and not self.timed_out

    @property
    def stdout_text(self) -> str:
        """stdout decoded as UTF-8 (undecodable bytes replaced)."""
        return self.stdout.decode("utf-8", "replace")

    @property
    def stderr_text(self) -> str:
        """stderr decoded as UTF-8 (undecodable bytes replaced)."""
        return self.stderr.decode("utf-8", "replace")

    @classmethod
    def from_wire(cls, wire: Mapping[str, Any]) -> "ExecResult":
        return cls(
            exit_code=_int(wire, "exit_code", -1),
            signal=_opt_int(wire, "signal"),
            stdout=_bytes(wire, "stdout"),
            stderr=_bytes(wire, "stderr"),
            stdout_truncated=bool(wire.get("stdout_truncated", False)),
            stderr_truncated=bool(wire.get("stderr_truncated", False)),
            timed_out=bool(wire.get("timed_out", False)),
            duration_ms=_int(wire, "duration_ms"),
            oom_killed=bool(wire.get("oom_killed", False)),
        )


@dataclass(frozen=True)
class Chunk:
    """A piece of a streamed command's output, as it arrived."""

    #: ``"stdout"`` or ``"stderr"``.
    stream: str
    data: bytes

    @property
    def text(self) -> str:
        """The bytes decoded as UTF-8 (undecodable bytes replaced; a multi-byte character split
        across chunks shows as replacement characters)."""
        return self.data.decode("utf-8", "replace")


@dataclass(frozen=True)
class ProcessInfo:
    """A background process as the session's VM reports it."""

    process_id: str
    pid: int = 0
    #: What it runs (a ``str`` command shows as the shell's argv).
    argv: List[str] = field(default_factory=list)
    tag: Optional[str] = None
    started_ms: int = 0
    pty: bool = False
    #: Its stdin takes :meth:`write`.
    stdin: bool = False
    #: It has ended (and all its output is in its ring buffer).
    exited: bool = False
    #: Exit status once ended; ``128 + signal`` when a signal ended it.
    exit_code: Optional[int] = None
    signal: Optional[int] = None
    #: It outlived its ``timeout_ms`` and was killed.
    timed_out: bool = False
    ended_ms: Optional[int] = None

    @classmethod
    def from_wire(cls, wire: Mapping[str, Any]) -> "ProcessInfo":
        argv = wire.get("argv")
        return cls(
            process_id=_str(wire, "process_id"),
            pid=_int(wire, "pid"),
            argv=[a for a in argv if isinstance(a, str)] if isinstance(argv, list) else [],
            tag=_opt_str(wire, "tag"),
            started_ms=_int(wire, "started_ms"),
            pty=bool(wire.get("pty", False)),
            stdin=bool(wire.get("stdin", False)),
            exited=bool(wire.get("exited", False)),
            exit_code=_opt_int(wire, "exit_code"),
            signal=_opt_int(wire, "signal"),
            timed_out=bool(wire.get("timed_out", False)),
            ended_ms=_opt_int(wire, "ended_ms"),
        )


@dataclass(frozen=True)
class ProcessChunk:
    """A piece of a background process's output, at its offset in the process's output."""

    #: ``"stdout"`` or ``"stderr"``.
    stream: str
    #: Offset of its first byte (offsets jump where the ring buffer dropped output).
    offset: int
    data: bytes

    @property
    def text(self) -> str:
        """The bytes decoded as UTF-8 (undecodable bytes replaced)."""
        return self.data.decode("utf-8", "replace")

    @classmethod
    def from_wire(cls, wire: Mapping[str, Any]) -> "ProcessChunk":
        return cls(_str(wire, "stream", "stdout"), _int(wire, "offset"), _bytes(wire, "data"))


@dataclass(frozen=True)
class ProcessOutput:
    """Output read from a process's ring buffer."""

    chunks: List[ProcessChunk]
    #: The oldest offset still held: output before it was dropped.
    first_offset: int
    #: Where the next read goes on.
    next_offset: int
    #: The process now (``exited`` says whether more output can come).
    process: ProcessInfo

    @property
    def data(self) -> bytes:
        """All the chunks' bytes, in order."""
        return b"".join(c.data for c in self.chunks)

    @classmethod
    def from_wire(cls, wire: Mapping[str, Any]) -> "ProcessOutput":
        chunks = wire.get("chunks")
        process = wire.get("process")
        return cls(
            chunks=[ProcessChunk.from_wire(c) for c in chunks if isinstance(c, dict)]
            if isinstance(chunks, list) else [],
            first_offset=_int(wire, "first_offset"),
            next_offset=_int(wire, "next_offset"),
            process=ProcessInfo.from_wire(process if isinstance(process, dict) else {}),
        )
