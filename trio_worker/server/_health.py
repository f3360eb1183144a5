"""The standard gRPC health service (``grpc.health.v1.Health``: Check, List, Watch).

grpc_health_probe, Kubernetes gRPC probes and client-side health checking speak it. The
overall server is the service named ``""``; it is SERVING from the start and NOT_SERVING
once shutdown begins (wire :meth:`HealthService.enter_graceful_shutdown` to the
transport's ``on_drain``). Any authenticated client may call it: no role is needed.

The messages come from ``trio_worker._pb.health_pb2``, generated from
``proto/grpc_health/v1/health.proto``: grpcio-health-checking is only a test dependency.
"""

from __future__ import annotations

import enum
from collections.abc import AsyncIterator, Iterable

import trio

from .._net._transport import (
    CallContext,
    Method,
    RpcError,
    StatusCode,
    StreamMethod,
    SyncUnaryMethod,
)
from .._pb import health_pb2

__all__ = ["SERVICE_NAME", "HealthService", "ServingStatus"]

#: The full name of the service, as used in method paths and by reflection.
SERVICE_NAME = "grpc.health.v1.Health"

_Request = health_pb2.HealthCheckRequest
_Response = health_pb2.HealthCheckResponse


class ServingStatus(enum.IntEnum):
    """``HealthCheckResponse.ServingStatus``."""

    UNKNOWN = 0
    SERVING = 1
    NOT_SERVING = 2
    SERVICE_UNKNOWN = 3  # only sent by Watch


class HealthService:
    """Serving status per service name, readable once (Check, List) or as a stream (Watch)."""

    def __init__(self, services: Iterable[str] = ()) -> None:
        self._statuses: dict[str, ServingStatus] = {"": ServingStatus.SERVING}
        for name in services:
            self._statuses[name] = ServingStatus.SERVING
        self._changed = trio.Event()
        self._shutting_down = False

    def status(self, service: str = "") -> ServingStatus | None:
        """The status of ``service``, None if it is unknown."""
        return self._statuses.get(service)

    def set_status(self, service: str, status: ServingStatus) -> None:
        """Set (or add) ``service``'s status; ignored once shutdown has begun."""
        if self._shutting_down or self._statuses.get(service) == status:
            return
        self._statuses[service] = status
        self._notify()

    def enter_graceful_shutdown(self) -> None:
        """Everything NOT_SERVING from now on; watchers are told, then their streams end."""
        if self._shutting_down:
            return
        self._shutting_down = True
        for name in self._statuses:
            self._statuses[name] = ServingStatus.NOT_SERVING
        self._notify()

    def methods(self) -> dict[str, Method]:
        """The method table to hand to the transport's ``Server``."""
        prefix = f"/{SERVICE_NAME}/"
        return {
            prefix + "Check": SyncUnaryMethod(_Request, _Response, self._check),
            prefix + "List": SyncUnaryMethod(
                health_pb2.HealthListRequest, health_pb2.HealthListResponse, self._list
            ),
            prefix + "Watch": StreamMethod(_Request, _Response, self._watch),
        }

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def _check(self, request: _Request, ctx: CallContext) -> _Response:
        status = self._statuses.get(request.service)
        if status is None:
            raise RpcError(StatusCode.NOT_FOUND, f"unknown service {request.service!r}")
        return _Response(status=status.name)

    def _list(
        self, request: health_pb2.HealthListRequest, ctx: CallContext
    ) -> health_pb2.HealthListResponse:
        response = health_pb2.HealthListResponse()
        for name, status in self._statuses.items():
            response.statuses[name].status = status.value
        return response

    async def _watch(self, request: _Request, ctx: CallContext) -> AsyncIterator[_Response]:
        last: ServingStatus | None = None
        while True:
            changed = self._changed  # taken before reading, so no change is missed
            status = self._statuses.get(request.service, ServingStatus.SERVICE_UNKNOWN)
            if status != last:
                yield _Response(status=status.name)
                last = status
            if self._shutting_down:
                # Told NOT_SERVING; ending the stream keeps the drain from waiting on it.
                raise RpcError(StatusCode.UNAVAILABLE, "the server is shutting down")
            await changed.wait()
