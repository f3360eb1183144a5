"""How jobs look: JSON for programs, aligned tables for people, and a job's exit code.

The JSON keys are the contract's: ``id``, ``owner``, ``command``, ``args``, ``state``
(lower-case), ``pid``, ``exit_code``, ``signal``, ``error``, ``started_at``, ``ended_at``
(RFC 3339, UTC, or null), ``output_bytes``, ``oom_killed``, ``limits``, ``isolation``.
"""

from __future__ import annotations

import errno
import json
import shlex
import sys
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any

from .._model import Isolation, JobInfo, JobState, Limits
from ._errors import ExitCode
from ._parse import format_size, signal_name

__all__ = [
    "describe_isolation",
    "describe_limits",
    "describe_state",
    "human_duration",
    "human_size",
    "job_exit",
    "job_json",
    "print_fields",
    "print_job",
    "print_jobs",
    "print_table",
    "rfc3339",
]


def rfc3339(moment: datetime | None) -> str | None:
    if moment is None:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _limits_json(limits: Limits) -> dict[str, Any]:
    return {
        "cpus": limits.cpus,
        "memory_bytes": limits.memory_bytes,
        "io_read_bps": limits.io_read_bps,
        "io_write_bps": limits.io_write_bps,
        "pids": limits.pids,
    }


def _isolation_json(isolation: Isolation) -> dict[str, bool]:
    return {"pid": isolation.pid, "mount": isolation.mount, "network": isolation.network}


def job_json(job: JobInfo) -> dict[str, Any]:
    return {
        "id": job.id,
        "owner": job.owner,
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


def dump_json(value: Any) -> None:
    sys.stdout.write(json.dumps(value, indent=2, ensure_ascii=False) + "\n")
    sys.stdout.flush()


# --- for people ---------------------------------------------------------------------


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


def human_duration(seconds: float) -> str:
    """``0.25`` → ``0.25s``, ``75`` → ``1m15s``, ``7322`` → ``2h02m``, ``200000`` → ``2d07h``."""
    if seconds < 10:
        return f"{seconds:.2g}s" if seconds < 1 else f"{seconds:.1f}s"
    whole = int(seconds)
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    if whole < 86400:
        return f"{whole // 3600}h{whole % 3600 // 60:02d}m"
    return f"{whole // 86400}d{whole % 86400 // 3600:02d}h"


def print_fields(rows: Iterable[tuple[str, str]]) -> None:
    """Label and value pairs, the values aligned (``status``, ``certs show``)."""
    rows = list(rows)
    width = max((len(label) for label, _ in rows), default=0)
    sys.stdout.write("".join(f"{label:<{width}}  {value}".rstrip() + "\n" for label, value in rows))
    sys.stdout.flush()


def print_table(headers: Sequence[str], rows: Iterable[Sequence[str]]) -> None:
    """Columns aligned with two spaces between them, no padding after the last."""
    rows = [list(row) for row in rows]
    widths = [max([len(h)] + [len(row[i]) for row in rows]) for i, h in enumerate(headers)]
    lines = []
    for row in [list(headers), *rows]:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=True)]
        lines.append("  ".join(cells).rstrip() + "\n")
    sys.stdout.write("".join(lines))
    sys.stdout.flush()


def describe_state(job: JobInfo) -> str:
    match job.state:
        case JobState.EXITED:
            return f"exited ({job.exit_code})"
        case JobState.KILLED:
            name = signal_name(job.signal) if job.signal is not None else "?"
            return f"killed ({name}{', out of memory' if job.oom_killed else ''})"
        case _:
            return str(job.state.value)


def describe_limits(limits: Limits) -> str:
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


def describe_isolation(isolation: Isolation) -> str:
    names = [n for n in ("pid", "mount", "network") if getattr(isolation, n)]
    return ",".join(names) or "none"


def _when(moment: datetime | None) -> str:
    if moment is None:
        return "-"
    return moment.astimezone().strftime("%Y-%m-%d %H:%M:%S")


def _command_line(job: JobInfo) -> str:
    return shlex.join([job.command, *job.args])


def print_job(job: JobInfo) -> None:
    """``status``: one job, a field per line."""
    rows = [
        ("ID", job.id),
        ("Owner", job.owner or "-"),
        ("Command", _command_line(job)),
        ("State", describe_state(job)),
        ("PID", str(job.pid) if job.pid else "-"),
        ("Started", _when(job.started_at)),
        ("Ended", _when(job.ended_at)),
        ("Output", f"{job.output_bytes} bytes"),
        ("Limits", describe_limits(job.limits)),
        ("Isolation", describe_isolation(job.isolation)),
    ]
    if job.error:
        rows.append(("Error", job.error))
    print_fields(rows)


def print_jobs(jobs: Iterable[JobInfo]) -> None:
    """``list``: one job per row, columns aligned."""
    print_table(
        ("ID", "OWNER", "STATE", "PID", "STARTED", "COMMAND"),
        (
            (
                job.id,
                job.owner or "-",
                describe_state(job),
                str(job.pid) if job.pid else "-",
                _when(job.started_at),
                _command_line(job),
            )
            for job in jobs
        ),
    )


# --- the exit code of run and wait --------------------------------------------------


def job_exit(job: JobInfo) -> tuple[int, str | None]:
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
