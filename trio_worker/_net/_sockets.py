"""Socket options both ends set."""

from __future__ import annotations

import socket
from contextlib import suppress
from typing import Any

__all__ = ["set_keepalive"]


def set_keepalive(sock: Any) -> None:
    """TCP keepalive: the kernel notices a peer that vanished without a FIN within about
    two minutes (60 s idle, then 6 probes 10 s apart)."""
    with suppress(OSError):  # the socket may already be dead
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        if hasattr(socket, "TCP_KEEPIDLE"):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 60)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 10)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 6)
