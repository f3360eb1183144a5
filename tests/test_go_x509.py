"""A strict X.509 parser loads our certificates: Go's ``tls.LoadX509KeyPair``.

Go's ``crypto/x509`` refuses OID arcs above 2^31 (golang/go#30757), as Botan and RustCrypto
do; the role extension we once used under the 2.25 UUID arc made every client certificate
unloadable there (grpcurl, grpc_health_probe, any Go client). This runs a real Go program.
"""

from __future__ import annotations

import datetime as dt
import os
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from trio_worker import pki
from trio_worker._identity import Role

from .conftest import require_program

# Load the pair (which parses the leaf), then verify it against the CA for client auth,
# and print the SAN URIs Go sees.
GO_PROGRAM = """\
package main

import ("crypto/tls"; "crypto/x509"; "fmt"; "os")

func main() {
	pair, err := tls.LoadX509KeyPair(os.Args[1], os.Args[2])
	if err != nil { fmt.Println("load:", err); os.Exit(1) }
	pem, _ := os.ReadFile(os.Args[3])
	roots := x509.NewCertPool()
	roots.AppendCertsFromPEM(pem)
	leaf, err := x509.ParseCertificate(pair.Certificate[0])
	if err != nil { fmt.Println("parse:", err); os.Exit(1) }
	usages := []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}
	_, err = leaf.Verify(x509.VerifyOptions{Roots: roots, KeyUsages: usages})
	if err != nil { fmt.Println("verify:", err); os.Exit(1) }
	for _, uri := range leaf.URIs { fmt.Println(uri.String()) }
}
"""


@pytest.fixture(scope="module")
def go_loader(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The Go program, built once for this module, with Go's own build cache (or the
    caller's GOCACHE), as ``test_interop_go`` builds: a cache of its own made every run
    compile crypto/tls and its dependencies again (15 s of the suite's slowest setup)."""
    go = require_program("go", "loading certificates with Go's crypto/x509")
    directory = tmp_path_factory.mktemp("go")
    (directory / "load.go").write_text(GO_PROGRAM)
    env = {**os.environ, "CGO_ENABLED": "0"}  # one file, the standard library only
    subprocess.run(
        [go, "build", "-o", str(directory / "load"), str(directory / "load.go")],
        cwd=directory,
        env=env,
        check=True,
        timeout=600,
    )
    return directory / "load"


def _load(loader: Path, cert: Path, key: Path, ca: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(loader), str(cert), str(key), str(ca)],
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize("role", list(Role))
def test_go_loads_our_client_certificates(go_loader: Path, tmp_path: Path, role: Role) -> None:
    pki.init_ca(tmp_path)
    files = pki.issue_client(tmp_path, "alice", role, logins=["alice", "builder"])
    result = _load(go_loader, files.cert, files.key, tmp_path / "ca.pem")
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.split() == [
        f"trio-worker:role:{role.value}",
        "trio-worker:login:alice",
        "trio-worker:login:builder",
    ]


def test_go_loads_the_development_pki(go_loader: Path, tmp_path: Path) -> None:
    dev = pki.ensure_dev_pki(tmp_path)
    result = _load(go_loader, dev.client.cert, dev.client.key, dev.ca.cert)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.split() == ["trio-worker:role:admin"]


def test_go_rejects_the_old_role_extension(go_loader: Path, tmp_path: Path) -> None:
    """The test can fail: a certificate with the old private extension does not load."""
    pki.init_ca(tmp_path)
    ca_key = serialization.load_pem_private_key((tmp_path / "ca.key").read_bytes(), None)
    ca = x509.load_pem_x509_certificate((tmp_path / "ca.pem").read_bytes())
    good = pki.issue_client(tmp_path, "alice", Role.FULL)
    cert = x509.load_pem_x509_certificate(good.cert.read_bytes())
    builder = (
        x509.CertificateBuilder()
        .subject_name(cert.subject)
        .issuer_name(ca.subject)
        .public_key(cert.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5))
        .not_valid_after(cert.not_valid_after_utc)
        .add_extension(
            x509.UnrecognizedExtension(
                x509.ObjectIdentifier("2.25.268815121869035125761907593043051543014"),
                b"\x0c\x04full",
            ),
            critical=False,
        )
    )
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    legacy = tmp_path / "legacy.pem"
    legacy.write_bytes(
        builder.sign(ca_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)
    )
    result = _load(go_loader, legacy, good.key, tmp_path / "ca.pem")
    assert result.returncode == 1
    assert "malformed extension OID field" in result.stdout
