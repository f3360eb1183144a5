"""Certificate issuance: files, modes, no overwriting, extensions, chains, roles."""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID
from cryptography.x509.verification import PolicyBuilder, Store

from trio_worker import InvalidRequest, StateDirError, pki
from trio_worker._identity import Identity, Role, identity_from_der
from trio_worker._tls import TLSConfigError


def load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def ca_dir(tmp_path: Path) -> Path:
    pki.init_ca(tmp_path / "ca")
    return tmp_path / "ca"


@pytest.fixture
def permissive_umask() -> Iterator[None]:
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


@pytest.mark.usefixtures("permissive_umask")
def test_init_ca_writes_a_ca(tmp_path: Path) -> None:
    files = pki.init_ca(tmp_path / "new" / "ca", common_name="Test CA", days=30)
    assert files == pki.CertFiles(tmp_path / "new/ca/ca.pem", tmp_path / "new/ca/ca.key")
    assert mode(files.key) == 0o600  # whatever the umask
    assert mode(files.cert) == 0o644
    assert mode(files.cert.parent) == 0o700
    assert sorted(p.name for p in files.cert.parent.iterdir()) == ["ca.key", "ca.pem"]
    cert = load(files.cert)
    assert cert.subject == cert.issuer
    assert cert.subject.rfc4514_string() == "CN=Test CA"
    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical
    assert bc.value.ca
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical
    assert ku.value.key_cert_sign
    assert ku.value.crl_sign
    assert not ku.value.digital_signature
    ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == ski.digest
    public_key = cert.public_key()
    assert isinstance(public_key, ec.EllipticCurvePublicKey)
    assert public_key.curve.name == "secp256r1"
    assert cert.not_valid_after_utc - cert.not_valid_before_utc <= dt.timedelta(days=30, minutes=5)
    key = serialization.load_pem_private_key(files.key.read_bytes(), password=None)
    assert key.public_key() == cert.public_key()


def test_serial_numbers_are_random(tmp_path: Path) -> None:
    serials = {load(pki.init_ca(tmp_path / str(i)).cert).serial_number for i in range(3)}
    assert len(serials) == 3
    assert all(s.bit_length() > 64 for s in serials)


def test_server_certificate(ca_dir: Path) -> None:
    files = pki.issue_server(ca_dir, ["localhost", "Worker.Example.", "127.0.0.1", "::1"])
    assert files == pki.CertFiles(ca_dir / "server.pem", ca_dir / "server.key")
    assert mode(files.key) == 0o600
    cert, ca = load(files.cert), load(ca_dir / "ca.pem")
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost", "worker.example"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    ]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ca_ski = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ca_ski.digest
    assert cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    for host in (x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("::1"))):
        verifier = PolicyBuilder().store(Store([ca])).build_server_verifier(host)
        assert verifier.verify(cert, [])[-1] == ca


@pytest.mark.parametrize("role", list(Role))
def test_client_certificate_carries_its_role(ca_dir: Path, role: Role) -> None:
    files = pki.issue_client(ca_dir, "alice", role)
    assert files == pki.CertFiles(ca_dir / "alice.pem", ca_dir / "alice.key")
    assert mode(files.key) == 0o600
    cert, ca = load(files.cert), load(ca_dir / "ca.pem")
    ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert not ext.critical
    assert list(ext.value) == [x509.UniformResourceIdentifier(f"trio-worker:role:{role.value}")]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    der = cert.public_bytes(serialization.Encoding.DER)
    assert identity_from_der(der) == Identity("alice", role)
    cert.verify_directly_issued_by(ca)  # (the handshake tests have OpenSSL verify it)


def test_client_certificate_lists_its_logins_in_order(ca_dir: Path) -> None:
    files = pki.issue_client(ca_dir, "ci", Role.FULL, logins=["ci", "builder", "1001"])
    san = load(files.cert).extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.value.get_values_for_type(x509.UniformResourceIdentifier) == [
        "trio-worker:role:full",
        "trio-worker:login:ci",
        "trio-worker:login:builder",
        "trio-worker:login:1001",
    ]
    der = load(files.cert).public_bytes(serialization.Encoding.DER)
    assert identity_from_der(der) == Identity("ci", Role.FULL, ("ci", "builder", "1001"))
    summary = pki.describe(files.cert)
    assert (summary.role, summary.logins) == (Role.FULL, ("ci", "builder", "1001"))


@pytest.mark.parametrize(
    "logins",
    [["a b"], [""], ["-rf"], ["x" * 33], ["a:b"], ["é"], ["ok", "ok"], "alice", ["a/b"]],
)
def test_bad_logins_are_refused(ca_dir: Path, logins: list[str]) -> None:
    with pytest.raises(InvalidRequest) as info:
        pki.issue_client(ca_dir, "alice", Role.FULL, logins=logins)
    assert info.value.field == "logins"
    assert sorted(p.name for p in ca_dir.iterdir()) == ["ca.key", "ca.pem"]


def _oid_arcs(der: bytes) -> Iterator[int]:
    """Every arc of every OBJECT IDENTIFIER in a DER structure (walking constructed types
    and the contents of OCTET and BIT STRINGs that hold DER themselves, as extensions do)."""
    at = 0
    while at < len(der):
        tag = der[at]
        length = der[at + 1]
        start = at + 2
        if length & 0x80:
            count = length & 0x7F
            length = int.from_bytes(der[start : start + count], "big")
            start += count
        body = der[start : start + length]
        at = start + length
        if tag == 0x06:  # OBJECT IDENTIFIER: base-128 arcs
            arcs, value = [], 0
            for byte in body:
                value = (value << 7) | (byte & 0x7F)
                if not byte & 0x80:
                    arcs.append(value)
                    value = 0
            first = arcs[0]
            yield from (min(first // 40, 2), first - 40 * min(first // 40, 2), *arcs[1:])
        elif tag & 0x20 or (tag == 0x04 and body[:1] == b"\x30"):  # constructed, or DER inside
            yield from _oid_arcs(body)


def test_no_certificate_we_make_has_an_oid_arc_above_2_to_the_28(tmp_path: Path) -> None:
    # RFC 5280 only requires parsers to handle arcs up to 2^28; Go rejects larger ones.
    dev = pki.ensure_dev_pki(tmp_path / "dev")
    pki.init_ca(tmp_path / "ca")
    made = [
        dev.ca.cert,
        dev.server.cert,
        dev.client.cert,
        tmp_path / "ca" / "ca.pem",
        pki.issue_server(tmp_path / "ca", ["localhost", "::1"]).cert,
        *(pki.issue_client(tmp_path / "ca", r.value, r, logins=["a"]).cert for r in Role),
    ]
    for path in made:
        der = load(path).public_bytes(serialization.Encoding.DER)
        arcs = list(_oid_arcs(der))
        assert 2 * len(load(path).extensions) < len(arcs)  # the walk found them
        assert max(arcs) <= 2**28, path.name
    assert max(_oid_arcs(b"\x06\x14" + _LEGACY_ROLE_OID)) > 2**28  # the walk sees big arcs


# The DER body of the old role extension's OID, 2.25.268815121869035125761907593043051543014.
_LEGACY_ROLE_OID = bytes.fromhex("698394bbf4b1bfecca8ba18d8da0a8d7d8dff366")


def test_leaf_does_not_outlive_its_ca(tmp_path: Path) -> None:
    pki.init_ca(tmp_path, days=10)
    cert = load(pki.issue_client(tmp_path, "bob", Role.READONLY, days=365).cert)
    assert cert.not_valid_after_utc <= load(tmp_path / "ca.pem").not_valid_after_utc


def test_nothing_is_overwritten(ca_dir: Path) -> None:
    before = {p.name: p.read_bytes() for p in ca_dir.iterdir()}
    with pytest.raises(TLSConfigError, match=r"ca\.(pem|key) already exists"):
        pki.init_ca(ca_dir)
    pki.issue_server(ca_dir, ["localhost"])
    pki.issue_client(ca_dir, "alice", Role.FULL)
    before = {p.name: p.read_bytes() for p in ca_dir.iterdir()}
    with pytest.raises(TLSConfigError, match=r"server\.(pem|key) already exists"):
        pki.issue_server(ca_dir, ["localhost"])
    with pytest.raises(TLSConfigError, match=r"alice\.(pem|key) already exists"):
        pki.issue_client(ca_dir, "alice", Role.ADMIN)
    (ca_dir / "alice.pem").unlink()  # even half a pair is kept
    with pytest.raises(TLSConfigError, match=r"alice\.key already exists"):
        pki.issue_client(ca_dir, "alice", Role.ADMIN)
    after = {p.name: p.read_bytes() for p in ca_dir.iterdir()}
    assert after == {k: v for k, v in before.items() if k != "alice.pem"}  # no temp files


@pytest.mark.parametrize(
    "name", ["", "../evil", "a/b", "a\\b", ".hidden", "-flag", "ca", "server", "x" * 65, "é"]
)
def test_bad_client_names_are_refused(ca_dir: Path, name: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        pki.issue_client(ca_dir, name, Role.FULL)
    assert info.value.field == "name"
    assert sorted(p.name for p in ca_dir.iterdir()) == ["ca.key", "ca.pem"]


@pytest.mark.parametrize(
    "hosts", [[], "localhost", ["bad host"], ["fe80::1%eth0"], ["a..b"], ["x" * 64 + ".com"]]
)
def test_bad_hosts_are_refused(ca_dir: Path, hosts: list[str]) -> None:
    with pytest.raises(InvalidRequest) as info:
        pki.issue_server(ca_dir, hosts)
    assert info.value.field == "hosts"


def test_bad_days_are_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidRequest, match="days"):
        pki.init_ca(tmp_path, days=0)


def test_issuing_without_a_ca_names_the_missing_file(tmp_path: Path) -> None:
    with pytest.raises(TLSConfigError, match=r"ca\.pem"):
        pki.issue_client(tmp_path, "alice", Role.FULL)


def test_mismatched_ca_key_is_refused(tmp_path: Path) -> None:
    pki.init_ca(tmp_path / "a")
    pki.init_ca(tmp_path / "b")
    (tmp_path / "a" / "ca.key").unlink()
    os.link(tmp_path / "b" / "ca.key", tmp_path / "a" / "ca.key")
    with pytest.raises(TLSConfigError, match="does not match"):
        pki.issue_client(tmp_path / "a", "alice", Role.FULL)


def test_describe(ca_dir: Path) -> None:
    files = pki.issue_client(ca_dir, "alice", Role.READONLY, days=7)
    summary = pki.describe(files.cert)
    cert = load(files.cert)
    assert summary.subject == "CN=alice"
    assert summary.issuer == "CN=trio-worker CA"
    assert summary.common_name == "alice"
    assert summary.role is Role.READONLY
    assert summary.not_before == cert.not_valid_before_utc
    assert summary.not_after == cert.not_valid_after_utc
    assert summary.serial_number == cert.serial_number
    assert not summary.is_ca
    assert summary.sans == ("URI:trio-worker:role:readonly",)
    assert summary.logins == ()
    fingerprint = summary.sha256_fingerprint
    assert len(fingerprint) == 32 * 3 - 1
    assert fingerprint.replace(":", "") == cert.fingerprint(hashes.SHA256()).hex().upper()
    server = pki.describe(pki.issue_server(ca_dir, ["localhost", "::1"]).cert)
    assert server.sans == ("DNS:localhost", "IP:::1")
    assert server.role is None
    assert pki.describe(ca_dir / "ca.pem").is_ca
    with pytest.raises(TLSConfigError, match=r"nope\.pem"):
        pki.describe(ca_dir / "nope.pem")


def test_dev_pki_is_created_once(tmp_path: Path) -> None:
    state = tmp_path / "state"
    first = pki.ensure_dev_pki(state)
    assert first.created
    assert first.directory == state / "pki"
    assert mode(first.directory) == 0o700
    names = sorted(p.name for p in first.directory.iterdir())
    assert names == ["admin.key", "admin.pem", "ca.key", "ca.pem", "server.key", "server.pem"]
    assert [p.name for p in state.iterdir()] == ["pki"]  # no temporary directory left
    for files in (first.ca, first.server, first.client):
        assert mode(files.key) == 0o600
    assert pki.describe(first.server.cert).sans == ("DNS:localhost", "IP:127.0.0.1", "IP:::1")
    der = load(first.client.cert).public_bytes(serialization.Encoding.DER)
    assert identity_from_der(der) == Identity("admin", Role.ADMIN)

    contents = {p.name: p.read_bytes() for p in first.directory.iterdir()}
    second = pki.ensure_dev_pki(state)
    assert not second.created
    assert (second.ca, second.server, second.client) == (first.ca, first.server, first.client)
    assert {p.name: p.read_bytes() for p in first.directory.iterdir()} == contents


def test_incomplete_dev_pki_is_not_repaired(tmp_path: Path) -> None:
    pki.ensure_dev_pki(tmp_path).server.key.unlink()
    with pytest.raises(StateDirError, match=r"server\.key"):
        pki.ensure_dev_pki(tmp_path)
    assert not (tmp_path / "pki" / "server.key").exists()


def test_dev_pki_fills_an_empty_directory(tmp_path: Path) -> None:
    (tmp_path / "pki").mkdir()
    assert pki.ensure_dev_pki(tmp_path).created
