"""The one table from exceptions to exit codes and one-line messages.

Every error a command can meet ends here: ``main`` prints ``trio-worker: error: WHAT; NEXT
STEP`` on stderr and exits with the class's code. ``run`` and ``wait`` exit with the job's
own code, so there every failure of trio-worker itself is 125 (as ``docker run`` does).

The exit codes are in ``_exit``.
"""

from __future__ import annotations

import errno
import sys
from collections.abc import Callable

from .._errors import (
    AuthenticationFailed,
    ConnectionFailed,
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
from .._tls import TLSConfigError
from ._exit import ExitCode
from ._settings import ConfigFileError

__all__ = ["ExitCode", "Failure", "LocalConfigError", "describe", "leaf_exception", "option_of"]


class LocalConfigError(Exception):
    """A setting of this host cannot be used (``serve --listen`` on a port in use); the
    message names it and says what to do."""


#: The request fields the server names in errors (``BadRequest``) → the option or
#: argument a person typed: users see ``--memory``, never ``limits.memory_bytes``.
_OPTION_OF_FIELD = {
    "command": "COMMAND",
    "args": "COMMAND",
    "env": "--env",
    "cwd": "--cwd",
    "working_dir": "--cwd",
    "limits": "--cpus/--memory/--io-read-bps/--io-write-bps/--pids",
    "limits.cpus": "--cpus",
    "limits.memory_bytes": "--memory",
    "limits.io_read_bps": "--io-read-bps",
    "limits.io_write_bps": "--io-write-bps",
    "limits.pids": "--pids",
    "isolation": "--isolate",
    "user": "--user",
    "grace": "--grace",
    "signal": "SIGNAL",
    "offset": "--offset",
    "id": "ID",
    "states": "--state",
    "owner": "--owner",
}


class _CycloptsError(Exception):
    """Stands for ``cyclopts.CycloptsError`` in the table: cyclopts is imported only when a
    command line goes through it, and until then none of its errors can be raised."""


def _cyclopts(name: str) -> type[BaseException]:
    """``cyclopts.<name>`` if cyclopts is loaded, else a class nothing is an instance of."""
    module = sys.modules.get("cyclopts")
    found = getattr(module, name, None) if module is not None else None
    return found if isinstance(found, type) else _CycloptsError


def option_of(field: str) -> str | None:
    """The option for a request field (``args[2]`` and ``env[K]`` as ``args``, ``env``)."""
    return _OPTION_OF_FIELD.get(field) or _OPTION_OF_FIELD.get(field.split("[", 1)[0])


class Failure:
    """An exit code and the one line that says why."""

    __slots__ = ("code", "message")

    def __init__(self, code: int, message: str) -> None:
        self.code = code
        self.message = message


#: The next step: a fixed text, or made from the exception and the command's name.
_Hint = str | Callable[[BaseException, str], str]


def _help(exc: BaseException, command: str) -> str:
    return f"see `trio-worker {command + ' ' if command else ''}--help`"


def _invalid(exc: BaseException, command: str) -> str:
    field = exc.field if isinstance(exc, InvalidRequest) else "-"
    if not field.startswith("-") and option_of(field) is None:
        return "fix the request and try again"  # the server's verdict on a field
    return _help(exc, command)


def _unexpected(tokens: list[str]) -> str:
    """cyclopts' "Unused Tokens: ['a', 'b']" in words (``trio-worker stop ID1 ID2``)."""
    shown = ", ".join(repr(t if len(t) <= 64 else t[:61] + "...") for t in tokens[:3])
    more = f" (and {len(tokens) - 3} more)" if len(tokens) > 3 else ""
    return f"unexpected argument{'s' if len(tokens) > 1 else ''} {shown}{more}"


def _usage(exc: BaseException, command: str) -> str:
    if isinstance(exc, _cyclopts("UnknownOptionError")) and command in ("run", "start"):
        return (
            f"options go before --, the command after it: trio-worker {command} "
            "[OPTIONS] -- COMMAND [ARG...]"
        )
    return _help(exc, command)


#: What a failed TLS handshake says (our client's own messages) → what is probably wrong.
#: Checked in order; the first phrase found wins.
_TLS_FAILURES = (
    (
        "timed out",
        "something accepted the connection but never answered TLS: is a trio-worker server "
        "listening there, and is it overloaded? (--addr, TRIO_WORKER_ADDR)",
    ),
    (
        # OpenSSL's "Hostname mismatch" / "IP address mismatch": the right CA, another name.
        "mismatch",
        "the server's certificate was not issued for the host in --addr: connect by a name "
        "or address it lists (`trio-worker certs show` on it), or reissue it with that --host",
    ),
    (
        "certificate has expired",
        "the server's certificate has expired: reissue it (trio-worker certs server) and send "
        "the server SIGHUP",
    ),
    (
        "certificate verify failed",
        "the server's certificate is not from --ca: give the CA that issued it (or this is "
        "not the trio-worker server you meant; check --addr)",
    ),
    (
        "alert certificate revoked",
        "the server has revoked --cert: use another client certificate",
    ),
    (
        "our certificate",
        "the server does not trust --cert (not from its CA, expired or revoked: "
        "`trio-worker certs show` on it says its validity): use a valid client certificate "
        "from the server's CA",
    ),
    (
        "does not offer HTTP/2",
        "that is a TLS server, but not a trio-worker server: check --addr",
    ),
)


def _connection(exc: BaseException, command: str) -> str:
    text = str(exc)
    if "does not speak HTTP/2" in text:
        return "that is not a trio-worker server: check --addr"
    if "connections open for this client" in text:
        return (
            "this certificate's other commands hold the server's cap on one client's "
            "connections (serve --max-connections-per-client): wait for them, or raise it"
        )
    if "TLS" in text:
        for phrase, hint in _TLS_FAILURES:
            if phrase in text:
                return hint
        # wrong version number, packet length, an EOF: the other end does not speak TLS.
        return "the other end does not speak TLS, so it is not a trio-worker server: check --addr"
    return "is the server running there? (--addr, TRIO_WORKER_ADDR)"


def _tls_config(exc: BaseException, command: str) -> str:
    if command == "certs show":
        return "check the file's path"
    if command.startswith("certs"):  # they read DIR's files, not the client's options
        return "check --dir (the directory `trio-worker certs init` made) and the name"
    return "check --ca/--cert/--key (or TRIO_WORKER_CA/_CERT/_KEY and the config file)"


def _still_running(exc: BaseException, command: str) -> str:
    job_id = getattr(exc, "job_id", "") or "ID"
    return f"stop it first (`trio-worker stop {job_id}`), or remove it anyway with rm -f"


def _denied(exc: BaseException, command: str) -> str:
    if getattr(exc, "field", "") == "user":  # the certificate's logins, not its role
        return (
            "give --user one of those, or use a certificate that lists the user (`trio-worker "
            "certs client ... --login USER`) or an admin one; `trio-worker certs show FILE` "
            "shows a certificate's logins"
        )
    return (
        "use a certificate whose role allows this (readonly < full < admin); "
        "`trio-worker certs show FILE` shows a certificate's role"
    )


def _not_running(exc: BaseException, command: str) -> str:
    job_id = getattr(exc, "job_id", "") or "ID"
    return f"`trio-worker status {job_id}` shows how it ended"


#: (class, exit code, the next step): most specific first; the first match wins.
TABLE: tuple[tuple[type[BaseException], ExitCode, _Hint], ...] = (
    (ConfigFileError, ExitCode.CONFIG, "fix the file or pass --config with another one"),
    (LocalConfigError, ExitCode.CONFIG, ""),
    (_CycloptsError, ExitCode.USAGE, _usage),
    (InvalidRequest, ExitCode.USAGE, _invalid),
    (TLSConfigError, ExitCode.CONFIG, _tls_config),
    (StateDirError, ExitCode.CONFIG, "check --state-dir and its permissions"),
    (ConnectionFailed, ExitCode.CONNECTION, _connection),
    (PermissionDenied, ExitCode.PERMISSION, _denied),
    (
        AuthenticationFailed,
        ExitCode.PERMISSION,
        "use a client certificate issued by `trio-worker certs client`",
    ),
    (JobNotFound, ExitCode.NOT_FOUND, "`trio-worker list` shows the jobs you may see"),
    (JobNotRunning, ExitCode.NOT_RUNNING, _not_running),
    (JobStillRunning, ExitCode.RUNNING, _still_running),
    (NoStdin, ExitCode.NOT_RUNNING, "start the job with -i (and -t for a terminal)"),
    (
        Unenforceable,
        ExitCode.UNENFORCEABLE,
        "drop that limit or isolation, or run the server where it can be enforced (as root, "
        "with cgroup v2)",
    ),
    (QuotaExceeded, ExitCode.EXHAUSTED, "wait for your jobs to end, or start them less often"),
    (ResourceExhausted, ExitCode.EXHAUSTED, "wait for jobs to end, or raise the server's caps"),
    (ShuttingDown, ExitCode.SHUTTING_DOWN, "try again once the server is back"),
    (RemoteError, ExitCode.SERVER, "see the server's log"),
)


def leaf_exception(exc: BaseException) -> BaseException:
    """The exception that matters inside (nested) exception groups.

    trio wraps errors from concurrent tasks in groups; a person wants the one cause. An
    interrupt wins, then our own errors, then anything else.
    """
    if not isinstance(exc, BaseExceptionGroup):
        return exc
    leaves: list[BaseException] = []

    def walk(group: BaseExceptionGroup[BaseException]) -> None:
        for inner in group.exceptions:
            if isinstance(inner, BaseExceptionGroup):
                walk(inner)
            else:
                leaves.append(inner)

    walk(exc)
    for wanted in (KeyboardInterrupt, BrokenPipeError, TrioWorkerError, _cyclopts("CycloptsError")):
        for leaf in leaves:
            if isinstance(leaf, wanted):
                return leaf
    return leaves[0] if leaves else exc


#: Errors of a write that the disk or device refused (not a bug, not the server's).
_UNWRITABLE = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO, errno.EROFS})


def _errno_name(number: int | None) -> str:
    return errno.errorcode.get(number or 0, "error")


def _one_line(text: str) -> str:
    """One line, its control characters spelled out (a server's message may have any)."""
    from ._render import printable

    return printable(" ".join(text.split()))


def describe(exc: BaseException, *, command: str = "", job_exit: bool = False) -> Failure:
    """The exit code and the one line to print for ``exc``.

    ``command`` names the subcommand for the hints (``see `trio-worker run --help```).
    ``job_exit``: the command exits with a job's code (``run``, ``wait``), so any failure
    of trio-worker itself becomes 125.
    """
    exc = leaf_exception(exc)
    if isinstance(exc, KeyboardInterrupt):
        return Failure(ExitCode.INTERRUPTED, "interrupted")
    if isinstance(exc, BrokenPipeError):
        return Failure(ExitCode.BROKEN_PIPE, "output closed")
    if isinstance(exc, OSError) and exc.errno in _UNWRITABLE:
        where = str(exc.filename) if exc.filename else ""
        return Failure(
            ExitCode.TOOL_FAILED if job_exit else ExitCode.UNWRITABLE,
            f"cannot write {where or 'the output'}: {exc.strerror or _errno_name(exc.errno)}",
        )
    for cls, code, hint in TABLE:
        if isinstance(exc, _cyclopts("CycloptsError") if cls is _CycloptsError else cls):
            next_step = hint(exc, command) if callable(hint) else hint
            message = _one_line(str(exc)).rstrip(".") or type(exc).__name__
            if isinstance(exc, _cyclopts("UnusedCliTokensError")):
                message = _unexpected(getattr(exc, "unused_tokens", None) or [])
            if isinstance(exc, InvalidRequest) and (option := option_of(exc.field)):
                message = _one_line(f"{option}: {exc.message}").rstrip(".")
            if next_step and "; " not in message:  # a message with "; " names its next step
                message = f"{message}; {_one_line(next_step)}"
            return Failure(ExitCode.TOOL_FAILED if job_exit else code, message)
    message = _one_line(f"{type(exc).__name__}: {exc}")
    return Failure(
        ExitCode.TOOL_FAILED if job_exit else ExitCode.BUG,
        f"unexpected error: {message}; this is a bug: rerun with --debug and report it",
    )
