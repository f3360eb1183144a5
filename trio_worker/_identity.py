"""Who a client is, read from its (already verified) certificate.

The name is the subject CN; the role travels in a private, non-critical X.509 extension
whose value is a DER UTF8String. A certificate whose role is missing, unknown or
malformed still completes the handshake and yields ``role=None``: the caller learns
PERMISSION_DENIED from the RPC rather than an opaque TLS failure.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from cryptography import x509
from cryptography.x509.oid import NameOID

from ._errors import AuthenticationFailed

__all__ = [
    "ROLE_OID",
    "Identity",
    "Role",
    "decode_role",
    "encode_role",
    "identity_from_der",
    "role_of",
]

#: OID of the role extension (a UUID-derived OID under 2.25, so no registration needed).
ROLE_OID = "2.25.268815121869035125761907593043051543014"

_UTF8STRING_TAG = 0x0C


class Role(enum.Enum):
    """What a client may do; see ``_authz`` for the table."""

    READONLY = "readonly"
    FULL = "full"
    ADMIN = "admin"


@dataclass(frozen=True)
class Identity:
    """An authenticated caller: the certificate's CN and its role, if it has a usable one."""

    name: str
    role: Role | None


def encode_role(role: Role) -> bytes:
    """The extension value for ``role``: a DER UTF8String (short form, the values are short)."""
    content = role.value.encode("utf-8")
    return bytes([_UTF8STRING_TAG, len(content)]) + content


def _decode_der_length(data: bytes, at: int) -> tuple[int, int] | None:
    """Return (length, offset of the content) of the DER length at ``data[at:]``, or None
    if it is missing or not in DER's one minimal form."""
    if at >= len(data):
        return None
    first = data[at]
    if first < 0x80:
        return first, at + 1
    count = first & 0x7F
    if count == 0 or count > 4 or at + 1 + count > len(data):  # 0x80 is BER's indefinite
        return None
    length_bytes = data[at + 1 : at + 1 + count]
    length = int.from_bytes(length_bytes, "big")
    if length_bytes[0] == 0 or length < 0x80:  # not minimal
        return None
    return length, at + 1 + count


def decode_role(value: bytes) -> Role | None:
    """Decode the extension value; anything but the DER UTF8String of a known role is None."""
    if not value or value[0] != _UTF8STRING_TAG:
        return None
    decoded = _decode_der_length(value, 1)
    if decoded is None:
        return None
    length, start = decoded
    if start + length != len(value):  # short, or trailing bytes
        return None
    try:
        text = value[start:].decode("utf-8")
    except UnicodeDecodeError:
        return None
    try:
        return Role(text)
    except ValueError:
        return None


def role_of(cert: x509.Certificate) -> Role | None:
    """The role carried by ``cert``, or None if it has no valid one."""
    try:
        ext = cert.extensions.get_extension_for_oid(x509.ObjectIdentifier(ROLE_OID))
    except (x509.ExtensionNotFound, x509.DuplicateExtension):  # two roles are no role
        return None
    except ValueError:  # some other extension is malformed: fail closed
        return None
    if not isinstance(ext.value, x509.UnrecognizedExtension):
        return None
    return decode_role(ext.value.value)


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
    return Identity(name=names[0].value, role=role_of(cert))
