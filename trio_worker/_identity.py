"""Who a client is, read from its (already verified) certificate.

The name is the subject CN. The role and the logins travel as subjectAltName URIs,
``trio-worker:role:ROLE`` (exactly one) and ``trio-worker:login:NAME`` (any number, in
order), so that every X.509 stack can load the certificate (an earlier private extension
under a 128-bit OID arc was rejected by Go, Botan and RustCrypto). A certificate whose role
is missing, unknown or given twice still completes the handshake and yields ``role=None``:
the caller learns PERMISSION_DENIED from the RPC rather than an opaque TLS failure.
"""

from __future__ import annotations

import enum
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final

from cryptography import x509
from cryptography.x509.oid import NameOID

from ._errors import AuthenticationFailed

__all__ = [
    "IDENTITY_CACHE_ENTRIES",
    "IDENTITY_CACHE_MAX_DER",
    "LOGIN_URI_PREFIX",
    "ROLE_URI_PREFIX",
    "Identity",
    "IdentityCache",
    "Role",
    "identity_from_der",
    "login_uri",
    "logins_of",
    "role_of",
    "role_uri",
    "san_uris",
]

ROLE_URI_PREFIX = "trio-worker:role:"
LOGIN_URI_PREFIX = "trio-worker:login:"


class Role(enum.Enum):
    """What a client may do; see ``_authz`` for the table."""

    READONLY = "readonly"
    FULL = "full"
    ADMIN = "admin"


@dataclass(frozen=True)
class Identity:
    """An authenticated caller: the certificate's CN, its role if it has a usable one, and
    the Unix logins it lists (in the certificate's order)."""

    name: str
    role: Role | None
    logins: tuple[str, ...] = ()


def role_uri(role: Role) -> str:
    return ROLE_URI_PREFIX + role.value


def login_uri(login: str) -> str:
    return LOGIN_URI_PREFIX + login


def san_uris(cert: x509.Certificate) -> list[str] | None:
    """The certificate's subjectAltName URIs in order; [] without a SAN; None when the SAN
    (or any extension) cannot be read, or there are two SAN extensions: fail closed."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    except (x509.DuplicateExtension, ValueError):
        return None
    return list(san.get_values_for_type(x509.UniformResourceIdentifier))


def _role_in(uris: Sequence[str]) -> Role | None:
    values = [uri[len(ROLE_URI_PREFIX) :] for uri in uris if uri.startswith(ROLE_URI_PREFIX)]
    if len(values) != 1:  # none, or two (even two equal ones) are no role
        return None
    try:
        return Role(values[0])
    except ValueError:
        return None


def _logins_in(uris: Sequence[str]) -> tuple[str, ...]:
    logins = (uri[len(LOGIN_URI_PREFIX) :] for uri in uris if uri.startswith(LOGIN_URI_PREFIX))
    return tuple(dict.fromkeys(login for login in logins if login))


def role_of(cert: x509.Certificate) -> Role | None:
    """The role carried by ``cert``, or None if it has no valid one."""
    uris = san_uris(cert)
    return None if uris is None else _role_in(uris)


def logins_of(cert: x509.Certificate) -> tuple[str, ...]:
    """The logins ``cert`` lists, in order, without empty values or repeats."""
    uris = san_uris(cert)
    return () if uris is None else _logins_in(uris)


def identity_from_der(cert_der: bytes) -> Identity:
    """Identity of the peer certificate ``cert_der`` (as from ``getpeercert(binary_form=True)``).

    Raises :class:`AuthenticationFailed` when there is no usable name: unparsable
    certificate, or not exactly one non-empty subject CN. A missing or bad role is not an
    error here (``role=None``); authorization refuses it.
    """
    try:
        cert = x509.load_der_x509_certificate(cert_der)
        names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    except ValueError as exc:
        raise AuthenticationFailed("the client certificate cannot be parsed") from exc
    if len(names) != 1 or not isinstance(names[0].value, str) or not names[0].value:
        raise AuthenticationFailed("the client certificate needs exactly one subject CN")
    uris = san_uris(cert)
    if uris is None:
        return Identity(name=names[0].value, role=None)
    return Identity(name=names[0].value, role=_role_in(uris), logins=_logins_in(uris))


#: Distinct client certificates whose identity a server keeps parsed (least recently used
#: dropped first), and the largest certificate kept (DER bytes; a larger one is parsed at
#: each connection): at most 64 x 8 KiB of keys held.
IDENTITY_CACHE_ENTRIES: Final = 64
IDENTITY_CACHE_MAX_DER: Final = 8 * 1024


class IdentityCache:
    """``identity_from_der`` remembered per certificate, keyed by its DER bytes.

    A CLI command opens one connection per run, always with the same certificate; parsing
    it with ``cryptography`` was ~0.25 ms of the server's CPU per connection. An identity is
    a function of the certificate's bytes alone, so a remembered one is the one a parse
    would give. Whether the certificate is still accepted (chain, expiry, CRL) is OpenSSL's
    check at every handshake, before the identity is read; the server still empties the
    cache when its TLS material is reloaded. Failures are not remembered.
    """

    def __init__(
        self,
        parse: Callable[[bytes], Identity] = identity_from_der,
        *,
        entries: int = IDENTITY_CACHE_ENTRIES,
        max_der: int = IDENTITY_CACHE_MAX_DER,
    ) -> None:
        self._parse = parse
        self._entries = entries
        self._max_der = max_der
        self._known: OrderedDict[bytes, Identity] = OrderedDict()

    def __len__(self) -> int:
        return len(self._known)

    def __call__(self, cert_der: bytes) -> Identity:
        known = self._known.get(cert_der)
        if known is not None:
            self._known.move_to_end(cert_der)
            return known
        identity = self._parse(cert_der)  # raises for an unusable certificate
        if len(cert_der) <= self._max_der and self._entries > 0:
            self._known[cert_der] = identity
            if len(self._known) > self._entries:
                self._known.popitem(last=False)
        return identity

    def clear(self) -> None:
        """Forget every certificate (the TLS material changed)."""
        self._known.clear()
