"""A measuring hook, not a design: how the log's data writes are done, for benchmarks.

Put this folder first on a server's ``PYTHONPATH`` (a ``bench_peer.py --server`` wrapper) and
set ``TRIO_WORKER_BENCH_LOG_WRITES``:

- ``skip``: no data written; the file grown sparse to the log's end instead (lagging readers
  read zeros, which is right only for output of zeros, such as the benches' ``head -c N
  /dev/zero``): an upper bound of what the log's write costs;
- ``direct``: the whole 4 KiB blocks written with ``O_DIRECT`` from a reused aligned buffer
  (the flush's parts joined, then copied in), the partial blocks at either end buffered as
  the log does (so no block is written both ways); readers unchanged.

Replaces ``OutputLog._write_data`` (internal); a failure drops the rest of the flush, as the
log does. ARCHITECTURE.md, "Bulk TLS writes in a worker thread, and the log's write".
"""

from __future__ import annotations

import mmap
import os
import threading
from typing import Any

_MODE = os.environ.get("TRIO_WORKER_BENCH_LOG_WRITES", "")
_BLOCK = 4096
_CHUNK = 4 * 1024 * 1024


def _install() -> None:
    from trio_worker._jobs import _output

    log_class: Any = _output.OutputLog
    write_data = log_class._write_data
    buffers = threading.local()
    direct_fds: dict[str, int] = {}

    def skip(log: Any, job: Any) -> int:
        size = sum(len(part) for part in job.parts)
        end = job.offset + size
        try:
            if os.fstat(log._data_fd).st_size < end:
                os.ftruncate(log._data_fd, end)
        except OSError as exc:
            job.error = exc
            return 0
        return size

    def direct(log: Any, job: Any) -> int:
        start = job.offset
        data = memoryview(b"".join(job.parts))
        end = start + len(data)
        first = -(-start // _BLOCK) * _BLOCK
        last = end // _BLOCK * _BLOCK
        if last - first < 64 * 1024:
            return int(write_data(log, job))
        done = 0
        try:
            key = str(log.data_path)
            fd = direct_fds.get(key)
            if fd is None:
                flags = os.O_WRONLY | os.O_DIRECT | os.O_CLOEXEC
                fd = direct_fds[key] = os.open(log.data_path, flags)
            if first > start:
                os.pwrite(log._data_fd, data[: first - start], start)
                done = first - start
            buffer = getattr(buffers, "buffer", None)
            if buffer is None:
                buffer = buffers.buffer = mmap.mmap(-1, _CHUNK)
            at = first
            while at < last:
                n = min(_CHUNK, last - at)
                buffer[:n] = data[at - start : at - start + n]
                if os.pwrite(fd, memoryview(buffer)[:n], at) != n:
                    raise OSError("short direct write")
                at += n
                done = at - start
            if end > last:
                os.pwrite(log._data_fd, data[last - start :], last)
                done = end - start
        except OSError as exc:
            job.error = exc
        return done

    if _MODE == "skip":
        log_class._write_data = skip
    elif _MODE == "direct":
        log_class._write_data = direct


if _MODE:
    _install()
