"""What both ends share about sockets: the address syntax, the options they set, the
size of a read."""

from __future__ import annotations

import socket
from contextlib import suppress

TYPE_CHECKING = False  # typing is for mypy only: a short command never imports it
if TYPE_CHECKING:
    from typing import Any, Final

__all__ = ["RECEIVE_SIZE", "WRITE_TIMEOUT", "set_keepalive", "split_host_port"]

#: Asked of each TLS read, by every driver. OpenSSL returns at most one record (16 KiB of
#: plaintext) per read, but Python allocates the whole size asked for first: 256 KiB
#: (mmap'd, then trimmed) made decrypting four times slower than asking for a record.
RECEIVE_SIZE: Final = 16 * 1024
#: Output the socket has not taken this long after it first had to wait: the peer is gone
#: (both ends, both client drivers).
WRITE_TIMEOUT: Final = 60.0


def split_host_port(value: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[V6]:PORT`` → (host, port), port 0..65535; ValueError in words.

    The one parser for ``--listen``, ``--addr`` and ``connect()``.
    """
    host, sep, port_text = value.rpartition(":")
    if not sep or not host:
        raise ValueError(f"expected HOST:PORT, got {value!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"write IPv6 addresses in brackets, like [::1]:50051, not {value!r}")
    if not port_text.isdigit():
        raise ValueError(f"port must be a number, got {port_text!r}")
    port = int(port_text)
    if not 0 <= port <= 65535:
        raise ValueError(f"port must be within 0..65535, got {port}")
    return host, port


def set_keepalive(sock: Any) -> None:
    """TCP keepalive: the kernel notices a peer that vanished without a FIN within about
    two minutes (60 s idle, then 6 probes 10 s apart)."""
    with suppress(OSError):  # the socket may already be dead
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        if hasattr(socket, "TCP_KEEPIDLE"):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 60)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 10)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 6)
