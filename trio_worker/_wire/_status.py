"""gRPC status on the wire: codes, the trailers that carry them, and structured details.

An error leaves as ``grpc-status``, a short ``grpc-message`` and ``grpc-status-details-bin``:
a ``google.rpc.Status`` whose details hold an ``ErrorInfo`` (``reason`` in UPPER_SNAKE_CASE,
``domain`` :data:`ERROR_DOMAIN`, a little ``metadata``) and, for INVALID_ARGUMENT, a
``BadRequest`` naming the field. Peers act on the reason, never on the message text, so
the message is for people only: at most :data:`MAX_MESSAGE_BYTES`, cut rather than grown.

Which exception goes with which (code, reason) is not decided here (the wire knows nothing
of jobs): see ``trio_worker._error_codes``.
"""

from __future__ import annotations

import base64
import binascii
import enum
import urllib.parse
from collections.abc import Mapping

TYPE_CHECKING = False  # typing is for mypy only: a short command never imports it
if TYPE_CHECKING:
    from typing import Final

__all__ = [
    "DETAILS_HEADER",
    "ERROR_DOMAIN",
    "MAX_MESSAGE_BYTES",
    "ErrorDetails",
    "StatusCode",
    "bound_text",
    "decode_details",
    "details_from_header",
    "encode_details",
    "status_trailers",
]

#: The trailer holding the serialized ``google.rpc.Status`` (base64, as every ``-bin``).
DETAILS_HEADER: Final = "grpc-status-details-bin"
#: ``ErrorInfo.domain`` of our reasons.
ERROR_DOMAIN: Final = "trioworker.v1"
#: Longest grpc-message we send (UTF-8 bytes before percent-encoding): a line for people,
#: and never a way to echo a client's megabytes back (contract: at most 1 KiB).
MAX_MESSAGE_BYTES: Final = 1024
#: Longest ErrorInfo metadata value or BadRequest field we send or take: the same reason.
_MAX_DETAIL_BYTES: Final = 256
#: Largest details blob we try to parse from a peer: a bound on the work a hostile one buys.
_MAX_DETAILS_IN: Final = 16 * 1024

#: What grpc-message keeps as is: printable ASCII but "%" (gRPC's percent-encoding rule).
_MESSAGE_SAFE: Final = "".join(chr(c) for c in range(0x20, 0x7F) if chr(c) != "%")
_TYPE_PREFIX: Final = "type.googleapis.com/"
#: The details' type URLs (the messages' full names, which the import below would give:
#: ``google.rpc`` is imported when details are made or read, not by every client command).
_ERROR_INFO_TYPE: Final = _TYPE_PREFIX + "google.rpc.ErrorInfo"
_BAD_REQUEST_TYPE: Final = _TYPE_PREFIX + "google.rpc.BadRequest"


class StatusCode(enum.IntEnum):
    """gRPC status codes (grpc/doc/statuscodes.md)."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16


def bound_text(text: str, limit: int = MAX_MESSAGE_BYTES) -> str:
    """``text`` cut to at most ``limit`` UTF-8 bytes, marked with "…" when cut."""
    raw = text.encode("utf-8", "replace")
    if len(raw) <= limit:
        return text
    marker = " …"
    cut = raw[: limit - len(marker.encode())].decode("utf-8", "ignore")
    return cut + marker


class ErrorDetails:
    """What a ``google.rpc.Status`` from a peer said, reduced to what we act on.

    A plain class, not a dataclass: this module is on every client command's path, and
    ``dataclasses`` (with the ``inspect`` it imports) is not (``tests/test_cli_imports.py``).
    """

    __slots__ = ("domain", "metadata", "reason", "violations")

    def __init__(
        self,
        reason: str = "",
        domain: str = "",
        metadata: Mapping[str, str] | None = None,
        violations: tuple[tuple[str, str], ...] = (),
    ) -> None:
        self.reason = reason
        self.domain = domain
        self.metadata: Mapping[str, str] = {} if metadata is None else metadata
        #: (field, description) of each BadRequest violation
        self.violations = violations


def encode_details(
    code: StatusCode,
    message: str,
    reason: str,
    metadata: Mapping[str, str] | None = None,
    violations: tuple[tuple[str, str], ...] = (),
) -> bytes:
    """A serialized ``google.rpc.Status`` with an ErrorInfo (and a BadRequest if any)."""
    from google.rpc import error_details_pb2, status_pb2  # type: ignore[import-untyped]

    status = status_pb2.Status(code=int(code), message=bound_text(message))
    info = error_details_pb2.ErrorInfo(reason=reason, domain=ERROR_DOMAIN)
    for key, value in (metadata or {}).items():
        info.metadata[key] = bound_text(value, _MAX_DETAIL_BYTES)
    status.details.add().Pack(info)
    if violations:
        bad = error_details_pb2.BadRequest()
        for name, description in violations:
            bad.field_violations.add(
                field=bound_text(name, _MAX_DETAIL_BYTES),
                description=bound_text(description, _MAX_DETAIL_BYTES),
            )
        status.details.add().Pack(bad)
    encoded: bytes = status.SerializeToString()
    return encoded


def decode_details(data: bytes) -> ErrorDetails | None:
    """The ErrorInfo and BadRequest inside a serialized ``google.rpc.Status``; None when
    the blob is missing, too large or not one (a peer's garbage is not an error of ours)."""
    if not data or len(data) > _MAX_DETAILS_IN:
        return None
    from google.protobuf.message import DecodeError  # (on a failed call only: see encode)
    from google.rpc import error_details_pb2, status_pb2

    status = status_pb2.Status()
    try:
        status.ParseFromString(data)
        reason = domain = ""
        metadata: dict[str, str] = {}
        violations: list[tuple[str, str]] = []
        for detail in status.details:
            if detail.type_url == _ERROR_INFO_TYPE and not reason:
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                reason, domain = info.reason, info.domain
                metadata = {
                    bound_text(key, _MAX_DETAIL_BYTES): bound_text(value, _MAX_DETAIL_BYTES)
                    for key, value in info.metadata.items()
                }
            elif detail.type_url == _BAD_REQUEST_TYPE:
                bad = error_details_pb2.BadRequest()
                detail.Unpack(bad)
                violations.extend(
                    (
                        bound_text(v.field, _MAX_DETAIL_BYTES),
                        bound_text(v.description, _MAX_DETAIL_BYTES),
                    )
                    for v in bad.field_violations
                )
    except DecodeError:
        return None
    return ErrorDetails(reason, domain, metadata, tuple(violations))


def status_trailers(
    code: StatusCode | int, message: str, details: bytes | None = None
) -> list[tuple[str, str]]:
    """The ``grpc-status`` / ``grpc-message`` / ``grpc-status-details-bin`` header fields.

    The message is bounded and percent-encoded (gRPC's rule: ASCII printable but ``%``
    stays as is); details are base64 without padding, as gRPC sends ``-bin`` values.
    """
    fields = [("grpc-status", str(int(code)))]
    if message:
        text = bound_text(message)
        fields.append(("grpc-message", urllib.parse.quote(text, safe=_MESSAGE_SAFE)))
    if details:
        fields.append((DETAILS_HEADER, base64.b64encode(details).decode("ascii").rstrip("=")))
    return fields


def details_from_header(value: str | bytes) -> bytes | None:
    """The raw bytes of a ``grpc-status-details-bin`` value (base64, padded or not)."""
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    if len(value) > _MAX_DETAILS_IN * 2:
        return None
    try:
        return base64.b64decode(value + "=" * (-len(value) % 4), validate=False)
    except (binascii.Error, ValueError):
        return None
