"""The TLS policy, checked with real handshakes over real trio sockets on 127.0.0.1.

The server CA and server certificate come from trustme; role-carrying client certificates
are issued from the same CA by ``trio_worker.pki``.
"""

from __future__ import annotations

import datetime as dt
import logging
import ssl
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio
import trustme

from trio_worker import pki
from trio_worker._identity import Identity, Role, identity_from_der
from trio_worker._tls import (
    TLS13_SUITE,
    TLSConfigError,
    _restrict_tls13_suites,
    alpn_offset,
    client_context,
    server_context,
)


@dataclass(frozen=True)
class Files:
    ca: Path
    cert: Path
    key: Path


@dataclass(frozen=True)
class Certs:
    server: Files
    alice: Files  # role full, from our CA
    norole: Files  # from our CA, no role extension
    other_ca: Files  # a valid client certificate from another CA
    expired: Files  # from our CA, expired yesterday


def _leaf_files(directory: Path, name: str, ca_file: Path, leaf: trustme.LeafCert) -> Files:
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    leaf.cert_chain_pems[0].write_to_path(str(cert))
    leaf.private_key_pem.write_to_path(str(key))
    return Files(ca=ca_file, cert=cert, key=key)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    d = tmp_path_factory.mktemp("tls")
    ca = trustme.CA()
    ca_file = d / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    ca.private_key_pem.write_to_path(str(d / "ca.key"))
    alice = pki.issue_client(d, "alice", Role.FULL)
    other = trustme.CA()
    yesterday = dt.datetime.now(dt.UTC) - dt.timedelta(days=1)
    return Certs(
        server=_leaf_files(d, "server", ca_file, ca.issue_cert("localhost", "127.0.0.1")),
        alice=Files(ca=ca_file, cert=alice.cert, key=alice.key),
        norole=_leaf_files(d, "norole", ca_file, ca.issue_cert("bob.example", common_name="bob")),
        other_ca=_leaf_files(
            d, "mallory", ca_file, other.issue_cert("mallory.example", common_name="mallory")
        ),
        expired=_leaf_files(
            d,
            "old",
            ca_file,
            ca.issue_cert(
                "old.example",
                common_name="old",
                not_before=yesterday - dt.timedelta(days=1),
                not_after=yesterday,
            ),
        ),
    )


def _server(certs: Certs) -> ssl.SSLContext:
    return server_context(ca=certs.server.ca, cert=certs.server.cert, key=certs.server.key)


def _client(files: Files) -> ssl.SSLContext:
    return client_context(ca=files.ca, cert=files.cert, key=files.key)


@dataclass
class Outcome:
    server_error: BaseException | None = None
    client_error: BaseException | None = None
    peer_der: bytes | None = None
    cipher: tuple[str, str, int] | None = None
    alpn: str | None = None
    received: bytes = b""

    @property
    def ok(self) -> bool:
        return self.server_error is None and self.client_error is None and self.received == b"ok"


def _cause(exc: BaseException) -> BaseException:
    return exc.__cause__ or exc


async def _connect(
    server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, hostname: str = "localhost"
) -> Outcome:
    """One connection: the server handshakes and sends b"ok"; both sides' errors recorded."""
    out = Outcome()
    (listener,) = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listener.socket.getsockname()[1]

    async def serve() -> None:
        tcp = await listener.accept()
        stream = trio.SSLStream(tcp, server_ctx, server_side=True)
        try:
            await stream.do_handshake()
            out.peer_der = stream.getpeercert(binary_form=True)
            await stream.send_all(b"ok")
        except trio.BrokenResourceError as exc:
            out.server_error = _cause(exc)
        finally:
            await trio.aclose_forcefully(stream)

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve)
            tcp = await trio.open_tcp_stream("127.0.0.1", port)
            stream = trio.SSLStream(tcp, client_ctx, server_hostname=hostname)
            try:
                await stream.do_handshake()
                out.cipher = stream.cipher()
                out.alpn = stream.selected_alpn_protocol()
                # In TLS 1.3 the client finishes before the server has judged its
                # certificate: a refusal shows up on the first read.
                out.received = bytes(await stream.receive_some())
            except trio.BrokenResourceError as exc:
                out.client_error = _cause(exc)
            finally:
                await trio.aclose_forcefully(stream)
    await listener.aclose()
    return out


async def test_good_client_gets_aes256_h2_and_its_identity(certs: Certs) -> None:
    out = await _connect(_server(certs), _client(certs.alice))
    assert out.ok, out
    assert out.cipher is not None
    assert out.cipher[:2] == (TLS13_SUITE, "TLSv1.3")
    assert out.alpn == "h2"
    assert out.peer_der is not None
    assert identity_from_der(out.peer_der) == Identity("alice", Role.FULL)


async def test_certificate_without_role_still_connects(certs: Certs) -> None:
    # No role is PERMISSION_DENIED at the RPC, not a TLS failure.
    out = await _connect(_server(certs), _client(certs.norole))
    assert out.ok, out
    assert out.peer_der is not None
    assert identity_from_der(out.peer_der) == Identity("bob", None)


async def test_tls12_client_is_refused(certs: Certs) -> None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cafile=certs.alice.ca)
    ctx.load_cert_chain(certs.alice.cert, certs.alice.key)
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_alpn_protocols(["h2"])  # refused for its version, not for its ALPN
    out = await _connect(_server(certs), ctx)
    assert not out.ok
    assert isinstance(out.server_error, ssl.SSLError)
    assert "UNSUPPORTED_PROTOCOL" in str(out.server_error)
    assert out.client_error is not None


async def test_client_offering_only_aes128_is_refused(certs: Certs) -> None:
    ctx = _client(certs.alice)
    _restrict_tls13_suites(ctx, "TLS_AES_128_GCM_SHA256")
    out = await _connect(_server(certs), ctx)
    assert not out.ok
    assert isinstance(out.server_error, ssl.SSLError)
    assert "NO_SHARED_CIPHER" in str(out.server_error).upper()


async def test_client_without_certificate_is_refused(certs: Certs) -> None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cafile=certs.alice.ca)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.set_alpn_protocols(["h2"])  # refused for its missing certificate, not its ALPN
    out = await _connect(_server(certs), ctx)
    assert not out.ok
    assert isinstance(out.server_error, ssl.SSLError)
    assert "CERTIFICATE" in str(out.server_error).upper()
    assert out.received == b""


async def test_client_certificate_from_another_ca_is_refused(certs: Certs) -> None:
    out = await _connect(_server(certs), _client(certs.other_ca))
    assert not out.ok
    assert isinstance(out.server_error, ssl.SSLError)
    assert "CERTIFICATE VERIFY FAILED" in str(out.server_error).upper()
    assert out.received == b""


async def test_expired_client_certificate_is_refused(certs: Certs) -> None:
    out = await _connect(_server(certs), _client(certs.expired))
    assert not out.ok
    assert isinstance(out.server_error, ssl.SSLError)
    assert "EXPIRED" in str(out.server_error).upper()


async def test_client_checks_the_server_host_name(certs: Certs) -> None:
    out = await _connect(_server(certs), _client(certs.alice), hostname="elsewhere.example")
    assert not out.ok
    assert isinstance(out.client_error, ssl.SSLCertVerificationError)


def test_contexts_carry_the_policy(certs: Certs) -> None:
    for ctx in (_server(certs), _client(certs.alice)):
        assert ctx.minimum_version == ctx.maximum_version == ssl.TLSVersion.TLSv1_3
        assert ctx.verify_mode == ssl.CERT_REQUIRED
        assert ctx.options & ssl.OP_NO_COMPRESSION
        assert ctx.options & ssl.OP_NO_RENEGOTIATION
        tls13 = [c["name"] for c in ctx.get_ciphers() if c["protocol"] == "TLSv1.3"]
        assert tls13 == [TLS13_SUITE]
    assert _client(certs.alice).check_hostname
    assert _server(certs).num_tickets == 0


@pytest.mark.parametrize(
    "suites",
    ["TLS_NO_SUCH_SUITE", "TLS_NO_SUCH_SUITE:TLS_AES_256_GCM_SHA384", "", ":", "TLS_\0X"],
)
def test_suite_restriction_fails_closed(suites: str) -> None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with pytest.raises(TLSConfigError):
        _restrict_tls13_suites(ctx, suites)


def test_suite_restriction_refuses_what_is_not_an_ssl_context() -> None:
    with pytest.raises(TLSConfigError, match="SSLContext"):
        _restrict_tls13_suites(object(), TLS13_SUITE)  # type: ignore[arg-type]


async def test_failed_restriction_leaves_no_openssl_error_behind(certs: Certs) -> None:
    # A refused call must not leave errors queued for the ssl module to misreport later.
    with pytest.raises(TLSConfigError):
        _restrict_tls13_suites(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), "TLS_NO_SUCH_SUITE")
    assert (await _connect(_server(certs), _client(certs.alice))).ok


def test_missing_file_is_named(certs: Certs, tmp_path: Path) -> None:
    missing = tmp_path / "nope.pem"
    with pytest.raises(TLSConfigError, match=r"nope\.pem"):
        server_context(ca=missing, cert=certs.server.cert, key=certs.server.key)
    with pytest.raises(TLSConfigError, match=r"nope\.pem"):
        client_context(ca=certs.alice.ca, cert=certs.alice.cert, key=missing)


def test_malformed_and_mismatched_files_are_named(certs: Certs, tmp_path: Path) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    with pytest.raises(TLSConfigError, match=r"junk\.pem"):
        client_context(ca=certs.alice.ca, cert=junk, key=certs.alice.key)
    with pytest.raises(TLSConfigError, match=r"junk\.pem"):
        client_context(ca=certs.alice.ca, cert=certs.alice.cert, key=junk)
    with pytest.raises(TLSConfigError, match=r"alice\.pem"):
        client_context(ca=certs.alice.ca, cert=certs.alice.cert, key=certs.server.key)


def test_encrypted_key_is_refused_without_prompting(certs: Certs, tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key(certs.alice.key.read_bytes(), password=None)
    locked = tmp_path / "locked.key"
    locked.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    with pytest.raises(TLSConfigError, match="encrypted"):
        client_context(ca=certs.alice.ca, cert=certs.alice.cert, key=locked)


@pytest.mark.parametrize("hostname", ["localhost", "127.0.0.1", "::1"])
async def test_dev_pki_works_end_to_end(tmp_path: Path, hostname: str) -> None:
    dev = pki.ensure_dev_pki(tmp_path)
    server = server_context(ca=dev.ca.cert, cert=dev.server.cert, key=dev.server.key)
    client = client_context(ca=dev.ca.cert, cert=dev.client.cert, key=dev.client.key)
    out = await _connect(server, client, hostname=hostname)
    assert out.ok, out
    assert out.peer_der is not None
    assert identity_from_der(out.peer_der) == Identity("admin", Role.ADMIN)


def _alpn_list(*names: bytes) -> bytes:
    return b"".join(bytes([len(n)]) + n for n in names)


@pytest.mark.parametrize(
    ("offered", "found"),
    [
        (_alpn_list(b"h2"), 1),
        (_alpn_list(b"http/1.1", b"h2"), 10),
        (_alpn_list(b"h2c", b"h2"), 5),  # h2c is not h2
        (_alpn_list(b"http/1.1"), None),
        (_alpn_list(b"h2c", b"h2x"), None),
        (b"", None),
        (b"\x05h2", None),  # a length past the end
        (b"\x00\x02h2", None),  # an empty name is malformed
    ],
)
def test_the_server_finds_h2_in_a_clients_alpn_list(offered: bytes, found: int | None) -> None:
    assert alpn_offset(offered) == found


def test_serving_with_an_expired_certificate_is_said(
    certs: Certs, caplog: pytest.LogCaptureFixture
) -> None:
    """A server certificate past its validity is served (a SIGHUP can replace it), but every
    client refuses it: the server says so at start and at each reload, naming the file."""
    from trio_worker.server._tlsreload import load_tls

    with caplog.at_level(logging.WARNING, logger="trio_worker.server"):
        load_tls(ca=certs.server.ca, cert=certs.server.cert, key=certs.server.key, crl=None)
        assert not caplog.records
        load_tls(ca=certs.expired.ca, cert=certs.expired.cert, key=certs.expired.key, crl=None)
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 1, said
    assert str(certs.expired.cert) in said[0]
    assert "expired" in said[0]
    assert "every client refuses it" in said[0]
