"""Shared by the transport and health tests: a PKI, a running Server, grpcio channels, and
a bare HTTP/2 client for what grpcio will not do on purpose (hold a stream open, ignore
flow control, drop the TCP connection mid-stream, watch for GOAWAY).
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import h2.config
import h2.connection
import h2.events
import h2.settings
import trio
import trustme

from trio_worker import pki
from trio_worker._identity import Role
from trio_worker._net._transport import CallRecord, Method, Server, TransportConfig
from trio_worker._tls import client_context, server_context
from trio_worker._wire._client import ClientH2Connection


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path

    def server_context(self) -> ssl.SSLContext:
        return server_context(ca=self.ca, cert=self.server_cert, key=self.server_key)

    def client_context(self) -> ssl.SSLContext:
        return client_context(ca=self.ca, cert=self.client_cert, key=self.client_key)

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca.read_bytes(),
            private_key=self.client_key.read_bytes(),
            certificate_chain=self.client_cert.read_bytes(),
        )


def make_pki(directory: Path) -> Pki:
    """A trustme CA and server certificate, and an ``admin`` client from trio_worker.pki."""
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(directory / "ca.pem"))
    ca.private_key_pem.write_to_path(str(directory / "ca.key"))
    server = ca.issue_cert("localhost", "127.0.0.1", "::1")
    server.cert_chain_pems[0].write_to_path(str(directory / "server.pem"))
    server.private_key_pem.write_to_path(str(directory / "server.key"))
    client = pki.issue_client(directory, "alice", Role.ADMIN)
    return Pki(
        ca=directory / "ca.pem",
        server_cert=directory / "server.pem",
        server_key=directory / "server.key",
        client_cert=client.cert,
        client_key=client.key,
    )


@dataclass
class Running:
    server: Server
    port: int
    records: list[CallRecord] = field(default_factory=list)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"


@asynccontextmanager
async def running_server(
    pki_: Pki,
    methods: Mapping[str, Method],
    *,
    config: TransportConfig | None = None,
    host: str = "127.0.0.1",
    on_drain: Callable[[], None] | None = None,
) -> AsyncIterator[Running]:
    records: list[CallRecord] = []
    server = Server(
        methods,
        pki_.server_context(),
        config=config,
        on_call=records.append,
        on_drain=on_drain,
    )
    async with trio.open_nursery() as nursery:
        port = await nursery.start(server.serve, host, 0)
        yield Running(server, port, records)
        nursery.cancel_scope.cancel()


def channel(pki_: Pki, target: str) -> grpc.Channel:
    """A grpcio channel over mTLS; the server certificate names localhost and 127.0.0.1."""
    return grpc.secure_channel(target, pki_.credentials())


def raw(method: str, ch: grpc.Channel, *, stream: bool = False) -> Any:
    """A callable for ``method`` that sends and returns raw bytes."""
    factory = ch.unary_stream if stream else ch.unary_unary
    return factory(method, request_serializer=lambda b: b, response_deserializer=lambda b: b)


def frame(message: bytes) -> bytes:
    """A gRPC length-prefixed message."""
    return b"\x00" + len(message).to_bytes(4, "big") + message


class RawClient:
    """A minimal HTTP/2 gRPC client over our TLS: explicit about every frame it sends."""

    def __init__(self, stream: trio.SSLStream[trio.SocketStream]) -> None:
        self.stream = stream
        # The client core's h2 connection: it keeps reading the streams in flight after a
        # GOAWAY (a drain), as real clients do.
        self.h2 = ClientH2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding="utf-8")
        )
        self.events: list[Any] = []
        self.data: dict[int, bytearray] = {}
        self.trailers: dict[int, dict[str, str]] = {}

    @classmethod
    @asynccontextmanager
    async def connect(
        cls, pki_: Pki, port: int, *, window: int | None = None
    ) -> AsyncIterator[RawClient]:
        tcp = await trio.open_tcp_stream("127.0.0.1", port)
        stream = trio.SSLStream(tcp, pki_.client_context(), server_hostname="localhost")
        client = cls(stream)
        try:
            await stream.do_handshake()
            client.h2.initiate_connection()
            if window is not None:
                client.h2.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: window})
            await client.flush()
            yield client
        finally:
            await trio.aclose_forcefully(stream)

    async def flush(self) -> None:
        data = self.h2.data_to_send()
        if data:
            await self.stream.send_all(data)

    async def start(
        self,
        method: str,
        message: bytes | None,
        *,
        end: bool = True,
        headers: list[tuple[str, str]] | None = None,
    ) -> int:
        stream_id: int = self.h2.get_next_available_stream_id()
        self.h2.send_headers(
            stream_id,
            [
                (":method", "POST"),
                (":scheme", "https"),
                (":path", method),
                (":authority", "localhost"),
                ("te", "trailers"),
                ("content-type", "application/grpc"),
                *(headers or []),
            ],
        )
        if message is not None:
            self.h2.send_data(stream_id, frame(message), end_stream=end)
        elif end:
            self.h2.end_stream(stream_id)
        await self.flush()
        return stream_id

    async def pump(self, *, ack: bool = True) -> bool:
        """Read once and process; False at EOF."""
        try:
            data = await self.stream.receive_some(65536)
        except trio.BrokenResourceError:
            return False
        if not data:
            return False
        for event in self.h2.receive_data(data):
            self.events.append(event)
            if isinstance(event, h2.events.DataReceived):
                self.data.setdefault(event.stream_id, bytearray()).extend(event.data)
                if ack:
                    self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, h2.events.TrailersReceived | h2.events.ResponseReceived):
                headers = dict(event.headers)
                if "grpc-status" in headers:
                    self.trailers[event.stream_id] = headers
        await self.flush()
        return True

    async def until(self, predicate: Callable[[], bool]) -> None:
        while not predicate():
            if not await self.pump():
                raise EOFError("server closed the connection")

    def status(self, stream_id: int) -> int | None:
        """The grpc-status the server sent on ``stream_id``, None before its trailers."""
        trailers = self.trailers.get(stream_id)
        return None if trailers is None else int(trailers["grpc-status"])


async def eventually(predicate: Callable[[], bool], seconds: float = 5.0) -> None:
    """Poll ``predicate`` until it holds (for state with no event to wait on)."""
    with trio.fail_after(seconds):
        while True:
            if predicate():
                return
            await trio.sleep(0.02)
