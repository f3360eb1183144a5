"""Revocation: ``pki.revoke`` writes a CRL, ``serve --crl`` refuses what it lists, and
SIGHUP reloads the CA, certificate, key and CRL without disturbing anything else."""

from __future__ import annotations

import datetime as dt
import logging
import os
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from trio_worker import ConnectionFailed, RemoteError, TrioWorkerError, pki
from trio_worker._identity import Role
from trio_worker._revocation import load_crl
from trio_worker._tls import TLSConfigError
from trio_worker.client import connect
from trio_worker.server._run import ServerSettings, run_server

from .grpc_support import Pki, RawClient, eventually

# --- the CRL file -------------------------------------------------------------------------


def _ca(directory: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate((directory / "ca.pem").read_bytes())


def _serial(path: Path) -> int:
    return x509.load_pem_x509_certificate(path.read_bytes()).serial_number


def _crl(directory: Path) -> x509.CertificateRevocationList:
    return x509.load_pem_x509_crl((directory / "crl.pem").read_bytes())


@pytest.fixture
def ca_dir(tmp_path: Path) -> Path:
    pki.init_ca(tmp_path / "pki")
    return tmp_path / "pki"


def test_revoke_creates_then_extends_the_crl(ca_dir: Path) -> None:
    alice = pki.issue_client(ca_dir, "alice", Role.FULL)
    bob = pki.issue_client(ca_dir, "bob", Role.FULL)
    first = pki.revoke(ca_dir, "alice")
    assert first == pki.Revoked(ca_dir / "crl.pem", _serial(alice.cert), False, 1)
    crl = _crl(ca_dir)
    assert crl.is_signature_valid(_ca(ca_dir).public_key())  # type: ignore[arg-type]
    assert crl.issuer == _ca(ca_dir).subject
    assert [e.serial_number for e in crl] == [_serial(alice.cert)]
    assert crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number == 1
    assert crl.next_update_utc == _ca(ca_dir).not_valid_after_utc  # valid as long as the CA
    assert (ca_dir / "crl.pem").stat().st_mode & 0o777 == 0o644

    assert pki.revoke(ca_dir, "bob").count == 2
    again = pki.revoke(ca_dir, "alice")
    assert again.already
    assert again.count == 2
    crl = _crl(ca_dir)
    assert sorted(e.serial_number for e in crl) == sorted([_serial(alice.cert), _serial(bob.cert)])
    assert crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number == 3
    assert load_crl(ca_dir / "crl.pem", [_ca(ca_dir)]).serials == {
        _serial(alice.cert),
        _serial(bob.cert),
    }
    assert not [p for p in ca_dir.iterdir() if p.name.startswith(".")]  # no temporary files


def test_revoke_refuses_what_it_cannot_vouch_for(tmp_path: Path, ca_dir: Path) -> None:
    with pytest.raises(TLSConfigError, match=r"nobody\.pem"):
        pki.revoke(ca_dir, "nobody")
    pki.init_ca(tmp_path / "other")
    pki.issue_client(tmp_path / "other", "eve", Role.FULL)
    for suffix in ("pem", "key"):
        os.link(tmp_path / "other" / f"eve.{suffix}", ca_dir / f"eve.{suffix}")
    with pytest.raises(TLSConfigError, match="not issued by this CA"):
        pki.revoke(ca_dir, "eve")
    pki.issue_client(ca_dir, "alice", Role.FULL)
    (ca_dir / "crl.pem").write_text("not a CRL")
    with pytest.raises(TLSConfigError, match="no valid PEM CRL"):
        pki.revoke(ca_dir, "alice")
    assert (ca_dir / "crl.pem").read_text() == "not a CRL"  # left for a human to look at
    pki.revoke(tmp_path / "other", "eve")
    os.replace(tmp_path / "other" / "crl.pem", ca_dir / "crl.pem")
    with pytest.raises(TLSConfigError, match="not signed by this CA"):
        pki.revoke(ca_dir, "alice")


def _foreign_crl(
    ca_dir: Path, serials: list[int], *, next_update: dt.datetime | None = None
) -> bytes:
    """A CRL made with cryptography directly, as another tool would, signed by the CA."""
    key = serialization.load_pem_private_key((ca_dir / "ca.key").read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(_ca(ca_dir).subject)
        .last_update(now - dt.timedelta(minutes=1))
        .next_update(next_update or now + dt.timedelta(days=7))
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key()), critical=False
        )
        .add_extension(x509.CRLNumber(42), critical=False)
    )
    for serial in serials:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(now).build()
        )
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def test_load_crl_checks_signature_and_expiry(tmp_path: Path, ca_dir: Path) -> None:
    path = tmp_path / "crl.pem"
    path.write_bytes(_foreign_crl(ca_dir, [7]))
    assert load_crl(path, [_ca(ca_dir)]).serials == {7}
    pki.init_ca(tmp_path / "other")
    with pytest.raises(TLSConfigError, match="not signed by the CA"):
        load_crl(path, [_ca(tmp_path / "other")])
    past = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1)
    path.write_bytes(_foreign_crl(ca_dir, [7], next_update=past))
    with pytest.raises(TLSConfigError, match="expired"):
        load_crl(path, [_ca(ca_dir)])
    path.write_bytes(b"")
    with pytest.raises(TLSConfigError, match="no valid PEM CRL"):
        load_crl(path, [_ca(ca_dir)])


# --- the server ---------------------------------------------------------------------------


@dataclass
class Served:
    port: int
    pki_dir: Path

    def connect(self, name: str) -> Any:
        return connect(
            f"127.0.0.1:{self.port}",
            ca=self.pki_dir / "ca.pem",
            cert=self.pki_dir / f"{name}.pem",
            key=self.pki_dir / f"{name}.key",
            server_hostname="localhost",
            timeout=10,
        )

    def raw_pki(self, name: str) -> Pki:
        d = self.pki_dir
        return Pki(
            d / "ca.pem", d / "server.pem", d / "server.key", d / f"{name}.pem", d / f"{name}.key"
        )


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[Served]:
    d = tmp_path / "pki"
    pki.init_ca(d)
    pki.issue_server(d, ["localhost", "127.0.0.1"])
    for name, role in (("alice", Role.FULL), ("bob", Role.FULL), ("root", Role.ADMIN)):
        pki.issue_client(d, name, role)
    pki.issue_client(d, "old", Role.ADMIN)
    pki.revoke(d, "old")
    settings = ServerSettings(
        ca=d / "ca.pem",
        cert=d / "server.pem",
        key=d / "server.key",
        crl=d / "crl.pem",
        state_dir=tmp_path / "state",
        port=0,
    )
    async with trio.open_nursery() as nursery:
        port = await nursery.start(
            lambda task_status: run_server(settings, task_status=task_status)
        )
        yield Served(port, d)
        nursery.cancel_scope.cancel()


async def _refused(served: Served, name: str) -> None:
    with pytest.raises((ConnectionFailed, RemoteError)):
        async with served.connect(name) as client:
            await client.list()


async def _exhaust(chunks: AsyncIterator[Any]) -> None:
    async for _ in chunks:
        pass


async def _hangup(caplog: pytest.LogCaptureFixture, expect: str) -> str:
    """SIGHUP ourselves (run_server handles it) and return the log line it caused."""
    before = len(caplog.records)
    os.kill(os.getpid(), signal.SIGHUP)

    def logged() -> list[str]:
        return [
            r.getMessage() for r in caplog.records[before:] if r.getMessage().startswith("SIGHUP")
        ]

    await eventually(lambda: bool(logged()), 20)
    (line,) = logged()
    assert expect in line, line
    return line


async def test_revocation_end_to_end(served: Served, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="trio_worker")
    await _refused(served, "old")  # revoked before start: refused at the handshake
    async with served.connect("alice") as alice, served.connect("root") as root:
        ticker = await alice.start("sh", ["-c", "while :; do echo tick; sleep 0.1; done"])
        async with served.connect("bob") as bob:
            bobs = await bob.start("sleep", ["60"])
        async with RawClient.connect(served.raw_pki("bob"), served.port) as raw_bob:
            await raw_bob.start("/grpc.health.v1.Health/Check", b"")
            await raw_bob.until(lambda: bool(raw_bob.trailers))  # bob is served
            async with alice.output(ticker.id) as follow:
                chunks = aiter(follow)
                await anext(chunks)

                pki.revoke(served.pki_dir, "bob")
                await _hangup(caplog, "closed 1 connection(s)")
                with trio.fail_after(10), pytest.raises(EOFError):
                    await raw_bob.until(lambda: False)  # the server closed bob's connection
                await _refused(served, "bob")
                await anext(chunks)  # alice's stream, on a connection open all along, goes on
                assert (await root.status(ticker.id)).state.name == "RUNNING"
                assert (await root.status(bobs.id)).state.name == "RUNNING"  # jobs untouched

                # A bad file: the old material stays, one line says why.
                (served.pki_dir / "crl.pem").write_text("-----BEGIN X509 CRL-----\ngarbage\n")
                line = await _hangup(caplog, "reload failed")
                assert "crl.pem" in line
                assert "\n" not in line
                await _refused(served, "bob")
                async with served.connect("alice") as again:
                    assert [j.id for j in await again.list()] == [ticker.id]
                await anext(chunks)

                # A CRL made by another tool, revoking alice (and no longer bob).
                (served.pki_dir / "crl.pem").write_bytes(
                    _foreign_crl(served.pki_dir, [_serial(served.pki_dir / "alice.pem")])
                )
                await _hangup(caplog, "closed 1 connection(s)")
                with trio.fail_after(10), pytest.raises(TrioWorkerError):
                    await _exhaust(chunks)
        await _refused(served, "alice")
        async with served.connect("bob") as bob:
            assert (await bob.status(bobs.id)).state.name == "RUNNING"
        assert (await root.status(ticker.id)).state.name == "RUNNING"


async def test_broken_certificate_or_key_on_reload_keeps_serving(
    served: Served, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="trio_worker")
    key = served.pki_dir / "server.key"
    good = key.read_bytes()
    key.write_text("not a key")
    line = await _hangup(caplog, "reload failed")
    assert "server.key" in line
    async with served.connect("alice") as alice:
        await alice.list()
    key.write_bytes(good)
    await _hangup(caplog, "reloaded the CA, certificate, key and CRL")
    async with served.connect("alice") as alice:
        await alice.list()


async def test_a_crl_made_after_start(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """`serve --crl` before any revocation: nothing is revoked until the file exists; once
    it was used, its disappearance is a failed reload, not an amnesty."""
    caplog.set_level(logging.INFO, logger="trio_worker")
    d = tmp_path / "pki"
    pki.init_ca(d)
    pki.issue_server(d, ["localhost", "127.0.0.1"])
    pki.issue_client(d, "alice", Role.FULL)
    settings = ServerSettings(
        ca=d / "ca.pem",
        cert=d / "server.pem",
        key=d / "server.key",
        crl=d / "crl.pem",
        crl_may_be_missing=True,
        state_dir=tmp_path / "state",
        port=0,
    )
    async with trio.open_nursery() as nursery:
        port = await nursery.start(
            lambda task_status: run_server(settings, task_status=task_status)
        )
        served = Served(port, d)
        assert any("does not exist yet" in r.getMessage() for r in caplog.records)
        async with served.connect("alice") as alice:
            await alice.list()
        pki.revoke(d, "alice")
        await _hangup(caplog, "reloaded the CA, certificate, key and CRL")
        await _refused(served, "alice")
        (d / "crl.pem").unlink()
        line = await _hangup(caplog, "reload failed")
        assert "crl.pem" in line
        await _refused(served, "alice")
        nursery.cancel_scope.cancel()


async def test_a_new_ca_on_reload_closes_the_old_cas_connections(
    served: Served, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    """A CA rotated in place (same subject name, new key): certificates of the old one are
    no longer served, open connections included."""
    caplog.set_level(logging.INFO, logger="trio_worker")
    new = tmp_path / "new"
    pki.init_ca(new)
    assert _ca(new).subject == _ca(served.pki_dir).subject
    pki.issue_server(new, ["localhost", "127.0.0.1"])
    pki.issue_client(new, "alice", Role.FULL)
    pki.issue_client(new, "gone", Role.FULL)
    pki.revoke(new, "gone")  # the new CA's CRL
    async with RawClient.connect(served.raw_pki("alice"), served.port) as old_alice:
        await old_alice.start("/grpc.health.v1.Health/Check", b"")
        await old_alice.until(lambda: bool(old_alice.trailers))
        for name in ("ca.pem", "server.pem", "server.key", "crl.pem"):
            os.replace(new / name, served.pki_dir / name)
        await _hangup(caplog, "closed 1 connection(s)")
        with trio.fail_after(10), pytest.raises(EOFError):
            await old_alice.until(lambda: False)
    rotated = Served(served.port, new)
    for name in ("ca.pem", "crl.pem"):
        os.link(served.pki_dir / name, new / name)
    async with rotated.connect("alice") as alice:
        await alice.list()
    await _refused(rotated, "gone")
