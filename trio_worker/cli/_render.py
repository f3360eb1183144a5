"""How jobs look: JSON for programs, aligned tables for people, and a job's exit code.

The JSON keys are the contract's: ``id``, ``owner``, ``command``, ``args``, ``state``
(lower-case), ``pid``, ``exit_code``, ``signal``, ``error``, ``started_at``, ``ended_at``
(RFC 3339, UTC, or null), ``output_bytes``, ``oom_killed``, ``limits``, ``isolation``;
and ``user``, the Unix user the job runs as.

For people: sizes in binary units (``2.9 MiB``), durations and ages (``3m12s``, ``5m ago``),
every time in one format with its zone (``2026-12-01 15:50:14 UTC``), ``list`` cut to the
terminal's width (80 columns when it is not a terminal; the command is shortened with …),
and states coloured on a terminal unless ``NO_COLOR`` is set.

Jobs are ``JobInfo`` or, from the short commands' blocking client, ``_views.JobView``: the
same attributes (its limits, isolation and usage are the messages, whose fields are the
same too).
"""

from __future__ import annotations

import errno
import os
import shlex
import sys
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime

from .._states import JobState
from ._exit import ExitCode
from ._parse import format_size, signal_name

TYPE_CHECKING = False  # typing is for mypy only: a short command never imports it
if TYPE_CHECKING:
    from typing import Any, TextIO

    from .._model import Isolation, JobInfo, Limits
    from .._views import IsolationView, JobView, LimitsView

    #: What is shown: the library's jobs (``run -i``, ``attach``) and the blocking client's.
    Job = JobInfo | JobView

__all__ = [
    "describe_isolation",
    "describe_limits",
    "describe_state",
    "format_time",
    "human_duration",
    "human_size",
    "job_exit",
    "job_json",
    "print_fields",
    "print_job",
    "print_jobs",
    "print_table",
    "printable",
    "rfc3339",
]


def rfc3339(moment: datetime | None) -> str | None:
    if moment is None:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _limits_json(limits: Limits | LimitsView) -> dict[str, Any]:
    return {
        "cpus": limits.cpus if limits.cpus - limits.cpus == 0 else None,  # NaN, inf: not JSON
        "memory_bytes": limits.memory_bytes,
        "io_read_bps": limits.io_read_bps,
        "io_write_bps": limits.io_write_bps,
        "pids": limits.pids,
    }


def _isolation_json(isolation: Isolation | IsolationView) -> dict[str, bool]:
    return {"pid": isolation.pid, "mount": isolation.mount, "network": isolation.network}


def job_json(job: Job) -> dict[str, Any]:
    return {
        "id": job.id,
        "owner": job.owner,
        "user": job.user,
        "command": job.command,
        "args": list(job.args),
        "state": job.state.value,
        "pid": job.pid or None,
        "exit_code": job.exit_code,
        "signal": job.signal,
        "error": job.error,
        "started_at": rfc3339(job.started_at),
        "ended_at": rfc3339(job.ended_at),
        "output_bytes": job.output_bytes,
        "oom_killed": job.oom_killed,
        "limits": _limits_json(job.limits),
        "isolation": _isolation_json(job.isolation),
    }


def terminal_columns(fallback: int = 80) -> int:
    """``shutil.get_terminal_size().columns`` (COLUMNS, else stdout's terminal, else
    ``fallback``), without importing shutil (and the compressors it brings) for it."""
    try:
        columns = int(os.environ["COLUMNS"])
    except (KeyError, ValueError):
        columns = 0
    if columns > 0:
        return columns
    stdout = sys.__stdout__
    if stdout is None:
        return fallback
    try:
        return os.get_terminal_size(stdout.fileno()).columns or fallback
    except (ValueError, OSError):
        return fallback


_JSON_C1 = {c: f"\\u{c:04x}" for c in range(0x7F, 0xA0)}


def dump_json(value: Any) -> None:
    import json  # for --json only

    # (json escapes C0 controls only: DEL and C1 too, as \u escapes, for a terminal.)
    text = json.dumps(value, indent=2, ensure_ascii=False).translate(_JSON_C1)
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


# --- for people ---------------------------------------------------------------------

#: Control characters (C0, DEL, C1) as ``\xNN``: text from the server (a job's command,
#: arguments, error, owner; another client chose most of it) must not reach a terminal as
#: escape sequences (a title, a cleared screen, the clipboard written by OSC 52).
_VISIBLE = {c: f"\\x{c:02x}" for c in (*range(0x20), *range(0x7F, 0xA0))}


def printable(text: str) -> str:
    """``text`` with its control characters spelled out (``\x1b``), for a terminal."""
    return text.translate(_VISIBLE) if not text.isprintable() else text


def human_size(value: int) -> str:
    """``1536`` → ``1.5 KiB``: three significant figures at most, binary multiples."""
    if value < 1024:
        return f"{value} B"
    size = float(value)
    for unit in ("KiB", "MiB", "GiB", "TiB", "PiB"):
        size /= 1024
        if size < 1024 or unit == "PiB":
            break
    return f"{size:.1f} {unit}" if size < 10 else f"{size:.0f} {unit}"


_INF = float("inf")


def human_duration(seconds: float) -> str:
    """``0.25`` → ``250ms``, ``75`` → ``1m15s``, ``7322`` → ``2h02m``, ``200000`` → ``2d07h``;
    a server's NaN or infinity as itself."""
    if seconds != seconds or seconds in (_INF, -_INF):
        return str(seconds)
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms"
    if seconds < 10:
        return f"{seconds:.1f}s"
    whole = int(seconds)
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    if whole < 86400:
        return f"{whole // 3600}h{whole % 3600 // 60:02d}m"
    return f"{whole // 86400}d{whole % 86400 // 3600:02d}h"


def colours_on(stream: TextIO) -> bool:
    """Colour only for a person at a terminal that can show it (https://no-color.org)."""
    if os.environ.get("NO_COLOR") or os.environ.get("TERM") == "dumb":
        return False
    return stream.isatty()


#: A table cell: its text, and the ANSI SGR code to show it in ("" for none).
Cell = tuple[str, str]


def _paint(text: str, sgr: str, colours: bool) -> str:
    return f"\x1b[{sgr}m{text}\x1b[0m" if colours and sgr else text


def print_fields(rows: Iterable[tuple[str, str | Cell]]) -> None:
    """Label and value pairs, the values aligned (``status``, ``certs show``)."""
    colours = colours_on(sys.stdout)
    cells = [
        (
            label,
            (printable(value[0]), value[1]) if isinstance(value, tuple) else (printable(value), ""),
        )
        for label, value in rows
    ]
    width = max((len(label) for label, _ in cells), default=0)
    sys.stdout.write(
        "".join(
            f"{label:<{width}}  {_paint(text, sgr, colours)}".rstrip() + "\n"
            for label, (text, sgr) in cells
        )
    )
    sys.stdout.flush()


#: What a cut column keeps, with its "…", in the order they give way: the command down to
#: 12, then names (owner, user) down to 5, then the command down to 8. A list of jobs of
#: several owners and users fits 80 columns then, even with ``killed (SIGTERM)`` and a
#: ``1064d ago``.
_FIT_MIN = 12
_SQUEEZE_MIN = 5
_FIT_LEAST = 8


def print_table(
    headers: Sequence[str],
    rows: Iterable[Sequence[str | Cell]],
    *,
    fit: int | None = None,
    squeeze: Sequence[int] = (),
) -> None:
    """Columns aligned with two spaces between them, no padding after the last. ``fit``:
    the column to shorten (with …) so that rows fit the terminal's width; ``squeeze``: the
    columns shortened too, once ``fit`` is down to its least (names, before a line wraps)."""
    colours = colours_on(sys.stdout)
    table: list[list[Cell]] = [
        [
            (printable(cell[0]), cell[1]) if isinstance(cell, tuple) else (printable(cell), "")
            for cell in row
        ]
        for row in rows
    ]
    widths = [max([len(h)] + [len(row[i][0]) for row in table]) for i, h in enumerate(headers)]
    if fit is not None:
        spare = terminal_columns() - sum(widths) - 2 * (len(widths) - 1)  # < 0: too wide
        steps = [(fit, _FIT_MIN), *((i, _SQUEEZE_MIN) for i in squeeze), (fit, _FIT_LEAST)]
        for i, least in steps:
            cut = min(max(-spare, 0), max(widths[i] - max(least, len(headers[i])), 0))
            widths[i] -= cut
            spare += cut
            for row in table:
                text, sgr = row[i]
                if len(text) > widths[i]:
                    row[i] = (text[: widths[i] - 1] + "…", sgr)
    lines = []
    for row in [[(h, "1") for h in headers], *table]:
        cells = [
            _paint(text, sgr, colours) + " " * (width - len(text))
            for (text, sgr), width in zip(row, widths, strict=True)
        ]
        lines.append("  ".join(cells).rstrip() + "\n")
    sys.stdout.write("".join(lines))
    sys.stdout.flush()


def describe_state(job: Job) -> str:
    match job.state:
        case JobState.EXITED:
            return f"exited ({job.exit_code})"
        case JobState.KILLED:
            name = signal_name(job.signal) if job.signal is not None else "?"
            return f"killed ({name}{', out of memory' if job.oom_killed else ''})"
        case _:
            return str(job.state.value)


def state_cell(job: Job) -> Cell:
    """The state in words and its colour: cyan running, green success, red failure,
    yellow stopped by a signal, magenta lost."""
    text = describe_state(job)
    match job.state:
        case JobState.RUNNING:
            return text, "36"
        case JobState.EXITED:
            return text, "32" if job.exit_code == 0 else "31"
        case JobState.KILLED:
            return text, "31" if job.oom_killed else "33"
        case JobState.FAILED:
            return text, "31"
        case _:
            return text, "35"


def format_time(moment: datetime | None) -> str:
    """``2026-12-01 15:50:14 UTC``: local time, with its zone; the one format for people."""
    if moment is None:
        return "-"
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    try:
        moment = moment.astimezone()
    except OverflowError:  # a server's year 1 or 9999, past the local zone's range
        moment = moment.astimezone(UTC)
    return moment.strftime("%Y-%m-%d %H:%M:%S %Z")


def age(moment: datetime, now: datetime | None = None) -> str:
    """``5s ago``, ``3m ago``, ``2h ago``, ``4d ago``: one unit, for a column."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    seconds = max(0, int(((now or datetime.now(UTC)) - moment).total_seconds()))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit} ago"
    return f"{seconds}s ago"


def describe_limits(limits: Limits | LimitsView) -> str:
    parts = []
    if limits.cpus:
        parts.append(f"cpus {limits.cpus:g}")
    if limits.memory_bytes:
        parts.append(f"memory {format_size(limits.memory_bytes)}")
    if limits.io_read_bps:
        parts.append(f"io-read {format_size(limits.io_read_bps)}/s")
    if limits.io_write_bps:
        parts.append(f"io-write {format_size(limits.io_write_bps)}/s")
    if limits.pids:
        parts.append(f"pids {limits.pids}")
    return ", ".join(parts) or "none"


def describe_isolation(isolation: Isolation | IsolationView) -> str:
    names = [n for n in ("pid", "mount", "network") if getattr(isolation, n)]
    return ",".join(names) or "none"


def _command_line(job: Job) -> str:
    return shlex.join([job.command, *job.args])


def _usage(job: Job) -> tuple[str, str]:
    """(CPU, peak memory) in words, or "-" where the host measured nothing."""
    usage = job.usage
    if usage is None:
        return "-", "-"
    cpu = human_duration(usage.cpu_seconds) if usage.cpu_seconds else "0s"
    peak = human_size(usage.memory_peak_bytes) if usage.memory_peak_bytes else "-"
    return cpu, peak


def print_job(job: Job) -> None:
    """``status``: one job, a field per line."""
    now = datetime.now(UTC)
    started = f"{format_time(job.started_at)} ({age(job.started_at, now)})"
    if job.ended_at is not None and job.state == JobState.LOST:
        # Its end is not known: the time is when a restarted server found it gone.
        ended = f"{format_time(job.ended_at)} (found lost at the server's restart; it ended before)"
    elif job.ended_at is not None:
        ran = human_duration((job.ended_at - job.started_at).total_seconds())
        ended = f"{format_time(job.ended_at)} (ran {ran})"
    else:
        ended = "-"
    output = human_size(job.output_bytes)
    if job.output_start:
        output += f" (the first {human_size(job.output_start)} no longer kept)"
    cpu, peak = _usage(job)
    rows: list[tuple[str, str | Cell]] = [
        ("ID", job.id),
        ("Command", _command_line(job)),
        ("State", state_cell(job)),
        ("User", job.user or "-"),
        ("Owner", job.owner or "-"),
        ("PID", str(job.pid) if job.pid else "-"),
        ("Started", started),
        ("Ended", ended),
        ("Output", output),
        ("CPU", cpu),
        ("Peak memory", peak),
        ("Limits", describe_limits(job.limits)),
        ("Isolation", describe_isolation(job.isolation)),
    ]
    if job.error:
        rows.append(("Error", job.error))
    print_fields(rows)


def print_jobs(jobs: Sequence[Job]) -> None:
    """``list``: one job per row, newest first, fitted to the terminal's width; OWNER only
    when the jobs have more than one, USER (who it runs as) likewise (``status`` and
    ``--json`` always say)."""
    now = datetime.now(UTC)
    owners = len({job.owner for job in jobs}) > 1
    users = len({job.user for job in jobs}) > 1
    headers = [
        "ID",
        *(["OWNER"] if owners else []),
        *(["USER"] if users else []),
        "STATE",
        "STARTED",
        "COMMAND",
    ]
    rows: list[list[str | Cell]] = [
        [
            job.id,
            *([job.owner or "-"] if owners else []),
            *([job.user or "-"] if users else []),
            state_cell(job),
            age(job.started_at, now),
            _command_line(job),
        ]
        for job in jobs
    ]
    names = range(1, 1 + owners + users)  # OWNER, USER: cut before the line is too wide
    print_table(headers, rows, fit=len(headers) - 1, squeeze=names)


# --- the exit code of run and wait --------------------------------------------------


def job_exit(job: Job) -> tuple[int, str | None]:
    """``_job_exit``, its line ``printable`` (the id and error are the server's text)."""
    code, note = _job_exit(job)
    return code, None if note is None else printable(" ".join(note.split()))


def _job_exit(job: Job) -> tuple[int, str | None]:
    """The exit code ``run``/``wait`` report for an ended job, and a line for stderr, if any.

    As a shell does: the job's own code, 128+N if signal N killed it, 127 if the command
    was not found, 126 if it could not be executed; 125 if trio-worker cannot tell.
    """
    match job.state:
        case JobState.EXITED:
            return (job.exit_code if job.exit_code is not None else ExitCode.TOOL_FAILED), None
        case JobState.KILLED:
            number = job.signal or 0
            note = f"job {job.id} was killed by {signal_name(number)}"
            if job.oom_killed:
                return 128 + number, f"{note}: it ran out of memory (--memory)"
            return 128 + number, None
        case JobState.FAILED:
            code = (
                ExitCode.NOT_FOUND_COMMAND
                if job.spawn_errno == errno.ENOENT
                else ExitCode.CANNOT_EXECUTE
            )
            return code, f"job {job.id} could not be started: {job.error}"
        case JobState.LOST:
            why = f": {job.error}" if job.error else ""
            return ExitCode.TOOL_FAILED, f"job {job.id} was lost (the server went away){why}"
        case _:
            return ExitCode.TOOL_FAILED, f"job {job.id} is still {job.state.value}"
