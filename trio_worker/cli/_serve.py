"""``trio-worker serve``: lock the state directory, find or make certificates, serve.

With no certificate options the server uses the development PKI in ``STATE_DIR/pki``,
creating it on the first run, and prints in two lines where it is and the exact client
command to try. Client commands given the same state directory (or none, when both use
the default) find it there.
"""

from __future__ import annotations

import logging
import os
import shlex
import sys
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import trio
from cyclopts import Parameter

from .._errors import InvalidRequest
from .._tls import TLSConfigError
from ._errors import ExitCode, LocalConfigError, leaf_exception
from ._params import Seconds
from ._settings import DEFAULT_ADDR, default_state_dir, resolve_state_dir

if TYPE_CHECKING:
    from .. import pki
    from .._host._users import UnixUser
    from .._net._transport import TransportConfig
    from ..server._quota import QuotaPolicy
    from ..server._run import ServerSettings

__all__ = ["client_hint", "serve"]


def client_hint(host: str, port: int, state_dir: Path) -> str:
    """The client command that reaches this server with the development PKI."""
    words = ["trio-worker", "run"]
    # A client in another shell has neither our TRIO_WORKER_STATE_DIR nor systemd's
    # STATE_DIRECTORY: name the directory unless it is the plain per-user default.
    environ = {k: v for k, v in os.environ.items() if k != "STATE_DIRECTORY"}
    if state_dir != Path(default_state_dir(environ)).absolute():
        words += ["--state-dir", str(state_dir)]
    if host in ("0.0.0.0", ""):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    addr = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if addr != DEFAULT_ADDR:
        words += ["--addr", addr]
    words += ["--", "echo", "hello"]
    return shlex.join(words)


async def _serve(settings: ServerSettings, dev: pki.DevPki | None) -> None:
    """Serve, with the log's lines written off the loop meanwhile (``_logsink``)."""
    from ._logsink import LogSink

    sinks = [h for h in logging.getLogger().handlers if isinstance(h, LogSink)]
    async with trio.open_nursery() as writers:
        for sink in sinks:
            await writers.start(sink.run)
        await _serve_until_stopped(settings, dev)
        writers.cancel_scope.cancel()  # (each writes what is left first)


async def _serve_until_stopped(settings: ServerSettings, dev: pki.DevPki | None) -> None:
    from ..server._run import run_server

    async with trio.open_nursery() as nursery:
        port = await nursery.start(partial(run_server, settings))
        if settings.job_user is None and os.geteuid() == 0:
            print(
                "trio-worker: warning: serving as root without --job-user: every full "
                "user's jobs run as root",
                file=sys.stderr,
                flush=True,
            )
        if dev is not None:
            if dev.created:
                print(
                    f"Created a development PKI in {dev.directory}: a CA, a server certificate "
                    "for localhost, 127.0.0.1 and ::1, and an admin client certificate.",
                    flush=True,
                )
            else:
                print(f"Using the development PKI in {dev.directory}.", flush=True)
            hint = client_hint(settings.host, port, settings.state_dir)
            print(f"Try it from another shell: {hint}", flush=True)


def _job_user(name: str | None) -> UnixUser | None:
    from .._host._users import lookup_user

    if name is None:
        return None
    try:
        return lookup_user(name)
    except InvalidRequest as exc:
        raise InvalidRequest("--job-user", exc.message) from None


def _cgroup_parent(name: str | None) -> str | None:
    """``--cgroup-parent``, checked before anything starts (the cgroup driver refuses it
    later, as a ValueError: "unexpected error ... this is a bug")."""
    from .._host._cgroups import _check_parent

    if name is None:
        return None
    try:
        _check_parent(name)
    except ValueError:
        raise InvalidRequest(
            "--cgroup-parent",
            f"{name!r} is not a cgroup name under the server's own: give a relative path"
            " with no '.' or '..' parts, e.g. trio-worker-ci",
        ) from None
    return name


def _quotas(max_running: int | None, start_rate: float | None) -> QuotaPolicy:
    from ..server._quota import QuotaPolicy

    try:
        return QuotaPolicy(max_running=max_running, start_rate=start_rate)
    except InvalidRequest as exc:
        flag = "--max-running" if exc.field == "max_running" else "--start-rate"
        raise InvalidRequest(flag, exc.message) from None


def _transport(max_connections_per_client: int | None) -> TransportConfig:
    from .._net._transport import TransportConfig

    if max_connections_per_client is None:
        return TransportConfig()
    if max_connections_per_client <= 0:
        raise InvalidRequest("--max-connections-per-client", "must be at least 1")
    return TransportConfig(max_connections_per_client=max_connections_per_client)


def serve(
    *,
    listen: Annotated[str, Parameter(metavar="HOST:PORT")] = DEFAULT_ADDR,
    ca: Annotated[Path | None, Parameter(metavar="FILE")] = None,
    cert: Annotated[Path | None, Parameter(metavar="FILE")] = None,
    key: Annotated[Path | None, Parameter(metavar="FILE")] = None,
    state_dir: Annotated[
        Path | None, Parameter(env_var="TRIO_WORKER_STATE_DIR", metavar="DIR")
    ] = None,
    shutdown_grace: Seconds = 5.0,
    cgroup_parent: Annotated[str | None, Parameter(metavar="NAME")] = None,
    crl: Annotated[Path | None, Parameter(metavar="FILE")] = None,
    max_running: Annotated[int | None, Parameter(metavar="N")] = None,
    start_rate: Annotated[float | None, Parameter(metavar="R")] = None,
    job_user: Annotated[str | None, Parameter(metavar="USER")] = None,
    max_connections_per_client: Annotated[int | None, Parameter(metavar="N")] = None,
) -> int:
    """Run the server until SIGINT or SIGTERM (Ctrl-C), then shut down gracefully.

    SIGHUP reloads the CA, certificate, key and CRL without stopping jobs or calls: from
    then on revoked certificates are refused and their open connections closed. A reload
    that fails keeps the previous files' contents and logs why.

    With no certificate options it uses the development PKI in STATE_DIR/pki, creating it
    on the first run (a CA, a server certificate for localhost, 127.0.0.1 and ::1, and an
    admin client certificate), and prints where it is and a client command to try. For
    real deployments make certificates with trio-worker certs and pass --ca, --cert, --key.
    One server per state directory: a second one refuses to start. Logs (one JSON audit
    line per call) go to stderr.

    For example:

        trio-worker serve
        trio-worker serve --listen 0.0.0.0:50051 --ca ca.pem --cert server.pem --key server.key
        trio-worker serve --state-dir /var/lib/trio-worker --shutdown-grace 30
        trio-worker serve --ca ca.pem --cert server.pem --key server.key --crl crl.pem

    Parameters
    ----------
    listen
        Address to listen on: HOST:PORT, [V6]:PORT; port 0 picks a free one.
    ca
        CA certificate that client certificates must be signed by.
    cert
        The server's certificate (its names are what clients dial).
    key
        The server certificate's private key.
    state_dir
        Job records, output logs and the development PKI. Default: STATE_DIRECTORY
        (systemd), else $XDG_STATE_HOME/trio-worker (~/.local/state/trio-worker).
    shutdown_grace
        On shutdown, seconds running jobs get between SIGTERM and SIGKILL.
    crl
        A PEM certificate revocation list signed by the CA: the client certificates it
        lists are refused. trio-worker certs revoke writes it, on first use: until the
        file exists nothing is revoked. With the development PKI: STATE_DIR/pki/crl.pem.
    job_user
        The Unix user (name or uid) jobs run as when neither the request nor the client's
        certificate (its logins) names one. Default: the user the server runs as.
    max_running
        At most N running jobs per client identity (certificate CN); more Starts are
        refused (RESOURCE_EXHAUSTED, QUOTA_EXCEEDED). Default: no limit.
    start_rate
        At most R job starts per second per client identity, in bursts of up to R.
        Default: no limit.
    max_connections_per_client
        At most N connections of one client identity (certificate CN) at once, from any
        address; the next is refused (GOAWAY ENHANCE_YOUR_CALM, which grpcio reports as
        UNAVAILABLE). Each CLI command holds one while it runs. Default: 128 (never
        more than the connections the server's descriptors allow).
    cgroup_parent
        The cgroup, under the server's own, that holds one cgroup per job. Default:
        trio-worker-HASH, named after the state directory, so servers on different state
        directories never touch each other's jobs (a server removes job groups it finds
        there at start-up, left by its own earlier run).
    """
    # The server's modules are imported here, not at start-up: client commands start faster.
    from .. import pki
    from .._jobs._statedir import check_private
    from ..server._run import ServerSettings, parse_listen

    try:
        host, port = parse_listen(listen)
    except ValueError as exc:
        raise InvalidRequest("--listen", f"{exc}; use e.g. 127.0.0.1:50051") from None
    cgroup_parent = _cgroup_parent(cgroup_parent)
    given = {"--ca": ca, "--cert": cert, "--key": key}
    absent = [flag for flag, value in given.items() if value is None]
    if 0 < len(absent) < 3:
        raise TLSConfigError(
            f"{' and '.join(absent)} missing; give --ca, --cert and --key together, or none "
            "of them to use the development PKI"
        )
    # The supervisor locks the state directory (a second server on it is refused with
    # StateDirError) before it touches anything else; the development PKI is made
    # atomically and never changed, so making or reading it first is safe.
    directory = Path(resolve_state_dir(state_dir))
    # Refused before anything is written there (the PKI's keys included).
    check_private(directory)
    dev: pki.DevPki | None = None
    if ca is None or cert is None or key is None:
        dev = pki.ensure_dev_pki(directory)
        ca, cert, key = dev.ca.cert, dev.server.cert, dev.server.key
        if crl is None:
            crl = dev.directory / pki.CRL_FILE
    settings = ServerSettings(
        ca=ca.expanduser(),
        cert=cert.expanduser(),
        key=key.expanduser(),
        state_dir=directory,
        host=host,
        port=port,
        shutdown_grace=shutdown_grace,
        cgroup_parent=cgroup_parent,
        crl=crl.expanduser() if crl is not None else None,
        crl_may_be_missing=True,
        quotas=_quotas(max_running, start_rate),
        job_user=_job_user(job_user),
        transport=_transport(max_connections_per_client),
    )
    from .._net._transport import ListenError

    try:
        trio.run(_serve, settings, dev)
    except BaseException as exc:
        cause = leaf_exception(exc)
        if isinstance(cause, ListenError):  # a setting of this host, not a bug: exit 3
            raise LocalConfigError(
                f"{cause}; choose another --listen address (port 0 picks a free one)"
            ) from exc
        raise
    print("trio-worker: server stopped", file=sys.stderr, flush=True)
    return ExitCode.OK
