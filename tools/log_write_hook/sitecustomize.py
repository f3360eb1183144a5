"""A measuring hook, not a design: the log's data writes skipped, for benchmarks.

Put this folder first on a server's ``PYTHONPATH`` (a ``bench_peer.py --server`` wrapper) and
set ``TRIO_WORKER_BENCH_LOG_WRITES=skip``: no data written; the file grown sparse to the log's
end instead (lagging readers read zeros, which is right only for output of zeros, such as the
benches' ``head -c N /dev/zero``): an upper bound of what the log's write costs.

(Its ``direct`` mode, the whole pages written with ``O_DIRECT``, is now the log's own way with
``DirectBuffers``.) Replaces ``OutputLog._write_data`` (internal). ARCHITECTURE.md, "Bulk TLS
writes in a worker thread, and the log's write" and "The log written with O_DIRECT".
"""

from __future__ import annotations

import os
from typing import Any

_MODE = os.environ.get("TRIO_WORKER_BENCH_LOG_WRITES", "")


def _install() -> None:
    from trio_worker._jobs import _output

    log_class: Any = _output.OutputLog

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

    if _MODE == "skip":
        log_class._write_data = skip


if _MODE:
    _install()
