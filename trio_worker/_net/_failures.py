"""Why dialing or a connection failed, in words: both client drivers (trio's in ``_channel``,
the blocking one in ``_blocking``) say it the same way, and the CLI's hints key on these
phrases (``cli/_errors``); the server's connections (``_connection``) name the client
instead."""

from __future__ import annotations

import errno
import re
import socket
import ssl

from .._errors import InvalidRequest
from ._sockets import split_host_port

__all__ = ["os_reason", "parse_addr", "strip_openssl", "tls_reason"]


def parse_addr(addr: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[V6]:PORT`` → (host, port), as ``InvalidRequest`` naming ``addr``."""
    try:
        host, port = split_host_port(addr)
    except ValueError as exc:
        raise InvalidRequest("addr", str(exc)) from None
    if port == 0:
        raise InvalidRequest("addr", "port 0 is for listening; give the server's port")
    return host, port


def strip_openssl(text: str) -> str:
    """'[SSL: X] what happened (_ssl.c:123)' → 'what happened'."""
    text = re.sub(r"^\[[^\]]*\]\s*", "", text)
    return re.sub(r"\s*\(_ssl\.c:\d+\)$", "", text).strip()


def os_reason(exc: BaseException, peer: str = "the server") -> str:
    """A lower-case one-phrase reason for an OSError (or a group of them); ``peer`` names
    the other end."""
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve the host name ({exc.strerror or exc})"
    if isinstance(exc, BaseExceptionGroup):
        # One per address tried (IPv6 and IPv4 for localhost): usually all the same.
        return ", ".join(dict.fromkeys(os_reason(e, peer) for e in exc.exceptions))
    if isinstance(exc, ConnectionRefusedError) or getattr(exc, "errno", None) == errno.ECONNREFUSED:
        return "connection refused"
    if isinstance(exc, ConnectionResetError):
        return f"connection reset by {peer}"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror[0].lower() + exc.strerror[1:]
    return str(exc) or type(exc).__name__


def tls_reason(
    cause: BaseException | None, *, handshake: bool = False, peer: str = "the server"
) -> str:
    """Why the TLS layer failed, from the SSLError (or OSError) underneath.

    During the handshake an alert from the server means it refused our certificate (ours
    is the only thing it still checks once our side of a TLS 1.3 handshake is done).
    """
    if isinstance(cause, ssl.SSLCertVerificationError):
        return f"certificate verify failed: {cause.verify_message}"
    if isinstance(cause, ssl.SSLEOFError | ssl.SSLZeroReturnError):
        return f"{peer} closed the connection"
    if isinstance(cause, ssl.SSLError):
        text = strip_openssl(str(cause.args[1] if len(cause.args) > 1 else cause))
        if handshake and "alert" in (cause.reason or "").lower():
            return f"the server refused our certificate ({text})"
        return text
    if cause is not None:
        return os_reason(cause, peer)
    return "the connection broke"
