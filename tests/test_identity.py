"""Identity, role and logins from a client certificate's subjectAltName URIs, including
hostile values."""

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
    IDENTITY_CACHE_ENTRIES,
    IDENTITY_CACHE_MAX_DER,
    Identity,
    IdentityCache,
    Role,
    identity_from_der,
)

KEY = ec.generate_private_key(ec.SECP256R1())
NOW = dt.datetime.now(dt.UTC)


def make_cert(
    common_names: tuple[str, ...] = ("alice",),
    uris: tuple[str, ...] | None = (),
    *,
    extra_names: tuple[x509.GeneralName, ...] = (),
    critical: bool = False,
) -> bytes:
    """A self-signed certificate's DER with the given CNs and SAN URIs (no SAN if None)."""
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
    if uris is not None:
        general: list[x509.GeneralName] = [*extra_names]
        general += [x509.UniformResourceIdentifier(u) for u in uris]
        builder = builder.add_extension(x509.SubjectAlternativeName(general), critical=critical)
    return builder.sign(KEY, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


@pytest.mark.parametrize("role", list(Role))
def test_each_role_round_trips(role: Role) -> None:
    der = make_cert(uris=(f"trio-worker:role:{role.value}",))
    assert identity_from_der(der) == Identity("alice", role)


def test_logins_are_read_in_order() -> None:
    der = make_cert(
        uris=(
            "trio-worker:login:zed",
            "https://example.com/x",
            "trio-worker:role:full",
            "trio-worker:login:alice",
            "trio-worker:login:1001",
        ),
        extra_names=(x509.DNSName("alice.example.com"),),
    )
    assert identity_from_der(der) == Identity("alice", Role.FULL, ("zed", "alice", "1001"))


def test_empty_and_repeated_logins_are_dropped() -> None:
    uris = ("trio-worker:role:full", "trio-worker:login:", "trio-worker:login:b") * 2
    assert identity_from_der(make_cert(uris=uris)).logins == ("b",)


def test_logins_without_a_role_are_kept_but_give_no_role() -> None:
    der = make_cert(uris=("trio-worker:login:alice",))
    assert identity_from_der(der) == Identity("alice", None, ("alice",))


@pytest.mark.parametrize(
    "uris",
    [
        pytest.param(None, id="no-san"),
        pytest.param((), id="no-uri"),
        pytest.param(("trio-worker:role:root",), id="unknown-role"),
        pytest.param(("trio-worker:role:ADMIN",), id="wrong-case"),
        pytest.param(("trio-worker:role:",), id="empty-role"),
        pytest.param(("trio-worker:role:admin ",), id="trailing-space"),
        pytest.param(("trio-worker:role:admin/",), id="trailing-slash"),
        pytest.param(("TRIO-WORKER:role:admin",), id="upper-case-scheme"),
        pytest.param(("trio-worker:roles:admin",), id="other-key"),
        pytest.param(("urn:trio-worker:role:admin",), id="urn"),
        pytest.param(("trio-worker:role:admin", "trio-worker:role:admin"), id="same-twice"),
        pytest.param(("trio-worker:role:admin", "trio-worker:role:readonly"), id="two-roles"),
        pytest.param(("trio-worker:role:full", "trio-worker:role:bogus"), id="good-and-bad"),
    ],
)
def test_missing_unknown_or_repeated_role_gives_no_role(uris: tuple[str, ...] | None) -> None:
    assert identity_from_der(make_cert(uris=uris)) == Identity("alice", None)


def test_critical_san_is_still_read() -> None:
    der = make_cert(uris=("trio-worker:role:admin",), critical=True)
    assert identity_from_der(der).role is Role.ADMIN


def test_role_in_a_dns_name_is_not_a_role() -> None:
    der = make_cert(extra_names=(x509.DNSName("trio-worker:role:admin"),))
    assert identity_from_der(der) == Identity("alice", None)


_ROLE_VALUES = [r.value for r in Role]
_uri = st.one_of(
    st.builds(lambda v: f"trio-worker:role:{v}", st.sampled_from([*_ROLE_VALUES, "root", ""])),
    st.builds(
        lambda v: f"trio-worker:login:{v}",
        st.text(alphabet="abz019_-.", max_size=6),
    ),
    st.sampled_from(["https://x.example/", "trio-worker:rol:full", "mailto:a@b"]),
)


@settings(database=None, max_examples=150, deadline=None)
@given(st.lists(_uri, max_size=6))
def test_any_uris_give_the_one_valid_role_and_the_logins(uris: list[str]) -> None:
    roles = [u.split(":", 2)[2] for u in uris if u.startswith("trio-worker:role:")]
    want_role = Role(roles[0]) if len(roles) == 1 and roles[0] in _ROLE_VALUES else None
    logins = [u.split(":", 2)[2] for u in uris if u.startswith("trio-worker:login:")]
    want_logins = tuple(dict.fromkeys(x for x in logins if x))
    got = identity_from_der(make_cert(uris=tuple(uris)))
    assert got == Identity("alice", want_role, want_logins)


@pytest.mark.parametrize(
    "common_names", [pytest.param((), id="no-cn"), pytest.param(("a", "b"), id="two-cns")]
)
def test_certificate_without_exactly_one_cn_is_refused(common_names: tuple[str, ...]) -> None:
    with pytest.raises(AuthenticationFailed, match="CN"):
        identity_from_der(make_cert(common_names))


def test_garbage_is_refused() -> None:
    with pytest.raises(AuthenticationFailed):
        identity_from_der(b"\x30\x03\x02\x01\x00")


def test_two_san_extensions_give_no_role() -> None:
    # cryptography will not build duplicate extensions: build an issuerAltName (same
    # length OID, 2.5.29.18) and rename it to subjectAltName (2.5.29.17). The signature
    # breaks, which identity_from_der does not check (the TLS layer does).
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
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier("trio-worker:role:admin")]),
            critical=False,
        )
        .add_extension(
            x509.IssuerAlternativeName([x509.UniformResourceIdentifier("trio-worker:role:admin")]),
            critical=False,
        )
        .sign(KEY, hashes.SHA256())
        .public_bytes(serialization.Encoding.DER)
    )
    ian, san = b"\x06\x03\x55\x1d\x12", b"\x06\x03\x55\x1d\x11"
    assert der.count(ian) == 1
    assert identity_from_der(der).role is Role.ADMIN
    assert identity_from_der(der.replace(ian, san)) == Identity("alice", None)


class _Counting:
    """``identity_from_der`` that counts the certificates it parsed."""

    def __init__(self) -> None:
        self.parsed: list[bytes] = []

    def __call__(self, der: bytes) -> Identity:
        self.parsed.append(der)
        return identity_from_der(der)


@settings(database=None, max_examples=60, deadline=None)
@given(st.lists(_uri, max_size=6))
def test_a_remembered_identity_is_the_one_a_parse_gives(uris: list[str]) -> None:
    der = make_cert(uris=tuple(uris))
    parse = _Counting()
    cache = IdentityCache(parse)
    first, again = cache(der), cache(bytes(der))  # equal bytes, another object
    assert first == again == identity_from_der(der)
    assert parse.parsed == [der]


def test_the_cache_holds_its_bound_of_certificates_least_recently_used_out() -> None:
    certs = [make_cert((f"user{i}",)) for i in range(IDENTITY_CACHE_ENTRIES + 1)]
    parse = _Counting()
    cache = IdentityCache(parse)
    for der in certs[:-1]:
        cache(der)
    cache(certs[0])  # used again: the second is now the least recently used
    cache(certs[-1])
    assert len(cache) == IDENTITY_CACHE_ENTRIES
    assert len(parse.parsed) == IDENTITY_CACHE_ENTRIES + 1
    assert cache(certs[0]).name == "user0"  # still known
    assert cache(certs[1]).name == "user1"  # parsed again
    assert len(parse.parsed) == IDENTITY_CACHE_ENTRIES + 2


def test_a_large_certificate_is_parsed_each_time_and_not_kept() -> None:
    big = make_cert(uris=tuple(f"trio-worker:login:u{i}" + "x" * 60 for i in range(150)))
    assert len(big) > IDENTITY_CACHE_MAX_DER
    parse = _Counting()
    cache = IdentityCache(parse)
    assert cache(big) == cache(big) == identity_from_der(big)
    assert len(parse.parsed) == 2
    assert len(cache) == 0


def test_failures_are_not_remembered_and_clear_forgets() -> None:
    parse = _Counting()
    cache = IdentityCache(parse)
    for _ in range(2):
        with pytest.raises(AuthenticationFailed):
            cache(make_cert(("a", "b")))
    assert len(cache) == 0
    der = make_cert()
    cache(der)
    cache.clear()
    cache(der)
    assert parse.parsed[-2:] == [der, der]
