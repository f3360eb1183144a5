"""The short commands' messages in protobuf's wire format, written and read by hand.

Importing protobuf's runtime (upb, the descriptor pool, the generated modules, the
well-known types with the ``calendar`` and ``typing`` they import) was a fifth of the
instructions of a whole ``trio-worker list``, which sends one small request and reads one
answer. The blocking client (``_blocking_client``, the command line's) writes and reads
the messages of its calls here instead, by field number (worker.proto;
https://protobuf.dev/programming-guides/encoding/):

* requests as protobuf writes them: fields at their default left out, a message field
  that is set written even when empty, repeated enums packed; arguments are checked as
  ``_requests`` checks them, with the same ``InvalidRequest`` field;
* answers as protobuf reads them: unknown fields and fields of an unexpected wire type
  skipped, the last value of a scalar kept, the occurrences of a message field merged,
  integers truncated to their type; what protobuf refuses (truncation, a varint over ten
  bytes, invalid UTF-8 in a string, groups) and a timestamp out of ``datetime``'s range
  raise :class:`Malformed`, which the client reports as the server's INTERNAL error.

``tests/test_pbwire.py`` compares both directions with protobuf on generated messages and
feeds the reader hostile bytes. The library's trio client and the server use protobuf
(``_requests``, ``_convert``); a field added to these messages must be added here too.
"""

from __future__ import annotations

import math
import os
import struct
from collections.abc import Iterable, Iterator, Mapping, Sequence
from datetime import UTC, datetime, timedelta

from ._errors import InvalidRequest

__all__ = [
    "Malformed",
    "id_request",
    "list_request",
    "output_request",
    "read_fields",
    "remove_request",
    "signal_request",
    "start_request",
    "stop_request",
    "timestamp",
    "to_int32",
    "to_int64",
    "utf8",
]

_MASK32 = (1 << 32) - 1
_MASK64 = (1 << 64) - 1
_VARINT, _FIXED64, _LENGTH, _FIXED32 = 0, 1, 2, 5
_DOUBLE = struct.Struct("<d")
#: The limits' fields by number (worker.proto ``Limits``): name, and the largest value.
LIMIT_FIELDS = (
    ("cpus", 0),
    ("memory_bytes", _MASK64),
    ("io_read_bps", _MASK64),
    ("io_write_bps", _MASK64),
    ("pids", _MASK32),
)
#: ``Isolation``'s fields by number.
ISOLATION_FIELDS = ("pid", "mount", "network")


class Malformed(Exception):
    """Bytes that are not the message they should be."""


# --- writing -------------------------------------------------------------------------


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _number(number: int, value: int) -> bytes:
    """A varint field (uint, bool, enum; a negative int32/int64 as its 64-bit two's
    complement); nothing for 0."""
    return _varint(number << 3) + _varint(value & _MASK64) if value else b""


def _length(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | _LENGTH) + _varint(len(payload)) + payload


def _raw(field: str, value: object) -> bytes:
    """A string field's bytes: ``str``, or UTF-8 ``bytes`` (protobuf takes those too)."""
    try:
        if isinstance(value, bytes):
            value.decode("utf-8")
            return value
        if isinstance(value, str):
            return value.encode("utf-8")
    except UnicodeError as exc:
        raise InvalidRequest(field, f"is not valid UTF-8 text: {exc}") from None
    raise InvalidRequest(field, f"must be a string, not {type(value).__name__}")


def _text(number: int, field: str, value: object) -> bytes:
    """A string field; nothing for ""."""
    raw = _raw(field, value)
    return _length(number, raw) if raw else b""


def _unsigned(field: str, value: object, maximum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequest(field, f"must be an integer, not {type(value).__name__}")
    if not 0 <= value <= maximum:
        raise InvalidRequest(field, f"must be between 0 and {maximum}, got {value}")
    return value


def _limits(values: Mapping[str, float | int]) -> bytes:
    out = b""
    for number, (name, maximum) in enumerate(LIMIT_FIELDS, 1):
        value = values.get(name, 0)
        if name == "cpus":
            if not isinstance(value, int | float) or isinstance(value, bool):
                raise InvalidRequest("limits", "cpus must be a number")
            packed = _DOUBLE.pack(float(value))
            if packed != bytes(8):  # (protobuf writes -0.0)
                out += _varint(number << 3 | _FIXED64) + packed
        else:
            out += _number(number, _unsigned("limits", value, maximum))
    return out


def start_request(
    command: str,
    args: Sequence[str] | None,
    *,
    env: Mapping[str, str] | None,
    cwd: str | os.PathLike[str] | None,
    limits: Mapping[str, float | int] | None,
    isolation: Iterable[str] | None,
    user: str | None,
    stdin: bool,
    tty: bool,
    terminal_size: tuple[int, int] | None,
) -> bytes:
    """``StartRequest``; ``limits`` by ``Limits``' field names, ``isolation`` the names of
    the namespaces to isolate (``Isolation``'s fields to set). A given one is sent even
    when empty, as ``_requests.start_request`` sends its message."""
    if isinstance(args, str | bytes):
        raise InvalidRequest("args", "must be a sequence of strings, not one string")
    out = _text(1, "command", command)
    for arg in args or ():  # (a repeated field: each element, "" too)
        out += _length(2, _raw("args", arg))
    for key, value in (env or {}).items():  # a map: entries of key (1) and value (2)
        out += _length(3, _length(1, _raw("env", key)) + _length(2, _raw("env", value)))
    out += _text(4, "cwd", os.fspath(cwd) if cwd is not None else "")
    if limits is not None:
        out += _length(5, _limits(limits))
    if isolation is not None:
        chosen = set(isolation)
        if not chosen <= set(ISOLATION_FIELDS):
            raise InvalidRequest("isolation", f"unknown namespaces {sorted(chosen)}")
        body = b"".join(
            _number(number, 1) for number, name in enumerate(ISOLATION_FIELDS, 1) if name in chosen
        )
        out += _length(6, body)
    out += _number(7, bool(stdin)) + _number(8, bool(tty))
    if terminal_size is not None:
        rows, cols = terminal_size
        body = _number(1, _unsigned("terminal_size", rows, _MASK32))
        body += _number(2, _unsigned("terminal_size", cols, _MASK32))
        out += _length(9, body)
    return out + _text(10, "user", user or "")


def stop_request(job_id: str, grace: float) -> bytes:
    out = _text(1, "id", job_id)
    if isinstance(grace, bool) or not isinstance(grace, int | float):
        raise InvalidRequest("grace", "must be a number of seconds")
    if not (math.isfinite(grace) and grace >= 0):
        raise InvalidRequest("grace", f"must be a finite number >= 0, got {grace}")
    try:
        delta = timedelta(seconds=grace)
    except OverflowError as exc:
        raise InvalidRequest("grace", str(exc)) from None
    seconds = delta.days * 86400 + delta.seconds  # (Duration.FromTimedelta's)
    return out + _length(2, _number(1, seconds) + _number(2, delta.microseconds * 1000))


def signal_request(job_id: str, signum: int) -> bytes:
    number = int(signum)
    if not -(1 << 31) <= number < 1 << 31:
        raise InvalidRequest("signal", f"{number} is out of range for a signal number")
    return _text(1, "id", job_id) + _number(2, number)


def id_request(job_id: str) -> bytes:
    """A request that carries only the job's id (Status, Wait)."""
    return _text(1, "id", job_id)


def remove_request(job_id: str, force: bool) -> bytes:
    return _text(1, "id", job_id) + _number(2, bool(force))


def list_request(states: Iterable[int], owner: str | None, page_size: int, token: str) -> bytes:
    """``ListRequest``; ``states`` as the enum's numbers (packed, as proto3 writes them)."""
    out = _number(1, _unsigned("page_size", page_size, _MASK32)) + _text(2, "page_token", token)
    packed = b"".join(_varint(state) for state in states)
    if packed:
        out += _length(3, packed)
    return out + _text(4, "owner", owner or "")


def output_request(job_id: str, offset: int, follow: bool) -> bytes:
    if not isinstance(offset, int) or offset < 0:
        raise InvalidRequest("offset", f"must be a non-negative integer, got {offset!r}")
    out = _text(1, "id", job_id) + _number(2, _unsigned("offset", offset, _MASK64))
    return out + _number(3, bool(follow))


# --- reading -------------------------------------------------------------------------


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        try:
            byte = data[pos]
        except IndexError:
            raise Malformed("truncated varint") from None
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result & _MASK64, pos
        shift += 7
        if shift >= 70:
            raise Malformed("varint over ten bytes")


def read_fields(data: bytes) -> Iterator[tuple[int, int, int | bytes]]:
    """(number, wire type, value) of each field: an integer for varints, the bytes of the
    others (a fixed64, a fixed32, a length-delimited payload). One-byte keys, lengths and
    values (most of them) are read inline: a List page is thousands of fields."""
    pos = 0
    end = len(data)
    try:
        while pos < end:
            key = data[pos]
            pos += 1
            if key > 0x7F:
                key, pos = _read_varint(data, pos - 1)
                if key > _MASK32:
                    raise Malformed(f"invalid field key {key}")
            number = key >> 3
            wire = key & 7
            if number == 0:
                raise Malformed("field number 0")
            if wire == _VARINT:
                value = data[pos]
                pos += 1
                if value > 0x7F:
                    value, pos = _read_varint(data, pos - 1)
                yield number, wire, value
                continue
            if wire == _LENGTH:
                size = data[pos]
                pos += 1
                if size > 0x7F:
                    size, pos = _read_varint(data, pos - 1)
            elif wire == _FIXED64:
                size = 8
            elif wire == _FIXED32:
                size = 4
            else:  # groups (deprecated; no message of ours has one) and invalid wire types
                raise Malformed(f"wire type {wire}")
            stop = pos + size
            if stop > end:
                raise Malformed("truncated field")
            yield number, wire, data[pos:stop]
            pos = stop
    except IndexError:
        raise Malformed("truncated") from None


def to_int32(value: int) -> int:
    value &= _MASK32
    return value - (1 << 32) if value >> 31 else value


def to_int64(value: int) -> int:
    return value - (1 << 64) if value >> 63 else value


def utf8(value: bytes) -> str:
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        raise Malformed("a string that is not UTF-8") from None


def double(value: bytes) -> float:
    result: float = _DOUBLE.unpack(value)[0]
    return result


def merge_timestamp(data: bytes, into: list[int]) -> None:
    """A ``google.protobuf.Timestamp``'s fields onto ``into`` ([seconds, nanos])."""
    for number, wire, value in read_fields(data):
        if wire == _VARINT and number in (1, 2):
            into[number - 1] = to_int64(value) if number == 1 else to_int32(value)  # type: ignore[arg-type]


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
#: ``Timestamp``'s valid range (protobuf's ``ToDatetime`` refuses others).
_SECONDS_MIN, _SECONDS_MAX = -62135596800, 253402300799


def timestamp(seconds: int, nanos: int) -> datetime:
    """``Timestamp.ToDatetime(tzinfo=UTC)``: microseconds, rounded toward zero."""
    if not (_SECONDS_MIN <= seconds <= _SECONDS_MAX and 0 <= nanos < 1_000_000_000):
        raise Malformed(f"a timestamp out of range ({seconds} s, {nanos} ns)")
    return _EPOCH + timedelta(seconds=seconds, microseconds=nanos // 1000)
