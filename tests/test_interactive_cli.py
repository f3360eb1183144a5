"""Interactive jobs from the outside: the official grpcio client driving Attach (a
bidirectional stream) against a server subprocess, and the ``trio-worker`` CLI's
``run -i``, ``run -it`` and ``attach`` on a real pseudo-terminal."""

from __future__ import annotations

import contextlib
import json
import os
import pty
import re
import select
import signal
import subprocess
import termios
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from tests.test_cli import COMMAND, DevServer, ServerProcess, clean_env, dev, ok, own_cgroup
from trio_worker._pb import worker_pb2 as pb

__all__ = ["dev"]  # a fixture, used by name

W = "/trioworker.v1.Worker/"
MiB = 1024 * 1024


def channel(dev: DevServer) -> grpc.Channel:
    pki_dir = dev.state_dir / "pki"
    credentials = grpc.ssl_channel_credentials(
        root_certificates=(pki_dir / "ca.pem").read_bytes(),
        private_key=(pki_dir / "admin.key").read_bytes(),
        certificate_chain=(pki_dir / "admin.pem").read_bytes(),
    )
    return grpc.secure_channel(f"localhost:{dev.port}", credentials)


def unary(ch: grpc.Channel, method: str, request: object, response: type) -> object:
    fn = ch.unary_unary(W + method, type(request).SerializeToString, response.FromString)  # type: ignore[attr-defined]
    return fn(request, timeout=30)


def attach_stub(ch: grpc.Channel) -> grpc.StreamStreamMultiCallable:
    return ch.stream_stream(
        W + "Attach", pb.AttachRequest.SerializeToString, pb.AttachResponse.FromString
    )


def server_rss(dev: DevServer) -> int:
    status = Path(f"/proc/{dev.server.proc.pid}/status").read_text()
    match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.M)
    assert match is not None
    return int(match[1]) * 1024


# --- grpcio interop ---------------------------------------------------------------------


def test_grpcio_attach_echo_and_close_stdin(dev: DevServer) -> None:
    with channel(dev) as ch:
        job = unary(ch, "Start", pb.StartRequest(command="cat", stdin=True), pb.Job)
        assert isinstance(job, pb.Job)
        assert job.stdin

        def requests() -> Iterator[pb.AttachRequest]:
            yield pb.AttachRequest(open=pb.AttachOpen(id=job.id))
            yield pb.AttachRequest(stdin=b"hello ")
            yield pb.AttachRequest(stdin=b"grpcio\n")
            yield pb.AttachRequest(close_stdin=True)

        out = b""
        ended = None
        for response in attach_stub(ch)(requests(), timeout=30):
            if response.WhichOneof("event") == "output":
                assert ended is None  # nothing after ended
                out += response.output.data
            else:
                ended = response.ended
        assert out == b"hello grpcio\n"
        assert ended is not None
        assert (ended.state, ended.exit_code) == (pb.JOB_STATE_EXITED, 0)


def test_grpcio_attach_without_stdin_is_failed_precondition(dev: DevServer) -> None:
    with channel(dev) as ch:
        job = unary(ch, "Start", pb.StartRequest(command="sleep", args=["100"]), pb.Job)
        assert isinstance(job, pb.Job)

        def requests() -> Iterator[pb.AttachRequest]:
            yield pb.AttachRequest(open=pb.AttachOpen(id=job.id))
            yield pb.AttachRequest(stdin=b"x")

        with pytest.raises(grpc.RpcError) as info:
            for _ in attach_stub(ch)(requests(), timeout=30):
                pass
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        unary(ch, "Stop", pb.StopRequest(id=job.id), pb.Job)


@pytest.mark.parametrize(
    "messages",
    [
        [pb.AttachRequest(stdin=b"no open first")],
        [pb.AttachRequest(open=pb.AttachOpen(id="{id}")), pb.AttachRequest(open=pb.AttachOpen())],
        [pb.AttachRequest(open=pb.AttachOpen(id=""))],
    ],
    ids=["stdin-before-open", "open-twice", "empty-id"],
)
def test_grpcio_attach_protocol_errors_are_invalid_argument(
    dev: DevServer, messages: list[pb.AttachRequest]
) -> None:
    with channel(dev) as ch:
        job = unary(ch, "Start", pb.StartRequest(command="cat", stdin=True), pb.Job)
        assert isinstance(job, pb.Job)
        for message in messages:
            if message.open.id == "{id}":
                message.open.id = job.id
        with pytest.raises(grpc.RpcError) as info:
            for _ in attach_stub(ch)(iter(messages), timeout=30):
                pass
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        unary(ch, "Stop", pb.StopRequest(id=job.id), pb.Job)


def test_grpcio_writer_to_a_job_that_never_reads_waits_and_server_memory_stays_flat(
    dev: DevServer,
) -> None:
    with channel(dev) as ch:
        job = unary(
            ch, "Start", pb.StartRequest(command="sleep", args=["1000"], stdin=True), pb.Job
        )
        assert isinstance(job, pb.Job)
        piece = bytes(MiB)
        sent = 0
        lock = threading.Lock()

        def requests() -> Iterator[pb.AttachRequest]:
            nonlocal sent
            yield pb.AttachRequest(open=pb.AttachOpen(id=job.id))
            for _ in range(64):
                yield pb.AttachRequest(stdin=piece)
                with lock:
                    sent += 1

        before = server_rss(dev)
        responses = attach_stub(ch)(requests(), timeout=60)
        time.sleep(3)  # time enough to push 64 MiB several times over, were it allowed
        with lock:
            taken = sent
        growth = server_rss(dev) - before
        # The server took one pipe buffer, a stream window and a message or two: the
        # writer waits (grpcio's generator is not even asked for the rest).
        print(f"stdin pieces taken: {taken} MiB, server RSS growth: {growth / MiB:.1f} MiB")
        assert taken < 16, taken
        assert growth < 24 * MiB, growth
        unary(ch, "Stop", pb.StopRequest(id=job.id), pb.Job)
        kinds = [r.WhichOneof("event") for r in responses]
        assert kinds[-1] == "ended"


# --- the CLI on a pseudo-terminal ---------------------------------------------------------


class Terminal:
    """A child process on a new pseudo-terminal, as a person at a terminal would run it."""

    def __init__(self, argv: list[str], env: dict[str, str], rows: int = 24, cols: int = 80):
        self.master, slave = pty.openpty()
        termios.tcsetwinsize(slave, (rows, cols))
        self.slave_path = os.ttyname(slave)
        self.proc = subprocess.Popen(
            argv,
            stdin=slave,
            stdout=slave,
            stderr=slave,
            env=env,
            start_new_session=True,
            preexec_fn=lambda: __import__("fcntl").ioctl(0, termios.TIOCSCTTY, 0),
        )
        self._slave = slave
        self.seen = b""

    def settings(self) -> list[object]:
        return termios.tcgetattr(self._slave)

    def expect(self, needle: bytes, timeout: float = 30) -> bytes:
        deadline = time.monotonic() + timeout
        while needle not in self.seen:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"{needle!r} never came; got {self.seen!r}")
            ready, _, _ = select.select([self.master], [], [], left)
            if ready:
                try:
                    data = os.read(self.master, 65536)
                except OSError:
                    data = b""
                if not data:
                    raise AssertionError(f"{needle!r} never came; got {self.seen!r}")
                self.seen += data
        return self.seen

    def wait_raw(self, cooked: list[object], timeout: float = 30) -> None:
        """Wait until the program has put the terminal in raw mode (its settings change)."""
        deadline = time.monotonic() + timeout
        while self.settings() == cooked:
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise AssertionError(f"the terminal stayed cooked; saw {self.seen!r}")
            time.sleep(0.02)
        mode = self.settings()
        assert not mode[3] & (termios.ICANON | termios.ECHO | termios.ISIG)  # type: ignore[operator]

    def send(self, data: bytes) -> None:
        os.write(self.master, data)

    def wait(self, timeout: float = 30) -> int:
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None:
            if time.monotonic() > deadline:
                self.proc.kill()
                raise AssertionError(f"still running; saw {self.seen!r}")
            ready, _, _ = select.select([self.master], [], [], 0.05)
            if ready:
                with contextlib.suppress(OSError):
                    self.seen += os.read(self.master, 65536)
        return self.proc.returncode

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        os.close(self.master)
        os.close(self._slave)


def cli_argv(dev: DevServer, command: str, *args: str) -> list[str]:
    return [*COMMAND, command, "--addr", dev.addr, *args]


def test_run_it_on_a_terminal_restores_the_terminal(dev: DevServer) -> None:
    term = Terminal(
        cli_argv(dev, "run", "-it", "--", "sh", "-c", "read x; echo got:$x; exit 3"), dev.env
    )
    try:
        before = term.settings()
        term.wait_raw(before)
        term.send(b"hello\r")
        term.expect(b"got:hello")
        assert term.wait() == 3
        assert term.settings() == before
    finally:
        term.close()


def test_run_i_streams_stdin_and_eof_closes_it(dev: DevServer) -> None:
    result = subprocess.run(
        cli_argv(dev, "run", "-i", "--", "sh", "-c", "wc -c; echo done"),
        input=b"x" * 300_000,
        env=dev.env,
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [b"300000", b"done"]


def test_run_it_with_piped_input_that_ends_mid_line_ends(dev: DevServer) -> None:
    # The end of our input is the job's end of file even after a line with no newline:
    # on its terminal that takes two EOF characters (it waited for ever with one).
    result = subprocess.run(
        cli_argv(dev, "run", "-it", "--", "sh", "-c", "cat; echo done"),
        input=b"zz",
        env=dev.env,
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.endswith(b"zzdone\r\n")


def test_run_without_i_gives_the_job_no_stdin(dev: DevServer) -> None:
    result = subprocess.run(
        cli_argv(dev, "run", "--", "sh", "-c", "cat; echo eof"),
        input=b"ignored",
        env=dev.env,
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0
    assert result.stdout == b"eof\n"


def test_attach_detaches_with_ctrl_p_ctrl_q_and_the_job_goes_on(dev: DevServer) -> None:
    job_id = (
        ok(
            subprocess.run(
                cli_argv(
                    dev, "start", "-it", "--", "sh", "-c", "while read x; do echo got:$x; done"
                ),
                env=dev.env,
                capture_output=True,
                timeout=30,
                check=False,
            )
        )
        .decode()
        .strip()
    )
    term = Terminal(cli_argv(dev, "attach", job_id), dev.env)
    try:
        before = term.settings()
        term.wait_raw(before)
        term.send(b"one\r")
        term.expect(b"got:one")
        term.send(b"\x10\x11")  # Ctrl-P Ctrl-Q
        assert term.wait() == 0
        assert term.settings() == before
    finally:
        term.close()
    status = ok(
        subprocess.run(
            cli_argv(dev, "status", "--json", job_id),
            env=dev.env,
            capture_output=True,
            timeout=30,
            check=False,
        )
    )
    assert b'"state": "running"' in status
    # Attach again: the job is still there, and ends with its code.
    term = Terminal(cli_argv(dev, "attach", job_id), dev.env)
    try:
        term.wait_raw(term.settings())
        term.send(b"two\r")
        term.expect(b"got:two")
        term.send(b"\x04")  # Ctrl-D: the terminal's end of file; the loop ends
        assert term.wait() == 0
    finally:
        term.close()


def test_run_it_ctrl_c_is_a_byte_for_the_job(dev: DevServer) -> None:
    script = "trap 'echo caught-int; exit 4' INT; echo ready; while :; do sleep 0.1; done"
    term = Terminal(cli_argv(dev, "run", "-it", "--", "sh", "-c", script), dev.env)
    try:
        before = term.settings()
        term.expect(b"ready")
        term.send(b"\x03")
        term.expect(b"caught-int")
        assert term.wait() == 4
        assert term.settings() == before
    finally:
        term.close()


def test_run_t_restores_the_terminal_when_killed_by_a_signal(dev: DevServer) -> None:
    term = Terminal(cli_argv(dev, "run", "-t", "--", "sh", "-c", "echo ready; sleep 100"), dev.env)
    try:
        before = term.settings()
        term.expect(b"ready")
        term.proc.send_signal(signal.SIGTERM)
        code = term.wait()
        assert code != 0
        assert term.settings() == before
    finally:
        term.close()


# --- the README's tour, as written -------------------------------------------------------

README = Path(__file__).resolve().parent.parent / "README.md"


def tour_line(fragment: str) -> str:
    """The README tour's command containing ``fragment``, without its comment."""
    for line in README.read_text().splitlines():
        if fragment in line and line.startswith(("trio-worker", "echo", "id=")):
            return line.split("  #", 1)[0].strip()
    raise AssertionError(f"no {fragment!r} in the README")


def shell_env(dev: DevServer) -> dict[str, str]:
    """The dev server's environment, with trio-worker on PATH and its address set."""
    env = dict(dev.env, TRIO_WORKER_ADDR=dev.addr)
    if Path(COMMAND[0]).name == "trio-worker":
        env["PATH"] = f"{Path(COMMAND[0]).parent}:{env.get('PATH', '')}"
    return env


@pytest.mark.skipif(Path(COMMAND[0]).name != "trio-worker", reason="needs the console script")
def test_readme_tour_interactive_examples_work_as_written(dev: DevServer) -> None:
    env = shell_env(dev)
    piped = tour_line("| trio-worker run -i")
    result = subprocess.run(
        ["sh", "-c", piped], env=env, capture_output=True, timeout=60, check=False
    )
    assert (result.returncode, result.stdout) == (0, b"HELLO\n"), result.stderr

    term = Terminal(["sh", "-c", tour_line("run -it -- sh")], env)
    try:
        before = term.settings()
        term.wait_raw(before)
        term.send(b"echo from-the-tour\r")
        term.expect(b"from-the-tour\r\n")
        term.send(b"exit 5\r")
        assert term.wait() == 5
        assert term.settings() == before
    finally:
        term.close()

    start, attach = tour_line("start -it"), tour_line("attach ")
    term = Terminal(["sh", "-c", f'{start}; echo "id=$id"; {attach}'], env)
    try:
        before = term.settings()
        term.wait_raw(before)
        term.send(b"echo attached-$$\r")
        term.expect(b"attached-")
        term.send(b"\x10\x11")
        assert term.wait() == 0
        assert term.settings() == before
        assert b"detached" in term.seen
    finally:
        term.close()
    job_id = re.search(rb"id=(\w+)", term.seen)
    assert job_id is not None
    subprocess.run(
        [*COMMAND, "stop", "--grace", "0", job_id[1].decode()], env=env, timeout=30, check=False
    )


def test_run_it_restores_the_terminal_when_the_connection_is_lost(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    env = clean_env(home)
    server = ServerProcess.start(["--listen", "127.0.0.1:0", *own_cgroup(home)], env)
    try:
        port = server.port()
        server.wait_for(r"^Try it", stream="stdout")
        argv = [*COMMAND, "run", "-it", "--addr", f"127.0.0.1:{port}", "--"]
        term = Terminal([*argv, "sh", "-c", "echo ready; sleep 100"], env)
        try:
            before = term.settings()
            term.expect(b"ready")
            server.proc.kill()  # the server vanishes mid-session
            assert term.wait() == 125
            assert term.settings() == before
            assert b"trio-worker: error:" in term.seen
        finally:
            term.close()
    finally:
        server.stop()


def test_run_i_without_t_ctrl_c_stops_the_job(dev: DevServer) -> None:
    script = "trap 'echo got-term; exit 9' TERM; echo ready; while :; do sleep 0.1; done"
    term = Terminal(cli_argv(dev, "run", "-i", "--", "sh", "-c", script), dev.env)
    try:
        before = term.settings()
        term.expect(b"ready")
        assert term.settings() == before  # no raw mode without -t
        term.send(b"\x03")  # the terminal turns it into SIGINT for us
        term.expect(b"got-term")
        assert term.wait() == 130
        assert b"stopping job" in term.seen
    finally:
        term.close()


def test_run_it_forwards_the_terminal_size_and_its_changes(dev: DevServer) -> None:
    script = 'stty size; trap "stty size" WINCH; echo ready; while :; do sleep 0.05; done'
    argv = cli_argv(dev, "run", "-it", "--", "sh", "-c", script)
    term = Terminal(argv, dev.env, rows=31, cols=97)
    try:
        before = term.settings()
        term.expect(b"ready")
        assert b"31 97" in term.seen  # the job's terminal started at our size
        termios.tcsetwinsize(term.master, (52, 133))  # the kernel sends us SIGWINCH
        term.expect(b"52 133")
        term.send(b"\x03")  # a key for the job: its terminal turns it into SIGINT
        assert term.wait() == 128 + signal.SIGINT
        assert term.settings() == before
    finally:
        term.close()


def test_run_t_without_i_ctrl_c_is_sigint_for_the_job(dev: DevServer) -> None:
    script = "trap 'echo caught-int; exit 4' INT; echo ready; while :; do sleep 0.1; done"
    term = Terminal(cli_argv(dev, "run", "-t", "--", "sh", "-c", script), dev.env)
    try:
        before = term.settings()
        term.wait_raw(before)
        term.expect(b"ready")
        term.send(b"typed keys go nowhere\x03")
        term.expect(b"caught-int")
        assert term.wait() == 4
        assert term.settings() == before
        assert b"typed keys" not in term.seen
    finally:
        term.close()


def test_run_i_is_one_connection_with_start_and_attach_only(dev: DevServer) -> None:
    before = len(dev.server.stderr)  # (the server's lines of earlier tests: not this one's)
    result = subprocess.run(
        cli_argv(dev, "run", "-i", "--", "cat"),
        input=b"one connection\n",
        env=dev.env,
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert (result.returncode, result.stdout) == (0, b"one connection\n"), result.stderr
    deadline = time.monotonic() + 20
    while True:  # the server's log lines arrive through a reader thread
        lines = dev.server.stderr[before:]
        records = [json.loads(line) for line in lines if line.startswith('{"time"')]
        rpcs = [r for r in records if r.get("event") == "rpc"]
        starts = [r for r in rpcs if r["method"].endswith("/Start") and r["status"] == "OK"]
        if not starts:  # (its lines are written in batches, a moment later)
            assert time.monotonic() < deadline, lines
            time.sleep(0.05)
            continue
        start = starts[-1]
        # From its Start on: an earlier command's connection may have had the same port.
        on_its_connection = [
            r["method"].rsplit("/", 1)[1]
            for r in rpcs[rpcs.index(start) :]
            if r["peer"] == start["peer"]
        ]
        if "Attach" in on_its_connection or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert on_its_connection == ["Start", "Attach"]
    # Who typed into which job is audited (how much, never what).
    typed = [r for r in records if r.get("event") == "attach" and r["peer"] == start["peer"]]
    assert len(typed) == 1
    assert typed[0]["job_id"] == start["job_id"]
    assert (typed[0]["identity"], typed[0]["stdin_bytes"]) == ("admin", len(b"one connection\n"))
    assert typed[0]["closed_stdin"] is True


def test_attach_as_readonly_watches_and_may_not_type(dev: DevServer) -> None:
    pki_dir = dev.state_dir / "pki"
    ok(
        subprocess.run(
            [*COMMAND, "certs", "client", "--dir", str(pki_dir), "watcher", "--role", "readonly"],
            env=dev.env,
            capture_output=True,
            timeout=30,
            check=False,
        )
    )
    creds = ["--ca", str(pki_dir / "ca.pem"), "--cert", str(pki_dir / "watcher.pem")]
    creds += ["--key", str(pki_dir / "watcher.key")]
    script = "i=0; while :; do echo tick$i; i=$((i+1)); sleep 0.1; done"
    started = subprocess.run(
        cli_argv(dev, "start", "-it", "--", "sh", "-c", script),
        env=dev.env,
        capture_output=True,
        timeout=30,
        check=False,
    )
    job_id = ok(started).decode().strip()
    try:
        # --no-stdin: watching is all a readonly role may do, and it may.
        term = Terminal(cli_argv(dev, "attach", "--no-stdin", *creds, job_id), dev.env)
        try:
            before = term.settings()
            term.expect(b"tick")
            assert term.settings() == before  # not raw: nothing of ours goes to the job
            term.send(b"\x03")  # Ctrl-C leaves; the job goes on
            assert term.wait() == 130
        finally:
            term.close()
        # Without it, typing is refused: the attach fails, the job goes on.
        term = Terminal(cli_argv(dev, "attach", *creds, job_id), dev.env)
        try:
            term.send(b"typed\r")
            assert term.wait() == 125
            assert b"may watch this job but not send it input" in term.seen
            assert b"attach --no-stdin only watches" in term.seen
        finally:
            term.close()
        status = ok(
            subprocess.run(
                cli_argv(dev, "status", "--json", job_id),
                env=dev.env,
                capture_output=True,
                timeout=30,
                check=False,
            )
        )
        assert json.loads(status)["state"] == "running"
    finally:
        subprocess.run(
            cli_argv(dev, "stop", "--grace", "0", job_id),
            env=dev.env,
            capture_output=True,
            timeout=30,
            check=False,
        )
