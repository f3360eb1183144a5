"""sd_notify without libsystemd: one datagram to ``$NOTIFY_SOCKET``.

With ``Type=notify`` systemd waits for READY=1 before starting what depends on
the server, and shows STATUS= in ``systemctl status``. Outside systemd the
variable is unset and every call is a no-op.
"""

from __future__ import annotations

import os
import socket

__all__ = ["notify"]


def notify(*fields: str) -> bool:
    """Send ``READY=1``-style fields; True if a notify socket took them."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]  # abstract namespace
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto("\n".join(fields).encode(), address)
    except OSError:
        return False
    return True
