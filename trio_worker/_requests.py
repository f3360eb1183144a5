"""The API's calls as messages: each method's request built and checked, its answer read.

The trio ``WorkerClient`` (``client``) uses this. The blocking one the command line uses
(``_blocking_client``) writes the same requests by hand (``_pbwire``, which says why) and
refuses the same arguments with the same ``InvalidRequest`` field (``tests/test_pbwire.py``
compares the two). Pure: protobuf in and out, no I/O.

It takes limits and isolation as messages: ``client`` checks and converts a caller's
``Limits`` and ``Isolation`` (``_convert.start_limits``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import timedelta
from typing import Final, TypeVar

from google.protobuf.message import DecodeError

from ._convert import STATE_TO_PB
from ._errors import InvalidRequest, RemoteError
from ._pb import worker_pb2 as pb
from ._states import JobState
from ._wire._status import StatusCode

__all__ = [
    "SERVICE",
    "attach_open",
    "id_request",
    "list_request",
    "method_path",
    "output_request",
    "parse",
    "remove_request",
    "request_field",
    "signal_request",
    "start_request",
    "stop_request",
]

SERVICE: Final = "trioworker.v1.Worker"

M = TypeVar("M")


def method_path(method: str) -> str:
    return f"/{SERVICE}/{method}"


@contextmanager
def request_field(field: str) -> Iterator[None]:
    """Turn protobuf's TypeError/ValueError on a bad argument into InvalidRequest(field)."""
    try:
        yield
    except (TypeError, ValueError, OverflowError) as exc:
        raise InvalidRequest(field, str(exc)) from None


def parse(message_type: type[M], data: bytes | memoryview) -> M:
    """A response message; a malformed one is the server's INTERNAL error."""
    try:
        return message_type.FromString(data)  # type: ignore[attr-defined,no-any-return]
    except DecodeError:
        message = "the server sent a malformed response message"
        raise RemoteError(StatusCode.INTERNAL, message) from None


def start_request(
    command: str,
    args: Sequence[str] | None,
    *,
    env: Mapping[str, str] | None,
    cwd: str | os.PathLike[str] | None,
    limits: pb.Limits | None,
    isolation: pb.Isolation | None,
    user: str | None,
    stdin: bool,
    tty: bool,
    terminal_size: tuple[int, int] | None,
) -> pb.StartRequest:
    if isinstance(args, str | bytes):
        raise InvalidRequest("args", "must be a sequence of strings, not one string")
    request = pb.StartRequest()
    with request_field("command"):
        request.command = command
    with request_field("args"):
        request.args.extend(args or ())
    with request_field("env"):
        request.env.update(env or {})
    with request_field("cwd"):  # the parameter's name, as the library says it
        request.working_dir = os.fspath(cwd) if cwd is not None else ""
    if limits is not None:
        request.limits.CopyFrom(limits)
    if isolation is not None:
        request.isolation.CopyFrom(isolation)
    request.stdin = bool(stdin)
    request.tty = bool(tty)
    if terminal_size is not None:
        with request_field("terminal_size"):
            request.terminal_size.rows, request.terminal_size.cols = terminal_size
    with request_field("user"):
        request.user = user or ""
    return request


def stop_request(job_id: str, grace: float) -> pb.StopRequest:
    request = pb.StopRequest()
    with request_field("id"):
        request.id = job_id
    if isinstance(grace, bool) or not isinstance(grace, int | float):
        raise InvalidRequest("grace", "must be a number of seconds")
    if not (math.isfinite(grace) and grace >= 0):
        raise InvalidRequest("grace", f"must be a finite number >= 0, got {grace}")
    with request_field("grace"):  # OverflowError beyond timedelta's range
        request.grace.FromTimedelta(timedelta(seconds=grace))
    return request


def signal_request(job_id: str, signum: int) -> pb.SignalRequest:
    request = pb.SignalRequest()
    with request_field("id"):
        request.id = job_id
    with request_field("signal"):
        request.signal = int(signum)
    return request


def id_request(message_type: type[M], job_id: str) -> M:
    """A request that carries only the job's id (Status, Wait)."""
    request = message_type()
    with request_field("id"):
        request.id = job_id  # type: ignore[attr-defined]
    return request


def remove_request(job_id: str, force: bool) -> pb.RemoveRequest:
    request = id_request(pb.RemoveRequest, job_id)
    request.force = bool(force)
    return request


def list_request(
    states: Iterable[JobState] | None, owner: str | None, page_size: int
) -> pb.ListRequest:
    states_pb = [STATE_TO_PB[JobState(state)] for state in states or ()]
    return pb.ListRequest(page_size=page_size, states=states_pb, owner=owner or "")


def output_request(job_id: str, offset: int, follow: bool) -> pb.OutputRequest:
    request = id_request(pb.OutputRequest, job_id)
    if not isinstance(offset, int) or offset < 0:
        raise InvalidRequest("offset", f"must be a non-negative integer, got {offset!r}")
    with request_field("offset"):
        request.offset = offset
    request.follow = bool(follow)
    return request


def attach_open(job_id: str, offset: int) -> pb.AttachRequest:
    if not isinstance(offset, int) or offset < 0:
        raise InvalidRequest("offset", f"must be a non-negative integer, got {offset!r}")
    request = pb.AttachRequest()
    with request_field("id"):
        request.open.id = job_id
    with request_field("offset"):
        request.open.offset = offset
    return request
