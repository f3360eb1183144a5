"""``trio-worker certs``: a CA, server and client certificates for real deployments.

The work is ``trio_worker.pki``'s; these commands name files, translate its errors into
option names, and say what to do next.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Literal

from cyclopts import App, Parameter

from .._errors import InvalidRequest
from ._errors import ExitCode
from ._render import format_time, print_fields

__all__ = ["certs"]

certs = App(
    name="certs",
    help="""Make certificates: a CA, the server's, and clients' with roles; show one.

Files: ca.pem/ca.key, server.pem/server.key, NAME.pem/NAME.key; keys are ECDSA P-256,
written 0600; an existing file is never overwritten. For example:

    trio-worker certs init --dir pki
    trio-worker certs server --dir pki --host worker1.example.com --host 10.0.0.5
    trio-worker certs client --dir pki alice --role full --login alice
    trio-worker certs show pki/alice.pem""",
    help_format="markdown",
)

Directory = Annotated[
    Path, Parameter(name="--dir", metavar="DIR", help="Directory holding ca.pem and ca.key.")
]

#: pki's request fields → the options they came from.
_FLAGS = {
    "hosts": "--host",
    "name": "NAME",
    "role": "--role",
    "logins": "--login",
    "days": "--days",
}


@contextmanager
def _option_names() -> Iterator[None]:
    try:
        yield
    except InvalidRequest as exc:
        raise InvalidRequest(_FLAGS.get(exc.field, exc.field), exc.message) from None


#: Our own SAN URIs, shown as Role and Logins rather than as names.
_OURS = "URI:trio-worker:"


def _say(*lines: str) -> None:
    for line in lines:
        print(line, flush=True)


@certs.command
def init(
    *,
    directory: Directory,
    days: int = 3650,
    common_name: Annotated[str, Parameter(name="--cn")] = "trio-worker CA",
) -> int:
    """Create a CA: DIR/ca.pem (give it to every server and client) and DIR/ca.key.

    For example:

        trio-worker certs init --dir /etc/trio-worker/pki
        trio-worker certs init --dir pki --days 730 --cn "ACME worker CA"

    Parameters
    ----------
    days
        Validity in days.
    common_name
        The CA's subject CN.
    """
    from .. import pki

    with _option_names():
        files = pki.init_ca(directory, common_name=common_name, days=days)
    _say(
        f"CA certificate: {files.cert}",
        f"CA key: {files.key} (keep it secret: it can issue certificates)",
        f"Next: trio-worker certs server --dir {directory} --host HOST",
    )
    return ExitCode.OK


@certs.command
def server(
    *,
    directory: Directory,
    host: Annotated[list[str], Parameter(name="--host", metavar="H", consume_multiple=True)],
    days: int = 825,
) -> int:
    """Issue DIR/server.pem and DIR/server.key from the CA in DIR.

    Clients check the server against these names: list every DNS name and IP address they
    will dial.

    For example:

        trio-worker certs server --dir pki --host worker1.example.com --host 10.0.0.5
        trio-worker certs server --dir pki --host localhost 127.0.0.1 ::1

    Parameters
    ----------
    host
        DNS names and IP addresses of the server (repeat, or several after one --host).
    days
        Validity in days (at most the CA's).
    """
    from .. import pki

    with _option_names():
        files = pki.issue_server(directory, host, days=days)
    _say(
        f"Server certificate: {files.cert} (for {', '.join(host)})",
        f"Server key: {files.key}",
        f"Serve with: trio-worker serve --ca {directory / 'ca.pem'} --cert {files.cert} "
        f"--key {files.key}",
    )
    return ExitCode.OK


@certs.command
def client(
    name: Annotated[str, Parameter(name="NAME")],
    /,
    *,
    directory: Directory,
    role: Literal["readonly", "full", "admin"],
    login: Annotated[list[str] | None, Parameter(name="--login", metavar="USER")] = None,
    days: int = 365,
) -> int:
    """Issue DIR/NAME.pem and DIR/NAME.key: identity NAME (it owns the jobs it starts) with
    a role, and the Unix users its jobs may run as.

    Roles: readonly sees every job but changes nothing; full starts jobs and sees, stops and
    signals its own; admin does everything to every job. Logins are like an SSH
    certificate's principals: a full client's jobs run as its first login unless it names
    another of them (or the server's default job user); with none, as the server's default.

    For example:

        trio-worker certs client --dir pki alice --role full --login alice
        trio-worker certs client --dir pki ci --role full --login ci --login builder
        trio-worker certs client --dir pki monitoring --role readonly --days 90

    Parameters
    ----------
    name
        The client's identity: letters, digits and ._@+- (also the file name).
    role
        What the client may do.
    login
        A Unix user the client may run jobs as (repeat; the first is its default).
    days
        Validity in days (at most the CA's).
    """
    from .. import pki
    from .._identity import Role

    with _option_names():
        files = pki.issue_client(directory, name, Role(role), logins=login or (), days=days)
    logins = f", logins {', '.join(login)}" if login else ""
    _say(
        f"Client certificate: {files.cert} ({name}, role {role}{logins})",
        f"Client key: {files.key}",
        f"Use with: trio-worker list --ca {directory / 'ca.pem'} --cert {files.cert} "
        f"--key {files.key}",
    )
    return ExitCode.OK


@certs.command
def revoke(
    name: Annotated[str, Parameter(name="NAME")],
    /,
    *,
    directory: Directory,
) -> int:
    """Revoke DIR/NAME.pem: add it to DIR/crl.pem, a CRL signed by the CA in DIR (created on
    first use). Servers started with --crl DIR/crl.pem refuse it after a SIGHUP, and close
    its open connections.

    For example:

        trio-worker certs revoke --dir pki mallory
        kill -HUP "$(pidof trio-worker)"   # or: systemctl reload trio-worker

    Parameters
    ----------
    name
        The client whose certificate (DIR/NAME.pem) to revoke.
    """
    from .. import pki

    with _option_names():
        done = pki.revoke(directory, name)
    what = "was already revoked" if done.already else "is revoked"
    _say(
        f"{name} ({done.serial_number:X}) {what}: {done.crl} lists {done.count} certificate(s)",
        f"Serve with --crl {done.crl}, and send the server SIGHUP to apply it now.",
    )
    return ExitCode.OK


@certs.command
def show(file: Annotated[Path, Parameter(name="FILE")], /) -> int:
    """Print a certificate's subject, role, logins, validity and fingerprint.

    For example:

        trio-worker certs show pki/alice.pem
        trio-worker certs show ~/.local/state/trio-worker/pki/server.pem
    """
    from .. import pki

    summary = pki.describe(file)
    now = datetime.now(UTC)
    kind = "CA" if summary.is_ca else ("client" if summary.role is not None else "end entity")
    rows = [
        ("Subject", summary.subject),
        ("Issuer", summary.issuer),
        ("Kind", kind),
        ("Role", summary.role.value if summary.role is not None else "-"),
        ("Logins", ", ".join(summary.logins) or "-"),
        ("Names", ", ".join(n for n in summary.sans if not n.startswith(_OURS)) or "-"),
        ("Valid from", format_time(summary.not_before) + _if(now < summary.not_before, "not yet")),
        ("Valid until", format_time(summary.not_after) + _if(now > summary.not_after, "expired")),
        ("Serial", f"{summary.serial_number:X}"),
        ("SHA-256", summary.sha256_fingerprint),
    ]
    print_fields(rows)
    return ExitCode.OK


def _if(condition: bool, note: str) -> str:
    return f" ({note})" if condition else ""
