"""Which client certificates are revoked: a CRL, read and checked once.

OpenSSL checks the CRL at every handshake (see ``_tls.server_context``); this is the same
list as data, for what OpenSSL cannot do: find the connections already open with a
certificate revoked since (they are closed on reload), and a handshake that began just
before a reload.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPublicKeyTypes

from ._tls import TLSConfigError

__all__ = ["Revocations", "load_crl"]


@dataclass(frozen=True, slots=True)
class Revocations:
    """The serial numbers a CA has revoked (a CRL covers one issuer)."""

    issuer: x509.Name
    serials: frozenset[int]

    def revokes(self, cert_der: bytes) -> bool:
        """Whether the certificate ``cert_der`` is revoked (an unreadable one is not ours to
        judge: the handshake has verified it already)."""
        try:
            cert = x509.load_der_x509_certificate(cert_der)
        except ValueError:
            return False
        return cert.issuer == self.issuer and cert.serial_number in self.serials


def _signed_by(crl: x509.CertificateRevocationList, ca: x509.Certificate) -> bool:
    if ca.subject != crl.issuer:
        return False
    key: CertificateIssuerPublicKeyTypes = ca.public_key()  # type: ignore[assignment]
    try:
        return crl.is_signature_valid(key)
    except (TypeError, ValueError):  # a key type that cannot sign
        return False


def load_crl(path: Path, ca_certs: Sequence[x509.Certificate]) -> Revocations:
    """Read the PEM CRL at ``path`` and check it: signed by one of ``ca_certs`` and not past
    its next update (OpenSSL would then refuse every client). Raises
    :class:`TLSConfigError` naming the file and the fault."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise TLSConfigError(f"cannot read CRL {path}: {exc.strerror or exc}") from exc
    try:
        crl = x509.load_pem_x509_crl(data)
    except ValueError as exc:
        raise TLSConfigError(f"CRL {path} holds no valid PEM CRL") from exc
    if not any(_signed_by(crl, ca) for ca in ca_certs):
        raise TLSConfigError(f"CRL {path} is not signed by the CA")
    next_update = crl.next_update_utc
    if next_update is not None and next_update < dt.datetime.now(dt.UTC):
        raise TLSConfigError(f"CRL {path} expired at {next_update.isoformat()}")
    return Revocations(crl.issuer, frozenset(entry.serial_number for entry in crl))
