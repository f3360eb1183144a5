"""Why dialing or a connection failed, in words: both client drivers (trio's in ``_channel``,
the blocking one in ``_blocking``) say it the same way, and the CLI's hints key on these
phrases (``cli/_errors``); the server's connections (``_connection``) name the client
instead."""

from __future__ import annotations

import errno
import re
import socket
import ssl

from .._errors import ConnectionFailed, InvalidRequest
from ._sockets import split_host_port

__all__ = [
    "Refused",
    "handshake_failed",
    "left_alert",
    "not_h2",
    "os_reason",
    "parse_addr",
    "strip_openssl",
    "tls_reason",
]


class Refused(ConnectionFailed):
    """The TLS handshake got a definite no: the server sent an alert (it refused our
    certificate: unknown CA, revoked...), its certificate is not one our CA vouches for, or
    it offers no HTTP/2. Dialing again would get the same answer, so a command that
    reconnects after a lost connection stops at this one; an EOF, a reset or silence in
    a handshake is a plain ConnectionFailed, worth another try."""


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


def handshake_failed(
    addr: str, cause: BaseException | None, *, ours_sent: bool = False
) -> ConnectionFailed:
    """The error for a TLS handshake with ``addr`` that failed of ``cause`` (None: the server
    closed the connection): :class:`Refused` for an alert or a certificate we cannot verify,
    else a plain ConnectionFailed.

    ``ours_sent``: our side of the handshake is done, so a TLS 1.3 server's verdict on our
    certificate is all that could still come; its close can overtake its alert, so a close
    says what it most likely meant (without being taken for the refusal itself).
    """
    reason = "the server closed the connection"
    if cause is not None:
        reason = tls_reason(cause, handshake=True)
    if ours_sent and "our certificate" not in reason:
        reason += " (did it refuse our certificate?)"
    refused = isinstance(cause, ssl.SSLCertVerificationError) or (
        isinstance(cause, ssl.SSLError) and "alert" in (cause.reason or "").lower()
    )
    return (Refused if refused else ConnectionFailed)(f"TLS handshake with {addr} failed: {reason}")


def left_alert(sock: ssl.SSLSocket) -> ssl.SSLError | None:
    """The alert a TLS peer sent before it closed, if ``sock`` still holds it unread.

    A TLS 1.3 server checks our certificate once our side of the handshake is done; if it
    refuses it, it sends its alert and closes, and our first write can meet that close
    before we have read the alert (two tries in five, on a loaded machine here). The alert
    is still there to be read, and says why.
    """
    try:
        sock.recv(1)
    except ssl.SSLWantReadError:  # (non-blocking, and nothing came)
        return None
    except ssl.SSLError as exc:
        return exc
    except OSError:
        return None
    return None


def not_h2(addr: str) -> Refused:
    """A TLS server that did not choose ALPN h2: not ours, and it will not change its mind."""
    return Refused(
        f"TLS handshake with {addr} failed: the server does not offer HTTP/2 "
        "(ALPN h2); is it a trio-worker server?"
    )


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
