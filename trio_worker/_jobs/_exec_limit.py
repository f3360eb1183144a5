"""How big a command line may be: the kernel's exec limit, counted as the kernel counts.

A request over it could never run (``execve`` fails with E2BIG), yet it would be
kept as a FAILED job, arguments included, in the job database and in every
List. So it is refused at the edge, before anything is stored.

What ``execve`` counts (``fs/exec.c``): every argument and environment string
with its NUL, one pointer per string (at least one argument), and the path of
the file it runs. The total may not exceed a quarter of the stack limit,
capped at three quarters of 8 MiB and never below 128 KiB (``getconf ARG_MAX``
says the same, without the cap); one string may not exceed 32 pages.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

from .._errors import InvalidRequest
from .._host._spawn import Environment

__all__ = ["MAX_RECORDED_ARGS", "check_exec_size", "exec_limit", "exec_size"]

_POINTER = 8
#: ``_STK_LIM / 4 * 3``: the kernel's cap whatever the stack limit.
_KERNEL_CAP = 6 * 1024 * 1024
#: ``ARG_MAX`` of the kernel headers: the floor, whatever the stack limit.
_KERNEL_FLOOR = 128 * 1024
#: Room for what exec adds to the request: the path it resolved the command
#: to (up to PATH_MAX) and the namespace helper's own arguments.
_RESERVE = 8 * 1024
#: A job's command and arguments are kept in its record and sent in List
#: pages of at most 4 MiB: one job must fit a page whatever the stack limit.
MAX_RECORDED_ARGS = 3 * 1024 * 1024


def exec_limit() -> int:
    """Bytes ``execve`` accepts for arguments, environment and file name here."""
    try:
        limit = os.sysconf("SC_ARG_MAX")
    except (ValueError, OSError):
        limit = _KERNEL_FLOOR
    if limit <= 0:
        limit = _KERNEL_FLOOR
    return max(min(limit, _KERNEL_CAP), _KERNEL_FLOOR)


def _max_string() -> int:
    """``MAX_ARG_STRLEN``: 32 pages, the NUL included."""
    try:
        return 32 * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return 32 * 4096


def _size(text: str) -> int:
    """``len(os.fsencode(text))``; an ASCII string (``isascii`` is a flag CPython keeps)
    is its own length, without encoding it: a Start counts the server's whole environment."""
    return len(text) if text.isascii() else len(os.fsencode(text))


def _args(argv: Sequence[str]) -> list[int]:
    return [_size(a) + 1 for a in argv]


def _env_strings(env: Mapping[str, str]) -> tuple[int, int, int]:
    """(how many, their bytes, the longest) of ``env``'s ``key=value`` strings with
    their NULs. An ``Environment`` has them from its strings, encoded once."""
    if isinstance(env, Environment):
        return env.exec_strings()
    sizes = [
        len(k) + len(v) + 2 if k.isascii() and v.isascii() else _size(k) + _size(v) + 2
        for k, v in env.items()
    ]
    return len(sizes), sum(sizes), max(sizes, default=0)


def exec_size(argv: Sequence[str], env: Mapping[str, str]) -> int:
    """What ``execve(argv[0], argv, env)`` counts against ``exec_limit()``."""
    count, size, _ = _env_strings(env)
    return _total(_args(argv), count, size)


def _total(args: list[int], env_count: int, env_size: int) -> int:
    return sum(args) + env_size + _POINTER * (max(len(args), 1) + env_count) + _RESERVE


def check_exec_size(argv: Sequence[str], env: Mapping[str, str]) -> None:
    """``InvalidRequest`` if ``argv`` with ``env`` (the job's whole environment) cannot run.

    The message gives sizes only: it never echoes the (large) input.
    """
    args = _args(argv)
    env_count, env_size, env_longest = _env_strings(env)
    longest = _max_string()
    for i, size in enumerate(args):
        if size > longest:
            field = "command" if i == 0 else f"args[{i - 1}]"
            raise InvalidRequest(
                field, f"is {size - 1} bytes long; the kernel runs no argument over {longest - 1}"
            )
    if env_longest > longest:
        raise InvalidRequest(
            "env", f"a variable is over {longest - 1} bytes long, which the kernel does not run"
        )
    total = _total(args, env_count, env_size)
    limit = exec_limit()
    if total > limit:
        field = "args" if sum(args) >= env_size else "env"
        raise InvalidRequest(
            field,
            f"command, arguments and environment take {total} bytes; this host runs at most"
            f" {limit} (its exec limit, ARG_MAX)",
        )
    recorded = sum(args)
    if recorded > MAX_RECORDED_ARGS:
        raise InvalidRequest(
            "args",
            f"command and arguments take {recorded} bytes; a job's are kept with its record,"
            f" at most {MAX_RECORDED_ARGS}",
        )
