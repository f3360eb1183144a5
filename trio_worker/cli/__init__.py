"""The ``trio-worker`` command line.

``main`` answers ``--help`` from the command table (``_commands``), reads the short client
commands' usual command lines itself (``_argv``) and leaves the rest to the cyclopts app
(``_app``; commands in ``_serve``, ``_jobs``, ``_remove``, ``_certs``, ``_interactive``),
sets up logging, and turns every error into one line on stderr and the exit code of its
class (``_errors``). ``--debug`` anywhere before ``--`` adds tracebacks and debug logs.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
from collections.abc import Callable, Sequence

from ._commands import ALIASES, NAMES, overview, unknown_command
from ._exit import ExitCode

TYPE_CHECKING = False  # typing is for mypy only: a short command never imports it
if TYPE_CHECKING:
    from typing import Any, NoReturn

    from ._app import app as app

__all__ = ["app", "main"]

#: Commands whose exit code is the job's; their own failures are 125.
_JOB_EXIT_COMMANDS = frozenset({"run", "wait", "attach"})
#: The options that may come before a command (or stand alone).
_TOP_OPTIONS = frozenset({"--help", "-h", "--version"})


def _split_debug(tokens: list[str]) -> tuple[list[str], bool]:
    """Remove ``--debug`` from the options (never from after ``--``)."""
    try:
        end = tokens.index("--")
    except ValueError:
        end = len(tokens)
    head = [t for t in tokens[:end] if t != "--debug"]
    return head + tokens[end:], len(head) != end


def _stdout_gone(*, fast: bool = False) -> NoReturn:
    # The reader went away (`trio-worker logs ID | head`): leave quietly, as cat does, and
    # keep Python from complaining when it flushes stdout on exit.
    _drop_stdout()
    if fast:
        os._exit(ExitCode.BROKEN_PIPE)
    sys.exit(ExitCode.BROKEN_PIPE)


def _open_closed_std_streams() -> None:
    """A command started with stdout or stderr closed (``trio-worker stop ID >&-``) still
    does its work and leaves without a traceback: what it prints goes to /dev/null, as
    ``print`` does when Python has no stdout. The fd is taken, so no socket or file of
    ours lands on fd 1 or 2 and receives the output meant for the user."""
    for fd, name in ((1, "stdout"), (2, "stderr")):
        if getattr(sys, name) is not None:
            continue
        try:
            os.fstat(fd)
            continue  # (open after all: not ours to write to)
        except OSError:
            pass
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            if devnull != fd:
                os.dup2(devnull, fd)
                os.close(devnull)
            setattr(sys, name, open(fd, "w", closefd=False))  # noqa: SIM115 (it is sys.stdout)
        except OSError:
            continue


def __getattr__(name: str) -> Any:
    if name == "app":  # cyclopts is imported when a command runs, not with this package
        from ._app import app

        return app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """The console script: run one command and exit with its code."""
    _open_closed_std_streams()
    tokens, debug = _split_debug(list(sys.argv[1:] if argv is None else argv))
    debug = debug or os.environ.get("TRIO_WORKER_DEBUG", "") not in ("", "0")
    command = next((t for t in tokens if not t.startswith("-")), "")
    if tokens and tokens[0].startswith("-") and tokens[0] not in _TOP_OPTIONS:
        # An option before any command (``trio-worker --addr H:P list``, as ``docker -H``):
        # cyclopts would take its value for the command, or fail rendering its error.
        _usage_error(_before_the_command(tokens))
    if command in ALIASES:  # (``ps``): the command's own name, for everything below
        tokens[tokens.index(command)] = command = ALIASES[command]
    if not command and all(t in ("--help", "-h") for t in tokens):
        try:
            sys.stdout.write(overview())  # also for no arguments at all
            sys.stdout.flush()
        except BaseException as exc:
            _fail(exc, command="", debug=debug, fast=False)
        sys.exit(ExitCode.OK)
    if command and command not in NAMES:
        print(
            f"trio-worker: error: {unknown_command(command)}; see `trio-worker --help`",
            file=sys.stderr,
        )
        sys.exit(ExitCode.USAGE)

    from . import _lazy

    if argv is None:
        _lazy.pause_collector()  # until the connection is up (``_session.open_client``)
    from . import _argv  # not for the overview: it reads the connection settings

    short = None
    if command in _argv.COMMANDS:
        _lazy.defer()  # what protobuf imports and a short command never runs
        short = _argv.parse_short(tokens)
    if short is not None:
        function, args, keywords = short
        run: Callable[[], object] = functools.partial(function, *args, **keywords)
    else:
        _lazy.resume_collector(freeze=False)  # serve, certs, help: as Python runs them
        from ._app import app, resolve_command

        if command and command != "certs":
            resolve_command(command)
        elif command:
            rest = tokens[tokens.index("certs") + 1 :]
            sub = next((t for t in rest if not t.startswith("-")), "")
            command = f"certs {sub}" if sub in app["certs"] else command
        run = functools.partial(app, tokens)
    from ._logs import setup_logging

    setup_logging(command, debug)
    # A short command in its own process leaves without the interpreter's teardown.
    fast = argv is None and short is not None

    try:
        result = run()
        # What is still buffered is part of the command's work: failing to write it is
        # the command's failure (a full disk must not exit 0).
        sys.stdout.flush()
    except SystemExit:
        raise
    except BaseException as exc:
        _fail(exc, command=command, debug=debug, fast=fast)
    _leave(int(result) if isinstance(result, int) else ExitCode.OK, fast=fast)


def _before_the_command(tokens: list[str]) -> str:
    """The line for an option that comes before the command (or with none after it)."""
    option = tokens[0].partition("=")[0]
    named = next((t for t in tokens if t in NAMES or t in ALIASES), "")
    if not named:
        return f"unknown option {option!r}; see `trio-worker --help`"
    return (
        f"{option} comes before the command; options go after it: trio-worker {named} {option} ..."
    )


def _usage_error(message: str) -> NoReturn:
    print(f"trio-worker: error: {message}", file=sys.stderr)
    sys.exit(ExitCode.USAGE)


def _fail(exc: BaseException, *, command: str, debug: bool, fast: bool) -> NoReturn:
    """One line on stderr for ``exc``, then its exit code."""
    from ._errors import describe

    if debug:
        import traceback

        traceback.print_exception(exc)
    failure = describe(exc, command=command, job_exit=command in _JOB_EXIT_COMMANDS)
    if failure.code == ExitCode.BROKEN_PIPE:
        _stdout_gone(fast=fast)
    if failure.code == ExitCode.UNWRITABLE:
        _drop_stdout()  # what stdout still buffers cannot be written either
    if failure.code != ExitCode.INTERRUPTED:
        with contextlib.suppress(OSError, ValueError):
            print(f"trio-worker: error: {failure.message}", file=sys.stderr, flush=True)
    _leave(failure.code, fast=fast)


def _drop_stdout() -> None:
    """Point fd 1 at /dev/null and let what stdout buffers go there: its reader is gone
    or its disk is full, and flushing at exit must neither fail again nor hide the one
    line that says why."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        sys.stdout.flush()


def _leave(code: int, *, fast: bool) -> NoReturn:
    """Exit with ``code``. With ``fast`` (a short command, run as its own process) skip the
    interpreter's teardown: it frees every module one by one (protobuf, h2, ...), ~20 ms,
    longer than some whole commands. Nothing is lost: stdout and stderr were flushed
    (a failure to is the command's failure, see ``main``), these commands keep no file
    open, and the kernel frees the rest."""
    if not fast:
        sys.exit(code)
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        os._exit(ExitCode.BROKEN_PIPE)
    except (OSError, ValueError):
        pass
    with contextlib.suppress(OSError, ValueError):
        sys.stderr.flush()
    os._exit(code)
