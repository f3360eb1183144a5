"""Identity and role from a client certificate, including hostile role values."""

from __future__ import annotations

import datetime as dt

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from hypothesis import given, settings
from hypothesis import strategies as st

from trio_worker import AuthenticationFailed
from trio_worker._identity import (
    ROLE_OID,
    Identity,
    Role,
    decode_role,
    encode_role,
    identity_from_der,
)

KEY = ec.generate_private_key(ec.SECP256R1())
NOW = dt.datetime.now(dt.UTC)

# DER is canonical: these three byte strings are the only valid role values.
VALID = {
    b"\x0c\x08readonly": Role.READONLY,
    b"\x0c\x04full": Role.FULL,
    b"\x0c\x05admin": Role.ADMIN,
}


def make_cert(
    common_names: tuple[str, ...] = ("alice",),
    role_values: tuple[bytes, ...] = (),
    *,
    critical: bool = False,
) -> bytes:
    """A self-signed certificate's DER with the given CNs and role extension values."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn) for cn in common_names])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(KEY.public_key())
        .serial_number(1)
        .not_valid_before(NOW)
        .not_valid_after(NOW + dt.timedelta(days=1))
    )
    for value in role_values:
        ext = x509.UnrecognizedExtension(x509.ObjectIdentifier(ROLE_OID), value)
        builder = builder.add_extension(ext, critical=critical)
    return builder.sign(KEY, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


def test_encode_role_is_der_utf8string() -> None:
    assert {encode_role(role): role for role in Role} == VALID


@pytest.mark.parametrize("role", list(Role))
def test_each_role_round_trips(role: Role) -> None:
    assert identity_from_der(make_cert(role_values=(encode_role(role),))) == Identity("alice", role)


def test_no_role_extension_gives_no_role() -> None:
    assert identity_from_der(make_cert()) == Identity("alice", None)


def test_critical_role_extension_is_still_read() -> None:
    der = make_cert(role_values=(encode_role(Role.ADMIN),), critical=True)
    assert identity_from_der(der).role is Role.ADMIN


def _oid_der(dotted: str) -> bytes:
    first, second, *rest = (int(arc) for arc in dotted.split("."))
    out = b""
    for arc in [first * 40 + second, *rest]:
        chunk = [arc & 0x7F]
        while arc := arc >> 7:
            chunk.append(0x80 | (arc & 0x7F))
        out += bytes(reversed(chunk))
    return out


def test_two_role_extensions_give_no_role() -> None:
    # cryptography will not build duplicate extensions: build a look-alike OID of the same
    # length, then rename it (the signature breaks, which identity_from_der does not check).
    twin = ROLE_OID[:-1] + "5"
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "alice")])
    der = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(KEY.public_key())
        .serial_number(1)
        .not_valid_before(NOW)
        .not_valid_after(NOW + dt.timedelta(days=1))
        .add_extension(
            x509.UnrecognizedExtension(x509.ObjectIdentifier(ROLE_OID), encode_role(Role.ADMIN)),
            critical=False,
        )
        .add_extension(
            x509.UnrecognizedExtension(x509.ObjectIdentifier(twin), encode_role(Role.READONLY)),
            critical=False,
        )
        .sign(KEY, hashes.SHA256())
        .public_bytes(serialization.Encoding.DER)
    )
    assert len(_oid_der(twin)) == len(_oid_der(ROLE_OID))
    assert der.count(_oid_der(twin)) == 1
    duplicated = der.replace(_oid_der(twin), _oid_der(ROLE_OID))
    assert identity_from_der(der).role is Role.ADMIN
    assert identity_from_der(duplicated) == Identity("alice", None)


@pytest.mark.parametrize(
    "value",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"\x0c\x04root", id="unknown-role"),
        pytest.param(b"\x0c\x05ADMIN", id="wrong-case"),
        pytest.param(b"\x13\x05admin", id="printable-string"),
        pytest.param(b"\x16\x05admin", id="ia5-string"),
        pytest.param(b"\x04\x07\x0c\x05admin", id="wrapped-in-octet-string"),
        pytest.param(b"admin", id="raw-bytes"),
        pytest.param(b"\x0c\x05admin\x00", id="trailing-byte"),
        pytest.param(b"\x0c\x06admin", id="length-too-long"),
        pytest.param(b"\x0c\x04admin", id="length-too-short"),
        pytest.param(b"\x0c\x81\x05admin", id="non-minimal-long-form"),
        pytest.param(b"\x0c\x80admin\x00\x00", id="indefinite-length"),
        pytest.param(b"\x0c", id="no-length"),
        pytest.param(b"\x0c\x05adm\xff\xfe", id="invalid-utf8"),
        pytest.param(b"\x0c\x06admin\x00", id="nul-inside"),
        pytest.param(b"\x0c\x84\xff\xff\xff\xff", id="huge-length"),
    ],
)
def test_malformed_or_unknown_role_gives_no_role(value: bytes) -> None:
    assert decode_role(value) is None
    assert identity_from_der(make_cert(role_values=(value,))) == Identity("alice", None)


def test_long_form_length_is_decoded() -> None:
    # Valid DER for a 128-byte string (long form needed): decodes, but is no known role.
    assert decode_role(b"\x0c\x81\x80" + b"a" * 128) is None


@settings(database=None, max_examples=500)
@given(st.binary(max_size=40))
def test_any_bytes_decode_to_a_role_only_when_valid(value: bytes) -> None:
    assert decode_role(value) is VALID.get(value)


_near_valid = st.one_of(
    st.binary(max_size=24),
    st.sampled_from(sorted(VALID)),
    st.tuples(st.sampled_from(sorted(VALID)), st.binary(max_size=3)).map(lambda t: t[0] + t[1]),
    st.tuples(st.sampled_from(sorted(VALID)), st.integers(0, 12)).map(lambda t: t[0][: t[1]]),
    st.tuples(st.binary(max_size=2), st.sampled_from(sorted(VALID))).map(lambda t: t[0] + t[1]),
)


@settings(database=None, max_examples=100, deadline=None)
@given(_near_valid)
def test_any_extension_value_in_a_certificate_never_crashes(value: bytes) -> None:
    assert identity_from_der(make_cert(role_values=(value,))) == Identity("alice", VALID.get(value))


@pytest.mark.parametrize(
    "common_names", [pytest.param((), id="no-cn"), pytest.param(("a", "b"), id="two-cns")]
)
def test_certificate_without_exactly_one_cn_is_refused(common_names: tuple[str, ...]) -> None:
    with pytest.raises(AuthenticationFailed, match="CN"):
        identity_from_der(make_cert(common_names))


def test_garbage_is_refused() -> None:
    with pytest.raises(AuthenticationFailed):
        identity_from_der(b"\x30\x03\x02\x01\x00")
