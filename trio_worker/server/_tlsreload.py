"""The server's TLS material (CA, certificate, key, CRL) and its reload on SIGHUP.

A reload builds everything anew off the event loop and swaps it in only when all of it
loaded: a bad file leaves the server on what it had, and says why in one log line. Jobs,
calls and other connections go on; connections whose certificate the new CRL revokes are
closed, and new handshakes use the new CA and CRL.
"""

from __future__ import annotations

import logging
import signal
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import trio
from cryptography import x509

from .._net._transport import Server
from .._revocation import load_crl
from .._tls import TLSConfigError, server_context

__all__ = ["TLSMaterial", "load_tls", "reload_on_sighup"]

_log = logging.getLogger("trio_worker.server")


@dataclass(frozen=True, slots=True)
class TLSMaterial:
    """A server context, and which client certificates its CRL revokes (None: no CRL)."""

    context: ssl.SSLContext
    revoked: Callable[[bytes], bool] | None


def load_tls(
    *, ca: Path, cert: Path, key: Path, crl: Path | None, crl_may_be_missing: bool = False
) -> TLSMaterial:
    """Read and check every file; raises :class:`TLSConfigError` naming the bad one.

    With ``crl_may_be_missing``, a CRL file that does not exist (yet: ``certs revoke``
    makes it on first use) means none is revoked. Once a CRL was in use, a reload never
    takes its disappearance for that.
    """
    if crl is not None and crl_may_be_missing and not crl.exists():
        crl = None
    context = server_context(ca=ca, cert=cert, key=key, crl=crl)
    if crl is None:
        return TLSMaterial(context, None)
    try:
        ca_certs = x509.load_pem_x509_certificates(Path(ca).read_bytes())
    except (OSError, ValueError) as exc:  # just read by server_context: changed since
        raise TLSConfigError(f"cannot read CA certificate {ca}: {exc}") from exc
    return TLSMaterial(context, load_crl(crl, ca_certs).revokes)


async def reload_on_sighup(
    server: Server,
    load: Callable[[bool], TLSMaterial],
    current: TLSMaterial,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """On each SIGHUP, ``load`` the material again and hand it to ``server``.
    ``load``'s argument: whether the CRL file may be missing (only while it always was)."""
    with trio.open_signal_receiver(signal.SIGHUP) as hangups:
        task_status.started()
        async for _ in hangups:
            try:
                material = await trio.to_thread.run_sync(load, current.revoked is None)
            except TLSConfigError as exc:
                _log.error("SIGHUP: reload failed, keeping the previous TLS material: %s", exc)
                continue
            current = material
            closed = server.use_tls(material.context, revoked=material.revoked)
            _log.info(
                "SIGHUP: reloaded the CA, certificate, key%s; closed %d connection(s) of "
                "revoked certificates",
                "" if material.revoked is None else " and CRL",
                closed,
            )
