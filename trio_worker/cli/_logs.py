"""Logging for a command: ``trio-worker:``-prefixed lines for clients, timestamped ones for
the server, audit records as the JSON lines they are; never h2's or hpack's frame logs."""

from __future__ import annotations

import contextlib
import logging
import sys
import time

__all__ = ["setup_logging"]


class _AuditFormatter(logging.Formatter):
    """Audit records are JSON lines already; everything else gets a time and a level."""

    def __init__(self, server: bool) -> None:
        fmt = (
            "%(asctime)s %(levelname)s %(name)s: %(message)s"
            if server
            else "trio-worker: %(message)s"
        )
        super().__init__(fmt)

    def format(self, record: logging.LogRecord) -> str:
        if record.name == "trio_worker.audit":
            return record.getMessage()
        return super().format(record)

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        """``2026-12-01 15:50:14.703 UTC``: the one time format of the CLI, with its zone."""
        moment = time.localtime(record.created)
        millis = int(record.msecs)
        return time.strftime(f"%Y-%m-%d %H:%M:%S.{millis:03d} %Z", moment)


def setup_logging(command: str, debug: bool) -> None:
    server = command == "serve"
    handler: logging.Handler = logging.StreamHandler(sys.stderr)
    if server:
        # The loop must never wait for stderr: lines queued while it serves (_logsink).
        from ._logsink import LogSink  # (trio: only serve's)

        with contextlib.suppress(AttributeError, OSError, ValueError):  # (a test's capture)
            handler = LogSink(sys.stderr.fileno())
    handler.setFormatter(_AuditFormatter(server))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if debug else logging.INFO if server else logging.WARNING)
    # The HTTP/2 libraries log every frame and header at DEBUG: --debug is for our records.
    for name in ("purerpc", "hpack", "h2"):
        logging.getLogger(name).setLevel(logging.WARNING)
