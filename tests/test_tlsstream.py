"""``_net/_tlsstream``: writing several buffers without joining them, on a real TLS
connection whose socket fills up."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import trio
import trio.testing

from tests.grpc_support import make_pki
from trio_worker._net._tlsstream import TLSSocketStream


def _small_socket_streams(tmp_path: Path) -> tuple[TLSSocketStream, TLSSocketStream]:
    """A server's and a client's stream over a socket pair of 64 KiB buffers each way
    (so that a write fills them up), before their handshake."""
    pki = make_pki(tmp_path)
    a, b = socket.socketpair()
    for sock in (a, b):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    server = TLSSocketStream(a, pki.server_context())
    client = TLSSocketStream(b, pki.client_context(), server_hostname="localhost")
    return server, client


async def test_buffers_written_in_turn_arrive_whole_and_in_order(tmp_path: Path) -> None:
    """More than the sockets hold, in buffers of every size: ``try_send_many`` keeps what
    the socket did not take (``pending``), ``flush`` completes it, and the reader gets
    the bytes in order."""
    server, client = _small_socket_streams(tmp_path)
    buffers = [os.urandom(n) for n in (1, 70_000, 5, 16_384, 2_000_000, 3)]
    buffers.insert(3, bytearray(os.urandom(40_000)))
    buffers.append(memoryview(os.urandom(300_000))[1000:])
    want = b"".join(buffers)
    got = bytearray()
    waited = False

    async def read() -> None:
        while len(got) < len(want):
            data = await client.receive_some(16 * 1024)
            assert data
            got.extend(data)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.do_handshake)
        nursery.start_soon(client.do_handshake)
    async with trio.open_nursery() as nursery:
        if not server.try_send_many(buffers):
            waited = True
            assert 0 < server.pending < len(want)
            nursery.start_soon(read)
            await server.flush()
        else:
            nursery.start_soon(read)
        assert server.pending == 0
    assert waited  # (the socket could not take 2 MB at once)
    assert bytes(got) == want
    server.close()
    client.close()


async def test_one_small_buffer_a_full_socket_takes_part_of_is_kept_and_flushed(
    tmp_path: Path,
) -> None:
    """A write of one small buffer (a unary answer's, sent without the general path's
    copies) into a socket that fills up: what it did not take is ``pending``, the buffer
    given to OpenSSL again by ``flush``, and the reader gets every byte in order."""
    server, client = _small_socket_streams(tmp_path)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.do_handshake)
        nursery.start_soon(client.do_handshake)
    sent = bytearray()
    while True:  # nobody reads: the socket fills
        buffer = bytearray(os.urandom(50_000))
        sent += buffer
        if not server.try_send_many([buffer]):
            break
        assert server.pending == 0
    assert 0 < server.pending <= 50_000
    got = bytearray()

    async def read() -> None:
        while len(got) < len(sent):
            data = await client.receive_some(16 * 1024)
            assert data
            got.extend(data)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read)
        await server.flush()
        assert server.pending == 0
    assert got == sent
    server.close()
    client.close()


async def test_bulk_writes_are_corked_only_while_written(tmp_path: Path) -> None:
    """Over TCP, a bulk write goes out corked (full segments rather than one per TLS
    record) and the cork is off again whenever the stream returns, written or not: no
    byte waits for the cork's timer. The bytes arrive whole."""
    pki = make_pki(tmp_path)
    listener = socket.create_server(("127.0.0.1", 0))
    b = socket.create_connection(listener.getsockname())
    a, _ = listener.accept()
    listener.close()
    a.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    server = TLSSocketStream(a, pki.server_context())
    client = TLSSocketStream(b, pki.client_context(), server_hostname="localhost")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.do_handshake)
        nursery.start_soon(client.do_handshake)
    corks: list[int] = []
    setsockopt = server.socket.setsockopt

    def watch(level: int, option: int, value: int) -> None:
        if option == socket.TCP_CORK:
            corks.append(value)
        setsockopt(level, option, value)

    server.socket.setsockopt = watch  # type: ignore[method-assign]
    want = os.urandom(8_000_000)
    got = bytearray()

    async def read() -> None:
        while len(got) < 5 + len(want):
            got.extend(await client.receive_some(64 * 1024))

    def corked() -> int:
        return server.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_CORK)

    assert server.try_send(b"small")  # a small write is not corked
    assert corks == []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(read)
        if not server.try_send_many([want[:4_000_000], want[4_000_000:]]):
            assert corked() == 0
            await server.flush()
        assert corked() == 0
    assert corks[:2] == [1, 0]
    assert corks.count(1) == corks.count(0)
    assert bytes(got) == b"small" + want
    server.close()
    client.close()


async def test_work_while_waiting_runs_once_when_the_handshake_waits(tmp_path: Path) -> None:
    """The server's handshake calls ``while_waiting`` once, the first time it waits for
    the client (the server makes its connection's core there), and completes as usual."""
    pki = make_pki(tmp_path)
    a, b = socket.socketpair()
    server = TLSSocketStream(a, pki.server_context())
    client = TLSSocketStream(b, pki.client_context(), server_hostname="localhost")
    calls: list[bool] = []

    async def shake_server() -> None:
        await server.do_handshake(while_waiting=lambda: calls.append(client_started))

    client_started = False
    async with trio.open_nursery() as nursery:
        nursery.start_soon(shake_server)
        await trio.testing.wait_all_tasks_blocked()
        assert calls == [False]  # no ClientHello yet: it waits, and works meanwhile
        client_started = True
        nursery.start_soon(client.do_handshake)
    assert calls == [False]  # once, however many times it waited
    assert server.selected_alpn_protocol() == "h2"
    server.close()
    client.close()
