"""Hearth's Python SDK: warm microVM sandboxes for AI-agent executors, over NATS.

Blocking::

    from hearth_sandbox import Hearth

    with Hearth.connect("nats://127.0.0.1:4222") as hearth:
        with hearth.sessions.create(template="default") as session:
            result = session.exec("python3 -c 'print(6 * 7)'")
            print(result.stdout_text)            # 42
            session.files.write("data.csv", "a,b\\n1,2\\n")
            print(session.files.read("data.csv"))

asyncio: the same with :class:`AsyncHearth`, ``await`` and ``async with``.
Errors are :class:`HearthError` subclasses (see :mod:`hearth_sandbox.errors`).
"""

from ._core import RetryPolicy, Timeouts
from ._version import __version__
from .aio import (
    AsyncExecStream,
    AsyncFiles,
    AsyncForkResult,
    AsyncHearth,
    AsyncPools,
    AsyncSession,
    AsyncSessions,
    AsyncTemplates,
)
from .errors import (
    BadRequest,
    Conflict,
    DeadlineExceeded,
    HearthError,
    HearthServerError,
    InsufficientStorage,
    NoCapacity,
    NotFound,
    QuotaExceeded,
    SessionEnded,
    Timeout,
    Unavailable,
)
from .processes import AsyncProcess, AsyncProcesses, AsyncProcessStream
from .sync import (
    ExecStream,
    Files,
    ForkResult,
    Hearth,
    Pools,
    Process,
    Processes,
    ProcessStream,
    Session,
    Sessions,
    Templates,
)
from .types import (
    Chunk,
    ExecResult,
    IsolationReport,
    PoolStatus,
    ProcessChunk,
    ProcessInfo,
    ProcessOutput,
    SessionInfo,
    Template,
)

__all__ = [
    "AsyncExecStream",
    "AsyncFiles",
    "AsyncForkResult",
    "AsyncHearth",
    "AsyncPools",
    "AsyncProcess",
    "AsyncProcessStream",
    "AsyncProcesses",
    "AsyncSession",
    "AsyncSessions",
    "AsyncTemplates",
    "BadRequest",
    "Chunk",
    "Conflict",
    "DeadlineExceeded",
    "ExecResult",
    "ExecStream",
    "Files",
    "ForkResult",
    "Hearth",
    "HearthError",
    "HearthServerError",
    "InsufficientStorage",
    "IsolationReport",
    "NoCapacity",
    "NotFound",
    "PoolStatus",
    "Pools",
    "Process",
    "ProcessChunk",
    "ProcessInfo",
    "ProcessOutput",
    "ProcessStream",
    "Processes",
    "QuotaExceeded",
    "RetryPolicy",
    "Session",
    "SessionEnded",
    "SessionInfo",
    "Sessions",
    "Template",
    "Templates",
    "Timeout",
    "Timeouts",
    "Unavailable",
    "__version__",
]
