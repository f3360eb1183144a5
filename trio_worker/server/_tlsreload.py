"""The server's TLS material (CA, certificate, key, CRL) and its reload on SIGHUP.

A reload builds everything anew off the event loop and swaps it in only when all of it
loaded: a bad file leaves the server on what it had, and says why in one log line. Jobs,
calls and other connections go on; connections whose certificate the new CRL revokes are
closed, and new handshakes use the new CA and CRL.
"""

from __future__ import annotations

import datetime as dt
import logging
import signal
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import trio
from cryptography import x509
from cryptography.exceptions import InvalidSignature

from .._net._transport import Server
from .._revocation import Revocations, load_crl
from .._tls import TLSConfigError, server_context

__all__ = ["TLSMaterial", "load_tls", "reload_on_sighup"]

_log = logging.getLogger("trio_worker.server")


@dataclass(frozen=True, slots=True)
class _Refusal:
    """Whether a client certificate is no longer served: not issued by one of the CA
    certificates, or revoked by the CRL."""

    ca_certs: tuple[x509.Certificate, ...]
    revocations: Revocations | None

    def __call__(self, cert_der: bytes) -> bool:
        try:
            cert = x509.load_der_x509_certificate(cert_der)
        except ValueError:
            return True
        if not any(_issued_by(cert, ca) for ca in self.ca_certs):
            return True
        return self.revocations is not None and self.revocations.revokes(cert_der)


def _issued_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


@dataclass(frozen=True, slots=True)
class TLSMaterial:
    """A server context; which client certificates it no longer serves (for the
    connections opened before it); whether a CRL is in force."""

    context: ssl.SSLContext
    refused: Callable[[bytes], bool]
    has_crl: bool


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
    try:
        ca_certs = tuple(x509.load_pem_x509_certificates(Path(ca).read_bytes()))
    except (OSError, ValueError) as exc:  # just read by server_context: changed since
        raise TLSConfigError(f"cannot read CA certificate {ca}: {exc}") from exc
    revocations = load_crl(crl, ca_certs) if crl is not None else None
    _warn_if_not_valid_now(cert)
    return TLSMaterial(context, _Refusal(ca_certs, revocations), crl is not None)


def _warn_if_not_valid_now(cert: Path) -> None:
    """Served all the same (a SIGHUP can replace it), but said: no client accepts it."""
    try:
        leaf = x509.load_pem_x509_certificates(Path(cert).read_bytes())[0]
    except (OSError, ValueError, IndexError):
        return  # just loaded by server_context; a race with its replacement
    now = dt.datetime.now(dt.UTC)
    if now > leaf.not_valid_after_utc:
        when = f"expired on {leaf.not_valid_after_utc:%Y-%m-%d %H:%M} UTC"
    elif now < leaf.not_valid_before_utc:
        when = f"is not valid before {leaf.not_valid_before_utc:%Y-%m-%d %H:%M} UTC"
    else:
        return
    _log.warning(
        "the server certificate %s %s: every client refuses it; reissue it "
        "(trio-worker certs server) and send SIGHUP",
        cert,
        when,
    )


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
                material = await trio.to_thread.run_sync(load, not current.has_crl)
            except TLSConfigError as exc:
                _log.error("SIGHUP: reload failed, keeping the previous TLS material: %s", exc)
                continue
            current = material
            closed = server.use_tls(material.context, refused=material.refused)
            _log.info(
                "SIGHUP: reloaded the CA, certificate, key%s; closed %d connection(s) of "
                "certificates no longer accepted",
                " and CRL" if material.has_crl else "",
                closed,
            )
