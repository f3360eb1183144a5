"""Certificates for trio-worker, without reaching for openssl.

A small CA issues the server certificate (with the host names and addresses clients dial)
and client certificates (whose CN is the caller's identity and whose subjectAltName URIs
carry its role and the Unix logins it may run jobs as). The same code makes the zero-config
development PKI that ``trio-worker serve`` creates on first run.

Files: ``ca.pem``/``ca.key``, ``server.pem``/``server.key``, ``NAME.pem``/``NAME.key``.
Keys are ECDSA P-256, written 0600; nothing existing is ever overwritten, and every file
appears whole or not at all.
"""

from __future__ import annotations

import datetime as dt
import errno
import fcntl
import ipaddress
import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ._errors import InvalidRequest, StateDirError
from ._identity import Role, login_uri, logins_of, role_of, role_uri
from ._tls import TLSConfigError

__all__ = [
    "CRL_FILE",
    "DEV_CLIENT_NAME",
    "DEV_SERVER_HOSTS",
    "CertFiles",
    "CertSummary",
    "DevPki",
    "Revoked",
    "describe",
    "ensure_dev_pki",
    "init_ca",
    "issue_client",
    "issue_server",
    "revoke",
]

DEV_SERVER_HOSTS = ("localhost", "127.0.0.1", "::1")
DEV_CLIENT_NAME = "admin"

_CA, _SERVER = "ca", "server"
#: The certificate revocation list ``revoke`` keeps next to the CA.
CRL_FILE = "crl.pem"
# Clock skew allowance: a certificate is valid from a few minutes before it was made.
_BACKDATE = dt.timedelta(minutes=5)
_CLIENT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+-]{0,63}")
# A Unix user name (POSIX portable characters, as useradd takes them) or a decimal uid.
_LOGIN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,31}")
_DNS_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
_DNS_NAME = re.compile(rf"(?:\*\.)?{_DNS_LABEL}(?:\.{_DNS_LABEL})*\.?")


@dataclass(frozen=True)
class CertFiles:
    """Where one certificate and its private key were written."""

    cert: Path
    key: Path


@dataclass(frozen=True)
class CertSummary:
    """What ``trio-worker certs show`` prints about a certificate."""

    subject: str
    issuer: str
    common_name: str | None
    role: Role | None
    logins: tuple[str, ...]
    not_before: dt.datetime
    not_after: dt.datetime
    sha256_fingerprint: str
    sans: tuple[str, ...]
    serial_number: int
    is_ca: bool


@dataclass(frozen=True)
class Revoked:
    """What ``revoke`` did: the CRL written, the certificate's serial, and whether it was
    already listed (revoking twice changes nothing)."""

    crl: Path
    serial_number: int
    already: bool
    count: int


@dataclass(frozen=True)
class DevPki:
    """The development PKI in a state directory, and whether this call created it."""

    directory: Path
    ca: CertFiles
    server: CertFiles
    client: CertFiles
    created: bool


# --- files ------------------------------------------------------------------------------


def _files(directory: Path, stem: str) -> CertFiles:
    return CertFiles(cert=directory / f"{stem}.pem", key=directory / f"{stem}.key")


def _refuse_existing(files: CertFiles) -> None:
    for path in (files.cert, files.key):
        if path.exists() or path.is_symlink():
            raise TLSConfigError(f"{path} already exists; not overwriting it")


def _publish(path: Path, data: bytes, mode: int) -> None:
    """Write ``path`` atomically, never replacing an existing file.

    The data goes to a temporary file created with ``mode`` from the start (mkstemp opens
    it 0600, O_EXCL), which is then hard-linked into place: ``link`` fails rather than
    replace, so a concurrent writer or an existing file is never clobbered.
    """
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            raise TLSConfigError(f"{path} already exists; not overwriting it") from None
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK):
                raise
            # A file system without hard links: check, then rename (a small race only).
            if path.exists():
                raise TLSConfigError(f"{path} already exists; not overwriting it") from None
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _write_pair(files: CertFiles, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    try:
        _publish(files.key, key_pem, 0o600)
        try:
            _publish(files.cert, cert.public_bytes(serialization.Encoding.PEM), 0o644)
        except BaseException:
            files.key.unlink()  # ours, just made: a key without its certificate is litter
            raise
    except OSError as exc:
        raise TLSConfigError(f"cannot write {exc.filename or files.cert}: {exc.strerror}") from exc


def _prepare_dir(directory: Path) -> Path:
    directory = Path(directory)
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise TLSConfigError(f"cannot create directory {directory}: {exc.strerror}") from exc
    return directory


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise TLSConfigError(f"{what} {path} does not exist") from None
    except OSError as exc:
        raise TLSConfigError(f"cannot read {what} {path}: {exc.strerror}") from exc


def _load_cert(path: Path, what: str) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(_read(path, what))
    except ValueError as exc:
        raise TLSConfigError(f"{what} {path} holds no valid PEM certificate") from exc


# --- building blocks --------------------------------------------------------------------


def _check_days(days: int) -> None:
    if not isinstance(days, int) or isinstance(days, bool) or days < 1:
        raise InvalidRequest("days", f"validity must be a whole number of days >= 1, not {days!r}")


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _signature_hash(key: CertificateIssuerPrivateKeyTypes) -> hashes.SHA256 | None:
    # Ed25519/Ed448 sign without a separate hash; everything else here uses SHA-256.
    if isinstance(key, ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey):
        return None
    return hashes.SHA256()


def _load_ca(directory: Path) -> tuple[x509.Certificate, CertificateIssuerPrivateKeyTypes]:
    files = _files(directory, _CA)
    cert = _load_cert(files.cert, "CA certificate")
    try:
        key = serialization.load_pem_private_key(_read(files.key, "CA key"), password=None)
    except (ValueError, TypeError) as exc:
        raise TLSConfigError(f"CA key {files.key} is not an unencrypted PEM private key") from exc
    if not isinstance(
        key,
        ec.EllipticCurvePrivateKey
        | rsa.RSAPrivateKey
        | dsa.DSAPrivateKey
        | ed25519.Ed25519PrivateKey
        | ed448.Ed448PrivateKey,
    ):
        raise TLSConfigError(f"CA key {files.key} cannot sign certificates")
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    if cert.public_key().public_bytes(der, spki) != key.public_key().public_bytes(der, spki):
        raise TLSConfigError(f"CA key {files.key} does not match CA certificate {files.cert}")
    return cert, key


def _leaf(
    *,
    subject: str,
    public_key: ec.EllipticCurvePublicKey,
    ca_cert: x509.Certificate,
    ca_key: CertificateIssuerPrivateKeyTypes,
    days: int,
    usage: x509.ObjectIdentifier,
) -> x509.CertificateBuilder:
    """A builder for an end-entity certificate signed by the CA, valid at most as long as it."""
    now = dt.datetime.now(dt.UTC)
    not_after = min(now + dt.timedelta(days=days), ca_cert.not_valid_after_utc)
    try:
        ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski)
    except x509.ExtensionNotFound:
        aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key())
    return (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(ca_cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(aki, critical=False)
    )


def _parse_hosts(hosts: Sequence[str]) -> list[x509.GeneralName]:
    if isinstance(hosts, str) or not hosts:
        raise InvalidRequest("hosts", "give at least one host name or IP address")
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            pass
        else:
            if isinstance(ip, ipaddress.IPv6Address) and ip.scope_id:
                raise InvalidRequest("hosts", f"{host!r}: a certificate cannot name a zone")
            names.append(x509.IPAddress(ip))
            continue
        if len(host) > 253 or not _DNS_NAME.fullmatch(host):
            raise InvalidRequest("hosts", f"{host!r} is neither a DNS name nor an IP address")
        names.append(x509.DNSName(host.lower().rstrip(".")))
    return names


def _check_client_name(name: str) -> None:
    if not isinstance(name, str) or not _CLIENT_NAME.fullmatch(name):
        raise InvalidRequest(
            "name",
            f"{name!r} is not a valid client name: 1-64 characters, letters, digits and "
            "'._@+-', starting with a letter or digit (it is also a file name)",
        )
    if name in (_CA, _SERVER):
        raise InvalidRequest("name", f"{name!r} is reserved for the {name} certificate's files")


def _check_logins(logins: Sequence[str]) -> list[str]:
    if isinstance(logins, str):
        raise InvalidRequest("logins", "give a list of user names, not one string")
    for login in logins:
        if not isinstance(login, str) or not _LOGIN.fullmatch(login):
            raise InvalidRequest(
                "logins",
                f"{login!r} is not a valid user name: 1-32 characters, letters, digits and "
                "'._-', starting with a letter, digit or '_'",
            )
    if len(set(logins)) != len(logins):
        raise InvalidRequest("logins", "a login is listed twice")
    return list(logins)


# --- public API -------------------------------------------------------------------------


def init_ca(
    directory: Path, /, *, common_name: str = "trio-worker CA", days: int = 3650
) -> CertFiles:
    """Create a CA in ``directory`` (``ca.pem``, ``ca.key``): the root every peer trusts."""
    _check_days(days)
    if not common_name or len(common_name) > 64:
        raise InvalidRequest("common_name", "must be 1 to 64 characters")
    files = _files(_prepare_dir(directory), _CA)
    _refuse_existing(files)
    key = _new_key()
    now = dt.datetime.now(dt.UTC)
    public_key = key.public_key()
    ski = x509.SubjectKeyIdentifier.from_public_key(public_key)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + dt.timedelta(days=days))
        # A CA for leaf certificates only: path_length=0 forbids intermediate CAs under it.
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), False)
        .sign(key, hashes.SHA256())
    )
    _write_pair(files, cert, key)
    return files


def issue_server(directory: Path, /, hosts: Sequence[str], *, days: int = 825) -> CertFiles:
    """Issue ``server.pem``/``server.key`` from the CA in ``directory``, valid for ``hosts``
    (DNS names and IP addresses, which clients check the server against)."""
    _check_days(days)
    sans = _parse_hosts(hosts)
    directory = Path(directory)
    files = _files(directory, _SERVER)
    _refuse_existing(files)
    ca_cert, ca_key = _load_ca(directory)
    key = _new_key()
    subject = hosts[0] if len(hosts[0]) <= 64 else "trio-worker server"
    cert = (
        _leaf(
            subject=subject,
            public_key=key.public_key(),
            ca_cert=ca_cert,
            ca_key=ca_key,
            days=days,
            usage=ExtendedKeyUsageOID.SERVER_AUTH,
        )
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .sign(ca_key, _signature_hash(ca_key))
    )
    _write_pair(files, cert, key)
    return files


def issue_client(
    directory: Path,
    /,
    name: str,
    role: Role,
    *,
    logins: Sequence[str] = (),
    days: int = 365,
) -> CertFiles:
    """Issue ``NAME.pem``/``NAME.key`` from the CA in ``directory``: identity ``name`` (the
    subject CN, which owns the jobs it starts) with ``role``, allowed to run jobs as the
    Unix users ``logins`` (the first is its default)."""
    _check_days(days)
    _check_client_name(name)
    if not isinstance(role, Role):
        raise InvalidRequest("role", f"must be one of {[r.value for r in Role]}, not {role!r}")
    uris = [role_uri(role), *(login_uri(login) for login in _check_logins(logins))]
    directory = Path(directory)
    files = _files(directory, name)
    _refuse_existing(files)
    ca_cert, ca_key = _load_ca(directory)
    key = _new_key()
    cert = (
        _leaf(
            subject=name,
            public_key=key.public_key(),
            ca_cert=ca_cert,
            ca_key=ca_key,
            days=days,
            usage=ExtendedKeyUsageOID.CLIENT_AUTH,
        )
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(u) for u in uris]),
            critical=False,
        )
        .sign(ca_key, _signature_hash(ca_key))
    )
    _write_pair(files, cert, key)
    return files


def _replace(path: Path, data: bytes, mode: int) -> None:
    """Write ``path`` atomically, replacing it: readers see the old file or the new one."""
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, path)
    finally:
        Path(tmp_name).unlink(missing_ok=True)
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _existing_crl(path: Path, ca_cert: x509.Certificate) -> x509.CertificateRevocationList | None:
    if not path.exists():
        return None
    try:
        crl = x509.load_pem_x509_crl(_read(path, "CRL"))
    except ValueError as exc:
        raise TLSConfigError(f"CRL {path} holds no valid PEM CRL; not touching it") from exc
    signed = crl.issuer == ca_cert.subject and crl.is_signature_valid(
        ca_cert.public_key()  # type: ignore[arg-type]  # _load_ca checked it can sign
    )
    if not signed:
        raise TLSConfigError(f"CRL {path} is not signed by this CA; not touching it")
    return crl


def revoke(directory: Path, /, name: str) -> Revoked:
    """Revoke ``NAME.pem``: add it to ``crl.pem`` in ``directory``, a CRL signed by the CA
    there, created on first use. The CRL stays valid as long as the CA; a server serving
    with it (``serve --crl``) takes it up on SIGHUP."""
    _check_client_name(name)
    directory = Path(directory)
    ca_cert, ca_key = _load_ca(directory)
    cert = _load_cert(directory / f"{name}.pem", "certificate")
    if cert.issuer != ca_cert.subject:
        raise TLSConfigError(f"{directory / f'{name}.pem'} was not issued by this CA")
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature) as exc:
        raise TLSConfigError(f"{directory / f'{name}.pem'} was not issued by this CA") from exc
    path = directory / CRL_FILE
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(dir_fd, fcntl.LOCK_EX)  # two revocations at once: neither is lost
        old = _existing_crl(path, ca_cert)
        entries = list(old) if old is not None else []
        already = any(e.serial_number == cert.serial_number for e in entries)
        now = dt.datetime.now(dt.UTC)
        if not already:
            entries.append(
                x509.RevokedCertificateBuilder()
                .serial_number(cert.serial_number)
                .revocation_date(now)
                .build()
            )
        number = 1
        if old is not None:
            try:
                number = old.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number + 1
            except x509.ExtensionNotFound:
                number = 1
        try:
            ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
            aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski)
        except x509.ExtensionNotFound:
            aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key())
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(ca_cert.subject)
            .last_update(now - _BACKDATE)
            .next_update(max(ca_cert.not_valid_after_utc, now + dt.timedelta(days=1)))
            .add_extension(x509.CRLNumber(number), critical=False)
            .add_extension(aki, critical=False)
        )
        for entry in entries:
            builder = builder.add_revoked_certificate(entry)
        crl = builder.sign(ca_key, _signature_hash(ca_key))
        try:
            _replace(path, crl.public_bytes(serialization.Encoding.PEM), 0o644)
        except OSError as exc:
            raise TLSConfigError(f"cannot write {path}: {exc.strerror}") from exc
    finally:
        os.close(dir_fd)
    return Revoked(path, cert.serial_number, already, len(entries))


def describe(cert_path: Path) -> CertSummary:
    """Summarize the (first) certificate in ``cert_path``."""
    cert_path = Path(cert_path)
    cert = _load_cert(cert_path, "certificate")
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    common_name = cns[0].value if cns and isinstance(cns[0].value, str) else None
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        sans = tuple(
            [f"DNS:{n}" for n in san.get_values_for_type(x509.DNSName)]
            + [f"IP:{ip}" for ip in san.get_values_for_type(x509.IPAddress)]
            + [f"URI:{uri}" for uri in san.get_values_for_type(x509.UniformResourceIdentifier)]
        )
    except (x509.ExtensionNotFound, x509.DuplicateExtension, ValueError):
        sans = ()
    try:
        is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except (x509.ExtensionNotFound, x509.DuplicateExtension, ValueError):
        is_ca = False
    return CertSummary(
        subject=cert.subject.rfc4514_string(),
        issuer=cert.issuer.rfc4514_string(),
        common_name=common_name,
        role=role_of(cert),
        logins=logins_of(cert),
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
        sha256_fingerprint=cert.fingerprint(hashes.SHA256()).hex(":").upper(),
        sans=sans,
        serial_number=cert.serial_number,
        is_ca=is_ca,
    )


def _dev_pki(directory: Path, *, created: bool) -> DevPki:
    return DevPki(
        directory=directory,
        ca=_files(directory, _CA),
        server=_files(directory, _SERVER),
        client=_files(directory, DEV_CLIENT_NAME),
        created=created,
    )


def _existing_dev_pki(directory: Path) -> DevPki:
    pki = _dev_pki(directory, created=False)
    for files in (pki.ca, pki.server, pki.client):
        for path in (files.cert, files.key):
            if not path.is_file():
                raise StateDirError(
                    f"the development PKI in {directory} is incomplete: {path} is missing "
                    f"(remove {directory} to have a new one made, or pass certificates)"
                )
    return pki


def ensure_dev_pki(state_dir: Path) -> DevPki:
    """Return the development PKI under ``state_dir/pki``, creating it if there is none.

    It holds a CA, a server certificate for localhost, 127.0.0.1 and ::1, and an ``admin``
    client certificate. It is built in a temporary directory and renamed into place, so
    it appears complete or not at all, and two processes racing here agree on one PKI.
    An existing PKI is never modified.
    """
    directory = Path(state_dir) / "pki"
    try:
        exists = any(directory.iterdir())
    except FileNotFoundError:
        exists = False
    except OSError as exc:
        raise StateDirError(f"cannot use {directory}: {exc.strerror}") from exc
    if exists:
        return _existing_dev_pki(directory)
    try:
        Path(state_dir).mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".pki-", dir=state_dir))
    except OSError as exc:
        raise StateDirError(f"cannot create the development PKI in {state_dir}: {exc}") from exc
    try:
        init_ca(tmp, common_name="trio-worker development CA")
        issue_server(tmp, DEV_SERVER_HOSTS)
        issue_client(tmp, DEV_CLIENT_NAME, Role.ADMIN)
        for made in tmp.iterdir():  # every file in the state directory is 0600
            made.chmod(0o600)
        try:
            os.rename(tmp, directory)  # atomic; replaces only a missing or empty directory
        except OSError as exc:
            if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise StateDirError(f"cannot create {directory}: {exc.strerror}") from exc
            return _existing_dev_pki(directory)  # another process got there first
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return _dev_pki(directory, created=True)
