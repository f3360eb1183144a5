"""The server: a supervisor, the gRPC services and the transport, run together.

The services are Worker, health (``grpc.health.v1``) and server reflection
(``grpc.reflection.v1`` and ``v1alpha``); the last two need a valid client
certificate but no role.

Shutdown is ordered so that nothing a client is waiting for is cut short:
stop accepting and send GOAWAY (new calls get UNAVAILABLE, health turns
NOT_SERVING, idle reflection streams end), stop the jobs (TERM, grace,
KILL) so every follower receives the end of its stream and every Wait its
final status, let the calls in flight finish, then close. A second signal
shortens the grace to zero.
"""

from __future__ import annotations

import gc
import json
import logging
import resource
import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import trio

from .._errors import describe_id
from .._host._users import UnixUser
from .._jobs._supervisor import Retention, open_supervisor
from .._limits import LimitPolicy
from .._net._sockets import split_host_port
from .._net._transport import CallRecord, Server, TransportConfig
from .._systemd import notify
from ._health import HealthService
from ._quota import QuotaPolicy
from ._reflection import ReflectionService
from ._service import SERVICE_NAME, WorkerService
from ._tlsreload import TLSMaterial, load_tls, reload_on_sighup

__all__ = ["ServerSettings", "parse_listen", "run_server"]

audit_log = logging.getLogger("trio_worker.audit")
_log = logging.getLogger("trio_worker.server")


@dataclass(frozen=True, slots=True)
class ServerSettings:
    """Everything ``run_server`` needs; the CLI builds one from flags and files."""

    ca: Path
    cert: Path
    key: Path
    state_dir: Path
    host: str = "127.0.0.1"
    port: int = 50051
    shutdown_grace: float = 5.0
    stop_grace: float = 5.0
    transport: TransportConfig = field(default_factory=TransportConfig)
    limit_policy: LimitPolicy = field(default_factory=LimitPolicy)
    cgroup_parent: str | None = None  # default: named after the state directory
    retention: Retention = field(default_factory=Retention)
    crl: Path | None = None  # a PEM CRL from the CA: revoked client certificates
    crl_may_be_missing: bool = False  # at start: no file yet means nothing revoked
    quotas: QuotaPolicy = field(default_factory=QuotaPolicy)  # per client identity
    job_user: UnixUser | None = None  # jobs' default user; None: the server's own


def parse_listen(value: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[V6]:PORT`` → (host, port); raises ValueError in words."""
    return split_host_port(value)


def _audit(record: CallRecord) -> None:
    """One JSON line per RPC: who, as what, did which method on which job (running as which
    Unix user), with what status."""
    if not audit_log.isEnabledFor(logging.INFO):
        return  # (the line costs ~40 us of the loop to make, per call)
    job_id = getattr(record.request, "id", "") or getattr(record.response, "id", "")
    if len(job_id) > 64:  # a client's id is unbounded: described, not copied into the log
        job_id = describe_id(job_id)
    identity = record.ctx.identity
    audit_log.info(
        json.dumps(
            {
                "time": datetime.now(UTC).isoformat(timespec="milliseconds"),
                "event": "rpc",
                "peer": record.ctx.peer,
                "identity": identity.name,
                "role": identity.role.value if identity.role else None,
                "method": record.ctx.method,
                "job_id": job_id or None,
                "job_user": getattr(record.response, "user", "") or None,
                "status": record.code.name,
                "message": record.message or None,
                "duration_ms": round(record.duration * 1000, 3),
            },
            separators=(",", ":"),
        )
    )


def _freeze_startup_objects() -> None:
    """Put what start-up made out of the cycle collector's reach, once per process.

    Modules, classes, protocol tables: ~40k objects that live as long as the process.
    A full collection scanned them all, 15-60 ms with the loop (or a worker thread,
    holding the GIL) stopped, once every ~900 Starts on a 2-core machine; now it scans
    what came later (jobs, connections). Garbage made so far is collected first, so
    no cycle is kept forever.
    """
    if gc.get_freeze_count() == 0:
        gc.collect()
        gc.freeze()


async def run_server(
    settings: ServerSettings,
    *,
    handle_signals: bool = True,
    on_call: Callable[[CallRecord], None] | None = None,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until SIGINT/SIGTERM (or cancellation); report the bound port when ready.
    With ``handle_signals``, SIGHUP reloads the CA, certificate, key and CRL."""

    def load(crl_may_be_missing: bool) -> TLSMaterial:
        return load_tls(
            ca=settings.ca,
            cert=settings.cert,
            key=settings.key,
            crl=settings.crl,
            crl_may_be_missing=crl_may_be_missing,
        )

    tls = load(settings.crl_may_be_missing)
    health = HealthService([SERVICE_NAME])

    def record(call: CallRecord) -> None:
        _audit(call)
        if on_call is not None:
            on_call(call)

    async with open_supervisor(
        settings.state_dir,
        keep_state=True,
        shutdown_grace=settings.shutdown_grace,
        cgroup_parent=settings.cgroup_parent,
        limit_policy=settings.limit_policy,
        retention=settings.retention,
    ) as supervisor:
        service = WorkerService(
            supervisor,
            default_grace=settings.stop_grace,
            quotas=settings.quotas,
            job_user=settings.job_user,
        )
        methods: dict[str, Any] = {**service.methods(), **health.methods()}
        # Reflection describes every service served, itself included; like health, it
        # needs a valid client certificate and no role.
        reflection = ReflectionService({path.split("/")[1] for path in methods})
        methods.update(reflection.methods())

        def on_drain() -> None:
            health.enter_graceful_shutdown()
            reflection.enter_graceful_shutdown()

        server = Server(
            methods,
            tls.context,
            config=settings.transport,
            on_call=record,
            on_drain=on_drain,
        )
        async with trio.open_nursery() as nursery:
            port = await nursery.start(server.serve, settings.host, settings.port)
            if handle_signals:
                await nursery.start(reload_on_sighup, server, load, tls)
            _log.info("serving on %s", ", ".join(server.addresses))
            cgroups = supervisor.cgroups
            _log.log(logging.INFO if cgroups.tracks else logging.WARNING, "%s", cgroups.summary())
            if server.caps.connections < server.config.max_connections:
                _log.warning(
                    "the descriptor limit (RLIMIT_NOFILE %d, raised to its hard limit) allows "
                    "only %d connections, not %d, and about as many jobs; raise the hard limit "
                    "(ulimit -Hn, systemd's LimitNOFILE=) for more",
                    resource.getrlimit(resource.RLIMIT_NOFILE)[0],
                    server.caps.connections,
                    server.config.max_connections,
                )
            if settings.crl is not None and not tls.has_crl:
                _log.info(
                    "CRL %s does not exist yet: no client certificate is revoked until it "
                    "does (trio-worker certs revoke makes it; then send SIGHUP)",
                    settings.crl,
                )
            _freeze_startup_objects()
            task_status.started(port)
            notify("READY=1", f"STATUS=serving on {', '.join(server.addresses)}")
            if not handle_signals:
                await trio.sleep_forever()
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                first = await signals.__anext__()
                _log.info("received %s: shutting down", signal.Signals(first).name)
                notify("STOPPING=1", "STATUS=shutting down")
                grace = settings.shutdown_grace
                async with trio.open_nursery() as shutdown:
                    # Draining runs alongside: it waits for the streams that the
                    # jobs' ends will finish.
                    shutdown.start_soon(server.drain, grace + 5.0)
                    async with trio.open_nursery() as jobs:
                        graceful = trio.CancelScope()

                        async def second_signal() -> None:
                            async for sig in signals:
                                name = signal.Signals(sig).name
                                _log.info("received %s again: killing jobs now", name)
                                graceful.cancel()
                                return

                        jobs.start_soon(second_signal)
                        with graceful:
                            await supervisor.shutdown(grace)
                        if graceful.cancelled_caught:
                            await supervisor.shutdown(0)
                        jobs.cancel_scope.cancel()
            nursery.cancel_scope.cancel()
