"""The one table between our exceptions and gRPC errors, both directions, without I/O."""

from __future__ import annotations

import urllib.parse

import pytest
from hypothesis import given
from hypothesis import strategies as st

from trio_worker import (
    AuthenticationFailed,
    InvalidRequest,
    JobNotFound,
    JobNotRunning,
    PermissionDenied,
    ResourceExhausted,
    ShuttingDown,
    TrioWorkerError,
    Unenforceable,
)
from trio_worker._error_codes import ERRORS, exception_from, status_of
from trio_worker._wire._status import (
    ERROR_DOMAIN,
    MAX_MESSAGE_BYTES,
    StatusCode,
    bound_text,
    decode_details,
    encode_details,
    status_trailers,
)

EXAMPLES: list[TrioWorkerError] = [
    JobNotFound("01JABCDEFGHJKMNPQRSTVWXYZ0"),
    JobNotRunning("01JABCDEFGHJKMNPQRSTVWXYZ0", "exited"),
    InvalidRequest("limits.memory_bytes", "must be at least 4096"),
    PermissionDenied("role readonly may not start jobs"),
    AuthenticationFailed("no role in the certificate"),
    Unenforceable("memory limits need cgroup v2"),
    ResourceExhausted("at most 100 running jobs"),
    ShuttingDown("the server is shutting down"),
]


@pytest.mark.parametrize("exc", EXAMPLES, ids=lambda e: type(e).__name__)
def test_every_error_comes_back_as_its_class_from_the_reason(exc: TrioWorkerError) -> None:
    wire = status_of(exc)
    again = exception_from(int(wire.code), "the message is not read", wire.details)
    assert type(again) is type(exc)
    for attribute in ("job_id", "state", "field", "message"):
        if attribute != "message" or isinstance(exc, InvalidRequest):
            assert getattr(again, attribute, None) == getattr(exc, attribute, None)


def test_reasons_are_upper_snake_case_and_unique() -> None:
    reasons = [row.reason for row in ERRORS]
    assert len(set(reasons)) == len(reasons)
    for reason in reasons:
        assert reason.replace("_", "").isalpha()
        assert reason.isupper()
    contract = {"JOB_NOT_FOUND", "JOB_NOT_RUNNING", "INVALID_ARGUMENT", "PERMISSION_DENIED"}
    assert contract | {"UNENFORCEABLE"} <= set(reasons)


def test_details_carry_error_info_and_bad_request() -> None:
    wire = status_of(InvalidRequest("env", "names must not contain '='"))
    assert wire.code is StatusCode.INVALID_ARGUMENT
    details = decode_details(wire.details)
    assert details is not None
    assert (details.reason, details.domain) == ("INVALID_ARGUMENT", ERROR_DOMAIN)
    assert details.violations == (("env", "names must not contain '='"),)


def test_a_bad_request_names_the_field_of_the_message_and_the_parameter_back() -> None:
    """``Supervisor.start``'s ``cwd`` is ``StartRequest.working_dir``: a gRPC client is told
    the field it sent, and a Python caller gets back the parameter it passed."""
    wire = status_of(InvalidRequest("cwd", "'/nope' does not exist"))
    details = decode_details(wire.details)
    assert details is not None
    assert details.violations == (("working_dir", "'/nope' does not exist"),)
    assert wire.message == "working_dir: '/nope' does not exist"
    again = exception_from(int(wire.code), wire.message, wire.details)
    assert isinstance(again, InvalidRequest)
    assert (again.field, again.message) == ("cwd", "'/nope' does not exist")


def test_a_foreign_domain_is_not_trusted_for_the_class() -> None:
    foreign = encode_details(StatusCode.FAILED_PRECONDITION, "x", "JOB_NOT_RUNNING")
    # Rewrite the domain: same reason, someone else's vocabulary.
    tampered = foreign.replace(ERROR_DOMAIN.encode(), b"example.com!!")
    again = exception_from(9, "x", tampered)
    assert not isinstance(again, JobNotRunning)


def test_a_huge_job_id_is_described_and_the_message_bounded() -> None:
    huge = "y" * (512 * 1024)
    wire = status_of(JobNotFound(huge))
    assert len(wire.message.encode()) <= MAX_MESSAGE_BYTES
    assert len(wire.details) < 2 * MAX_MESSAGE_BYTES
    assert huge[:100] not in wire.message
    trailers = dict(status_trailers(wire.code, wire.message, wire.details))
    assert len(trailers["grpc-message"]) <= 3 * MAX_MESSAGE_BYTES


@given(st.text(max_size=3000))
def test_messages_are_bounded_and_survive_percent_encoding(text: str) -> None:
    bounded = bound_text(text)
    assert len(bounded.encode("utf-8", "replace")) <= MAX_MESSAGE_BYTES
    trailers = dict(status_trailers(StatusCode.INTERNAL, text))
    if bounded:
        value = trailers["grpc-message"]
        assert value.isascii()
        assert urllib.parse.unquote(value, errors="replace") == bounded.encode(
            "utf-8", "replace"
        ).decode("utf-8", "replace")


@given(st.binary(max_size=200))
def test_garbage_details_from_a_peer_never_raise(blob: bytes) -> None:
    decode_details(blob)  # returns something or None, never raises
    error = exception_from(9, "whatever", blob)
    assert isinstance(error, TrioWorkerError)
