"""Certificates made by other tools: the server reads roles from SAN URIs whoever wrote them.

The contract puts roles and logins in standard subjectAltName URIs so that any X.509 tool
can make them. Here a CA, a server certificate and client certificates are built directly
with ``cryptography`` (as the contract's reference peer does) and with a ``trustme`` CA,
none of them by ``trio_worker.pki``; grpcio calls the real server with them.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import trio
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from trio_worker._pb import worker_pb2 as pb
from trio_worker.server._run import ServerSettings, run_server

W = "/trioworker.v1.Worker/"


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


@dataclass(frozen=True)
class Issuer:
    """A CA's certificate and key, from whichever tool made them."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    def leaf(
        self, directory: Path, stem: str, cn: str, sans: list[x509.GeneralName], *, server: bool
    ) -> tuple[Path, Path]:
        """A leaf written the way the reference peer writes them (no SKI, AKI from the key)."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(cn))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now)
            .not_valid_after(now + dt.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(True, False, False, False, False, False, False, False, False),
                critical=True,
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        cert_path, key_path = directory / f"{stem}.pem", directory / f"{stem}.key"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(_key_pem(key))
        return cert_path, key_path


def cryptography_ca() -> Issuer:
    """A CA exactly as the reference peer's pki.py makes one."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("bench CA"))
        .issuer_name(_name("bench CA"))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return Issuer(cert, key)


def trustme_ca() -> Issuer:
    ca = trustme.CA()
    key = serialization.load_pem_private_key(ca.private_key_pem.bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return Issuer(x509.load_pem_x509_certificate(ca.cert_pem.bytes()), key)


def role(value: str) -> x509.GeneralName:
    return x509.UniformResourceIdentifier(f"trio-worker:role:{value}")


CLIENTS: dict[str, list[x509.GeneralName]] = {
    "admin": [role("admin")],
    "full": [x509.UniformResourceIdentifier("https://example.com/"), role("full")],
    "readonly": [role("readonly"), x509.DNSName("reader.example.com")],
    "norole": [],
    "tworoles": [role("full"), role("admin")],
    "bogus": [role("root")],
}


@dataclass
class Served:
    port: int
    ca: Path
    clients: dict[str, tuple[Path, Path]]

    def call(self, who: str, method: str, request: object, response: type) -> object:
        cert, key = self.clients[who]
        creds = grpc.ssl_channel_credentials(
            self.ca.read_bytes(), key.read_bytes(), cert.read_bytes()
        )
        with grpc.secure_channel(f"localhost:{self.port}", creds) as ch:
            fn = ch.unary_unary(W + method, type(request).SerializeToString, response.FromString)  # type: ignore[attr-defined]
            return fn(request, timeout=30)

    async def code(self, who: str, method: str, request: object, response: type) -> grpc.StatusCode:
        try:
            await trio.to_thread.run_sync(self.call, who, method, request, response)
        except grpc.RpcError as exc:
            return exc.code()  # type: ignore[no-any-return]
        return grpc.StatusCode.OK


@pytest.fixture(params=["cryptography", "trustme"])
async def served(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Served]:
    issuer = cryptography_ca() if request.param == "cryptography" else trustme_ca()
    ca = tmp_path / "ca.pem"
    ca.write_bytes(issuer.cert.public_bytes(serialization.Encoding.PEM))
    server_names: list[x509.GeneralName] = [
        x509.DNSName("localhost"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
    ]
    cert, key = issuer.leaf(tmp_path, "server", "localhost", server_names, server=True)
    clients = {
        name: issuer.leaf(tmp_path, name, f"ext-{name}", sans, server=False)
        for name, sans in CLIENTS.items()
    }
    settings = ServerSettings(ca=ca, cert=cert, key=key, state_dir=tmp_path / "state", port=0)
    async with trio.open_nursery() as nursery:

        async def serve(task_status: trio.TaskStatus[int]) -> None:
            await run_server(settings, handle_signals=False, task_status=task_status)

        port = await nursery.start(serve)
        yield Served(port, ca, clients)
        nursery.cancel_scope.cancel()


async def test_roles_in_san_uris_from_other_tools(served: Served) -> None:
    ok, denied = grpc.StatusCode.OK, grpc.StatusCode.PERMISSION_DENIED
    start = pb.StartRequest(command="true")
    job = await trio.to_thread.run_sync(served.call, "full", "Start", start, pb.Job)
    assert isinstance(job, pb.Job)
    assert job.owner == "ext-full"  # the subject CN
    assert await served.code("admin", "Start", start, pb.Job) == ok
    assert await served.code("readonly", "Start", start, pb.Job) == denied
    assert await served.code("readonly", "Status", pb.StatusRequest(id=job.id), pb.Job) == ok
    for who in ("norole", "tworoles", "bogus"):
        assert await served.code(who, "List", pb.ListRequest(), pb.ListResponse) == denied, who
