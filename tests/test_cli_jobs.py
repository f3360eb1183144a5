"""The job commands a docker user reaches for: rm, prune, id prefixes, list filters, tails.

Against one development server in a subprocess (``tests.test_cli``'s helpers), each call a
real console script in a subprocess.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from tests.test_cli import (
    CHATTY_JOB,
    COMMAND,
    LINES,
    CuttingProxy,
    DevServer,
    ServerProcess,
    assert_one_line_error,
    clean_env,
    cli,
    ok,
    own_cgroup,
)
from tests.test_faults import fill, recorded, small_tmpfs
from trio_worker import ConnectionFailed, pki
from trio_worker.cli._errors import describe

__all__ = ["COMMAND"]


@pytest.fixture(scope="module")
def dev(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevServer]:
    home = tmp_path_factory.mktemp("home")
    env = clean_env(home)
    server = ServerProcess.start(["--listen", "127.0.0.1:0", *own_cgroup(home)], env)
    try:
        port = server.port()
        server.wait_for(r"^Try it", stream="stdout")
        yield DevServer(server, home, env, port)
    finally:
        assert server.stop() == 0, server.stderr


def start(dev: DevServer, *command: str) -> str:
    return ok(dev("start", "--", *command)).decode().strip()


def ids(dev: DevServer) -> set[str]:
    return {job["id"] for job in json.loads(ok(dev("list", "--json")))}


def test_rm_removes_ended_jobs_and_their_output(dev: DevServer) -> None:
    job_id = start(dev, "sh", "-c", "echo bye")
    ok(dev("wait", job_id))
    directory = dev.state_dir / "jobs" / job_id
    assert (directory / "output.log").read_bytes() == b"bye\n"
    assert ok(dev("rm", job_id)).decode() == f"{job_id}\n"
    assert not directory.exists()
    assert job_id not in ids(dev)
    assert_one_line_error(dev("status", job_id), 6)
    assert_one_line_error(dev("rm", job_id), 6)


def test_rm_refuses_a_running_job_unless_forced(dev: DevServer) -> None:
    job_id = start(dev, "sleep", "300")
    err = assert_one_line_error(dev("rm", job_id), 12)
    assert "still running" in err
    assert "rm -f" in err
    assert job_id in ids(dev)
    assert ok(dev("rm", "-f", job_id)).decode() == f"{job_id}\n"
    assert job_id not in ids(dev)


def test_rm_goes_on_past_ids_it_cannot_remove(dev: DevServer) -> None:
    done = start(dev, "true")
    ok(dev("wait", done))
    result = dev("rm", "01ARZ3NDEKTSV4RRFFQ69G5FAV", done)
    assert result.returncode == 6
    assert result.stdout.decode() == f"{done}\n"
    assert result.stderr.decode().count("\n") == 1


def test_prune_removes_every_ended_job_and_says_how_much(dev: DevServer) -> None:
    running = start(dev, "sleep", "300")
    ended = [start(dev, "sh", "-c", "head -c 3000 /dev/zero") for _ in range(3)]
    for job_id in ended:
        ok(dev("wait", job_id))
    out = ok(dev("prune")).decode()
    match = re.fullmatch(r"Removed (\d+) ended jobs?, (.+) of output\.\n", out)
    assert match is not None, out
    assert int(match[1]) >= 3
    # Only running jobs are left: this one, and any an earlier test of the module's
    # server left running (one that failed before its clean-up).
    left = json.loads(ok(dev("list", "--json")))
    assert running in {job["id"] for job in left}
    assert {job["state"] for job in left} == {"running"}, left
    assert not any((dev.state_dir / "jobs" / job_id).exists() for job_id in ended)
    assert ok(dev("prune")).decode() == "Removed 0 ended jobs, 0 B of output.\n"
    ok(dev("rm", "-f", running))


def test_ids_take_unique_prefixes_in_any_case(dev: DevServer) -> None:
    first = start(dev, "sleep", "300")
    second = start(dev, "sleep", "300")
    common = next(i for i, (a, b) in enumerate(zip(first, second, strict=True)) if a != b)
    assert common < 26
    # The module's server holds the earlier tests' jobs too: an id's place made in the same
    # round as theirs shares their time part, so a prefix is unique among all of them
    # (seen: "matches 3 jobs" for the prefix unique between these two).
    everyone = ok(dev("list", "-q")).decode().split()
    assert {first, second} <= set(everyone)

    def shortest_unique(job_id: str) -> str:
        shared = (
            next((i for i, (a, b) in enumerate(zip(job_id, other, strict=True)) if a != b), 26)
            for other in everyone
            if other != job_id
        )
        return job_id[: max(shared) + 1]

    # The shortest unique prefix of each, lower-cased, works wherever an id is taken.
    for job_id in (first, second):
        prefix = shortest_unique(job_id).lower()
        status = json.loads(ok(dev("status", "--json", prefix)))
        assert status["id"] == job_id
    err = assert_one_line_error(dev("status", first[:common].lower()), 2)
    found = re.search(
        r"matches (\d+) jobs; give more of the id \(they differ from character \d+ on\)", err
    )
    assert found is not None, err
    assert int(found.group(1)) >= 2, err
    ok(dev("stop", shortest_unique(second)))
    ok(dev("rm", "-f", shortest_unique(first).lower(), second))
    assert_one_line_error(dev("status", "zzzz"), 6)


def test_list_quiet_state_and_owner_filters(dev: DevServer) -> None:
    running = start(dev, "sleep", "300")
    exited = start(dev, "true")
    ok(dev("wait", exited))
    quiet = ok(dev("list", "-q")).decode().splitlines()
    assert {running, exited} <= set(quiet)
    assert quiet == sorted(quiet, reverse=True)  # newest first
    assert running in ok(dev("list", "-q", "--state", "running")).decode().split()
    assert exited not in ok(dev("list", "-q", "--state", "RUNNING")).decode().split()
    both = ok(dev("list", "-q", "--state", "running", "--state", "exited")).decode().split()
    assert {running, exited} <= set(both)
    assert ok(dev("list", "-q", "--owner", "nobody-here")) == b""
    assert running in ok(dev("list", "-q", "--owner", "admin")).decode().split()
    err = assert_one_line_error(dev("list", "--state", "sleeping"), 2)
    assert "'sleeping' is not a state" in err
    ok(dev("rm", "-f", running, exited))


def test_logs_tail_prints_the_last_lines(dev: DevServer) -> None:
    job_id = start(dev, "sh", "-c", "seq 1 100000; printf 'no newline'")
    ok(dev("wait", job_id))
    assert ok(dev("logs", "--tail", "3", job_id)) == b"99999\n100000\nno newline"
    assert ok(dev("logs", "-n", "1", job_id)) == b"no newline"
    assert ok(dev("logs", "--tail", "0", job_id)) == b""
    assert ok(dev("logs", "--tail", "200000", job_id)) == ok(dev("logs", job_id))


def test_env_name_alone_passes_the_client_value(dev: DevServer) -> None:
    env = {**dev.env, "FROM_CLIENT": "client value"}
    result = cli(
        "run",
        "--addr",
        dev.addr,
        "-e",
        "FROM_CLIENT",
        "--",
        "sh",
        "-c",
        'echo "$FROM_CLIENT"',
        env=env,
    )
    assert ok(result) == b"client value\n"


def test_stop_of_an_ended_job_exits_0_and_says_so(dev: DevServer) -> None:
    job_id = start(dev, "true")
    ok(dev("wait", job_id))
    result = dev("stop", job_id)
    assert result.returncode == 0
    assert result.stdout == b""
    assert result.stderr.decode() == f"trio-worker: job {job_id} had already ended: exited (0)\n"


def test_first_ctrl_c_on_run_stops_printing_at_once(dev: DevServer) -> None:
    """A job printing faster than the terminal: after Ctrl-C, the backlog is not printed,
    only what the job wrote while it stopped (its last words)."""
    script = (
        "trap 'echo; echo got TERM; exit 3' TERM; echo ready; "
        "while :; do echo xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx; done"
    )
    proc = subprocess.Popen(
        [*COMMAND, "run", "--addr", dev.addr, "--", "sh", "-c", script],
        env=dev.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline() == b"ready\n"
    before = 0
    while before < 4 * 1024 * 1024:  # well into the flood
        before += len(proc.stdout.read1(1 << 20))
    proc.send_signal(signal.SIGINT)
    after, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    assert after.endswith(b"\ngot TERM\n")
    # What was already on its way out (pipes, one chunk) is all; the backlog on the server
    # and in the client's buffers (megabytes) never is printed.
    assert len(after) < 512 * 1024, len(after)
    lines = err.decode().splitlines()
    assert lines[-2].startswith("trio-worker: stopping job"), lines
    # Below whatever the job wrote while it stopped: how it ended, the last line on screen.
    assert re.fullmatch(r"trio-worker: job \w{26} exited \(3\)", lines[-1]), lines


def test_tls_failures_say_what_is_wrong(dev: DevServer, tmp_path: Path) -> None:
    other = tmp_path / "other"
    pki.init_ca(other)
    dev_pki = dev.state_dir / "pki"
    admin = ["--cert", dev_pki / "admin.pem", "--key", dev_pki / "admin.key"]
    wrong_ca = cli("list", "--addr", dev.addr, "--ca", other / "ca.pem", *admin, env=dev.env)
    assert "not from --ca" in assert_one_line_error(wrong_ca, 4)

    with socket.create_server(("127.0.0.1", 0)) as plain:  # answers like an HTTP server

        def answer() -> None:
            conn, _ = plain.accept()
            with conn:
                conn.recv(4096)
                conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")

        thread = threading.Thread(target=answer, daemon=True)
        thread.start()
        addr = f"127.0.0.1:{plain.getsockname()[1]}"
        result = cli("list", "--addr", addr, env=dev.env)
        thread.join(10)
    err = assert_one_line_error(result, 4)
    assert "does not speak TLS" in err
    assert "not a trio-worker server" in err


@pytest.mark.parametrize(
    ("message", "hint"),
    [
        ("TLS handshake with h:1 timed out after 10 s", "never answered TLS"),
        ("TLS handshake with h:1 failed: certificate verify failed: x", "not from --ca"),
        ("TLS handshake with h:1 failed: the server refused our certificate (x)", "--cert"),
        ("TLS handshake with h:1 failed: the server refused our certificate (x)", "expired"),
        (
            "TLS handshake with h:1 failed: the server refused our certificate "
            "(sslv3 alert certificate revoked)",
            "the server has revoked --cert",
        ),
        (
            "TLS handshake with h:1 failed: certificate verify failed: IP address mismatch, "
            "certificate is not valid for '127.0.0.1'",
            "not issued for the host in --addr",
        ),
        (
            "TLS handshake with h:1 failed: certificate verify failed: Hostname mismatch, "
            "certificate is not valid for 'h'",
            "not issued for the host in --addr",
        ),
        (
            "TLS handshake with h:1 failed: certificate verify failed: certificate has expired",
            "the server's certificate has expired",
        ),
        ("TLS handshake with h:1 failed: wrong version number", "does not speak TLS"),
        ("cannot connect to h:1: connection refused", "is the server running there?"),
    ],
)
def test_connection_failures_get_their_own_hint(message: str, hint: str) -> None:
    failure = describe(ConnectionFailed(message), command="list")
    assert failure.code == 4
    assert hint in failure.message


def test_a_port_in_use_is_a_configuration_error(dev: DevServer, tmp_path: Path) -> None:
    result = cli(
        "serve", "--listen", dev.addr, "--state-dir", tmp_path / "state", env=dev.env, timeout=60
    )
    err = assert_one_line_error(result, 3)
    assert "already in use" in err
    assert "bug" not in err


def test_server_validation_errors_name_the_option(dev: DevServer) -> None:
    err = assert_one_line_error(dev("start", "--memory", "1", "--", "true"), 2)
    assert err.startswith("trio-worker: error: --memory: ")
    assert "limits." not in err
    err = assert_one_line_error(dev("start", "--cwd", "/no/such/dir", "--", "true"), 2)
    assert err.startswith("trio-worker: error: --cwd: ")


def test_debug_shows_our_tracebacks_and_nothing_of_http2(dev: DevServer) -> None:
    result = dev("status", "--debug", "01ARZ3NDEKTSV4RRFFQ69G5FAV")
    err = result.stderr.decode()
    assert result.returncode == 6
    assert "Traceback" in err
    assert not re.search(r"\b(hpack|h2|purerpc)\b", err), err


def test_run_ends_promptly_and_says_so_when_the_server_shuts_down(tmp_path: Path) -> None:
    env = clean_env(tmp_path)
    server = ServerProcess.start(["--listen", "127.0.0.1:0", *own_cgroup(tmp_path)], env)
    try:
        addr = f"127.0.0.1:{server.port()}"
        server.wait_for(r"^Try it", stream="stdout")
        run = subprocess.Popen(
            [*COMMAND, "run", "--addr", addr, "--", "sh", "-c", "echo started; sleep 300"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert run.stdout is not None
        assert run.stdout.readline() == b"started\n"
        server.proc.send_signal(signal.SIGTERM)
        _, err = run.communicate(timeout=20)  # not the 60 s of reconnecting
    finally:
        server.stop()
    assert run.returncode == 128 + signal.SIGTERM, err
    assert err.decode().endswith("was killed by SIGTERM: the server is shutting down\n"), err


@pytest.mark.parametrize(
    "args",
    [
        ["run", "--", "sh", "-c", "echo out; echo err >&2; sleep 0.3; exit 4"],
        ["start", "--follow", "--", "sh", "-c", "echo out; sleep 0.3"],
        ["rm", "-f", "{prefix}"],
        ["logs", "-f", "--tail", "1", "{prefix}"],
    ],
)
async def test_each_command_uses_one_connection(dev: DevServer, args: list[str]) -> None:
    """One TCP connection (one TLS handshake) for the whole command: Start, the output and
    the end of ``run``; List (for an id prefix) and the call itself for the others."""
    target = start(dev, "sh", "-c", "echo hi; sleep 0.5")
    proxy = CuttingProxy(dev.port)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(proxy.serve)
        argv = [arg.replace("{prefix}", target[:-4].lower()) for arg in args]
        result = await trio.run_process(
            [*COMMAND, argv[0], "--addr", f"127.0.0.1:{port}", *argv[1:]],
            env=dev.env,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
        nursery.cancel_scope.cancel()
    assert result.returncode in (0, 4), result.stderr
    assert proxy.connections == 1


async def test_run_says_when_the_connection_is_lost_and_when_it_is_back(
    dev: DevServer, tmp_path: Path
) -> None:
    """``run`` follows its job on one connection: cut mid-output, it says so on stderr in one
    line, in another when it is back, and every byte still arrives exactly once."""
    expected = b"".join(f"{i:06d} {'x' * 90}\n".encode() for i in range(LINES))
    halfway = tmp_path / "go-on"
    proxy = CuttingProxy(dev.port)
    out, err = bytearray(), bytearray()
    async with trio.open_nursery() as nursery:
        port = await nursery.start(proxy.serve)
        argv = [*COMMAND, "run", "--addr", f"127.0.0.1:{port}", "--", sys.executable, "-c"]
        proc = await trio.lowlevel.open_process(
            [*argv, CHATTY_JOB, str(halfway)],
            env=dev.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert proc.stdout is not None
        assert proc.stderr is not None
        printing = trio.Event()

        async def collect(stream: trio.abc.ReceiveStream, into: bytearray) -> None:
            while data := await stream.receive_some():
                into += data
                printing.set()

        async with trio.open_nursery() as readers:
            readers.start_soon(collect, proc.stdout, out)
            readers.start_soon(collect, proc.stderr, err)
            with trio.fail_after(60):
                await printing.wait()  # the Start was answered: run follows the output
                proxy.cut()
                halfway.touch()  # the job goes on while run reconnects
                await proc.wait()
        nursery.cancel_scope.cancel()
    assert proc.returncode == 0, err
    assert proxy.cuts == 1
    assert bytes(out) == expected
    said = [line.split(" ", 2)[1] for line in err.decode().splitlines()]
    assert said == ["lost", "reconnected"], err


def said_lost(err: str, printed: int, total: int) -> None:
    """``err`` says that the job's output was lost from after the ``printed`` bytes to its
    end ``total``, in one line; before it, a line for each gap in the middle (the disk
    may take writes again half-way, as the server's other files come and go)."""
    *gaps, last = err.splitlines()
    gap = r"trio-worker: bytes \d+ to \d+ of the log are no longer kept on the server; "
    assert all(re.fullmatch(gap + "continuing after them", line) for line in gaps), err
    lost = re.fullmatch(
        rf"trio-worker: bytes (\d+) to {total} of the job's output were lost on "
        r"the server \(never written: its disk was full\?\)",
        last,
    )
    assert lost is not None, err
    # (Only the first gap is said: at least those bytes lie before the end's.)
    assert int(lost[1]) >= printed + sum(
        int(b) - int(a) for a, b in (re.findall(r"\d+", line)[:2] for line in gaps)
    ), err


@contextlib.contextmanager
def _on_a_small_disk(
    tmp_path: Path, size: str = "4m"
) -> Iterator[tuple[Path, Path, dict[str, str], list[str]]]:
    """A home whose state directory is on a tmpfs of ``size`` (a disk a job's output
    fills): the home, the disk, the environment and a server's arguments for it."""
    home = tmp_path / "home"
    state = home / ".local" / "state"
    state.mkdir(parents=True)
    with small_tmpfs(state / "disk", f"size={size}") as disk:
        env = clean_env(home, TRIO_WORKER_STATE_DIR=str(disk / "trio-worker"))
        yield home, disk, env, ["--listen", "127.0.0.1:0", *own_cgroup(home)]


@pytest.mark.root
def test_run_says_when_the_end_of_the_output_was_lost_on_a_full_disk(tmp_path: Path) -> None:
    # The server's disk filled while the job wrote: what it could not write is lost,
    # counted in output_bytes. A gap in the middle shows in the next chunk's offset (said
    # on stderr); lost bytes at the end have no next chunk: run said nothing, and
    # printed less than the job wrote with exit code 0, as if that were all.
    with _on_a_small_disk(tmp_path) as (home, _, env, args):
        server = ServerProcess.start(args, env)
        try:
            dev = DevServer(server, home, env, server.port())
            server.wait_for(r"^Try it", stream="stdout")
            result = dev("run", "--", "head", "-c", "8M", "/dev/zero")
            assert result.returncode == 0, result.stderr
            got = len(result.stdout)
            assert got < 8 * 2**20
            said_lost(result.stderr.decode(), got, 8 * 2**20)
        finally:
            assert server.stop() == 0, server.stderr


@pytest.mark.root
def test_attach_and_logs_say_when_the_end_of_the_output_was_lost_on_a_full_disk(
    tmp_path: Path,
) -> None:
    # As run does (above): attach printed less than the job wrote and exited with the
    # job's 0 saying nothing, and so did logs and logs -f. They say which bytes were
    # lost; attach exits with the job's code all the same (the contract's), logs with
    # its own (14).
    total = 128 * 2**20
    with _on_a_small_disk(tmp_path, "64m") as (home, _, env, args):
        server = ServerProcess.start(args, env)
        try:
            dev = DevServer(server, home, env, server.port())
            server.wait_for(r"^Try it", stream="stdout")
            # It writes once attach has sent it a line: attach follows all of it.
            start = ok(dev("start", "-i", "--", "sh", "-c", f"read x; head -c {total} /dev/zero"))
            job_id = start.decode().strip()
            # Attach's output is read once the job has ended: until then its stream waits
            # for flow control, its reader on the server (at most ~20 MiB read ahead) far
            # behind the end of what the disk took (~63 MiB). A live reader ahead of the
            # log's writes is served from memory the bytes the disk then refuses, which no
            # later reader can get: attach then printed more than logs, and said a later
            # start of the loss (1 run in 25 at load 10-14).
            line = tmp_path / "go"
            line.write_bytes(b"go\n")
            with (
                line.open("rb") as stdin,
                subprocess.Popen(
                    [*COMMAND, "attach", "--addr", dev.addr, job_id],
                    env=env,
                    stdin=stdin,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                ) as attach,
            ):
                try:
                    ok(dev("wait", job_id))
                    out, err = attach.communicate(timeout=60)
                finally:
                    if attach.poll() is None:
                        attach.kill()
            assert attach.returncode == 0, err
            got = len(out)
            assert got < total
            said = err.decode()
            said_lost(said, got, total)
            for follow in (["-f"], []):
                logs = dev("logs", *follow, job_id)
                assert (logs.returncode, logs.stderr.decode()) == (14, said), follow
                assert len(logs.stdout) == got
        finally:
            assert server.stop() == 0, server.stderr


@pytest.mark.root
def test_a_start_whose_record_cannot_be_written_is_refused_not_lost_to_a_crash(
    tmp_path: Path,
) -> None:
    # On a full disk a Start was answered, its record pending in memory: SIGKILL the
    # server and the restarted one had never heard of the job ("removed N job
    # directories with no record"). The commit that finds the disk full takes the
    # store's reserve; from then on a Start commits its record before the spawn, or is
    # refused (9) and nothing runs.
    with _on_a_small_disk(tmp_path) as (home, disk, env, args):
        server = ServerProcess.start(args, env)
        try:
            dev = DevServer(server, home, env, server.port())
            server.wait_for(r"^Try it", stream="stdout")
            kept = ok(dev("start", "--", "sleep", "600")).decode().strip()
            db = disk / "trio-worker" / "jobs.db"
            deadline = time.monotonic() + 30
            while kept not in recorded(db):  # committed right after the answer
                assert time.monotonic() < deadline, "the record was never committed"
                time.sleep(0.02)
            filler = fill(disk)
            # The first Start meets the full disk: answered before its record's commit,
            # which goes in, in the room of the reserve it gives up.
            first = ok(dev("start", "--", "sleep", "600")).decode().strip()
            server.wait_for(r"the job database's disk is full: its reserve \(\d+ KiB\)")
            while first not in recorded(db):
                assert time.monotonic() < deadline, "the record was never committed"
                time.sleep(0.02)
            refill = fill(disk)  # (what the commit left of the reserve's room)
            refused = dev("start", "--", "sleep", "600")
            err = assert_one_line_error(refused, 9)
            assert "its record cannot be written" in err, err
            assert refused.stdout == b""
            assert sorted(ok(dev("list", "-q")).decode().split()) == sorted([kept, first])
            server.proc.kill()
            assert server.stop() == -signal.SIGKILL  # (its pipes closed)
            filler.unlink()
            refill.unlink()
            server = ServerProcess.start(args, env)
            dev = DevServer(server, home, env, server.port())
            listed = {job["id"]: job["state"] for job in json.loads(ok(dev("list", "--json")))}
            assert listed == {kept: "lost", first: "lost"}, listed
        finally:
            assert server.stop() == 0, server.stderr


def test_attach_to_an_ended_job_says_so_and_exits_with_its_code(dev: DevServer) -> None:
    """Nothing comes "from now on" from a job that has ended: ``attach`` says where its
    output is instead of printing nothing, and exits with the job's code as ``wait`` does."""
    job_id = start(dev, "sh", "-c", "echo out; exit 3")
    assert dev("wait", job_id).returncode == 3
    result = dev("attach", job_id)
    assert result.returncode == 3
    assert result.stdout == b""
    assert result.stderr.decode() == (
        f"trio-worker: job {job_id} had already ended: exited (3);"
        f" trio-worker logs {job_id} shows its output\n"
    )
    killed = start(dev, "sleep", "60")
    ok(dev("signal", killed, "KILL"))
    assert dev("wait", killed).returncode == 137
    result = dev("attach", "--no-stdin", killed)
    assert result.returncode == 137
    assert f"job {killed} had already ended: killed (SIGKILL)" in result.stderr.decode()


def test_python_m_trio_worker_is_the_command_line(dev: DevServer) -> None:
    """``python -m trio_worker`` runs the CLI (a Python user's first guess, and the way to
    reach it where no console script is on PATH): exit codes and errors as the script's."""
    module = [sys.executable, "-m", "trio_worker"]

    def run(*args: str) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            [*module, *args], env=dev.env, capture_output=True, timeout=30, check=False
        )

    result = run("run", "--addr", dev.addr, "--", "sh", "-c", "echo hi; exit 3")
    assert (result.returncode, result.stdout) == (3, b"hi\n"), result.stderr
    assert ok(run("--help")).startswith(b"Usage: trio-worker COMMAND")
    assert_one_line_error(run("status", "--addr", dev.addr, "nosuch"), 6)


def test_ps_is_list_as_in_docker(dev: DevServer) -> None:
    """``ps``, docker's name for ``list``, is the same command: options, output, errors."""
    job_id = start(dev, "sleep", "60")
    try:
        assert ok(dev("ps", "-q", "--state", "running")) == ok(
            dev("list", "-q", "--state", "running")
        )
        assert job_id in ok(dev("ps", "-q")).decode().split()
        assert {job["id"] for job in json.loads(ok(dev("ps", "--json")))} == ids(dev)
        assert "--state" in assert_one_line_error(dev("ps", "--state", "nope"), 2)
        assert re.search(rb"^  ps +The same as list", ok(cli("--help", env=dev.env)), re.M)
    finally:
        ok(dev("rm", "-f", job_id))


def test_a_lost_jobs_end_is_not_shown_as_how_long_it_ran(tmp_path: Path) -> None:
    """A job that was running when the server died is ``lost``: its ``ended_at`` is when
    the restarted server found it so, not its end (unknown), so ``status`` does not call
    the time from its start to the restart "ran"; ``wait`` exits 125 and says why."""
    home = tmp_path / "home"
    home.mkdir()
    env = clean_env(home)
    args = ["--listen", "127.0.0.1:0", *own_cgroup(home)]
    server = ServerProcess.start(args, env)
    try:
        dev = DevServer(server, home, env, server.port())
        server.wait_for(r"^Try it", stream="stdout")
        job_id = start(dev, "sleep", "600")
        db = dev.state_dir / "jobs.db"
        deadline = time.monotonic() + 30
        while job_id not in recorded(db):  # committed right after the answer
            assert time.monotonic() < deadline, "the record was never committed"
            time.sleep(0.02)
        server.proc.kill()
        assert server.stop() == -signal.SIGKILL
        server = ServerProcess.start(args, env)
        dev = DevServer(server, home, env, server.port())
        shown = ok(dev("status", job_id)).decode()
        assert re.search(r"^State\s+lost$", shown, re.M), shown
        assert re.search(
            r"^Ended\s+\S+ \S+ \S+ \(found lost at the server's restart; it ended before\)$",
            shown,
            re.M,
        ), shown
        assert "ran " not in shown, shown
        assert json.loads(ok(dev("status", "--json", job_id)))["state"] == "lost"
        waited = dev("wait", job_id)
        assert waited.returncode == 125
        assert "was lost (the server went away)" in waited.stderr.decode()
    finally:
        assert server.stop() == 0, server.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--addr", "127.0.0.1:1", "list", "-q"],
            "--addr comes before the command; options go after it: trio-worker list --addr ...",
        ),
        (
            ["--addr=127.0.0.1:1", "ps"],
            "--addr comes before the command; options go after it: trio-worker ps --addr ...",
        ),
        (["-q", "list"], "-q comes before the command; options go after it: trio-worker list -q"),
        (["--", "list"], "-- comes before the command; options go after it: trio-worker list --"),
        (["--nope"], "unknown option '--nope'; see `trio-worker --help`"),
        (["--debug", "--nope"], "unknown option '--nope'"),
    ],
)
def test_an_option_before_the_command_is_a_one_line_usage_error(
    args: list[str], message: str, tmp_path: Path
) -> None:
    """``docker -H HOST ps`` puts options first; ours go after the command. Said in one
    line: it was "unknown command '127.0.0.1:1'", or a traceback (cyclopts failed to
    render its own error for ``--nope``, ``-q list``, ``-- list``)."""
    err = assert_one_line_error(cli(*args, env=clean_env(tmp_path)), 2)
    assert message in err, err


@pytest.mark.parametrize("parent", ["../escape", "/abs", ""])
def test_serve_refuses_a_cgroup_parent_outside_its_own_as_usage(
    parent: str, tmp_path: Path
) -> None:
    """A ``--cgroup-parent`` that is no relative name is the operator's mistake (exit 2,
    naming the option), before anything is written; it was "unexpected error: ValueError
    ... this is a bug" (exit 1) once the cgroup driver met it."""
    state = tmp_path / "state"
    result = cli(
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--state-dir",
        state,
        "--cgroup-parent",
        parent,
        env=clean_env(tmp_path),
    )
    err = assert_one_line_error(result, 2)
    assert f"--cgroup-parent: {parent!r} is not a cgroup name" in err, err
    assert not state.exists()


def test_a_grace_too_long_for_the_wire_is_said_in_our_words(dev: DevServer) -> None:
    """``--grace`` past protobuf's Duration (10,000 years) is refused naming the limit; it
    was Python's timedelta's "days=1157407407; must have magnitude <= 999999999"."""
    job_id = start(dev, "sleep", "60")
    try:
        err = assert_one_line_error(dev("stop", "--grace", "99999999999999", job_id), 2)
        assert "--grace: '99999999999999' is too long; the most is 315576000000 seconds" in err
        assert json.loads(ok(dev("status", "--json", job_id)))["state"] == "running"
    finally:
        ok(dev("rm", "-f", job_id))


def test_a_user_the_certificate_may_not_run_as_gets_a_hint_about_logins(dev: DevServer) -> None:
    """A ``full`` certificate naming a user outside its logins is refused for the user, not
    the role: the hint says how to get the user (a login, or an admin certificate) instead
    of "use a certificate whose role allows this"; the role's refusals keep theirs."""
    from trio_worker._identity import Role

    pki_dir = dev.state_dir / "pki"
    full = pki.issue_client(pki_dir, "carl", Role.FULL, logins=["nobody"])
    reader = pki.issue_client(pki_dir, "reader", Role.READONLY)
    ca = pki_dir / "ca.pem"
    as_full = ("--ca", ca, "--cert", full.cert, "--key", full.key)
    err = assert_one_line_error(dev("start", *as_full, "--user", "daemon", "--", "true"), 5)
    assert "'carl' may run jobs only as nobody" in err, err
    assert "certs client ... --login USER" in err, err
    assert "role allows" not in err, err
    as_reader = ("--ca", ca, "--cert", reader.cert, "--key", reader.key)
    err = assert_one_line_error(dev("start", *as_reader, "--", "true"), 5)
    assert "use a certificate whose role allows this" in err, err


def test_an_extra_argument_is_named_in_words(dev: DevServer) -> None:
    """``stop ID1 ID2`` (docker takes several; ours one): the extra argument is named, not
    cyclopts' "Unused Tokens: ['ID2']"; nothing is stopped."""
    first, second = start(dev, "sleep", "60"), start(dev, "sleep", "60")
    try:
        err = assert_one_line_error(dev("stop", first, second), 2)
        assert err == (
            f"trio-worker: error: unexpected argument '{second}'; see `trio-worker stop --help`\n"
        )
        assert "unexpected arguments 'a', 'b', 'c' (and 2 more)" in assert_one_line_error(
            dev("list", "a", "b", "c", "d", "e"), 2
        )
        assert {json.loads(ok(dev("status", "--json", i)))["state"] for i in (first, second)} == {
            "running"
        }
    finally:
        ok(dev("rm", "-f", first, second))


def test_a_command_on_no_path_directory_is_not_found_for_another_user(tmp_path: Path) -> None:
    """A job of another user keeps the server's PATH; a directory on it that user may not
    search (root's ``~/.cargo/bin``) made execve say EACCES for every missing command, so
    ``run --user nobody -- nosuch`` was "Permission denied" and 126. Not found (127), as
    bash and docker say, with or without the namespace helper; a file that is there and
    cannot be executed stays 126."""
    from tests.conftest import require_root

    require_root("running jobs as nobody")
    home = tmp_path / "home"
    home.mkdir()
    hidden = tmp_path / "hidden"  # (tmp_path is 0700: nobody may not search it)
    hidden.mkdir(mode=0o700)
    (hidden / "notexec").write_text("not a program\n")
    env = clean_env(home, PATH=f"{hidden}:/usr/local/bin:/usr/bin:/bin")
    server = ServerProcess.start(["--listen", "127.0.0.1:0", *own_cgroup(home)], env)
    try:
        dev = DevServer(server, home, env, server.port())
        server.wait_for(r"^Try it", stream="stdout")
        for isolate in ([], ["--isolate", "pid"]):
            missing = dev("run", "--user", "nobody", *isolate, "--", "no-such-command-xyz")
            assert missing.returncode == 127, (isolate, missing.stderr)
            assert b"No such file or directory" in missing.stderr, missing.stderr
            assert ok(dev("run", "--user", "nobody", *isolate, "--", "id", "-un")) == b"nobody\n"
        refused = dev("run", "--", "notexec")  # root's: there, and not executable
        assert refused.returncode == 126, refused.stderr
        assert b"Permission denied" in refused.stderr, refused.stderr
    finally:
        assert server.stop() == 0, server.stderr


def test_a_working_directory_that_does_not_exist_is_no_missing_command(dev: DevServer) -> None:
    """A job of another user enters its ``--cwd`` with that user's rights, in the child (the
    server does not look, not to tell what exists where the user may not look): a missing
    one failed the job with ENOENT as its spawn error, "command not found" (127). It is
    126, "could not be executed otherwise", with or without the namespace helper."""
    from tests.conftest import require_root

    require_root("running jobs as nobody")
    for isolate in ([], ["--isolate", "pid"]):
        args = ["--user", "nobody", *isolate, "--cwd", "/no/such/dir", "--", "true"]
        result = dev("run", *args)
        assert result.returncode == 126, (isolate, result.stderr)
        assert b"No such file or directory: '/no/such/dir'" in result.stderr, result.stderr
        found = re.search(r"job (\w{26}) could not be started", result.stderr.decode())
        assert found is not None, result.stderr
        job_id = found[1]
        assert json.loads(ok(dev("status", "--json", job_id)))["state"] == "failed"
        assert dev("wait", job_id).returncode == 126


def test_sigterm_to_run_stops_the_job_as_ctrl_c_does(dev: DevServer) -> None:
    """``timeout 60 trio-worker run -- ...``, a CI step cancelled: SIGTERM to ``run`` stops
    the job (its last words shown, how it ended said) and exits 143, as ``docker run``
    passes it on; it ended the command alone, silently, and the job ran on unwatched."""
    script = "trap 'echo got TERM; exit 7' TERM; echo ready; while :; do sleep 0.1; done"
    proc = subprocess.Popen(
        [*COMMAND, "run", "--addr", dev.addr, "--", "sh", "-c", script],
        env=dev.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline() == b"ready\n"
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 143, err
    assert out.endswith(b"got TERM\n"), out
    lines = err.decode().splitlines()
    assert re.fullmatch(r"trio-worker: SIGTERM: stopping job (\w{26}) \(again to .*\)", lines[0])
    job_id = lines[0].split()[4]
    assert lines[-1] == f"trio-worker: job {job_id} exited (7)", lines
    assert json.loads(ok(dev("status", "--json", job_id)))["exit_code"] == 7


def test_a_script_whose_interpreter_is_missing_could_not_be_executed(
    dev: DevServer, tmp_path: Path
) -> None:
    """execve says ENOENT for a file that is there when its ``#!`` program is not: it was
    reported as the command itself not found ("No such file or directory: 'x.sh'", 127).
    It is 126, "bad interpreter", as bash says, with or without the namespace helper."""
    script = tmp_path / "x.sh"
    script.write_text("#!/no/such/interpreter\n")
    script.chmod(0o755)
    isolations: list[list[str]] = [[]]
    if os.geteuid() == 0:
        isolations.append(["--isolate", "pid"])
    for isolate in isolations:
        for command in ([str(script)], ["--cwd", str(tmp_path), "--", "./x.sh"]):
            args = [*isolate, *command] if command[0] == "--cwd" else [*isolate, "--", *command]
            result = dev("run", *args)
            assert result.returncode == 126, (args, result.stderr)
            assert b"bad interpreter: No such file or directory" in result.stderr, result.stderr
    assert dev("run", "--", "no-such-command-xyz").returncode == 127
