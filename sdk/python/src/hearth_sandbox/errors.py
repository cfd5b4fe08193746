"""Exceptions raised by the Hearth SDK.

Every failure of a Hearth operation is a :class:`HearthError`. Errors the service answered carry its
numeric ``code`` (the ``Nats-Service-Error-Code`` header) and its ``message``; the class says what
to do about it:

=========================  ======  ==================================================================
class                      code    meaning
=========================  ======  ==================================================================
:class:`BadRequest`        400     the request is invalid; the same request fails again
:class:`NotFound`          404     no such session, template or file
:class:`SessionEnded`      (404)   the session is released or lost (asked of its data plane)
:class:`Conflict`          409     conflicts with the current state (e.g. ``session_id`` reused)
:class:`QuotaExceeded`     429     a quota is exhausted; ``retry_after_ms`` may say when to retry
:class:`HearthServerError` 500     a server bug, or a code newer than this SDK
:class:`NoCapacity`        503     no VM now; retried automatically, carries ``retry_after_ms``
:class:`DeadlineExceeded`  504     the work did not finish in time (server side)
:class:`Timeout`           —       no reply in time (client side); ``may_have_run`` is true
:class:`InsufficientStorage` 507   the session's disk quota is full; nothing was written
:class:`Unavailable`       —       nobody serves the subject, or the connection is down
=========================  ======  ==================================================================
"""

from __future__ import annotations

from typing import Dict, Optional, Type

__all__ = [
    "BadRequest",
    "Conflict",
    "DeadlineExceeded",
    "HearthError",
    "HearthServerError",
    "InsufficientStorage",
    "NoCapacity",
    "NotFound",
    "QuotaExceeded",
    "SessionEnded",
    "Timeout",
    "Unavailable",
    "error_for_code",
]


class HearthError(Exception):
    """Base class of every error the SDK raises for a Hearth operation.

    Attributes:
        message: What went wrong, as the server (or the SDK) said it.
        code: The service's error code (400, 404, …), or ``None`` when the service did not answer.
        subject: The NATS subject of the request, when there was one.
        retry_after_ms: How long the service asked the caller to wait before retrying, if it did.
        may_have_run: Whether the operation may have taken effect on the server. ``False`` for
            every error reply (the service refused it) and when nothing was delivered.
    """

    #: The code this class stands for, ``None`` for client-side conditions.
    default_code: Optional[int] = None
    #: Whether the SDK retries it for idempotent operations (see :class:`RetryPolicy`).
    retried: bool = False

    def __init__(
        self,
        message: str,
        *,
        code: Optional[int] = None,
        subject: Optional[str] = None,
        retry_after_ms: Optional[int] = None,
        may_have_run: bool = False,
    ) -> None:
        self.message = message
        self.code = code if code is not None else self.default_code
        self.subject = subject
        self.retry_after_ms = retry_after_ms
        self.may_have_run = may_have_run
        super().__init__(message)

    def __str__(self) -> str:
        parts = []
        if self.subject:
            parts.append(f"{self.subject}:")
        if self.code is not None:
            parts.append(str(self.code))
        parts.append(self.message)
        if self.retry_after_ms is not None:
            parts.append(f"(retry after {self.retry_after_ms} ms)")
        return " ".join(parts)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self)!r})"


class BadRequest(HearthError):
    """400: the request is malformed or invalid (a path outside the volume, a limit exceeded…)."""

    default_code: Optional[int] = 400


class NotFound(HearthError):
    """404: the session, template or file does not exist."""

    default_code: Optional[int] = 404


class SessionEnded(NotFound):
    """The session is over (``released`` or ``lost``): its exec and files are served by nobody.

    Attributes:
        state: The session's terminal state as the scheduler reports it.
    """

    def __init__(self, message: str, *, state: str, subject: Optional[str] = None) -> None:
        super().__init__(message, subject=subject)
        self.state = state


class Conflict(HearthError):
    """409: the request conflicts with the current state (a ``session_id`` reused with another
    template, a snapshot onto an existing template name, exec on a destroyed VM)."""

    default_code: Optional[int] = 409


class QuotaExceeded(HearthError):
    """429: a quota was exceeded (a tenant's sessions, a session's queued requests). Not retried
    automatically: ``retry_after_ms``, when present, says when a retry may succeed."""

    default_code: Optional[int] = 429


class HearthServerError(HearthError):
    """500, or a code this SDK does not know: a failure on the server. Not retried."""

    default_code: Optional[int] = 500


class NoCapacity(HearthError):
    """503: no warm VM and no cold restore possible in time. Retried automatically by idempotent
    operations until their deadline, after ``retry_after_ms``."""

    default_code: Optional[int] = 503
    retried = True


class DeadlineExceeded(HearthError):
    """504: a deadline passed on the server before the work finished. Retried for idempotent
    operations."""

    default_code: Optional[int] = 504
    retried = True


class Timeout(DeadlineExceeded):
    """No reply arrived within the client's timeout. The request may or may not have taken effect
    (``may_have_run`` is true); idempotent operations retry it with the same body."""

    default_code: Optional[int] = None


class InsufficientStorage(HearthError):
    """507: the session's disk quota is full. Nothing was written."""

    default_code: Optional[int] = 507


class Unavailable(HearthError):
    """Nobody serves the subject (no scheduler, or the session's worker is gone) or the NATS
    connection is down. ``may_have_run`` says whether the request had been sent when the
    connection was lost (an exec may then have run)."""

    retried = True


_BY_CODE: Dict[int, Type[HearthError]] = {
    400: BadRequest,
    404: NotFound,
    409: Conflict,
    429: QuotaExceeded,
    500: HearthServerError,
    503: NoCapacity,
    504: DeadlineExceeded,
    507: InsufficientStorage,
}


def error_for_code(
    code: int, message: str, *, subject: Optional[str] = None, retry_after_ms: Optional[int] = None
) -> HearthError:
    """The exception for a service error reply; unknown codes are :class:`HearthServerError`."""
    cls = _BY_CODE.get(code, HearthServerError)
    return cls(message, code=code, subject=subject, retry_after_ms=retry_after_ms)
