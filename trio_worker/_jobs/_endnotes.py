"""Jobs' ends noted on disk before anyone is told of them, until their records commit.

Stop and Wait answer as soon as a job has ended; its record reaches the store with the
committer's next transaction (``_records``: up to ``END_COMMIT_AFTER`` later, in a
worker thread). A server killed in between restarted with those jobs LOST, though a
client had been told how they ended (94 of 200 in one test). Waiting for the commit
before answering would cost each Stop and Wait a thread round trip and a transaction.

So each end is also written into a slot of a small file mapped into memory (``ends``
in the state directory): a copy of 128 bytes, no system call, nothing the loop waits
for. The kernel keeps a mapped file's pages when the process dies, and writes them out
in its own time. A slot is freed once its end's record is committed. At the next start
``restore`` reads the slots, and a job the store still has as RUNNING that has a slot
ended as the slot says, not LOST.

Like the store's commits (``synchronous=NORMAL``), the notes survive the server's death,
not the machine's. An end that finds every slot taken (more than ``SLOTS`` ends waiting
for one commit) is not noted: it has the window it always had. A slot holds a checksum,
so a slot half written when the process died is ignored.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import struct
import zlib
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

from .._model import JobInfo, JobState, Usage

__all__ = ["SLOTS", "EndNote", "EndNotes", "read_end_notes"]

#: How many ends may wait for their commit with a note each.
SLOTS = 1024
#: checksum, id, state, has usage, oom killed, exit code (-1: none), signal (0: none),
#: ended at (us since the epoch), cpu seconds, peak memory, output bytes, output start,
#: dropped bytes.
_SLOT = struct.Struct("<I32sBBBxiiqdQQQQ")
_SIZE = 128
_STATES = {JobState.EXITED: 1, JobState.KILLED: 2}
_STATE_OF = {code: state for state, code in _STATES.items()}
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


@dataclass(frozen=True, slots=True)
class EndNote:
    """A job's end as noted: what its end record would have said."""

    state: JobState
    exit_code: int | None
    signal: int | None
    ended_at: datetime
    usage: Usage | None
    oom_killed: bool
    output_bytes: int
    output_start: int
    dropped_bytes: int

    def ended(self, info: JobInfo) -> JobInfo:
        """``info`` (the job's RUNNING record) as it ended."""
        return replace(
            info,
            state=self.state,
            exit_code=self.exit_code,
            signal=self.signal,
            ended_at=self.ended_at,
            usage=self.usage,
            oom_killed=self.oom_killed,
            output_bytes=self.output_bytes,
            output_start=self.output_start,
        )


def _pack(info: JobInfo, dropped_bytes: int) -> bytes | None:
    state = _STATES.get(info.state)
    job_id = info.id.encode()
    if state is None or info.ended_at is None or len(job_id) > 32:
        return None
    usage = info.usage
    body = _SLOT.pack(
        0,
        job_id,
        state,
        usage is not None,
        info.oom_killed,
        -1 if info.exit_code is None else info.exit_code,
        info.signal or 0,
        (info.ended_at - _EPOCH) // _MICROSECOND,
        0.0 if usage is None else usage.cpu_seconds,
        0 if usage is None else usage.memory_peak_bytes,
        info.output_bytes,
        info.output_start,
        dropped_bytes,
    )
    return struct.pack("<I", zlib.crc32(body[4:])) + body[4:]


def _unpack(slot: bytes) -> tuple[str, EndNote] | None:
    (crc, job_id, state, has_usage, oom, code, signal, at, cpu, peak, out, start, dropped) = (
        _SLOT.unpack_from(slot)
    )
    if crc == 0 or crc != zlib.crc32(slot[4 : _SLOT.size]) or state not in _STATE_OF:
        return None
    note = EndNote(
        state=_STATE_OF[state],
        exit_code=None if code == -1 else code,
        signal=signal or None,
        ended_at=_EPOCH + at * _MICROSECOND,
        usage=Usage(cpu_seconds=cpu, memory_peak_bytes=peak) if has_usage else None,
        oom_killed=bool(oom),
        output_bytes=out,
        output_start=start,
        dropped_bytes=dropped,
    )
    return job_id.rstrip(b"\0").decode(), note


def read_end_notes(path: Path) -> dict[str, EndNote]:
    """The ends noted in ``path`` by an earlier run (blocking: a worker thread's)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return {}
    notes: dict[str, EndNote] = {}
    for at in range(0, len(data) - _SIZE + 1, _SIZE):
        found = _unpack(data[at : at + _SIZE])
        if found is not None:
            notes[found[0]] = found[1]
    return notes


class EndNotes:
    """The slots of ``ends``, mapped: ``note`` on the loop, ``release`` once committed."""

    __slots__ = ("_free", "_map", "_slot_of")

    def __init__(self, mapped: mmap.mmap) -> None:
        self._map = mapped
        self._free = list(range(SLOTS - 1, -1, -1))
        self._slot_of: dict[str, int] = {}

    @classmethod
    def create(cls, path: Path) -> EndNotes:
        """An empty notes file at ``path`` (blocking: call once the ends it held are
        committed). ``OSError`` if its blocks cannot be allocated."""
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, 0)  # the earlier run's notes
            os.ftruncate(fd, SLOTS * _SIZE)
            # Blocks allocated now: a page's first write on the loop then finds its
            # block (a page fault, not an allocation in the file system's journal).
            # And none to be had (a disk all but full) is an OSError here: a first
            # write into a page with no block would be a SIGBUS, which ends the server.
            os.posix_fallocate(fd, 0, SLOTS * _SIZE)
            return cls(mmap.mmap(fd, SLOTS * _SIZE))
        finally:
            os.close(fd)  # the mapping keeps the file

    def note(self, info: JobInfo, dropped_bytes: int) -> None:
        """Note an EXITED or KILLED job's end (others, or with no slot free: nothing)."""
        if info.id in self._slot_of or not self._free:
            return
        slot = _pack(info, dropped_bytes)
        if slot is None:
            return
        index = self._free.pop()
        self._map[index * _SIZE : index * _SIZE + len(slot)] = slot
        self._slot_of[info.id] = index

    def release(self, job_id: str) -> None:
        """The job's end record is committed: its slot is free again."""
        index = self._slot_of.pop(job_id, None)
        if index is not None:
            self._map[index * _SIZE : index * _SIZE + 4] = b"\0\0\0\0"
            self._free.append(index)

    def __len__(self) -> int:
        return len(self._slot_of)

    def close(self) -> None:
        with contextlib.suppress(BufferError):
            self._map.close()
