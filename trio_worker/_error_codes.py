"""The one table between our exceptions and gRPC errors, used by the server and the client.

Each row is (exception class, status code, ErrorInfo reason). The server turns an
exception into a status, a short message and ``grpc-status-details-bin``
(:func:`status_of`); the client turns them back into the same class from the reason
(:func:`exception_from`), never from the message text. Adding an error class means adding
one row here (and one to the CLI's exit-code table).

Structured fields travel in the details: a job id in ``ErrorInfo.metadata["id"]``, a state
in ``metadata["state"]``, the field of an ``InvalidRequest`` as the ``BadRequest``
violation's ``field``, that of a ``PermissionDenied`` for a user (not a role) in
``metadata["field"]``.
"""

from __future__ import annotations

from collections.abc import Mapping

from ._errors import (
    AuthenticationFailed,
    InvalidRequest,
    JobNotFound,
    JobNotRunning,
    JobStillRunning,
    NoStdin,
    PermissionDenied,
    QuotaExceeded,
    RemoteError,
    ResourceExhausted,
    ShuttingDown,
    StateDirError,
    TrioWorkerError,
    Unenforceable,
)
from ._wire._status import ERROR_DOMAIN, StatusCode, bound_text, decode_details, encode_details

TYPE_CHECKING = False  # typing is for mypy only: a short command never imports it
if TYPE_CHECKING:
    from typing import Final

__all__ = ["ERRORS", "ErrorRow", "WireError", "exception_from", "status_of"]


class ErrorRow:
    """One row of the table. (Plain classes here, not dataclasses: a client command loads
    this module when a call fails, and ``dataclasses`` is no client command's.)"""

    __slots__ = ("code", "error", "reason")

    def __init__(self, error: type[TrioWorkerError], code: StatusCode, reason: str) -> None:
        self.error = error
        self.code = code
        self.reason = reason


#: Most specific class first: the first row whose class matches wins.
ERRORS: Final[tuple[ErrorRow, ...]] = (
    ErrorRow(JobNotFound, StatusCode.NOT_FOUND, "JOB_NOT_FOUND"),
    ErrorRow(InvalidRequest, StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT"),
    ErrorRow(PermissionDenied, StatusCode.PERMISSION_DENIED, "PERMISSION_DENIED"),
    ErrorRow(AuthenticationFailed, StatusCode.UNAUTHENTICATED, "UNAUTHENTICATED"),
    ErrorRow(JobNotRunning, StatusCode.FAILED_PRECONDITION, "JOB_NOT_RUNNING"),
    ErrorRow(JobStillRunning, StatusCode.FAILED_PRECONDITION, "JOB_RUNNING"),
    ErrorRow(NoStdin, StatusCode.FAILED_PRECONDITION, "NO_STDIN"),
    ErrorRow(Unenforceable, StatusCode.FAILED_PRECONDITION, "UNENFORCEABLE"),
    ErrorRow(QuotaExceeded, StatusCode.RESOURCE_EXHAUSTED, "QUOTA_EXCEEDED"),
    ErrorRow(ResourceExhausted, StatusCode.RESOURCE_EXHAUSTED, "RESOURCE_EXHAUSTED"),
    ErrorRow(ShuttingDown, StatusCode.UNAVAILABLE, "SHUTTING_DOWN"),
    ErrorRow(StateDirError, StatusCode.INTERNAL, "STATE_DIR"),
)

#: Statuses without our details (from the transport's own refusals, or another server):
#: the class when the code alone says it; other codes become RemoteError.
_BY_CODE: Final[dict[StatusCode, type[TrioWorkerError]]] = {
    StatusCode.PERMISSION_DENIED: PermissionDenied,
    StatusCode.UNAUTHENTICATED: AuthenticationFailed,
    StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    StatusCode.UNAVAILABLE: ShuttingDown,
}


#: Where the library's name for a request field is not the message's (``Supervisor.start``'s
#: ``cwd`` is ``StartRequest.working_dir``): a BadRequest names the field of the request the
#: peer sent, and a Python caller gets back the parameter it passed.
_WIRE_FIELD: Final[dict[str, str]] = {"cwd": "working_dir"}
_LIBRARY_FIELD: Final[dict[str, str]] = {wire: ours for ours, wire in _WIRE_FIELD.items()}


class WireError:
    """An error as it leaves: status code, message (bounded) and serialized details."""

    __slots__ = ("code", "details", "message")

    def __init__(self, code: StatusCode, message: str, details: bytes) -> None:
        self.code = code
        self.message = message
        self.details = details


def status_of(exc: TrioWorkerError) -> WireError:
    """The status, message and details that carry ``exc`` to a client."""
    for row in ERRORS:
        if isinstance(exc, row.error):
            break
    else:
        row = ErrorRow(type(exc), StatusCode.UNKNOWN, "UNKNOWN")
    if isinstance(exc, InvalidRequest) and exc.field in _WIRE_FIELD:
        exc = InvalidRequest(_WIRE_FIELD[exc.field], exc.message)
    message = bound_text(str(exc))
    metadata: dict[str, str] = {}
    violations: tuple[tuple[str, str], ...] = ()
    ids = JobNotFound | JobNotRunning | JobStillRunning | NoStdin
    if isinstance(exc, ids) and len(exc.job_id) <= 64:
        metadata["id"] = exc.job_id
    if isinstance(exc, NoStdin):
        metadata["why"] = bound_text(exc.why)
    if isinstance(exc, JobNotRunning):
        metadata["state"] = exc.state
    if isinstance(exc, InvalidRequest):
        violations = ((exc.field, exc.message),)
    if isinstance(exc, PermissionDenied) and exc.field:
        metadata["field"] = exc.field
    details = encode_details(row.code, message, row.reason, metadata, violations)
    return WireError(row.code, message, details)


def exception_from(
    code: int, message: str, details: bytes | None, job_id: str | None = None
) -> TrioWorkerError:
    """The exception for a non-OK status: the class its reason names, else by code alone.

    ``job_id`` is the id the call was about, for JobNotFound/JobNotRunning when the details
    do not carry it.
    """
    info = decode_details(details) if details else None
    if info is not None and info.domain == ERROR_DOMAIN:
        for row in ERRORS:
            if row.reason == info.reason:
                return _build(row.error, message, info.metadata, info.violations, job_id)
    try:
        status = StatusCode(code)
    except ValueError:
        return RemoteError(code, message)
    if status is StatusCode.INVALID_ARGUMENT:
        return InvalidRequest("request", message)
    if status is StatusCode.NOT_FOUND and job_id is not None:
        return JobNotFound(job_id)
    cls = _BY_CODE.get(status)
    if cls is None:
        return RemoteError(code, message)
    if cls is ShuttingDown:
        return ShuttingDown(message or "the server is shutting down")
    return cls(message)


def _build(
    cls: type[TrioWorkerError],
    message: str,
    meta: Mapping[str, str],
    violations: tuple[tuple[str, str], ...],
    job_id: str | None,
) -> TrioWorkerError:
    if issubclass(cls, JobNotFound):
        return cls(meta.get("id") or job_id or "")
    if issubclass(cls, JobStillRunning):
        return cls(meta.get("id") or job_id or "")
    if issubclass(cls, JobNotRunning):
        return cls(meta.get("id") or job_id or "", meta.get("state", "ended"))
    if issubclass(cls, NoStdin):
        return cls(meta.get("id") or job_id or "", meta.get("why", "it takes no input"))
    if issubclass(cls, InvalidRequest):
        field, text = violations[0] if violations else ("request", message)
        return cls(_LIBRARY_FIELD.get(field, field), text)
    if issubclass(cls, PermissionDenied):
        return cls(message, field=meta.get("field", ""))
    return cls(message)
