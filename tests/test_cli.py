"""The ``trio-worker`` console script end to end: a real server subprocess, real TLS.

Every client call runs the console script in a subprocess with a fresh temporary HOME (no
XDG or TRIO_WORKER variables from the developer's environment), as a new user would. One
development-mode server is shared by the module; the certificates/roles tests share a
second one started with certificates from ``trio-worker certs``.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import shlex
import signal
import socket
import stat
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Collection, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import grpc
import pytest
import trio

from tests.conftest import named_parent
from trio_worker import pki
from trio_worker._identity import Role
from trio_worker._pb import worker_pb2 as pb

_SCRIPT = Path(sys.executable).with_name("trio-worker")
#: The console script if installed next to this Python (pip install), else the module.
COMMAND = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "trio_worker.cli"]

JSON_KEYS = {
    "id",
    "owner",
    "user",
    "command",
    "args",
    "state",
    "pid",
    "exit_code",
    "signal",
    "error",
    "started_at",
    "ended_at",
    "output_bytes",
    "oom_killed",
    "limits",
    "isolation",
}


def clean_env(home: Path, **extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("TRIO_WORKER_", "XDG_")) and k != "STATE_DIRECTORY"
    }
    env["HOME"] = str(home)
    env.update(extra)
    return env


def own_cgroup(directory: Path) -> list[str]:
    """Servers of one test run share a cgroup: each needs its own parent group, or one
    would remove the other's job groups (and the parent itself when it stops). (The
    same ``directory``, the same parent: a restarted server finds its leftovers.)"""
    return ["--cgroup-parent", named_parent(f"trio-worker-test-{os.getpid()}-{directory.name}")]


def cli(
    *args: str | Path, env: dict[str, str], timeout: float = 30
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [*COMMAND, *map(str, args)], env=env, capture_output=True, timeout=timeout, check=False
    )


def cli_many(
    calls: Sequence[Sequence[str | Path]], env: dict[str, str]
) -> list[subprocess.CompletedProcess[bytes]]:
    """Several independent CLI calls at once (each is mostly interpreter start-up)."""
    with ThreadPoolExecutor(max_workers=8) as pool:
        return list(pool.map(lambda args: cli(*args, env=env), calls))


def ok(result: subprocess.CompletedProcess[bytes]) -> bytes:
    assert result.returncode == 0, (result.returncode, result.stderr.decode(errors="replace"))
    return result.stdout


def assert_one_line_error(result: subprocess.CompletedProcess[bytes], code: int) -> str:
    err = result.stderr.decode(errors="replace")
    assert result.returncode == code, (result.returncode, err)
    assert err.startswith("trio-worker: error: "), err
    assert err.count("\n") == 1, err
    assert err.endswith("\n"), err
    assert "Traceback" not in err
    return err


# --- a server in a subprocess ---------------------------------------------------------


@dataclass
class ServerProcess:
    proc: subprocess.Popen[bytes]
    stdout: list[str] = field(default_factory=list)
    stderr: list[str] = field(default_factory=list)
    threads: list[threading.Thread] = field(default_factory=list)

    @classmethod
    def start(
        cls, args: Sequence[str | Path], env: dict[str, str], *, prefix: Sequence[str] = ()
    ) -> ServerProcess:
        proc = subprocess.Popen(
            [*prefix, *COMMAND, "serve", *map(str, args)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        server = cls(proc)
        assert proc.stdout is not None
        assert proc.stderr is not None
        for pipe, lines in ((proc.stdout, server.stdout), (proc.stderr, server.stderr)):
            thread = threading.Thread(target=_drain, args=(pipe, lines), daemon=True)
            thread.start()
            server.threads.append(thread)
        return server

    def wait_for(
        self, pattern: str, *, stream: str = "stderr", timeout: float = 20
    ) -> re.Match[str]:
        lines = self.stderr if stream == "stderr" else self.stdout
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(lines):
                if match := re.search(pattern, line):
                    return match
            if self.proc.poll() is not None and all(not t.is_alive() for t in self.threads):
                break
            time.sleep(0.02)
        raise AssertionError(f"no {pattern!r} in the server's {stream}: {lines}")

    def port(self) -> int:
        return int(self.wait_for(r"serving on 127\.0\.0\.1:(\d+)")[1])

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            code = self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise
        for thread in self.threads:
            thread.join(5)
        for pipe in (self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                pipe.close()
        return code


def _drain(pipe: object, lines: list[str]) -> None:
    for raw in pipe:  # type: ignore[attr-defined]
        lines.append(raw.decode(errors="replace").rstrip("\n"))


@dataclass
class DevServer:
    server: ServerProcess
    home: Path
    env: dict[str, str]
    port: int

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def state_dir(self) -> Path:
        return self.home / ".local" / "state" / "trio-worker"

    def __call__(
        self, *args: str | Path, timeout: float = 30
    ) -> subprocess.CompletedProcess[bytes]:
        """A client command against this server (the address is the only option given)."""
        command, *rest = args
        return cli(command, "--addr", self.addr, *rest, env=self.env, timeout=timeout)


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


# --- the development PKI: the first run ---------------------------------------------


def test_first_run_prints_two_lines_and_the_command_works(dev: DevServer) -> None:
    assert len(dev.server.stdout) == 2, dev.server.stdout
    created, hint = dev.server.stdout
    pki_dir = dev.state_dir / "pki"
    assert created.startswith(f"Created a development PKI in {pki_dir}")
    prefix = "Try it from another shell: "
    assert hint.startswith(prefix)
    argv = shlex.split(hint.removeprefix(prefix))
    assert argv == ["trio-worker", "run", "--addr", dev.addr, "--", "echo", "hello"]
    # Exactly what it says, in another "shell" with the same HOME and nothing else.
    assert ok(cli(*argv[1:], env=dev.env)) == b"hello\n"

    # Keys 0600, directories 0700, and nothing written outside the state directory.
    for name in ("ca", "server", "admin"):
        assert stat.S_IMODE((pki_dir / f"{name}.key").stat().st_mode) == 0o600
        assert (pki_dir / f"{name}.pem").is_file()
    assert stat.S_IMODE(dev.state_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE(pki_dir.stat().st_mode) == 0o700
    outside = [
        p
        for p in dev.home.rglob("*")
        if not p.is_relative_to(dev.state_dir) and p not in dev.state_dir.parents
    ]
    assert outside == []


def test_second_server_on_the_same_state_dir_is_refused(dev: DevServer) -> None:
    result = cli("serve", "--listen", "127.0.0.1:0", env=dev.env)
    err = assert_one_line_error(result, 3)
    assert "in use by another trio-worker server" in err


def test_serve_refuses_a_world_writable_state_dir_untouched(tmp_path: Path) -> None:
    state = tmp_path / "shared"
    state.mkdir()
    state.chmod(0o1777)
    env = clean_env(tmp_path)
    result = cli("serve", "--listen", "127.0.0.1:0", "--state-dir", state, env=env)
    err = assert_one_line_error(result, 3)
    assert "writable by others" in err
    assert stat.S_IMODE(state.stat().st_mode) == 0o1777
    assert list(state.iterdir()) == []  # no PKI, no lock: nothing written there


def test_restart_reuses_the_pki(tmp_path: Path) -> None:
    env = clean_env(tmp_path, XDG_STATE_HOME=str(tmp_path / "xdg-state"))
    first = ServerProcess.start(["--listen", "127.0.0.1:0", *own_cgroup(tmp_path)], env)
    first.port()
    first.wait_for("^Try it", stream="stdout")
    assert first.stop() == 0
    pki_dir = tmp_path / "xdg-state" / "trio-worker" / "pki"
    before = {p.name: p.read_bytes() for p in pki_dir.iterdir()}
    assert set(before) == {"ca.pem", "ca.key", "server.pem", "server.key", "admin.pem", "admin.key"}

    second = ServerProcess.start(["--listen", "127.0.0.1:0", *own_cgroup(tmp_path)], env)
    try:
        port = second.port()
        second.wait_for("^Try it", stream="stdout")
        assert second.stdout[0] == f"Using the development PKI in {pki_dir}."
        assert ok(cli("list", "--addr", f"127.0.0.1:{port}", env=env)).startswith(b"ID")
    finally:
        assert second.stop() == 0
    assert {p.name: p.read_bytes() for p in pki_dir.iterdir()} == before


# --- run and wait: exit codes -------------------------------------------------------


def test_run_exit_codes(dev: DevServer, tmp_path: Path) -> None:
    cases: list[tuple[list[str], int]] = [
        (["true"], 0),
        (["sh", "-c", "exit 7"], 7),
        (["sh", "-c", "kill -KILL $$"], 137),
        (["sh", "-c", "kill -TERM $$"], 143),
        (["no-such-command-trio-worker"], 127),
        ([str(tmp_path)], 126),  # a directory: EACCES
    ]
    results = cli_many([["run", "--addr", dev.addr, "--", *argv] for argv, _ in cases], dev.env)
    for (argv, code), result in zip(cases, results, strict=True):
        assert result.returncode == code, (argv, result.stderr)
        if code in (126, 127):
            err = result.stderr.decode()
            assert err.startswith("trio-worker: job "), err
            assert "could not be started" in err, err
            assert err.count("\n") == 1
        else:
            assert result.stderr == b""


def test_a_closed_stdout_is_no_traceback(dev: DevServer) -> None:
    """Started with stdout closed (``>&-``), a short command still does its work and
    leaves with its own code, its output gone as to /dev/null (no traceback from the
    fast exit's flush, and no socket of ours on fd 1)."""

    def closed(*args: str) -> subprocess.CompletedProcess[bytes]:
        script = 'exec "$@" >&-'
        argv = [*COMMAND, args[0], "--addr", dev.addr, *args[1:]]
        return subprocess.run(
            ["sh", "-c", script, "sh", *argv], env=dev.env, capture_output=True, timeout=30
        )

    result = closed("run", "--", "sh", "-c", "echo out; echo err >&2; exit 4")
    assert (result.returncode, result.stderr) == (4, b"err\n"), result.stderr
    job_id = ok(dev("start", "--", "true")).decode().strip()
    for args, code in ((["wait", job_id], 0), (["status", job_id], 0), (["logs", job_id], 0)):
        result = closed(*args)
        assert (result.returncode, result.stderr) == (code, b""), (args, result.stderr)
    assert closed("rm", job_id).returncode == 0
    assert dev("status", job_id).returncode == 6  # no such job: it was removed


def test_output_that_cannot_be_written_is_one_line_and_its_own_code(dev: DevServer) -> None:
    """Stdout on a full disk (/dev/full): one line saying so, exit 13 (125 for run,
    whose code is the job's), never exit 0 with the output lost, never "a bug"."""

    def full(*args: str) -> subprocess.CompletedProcess[bytes]:
        argv = [*COMMAND, *args]
        with open("/dev/full", "wb") as stdout:
            return subprocess.run(
                argv, env=dev.env, stdout=stdout, stderr=subprocess.PIPE, timeout=30
            )

    job_id = ok(dev("start", "--", "echo", "hello")).decode().strip()
    assert dev("wait", job_id).returncode == 0
    cases = [
        (["--help"], 13),
        (["list", "--addr", dev.addr], 13),
        (["status", "--addr", dev.addr, job_id], 13),
        (["logs", "--addr", dev.addr, job_id], 13),
        (["run", "--addr", dev.addr, "--", "echo", "hello"], 125),
    ]
    for args, code in cases:
        result = full(*args)
        err = result.stderr.decode()
        assert result.returncode == code, (args, err)
        assert err == "trio-worker: error: cannot write the output: No space left on device\n", args


def test_a_reader_that_goes_away_is_exit_141_and_silence(dev: DevServer) -> None:
    """``trio-worker logs ID | head -c 10``: the pipe closes under a long output; the
    command leaves as cat does (141, nothing on stderr, no traceback)."""
    job_id = ok(dev("start", "--", "head", "-c", "4000000", "/dev/zero")).decode().strip()
    assert dev("wait", job_id).returncode == 0
    argv = [*COMMAND, "logs", "--addr", dev.addr, job_id]
    logs = subprocess.Popen(argv, env=dev.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert logs.stdout is not None
    assert logs.stderr is not None
    assert logs.stdout.read(10) == b"\0" * 10
    logs.stdout.close()
    with logs.stderr:
        err = logs.stderr.read()
    assert (logs.wait(timeout=30), err) == (141, b"")


def test_wait_and_signal(dev: DevServer) -> None:
    script = "trap 'echo got USR1; exit 5' USR1; echo ready; while :; do sleep 0.05; done"
    job_id = ok(dev("start", "--", "sh", "-c", script)).decode().strip()
    deadline = time.monotonic() + 10
    time.sleep(0.2)
    while b"ready" not in ok(dev("logs", job_id)):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert ok(dev("signal", job_id, "USR1")) == b""
    assert dev("wait", job_id).returncode == 5
    assert ok(dev("logs", job_id)) == b"ready\ngot USR1\n"
    err = assert_one_line_error(dev("signal", job_id, "SIGTERM"), 7)
    assert "not running" in err


# --- output: bytes as they are, streams apart -----------------------------------------

BINARY_JOB = (
    "import sys, time; sys.stdout.buffer.write(bytes(range(256))); sys.stdout.flush(); "
    "time.sleep(0.2); sys.stderr.buffer.write(bytes(range(255, -1, -1))); sys.stderr.flush()"
)


def test_binary_output_through_run_and_logs(dev: DevServer) -> None:
    everything, reversed_ = bytes(range(256)), bytes(range(255, -1, -1))
    result = dev("run", "--", sys.executable, "-c", BINARY_JOB)
    assert result.returncode == 0, result.stderr
    assert result.stdout == everything
    assert result.stderr == reversed_

    job_id = ok(dev("start", "--", sys.executable, "-c", BINARY_JOB)).decode().strip()
    full = dev("logs", "--follow", job_id)  # until the job ends
    tail, status = cli_many(
        [
            ["logs", "--addr", dev.addr, job_id, "--offset", "256"],
            ["status", "--addr", dev.addr, "--json", job_id],
        ],
        dev.env,
    )
    assert (full.returncode, full.stdout, full.stderr) == (0, everything, reversed_)
    assert (tail.returncode, tail.stdout, tail.stderr) == (0, b"", reversed_)
    assert json.loads(ok(status))["output_bytes"] == 512


def test_start_follow_env_cwd(dev: DevServer, tmp_path: Path) -> None:
    result = dev(
        "start",
        "--follow",
        "--env",
        "GREETING=hello world",
        "--env",
        "EMPTY=",
        "--cwd",
        tmp_path,
        "--",
        "sh",
        "-c",
        'echo "$GREETING"; echo "[$EMPTY]"; pwd; echo oops >&2',
    )
    lines = ok(result).decode().splitlines()
    assert re.fullmatch(r"[0-9A-Z]{26}", lines[0])
    assert lines[1:] == ["hello world", "[]", str(tmp_path)]
    assert result.stderr == b"oops\n"


# --- status and list --------------------------------------------------------------------


def test_status_and_list_json_and_tables(dev: DevServer) -> None:
    started = ok(dev("start", "--follow", "--", "sh", "-c", "echo hi; exit 3")).decode()
    job_id, hi = started.splitlines()
    assert hi == "hi"
    status, listing, table, one = cli_many(
        [
            ["status", "--addr", dev.addr, "--json", job_id],
            ["list", "--addr", dev.addr, "--json"],
            ["list", "--addr", dev.addr],
            ["status", "--addr", dev.addr, job_id],
        ],
        dev.env,
    )
    job = json.loads(ok(status))
    assert set(job) == JSON_KEYS
    assert job["id"] == job_id
    assert job["owner"] == "admin"
    assert job["user"] == pwd.getpwuid(os.getuid()).pw_name  # the server's own user
    assert (job["command"], job["args"]) == ("sh", ["-c", "echo hi; exit 3"])
    assert (job["state"], job["exit_code"], job["signal"]) == ("exited", 3, None)
    assert job["output_bytes"] == 3
    assert job["oom_killed"] is False
    assert set(job["limits"]) == {"cpus", "memory_bytes", "io_read_bps", "io_write_bps", "pids"}
    assert job["isolation"] == {"pid": False, "mount": False, "network": False}
    started = datetime.fromisoformat(job["started_at"])
    ended = datetime.fromisoformat(job["ended_at"])
    assert started.tzinfo is not None
    assert started <= ended

    jobs = json.loads(ok(listing))
    assert isinstance(jobs, list)
    assert all(set(j) == JSON_KEYS for j in jobs)
    assert [j for j in jobs if j["id"] == job_id] == [job]
    assert all(j["state"] in {"running", "exited", "killed", "failed", "lost"} for j in jobs)

    rows = ok(table).decode().splitlines()
    assert rows[0].split() == ["ID", "STATE", "STARTED", "COMMAND"]  # one owner, one user
    row = next(r for r in rows if r.startswith(job_id))
    assert "exited (3)" in row
    assert re.search(r"  \d+[smhd] ago  ", row)
    assert row.endswith("sh -c 'echo hi; exit 3'")
    assert {len(r.split("  ")[0]) for r in rows[1:]} == {26}  # aligned id column
    assert all(len(r) <= 80 for r in rows)

    text = ok(one).decode()
    assert re.search(rf"^ID\s+{job_id}$", text, re.M)
    assert re.search(r"^State\s+exited \(3\)$", text, re.M)


def test_limits_reach_the_server(dev: DevServer) -> None:
    result = dev("start", "--memory", "64M", "--pids", "50", "--", "true")
    if result.returncode == 8:  # this host cannot enforce limits (no cgroup v2 delegation)
        assert_one_line_error(result, 8)
        return
    job_id = ok(result).decode().strip()
    limits = json.loads(ok(dev("status", "--json", job_id)))["limits"]
    assert limits["memory_bytes"] == 64 * 1024**2
    assert limits["pids"] == 50


# --- errors: one line, documented code, no traceback ----------------------------------------


def test_errors_are_one_line_with_their_code(dev: DevServer, tmp_path: Path) -> None:
    other = tmp_path / "other-ca"
    pki.init_ca(other)
    pki.issue_client(other, "mallory", Role.ADMIN)
    ours = tmp_path / "ours"
    ours.mkdir()
    dev_pki = dev.state_dir / "pki"
    for name in ("ca.pem", "ca.key"):
        (ours / name).write_bytes((dev_pki / name).read_bytes())
    pki.issue_client(ours, "viewer", Role.READONLY)
    ca = dev_pki / "ca.pem"
    viewer = ["--ca", ca, "--cert", ours / "viewer.pem", "--key", ours / "viewer.key"]
    mallory = ["--ca", ca, "--cert", other / "mallory.pem", "--key", other / "mallory.key"]
    admin = ["--cert", dev_pki / "admin.pem", "--key", dev_pki / "admin.key"]
    a = ["--addr", dev.addr]
    # (Errors found before any connection are tested in-process: test_cli_parse.py.)
    cases: list[tuple[list[str | Path], int, str]] = [
        (["list", "--addr", "127.0.0.1:1"], 4, "127.0.0.1:1"),  # unreachable
        (["list", *a, *mallory], 4, dev.addr),  # TLS refused: a client from another CA
        (["list", *a, "--ca", other / "ca.pem", *admin], 4, dev.addr),  # server not trusted
        (["start", *a, "--memory", "12XB", "--", "true"], 2, "--memory: '12XB' is not a size"),
        (["status", *a, "01ARZ3NDEKTSV4RRFFQ69G5FAV"], 6, "01ARZ3NDEKTSV4RRFFQ69G5FAV"),
        (["wait", *a, "01ARZ3NDEKTSV4RRFFQ69G5FAV"], 125, "01ARZ3NDEKTSV4RRFFQ69G5FAV"),
        (["start", *a, *viewer, "--", "true"], 5, "readonly"),
        (["run", *a, *viewer, "--", "true"], 125, "readonly"),
    ]
    results = cli_many([args for args, _, _ in cases], dev.env)
    for (args, code, needle), result in zip(cases, results, strict=True):
        err = assert_one_line_error(result, code)
        assert needle in err, (args, err)


def test_debug_shows_the_traceback(dev: DevServer) -> None:
    result = dev("status", "--debug", "01ARZ3NDEKTSV4RRFFQ69G5FAV")
    assert result.returncode == 6
    assert b"Traceback" in result.stderr
    assert result.stderr.splitlines()[-1].startswith(b"trio-worker: error: ")


def test_settings_precedence_flag_env_config(dev: DevServer, tmp_path: Path) -> None:
    config_home = tmp_path / "config"
    (config_home / "trio-worker").mkdir(parents=True)
    (config_home / "trio-worker" / "config.toml").write_text(f'addr = "{dev.addr}"\n')
    env = {**dev.env, "XDG_CONFIG_HOME": str(config_home)}
    (tmp_path / "bad.toml").write_text("adress = 'typo'\n")
    env_addr = {**env, "TRIO_WORKER_ADDR": "127.0.0.1:1"}
    calls: list[tuple[list[str], dict[str, str]]] = [
        (["list"], env),  # the config file's addr
        (["list"], env_addr),  # the environment beats the file
        (["list", "--addr", dev.addr], env_addr),  # the flag beats the environment
        (["list"], {**env, "TRIO_WORKER_CONFIG": str(tmp_path / "bad.toml")}),
    ]
    with ThreadPoolExecutor(max_workers=4) as pool:
        by_config, by_env, by_flag, bad = pool.map(lambda c: cli(*c[0], env=c[1]), calls)
    ok(by_config)
    assert_one_line_error(by_env, 4)
    ok(by_flag)
    assert "unknown key 'adress'" in assert_one_line_error(bad, 3)


# --- certificates and roles --------------------------------------------------------------


@dataclass
class RealServer:
    server: ServerProcess
    pki_dir: Path
    env: dict[str, str]
    port: int

    def as_(self, name: str, *args: str | Path) -> subprocess.CompletedProcess[bytes]:
        return cli(*self.args(name, *args), env=self.env)

    def many(
        self, calls: Sequence[Sequence[str | Path]]
    ) -> list[subprocess.CompletedProcess[bytes]]:
        """(name, command, args...) calls at once."""
        return cli_many([self.args(*call) for call in calls], self.env)

    def args(self, name: str | Path, *args: str | Path) -> list[str | Path]:
        command, *rest = args
        creds: list[str | Path] = [
            "--addr",
            f"localhost:{self.port}",
            "--ca",
            self.pki_dir / "ca.pem",
            "--cert",
            self.pki_dir / f"{name}.pem",
            "--key",
            self.pki_dir / f"{name}.key",
        ]
        return [command, *creds, *rest]

    def grpc_channel(self, name: str) -> grpc.Channel:
        credentials = grpc.ssl_channel_credentials(
            root_certificates=(self.pki_dir / "ca.pem").read_bytes(),
            private_key=(self.pki_dir / f"{name}.key").read_bytes(),
            certificate_chain=(self.pki_dir / f"{name}.pem").read_bytes(),
        )
        return grpc.secure_channel(f"localhost:{self.port}", credentials)


@pytest.fixture(scope="module")
def real(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealServer]:
    home = tmp_path_factory.mktemp("ops")
    env = clean_env(home)
    pki_dir = home / "pki"
    ok(cli("certs", "init", "--dir", pki_dir, env=env))
    made = cli_many(
        [
            ["certs", "server", "--dir", pki_dir, "--host", "localhost", "127.0.0.1"],
            ["certs", "client", "--dir", pki_dir, "alice", "--role", "full"],
            ["certs", "client", "--dir", pki_dir, "bob", "--role", "full"],
            ["certs", "client", "--dir", pki_dir, "reader", "--role", "readonly"],
            ["certs", "client", "--dir", pki_dir, "root", "--role", "admin"],
        ],
        env,
    )
    for result in made:
        ok(result)
    server = ServerProcess.start(
        [
            "--listen",
            "127.0.0.1:0",
            "--state-dir",
            home / "state",
            "--ca",
            pki_dir / "ca.pem",
            "--cert",
            pki_dir / "server.pem",
            "--key",
            pki_dir / "server.key",
            *own_cgroup(home),
        ],
        env,
    )
    try:
        yield RealServer(server, pki_dir, env, server.port())
    finally:
        assert server.stop() == 0, server.stderr
    assert server.stdout == []  # no development PKI with certificates given
    assert not (home / "state" / "pki").exists()


def test_certs_files_and_show(real: RealServer) -> None:
    names = {p.name for p in real.pki_dir.iterdir()}
    assert names == {
        f"{n}.{ext}"
        for n in ("ca", "server", "alice", "bob", "reader", "root")
        for ext in ("pem", "key")
    }
    for key in real.pki_dir.glob("*.key"):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
    shown = ok(cli("certs", "show", real.pki_dir / "alice.pem", env=real.env)).decode()
    assert re.search(r"^Subject\s+CN=alice$", shown, re.M)
    assert re.search(r"^Role\s+full$", shown, re.M)
    assert re.search(r"^SHA-256\s+([0-9A-F]{2}:){31}[0-9A-F]{2}$", shown, re.M)
    assert re.search(r"^Valid until\s+\d{4}-", shown, re.M)
    again = cli("certs", "client", "--dir", real.pki_dir, "alice", "--role", "admin", env=real.env)
    assert "already exists" in assert_one_line_error(again, 3)


def test_certs_client_logins_and_show(tmp_path: Path) -> None:
    env = clean_env(tmp_path)
    pki_dir = tmp_path / "pki"
    ok(cli("certs", "init", "--dir", pki_dir, env=env))
    made = ok(
        cli(
            *("certs", "client", "--dir", pki_dir, "ci", "--role", "full"),
            *("--login", "ci", "--login", "builder"),
            env=env,
        )
    ).decode()
    assert "role full, logins ci, builder" in made
    shown = ok(cli("certs", "show", pki_dir / "ci.pem", env=env)).decode()
    assert re.search(r"^Role\s+full$", shown, re.M)
    assert re.search(r"^Logins\s+ci, builder$", shown, re.M)
    assert re.search(r"^Names\s+-$", shown, re.M)  # our URIs are shown as role and logins
    bad = cli("certs", "client", "--dir", pki_dir, "x", "--role", "full", "--login", "a b", env=env)
    assert "--login" in assert_one_line_error(bad, 2)


def test_certs_show_says_when_a_certificate_has_expired(tmp_path: Path) -> None:
    """An expired client certificate is refused by the server with a bare TLS alert; the
    operator's next step, ``certs show``, says so plainly."""
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    env = clean_env(tmp_path)
    pki_dir = tmp_path / "pki"
    ok(cli("certs", "init", "--dir", pki_dir, env=env))
    ca = x509.load_pem_x509_certificate((pki_dir / "ca.pem").read_bytes())
    ca_key = serialization.load_pem_private_key((pki_dir / "ca.key").read_bytes(), None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    now = dt.datetime.now(dt.UTC)
    old = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "old")]))
        .issuer_name(ca.subject)
        .public_key(ec.generate_private_key(ec.SECP256R1()).public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=10))
        .not_valid_after(now - dt.timedelta(days=1))
        .sign(ca_key, hashes.SHA256())
    )
    (pki_dir / "old.pem").write_bytes(old.public_bytes(serialization.Encoding.PEM))
    shown = ok(cli("certs", "show", pki_dir / "old.pem", env=env)).decode()
    assert re.search(r"^Valid until\s+.*\(expired\)$", shown, re.M), shown
    fresh = ok(cli("certs", "show", pki_dir / "ca.pem", env=env)).decode()
    assert "expired" not in fresh


def test_revoke_and_reload_through_the_cli(tmp_path: Path) -> None:
    env = clean_env(tmp_path)
    d = tmp_path / "pki"
    ok(cli("certs", "init", "--dir", d, env=env))
    for made in cli_many(
        [
            ["certs", "server", "--dir", d, "--host", "localhost", "127.0.0.1"],
            ["certs", "client", "--dir", d, "alice", "--role", "full"],
            ["certs", "client", "--dir", d, "bob", "--role", "full"],
        ],
        env,
    ):
        ok(made)
    said = ok(cli("certs", "revoke", "--dir", d, "alice", env=env)).decode()
    assert "alice" in said
    assert f"--crl {d / 'crl.pem'}" in said
    server = ServerProcess.start(
        [
            *("--listen", "127.0.0.1:0", "--state-dir", tmp_path / "state"),
            *("--ca", d / "ca.pem", "--cert", d / "server.pem", "--key", d / "server.key"),
            *("--crl", d / "crl.pem", *own_cgroup(tmp_path)),
        ],
        env,
    )
    try:
        port = server.port()

        def as_(name: str) -> list[str | Path]:
            return [
                *("list", "--addr", f"localhost:{port}", "--ca", d / "ca.pem"),
                *("--cert", d / f"{name}.pem", "--key", d / f"{name}.key"),
            ]

        alice, bob = cli_many([as_("alice"), as_("bob")], env)
        assert_one_line_error(alice, 4)  # revoked before the server started
        ok(bob)
        ok(cli("certs", "revoke", "--dir", d, "bob", env=env))
        server.proc.send_signal(signal.SIGHUP)
        server.wait_for("SIGHUP: reloaded the CA, certificate, key and CRL")
        alice, bob = cli_many([as_("alice"), as_("bob")], env)
        assert_one_line_error(alice, 4)
        assert_one_line_error(bob, 4)
        (d / "crl.pem").write_text("garbage")
        server.proc.send_signal(signal.SIGHUP)
        server.wait_for(r"SIGHUP: reload failed, keeping the previous TLS material: .*crl\.pem")
        assert_one_line_error(cli(*as_("bob"), env=env), 4)
    finally:
        assert server.stop() == 0, server.stderr


def test_quota_refusal_exits_9(tmp_path: Path) -> None:
    env = clean_env(tmp_path)
    d = tmp_path / "pki"
    ok(cli("certs", "init", "--dir", d, env=env))
    for made in cli_many(
        [
            ["certs", "server", "--dir", d, "--host", "localhost"],
            ["certs", "client", "--dir", d, "alice", "--role", "full"],
        ],
        env,
    ):
        ok(made)
    server = ServerProcess.start(
        [
            *("--listen", "127.0.0.1:0", "--state-dir", tmp_path / "state"),
            *("--ca", d / "ca.pem", "--cert", d / "server.pem", "--key", d / "server.key"),
            *("--max-running", "1", *own_cgroup(tmp_path)),
        ],
        env,
    )
    try:
        creds = [
            *("--addr", f"localhost:{server.port()}", "--ca", d / "ca.pem"),
            *("--cert", d / "alice.pem", "--key", d / "alice.key"),
        ]
        if os.geteuid() == 0:
            server.wait_for(
                r"^trio-worker: warning: serving as root without --job-user: every full"
            )
        # Which cgroups hold the jobs, once it listens (a failed listen stays one line).
        server.wait_for(r"trio_worker.server: (cgroups: v[12], the jobs' groups under |no usable)")
        job = ok(cli("start", *creds, "--", "sleep", "60", env=env)).decode().strip()
        err = assert_one_line_error(cli("start", *creds, "--", "true", env=env), 9)
        assert "quota exceeded: at most 1 running job per client (--max-running)" in err
        ok(cli("stop", *creds, "--grace", "0", job, env=env))
        ok(cli("start", *creds, "--", "true", env=env))
    finally:
        assert server.stop() == 0, server.stderr


def test_a_low_descriptor_limit_is_said_at_start(tmp_path: Path) -> None:
    """A hard RLIMIT_NOFILE too low for the default caps: serve still serves, and says once
    how few connections it allows and how to raise it (not only later, as refusals)."""
    env = clean_env(tmp_path)
    server = ServerProcess.start(
        ["--listen", "127.0.0.1:0", "--state-dir", tmp_path / "state", *own_cgroup(tmp_path)],
        env,
        prefix=["prlimit", "--nofile=256:256", "--"],
    )
    try:
        port = server.port()
        said = server.wait_for(r"descriptor limit \(RLIMIT_NOFILE (\d+).* allows only (\d+) conn")
        assert int(said[1]) == 256
        assert 0 < int(said[2]) < 128
        assert "LimitNOFILE=" in said.string
        ok(cli("list", "--addr", f"127.0.0.1:{port}", "--state-dir", tmp_path / "state", env=env))
    finally:
        assert server.stop() == 0, server.stderr


def test_the_connections_per_client_cap_is_a_serve_flag(tmp_path: Path) -> None:
    """``serve --max-connections-per-client N`` (TransportConfig's 128 without it): with 1,
    a client that holds a connection has its next one refused, in the server's words (its
    GOAWAY's), and is served again once the first has closed; 0 is refused before anything
    starts."""
    env = clean_env(tmp_path)
    state = tmp_path / "state"
    err = assert_one_line_error(
        cli("serve", "--state-dir", state, "--max-connections-per-client", "0", env=env), 2
    )
    assert "--max-connections-per-client: must be at least 1" in err
    server = ServerProcess.start(
        [
            *("--listen", "127.0.0.1:0", "--state-dir", state),
            *("--max-connections-per-client", "1", *own_cgroup(tmp_path)),
        ],
        env,
    )
    try:
        port = server.port()
        d = state / "pki"
        client = ["--addr", f"127.0.0.1:{port}", "--state-dir", state]
        ok(cli("list", *client, env=env))
        credentials = grpc.ssl_channel_credentials(
            root_certificates=(d / "ca.pem").read_bytes(),
            private_key=(d / "admin.key").read_bytes(),
            certificate_chain=(d / "admin.pem").read_bytes(),
        )
        with grpc.secure_channel(f"localhost:{port}", credentials) as channel:
            listing = channel.unary_unary(
                "/trioworker.v1.Worker/List",
                request_serializer=pb.ListRequest.SerializeToString,
                response_deserializer=pb.ListResponse.FromString,
            )(pb.ListRequest(), timeout=10)
            assert isinstance(listing, pb.ListResponse)
            err = assert_one_line_error(cli("list", *client, env=env), 4)
            assert "(the server said: 1 connections open for this client)" in err
            assert "serve --max-connections-per-client" in err  # the hint, not "running?"
            server.wait_for(r"refusing a connection from .*: 1 connections open for this client")
        ok(cli("list", *client, env=env))
    finally:
        assert server.stop() == 0, server.stderr


def test_roles_through_the_cli(real: RealServer) -> None:
    alice, bob = (
        ok(r).decode().strip()
        for r in real.many(
            [("alice", "start", "--", "sleep", "60"), ("bob", "start", "--", "sleep", "60")]
        )
    )
    (
        alice_list,
        reader_list,
        alice_status_bob,
        alice_stop_bob,
        reader_start,
        reader_stop,
        reader_signal,
        reader_status_bob,
    ) = real.many(
        [
            ("alice", "list", "--json"),
            ("reader", "list", "--json"),
            ("alice", "status", bob),
            ("alice", "stop", bob),
            ("reader", "start", "--", "true"),
            ("reader", "stop", alice),
            ("reader", "signal", alice, "HUP"),
            ("reader", "status", "--json", bob),
        ]
    )

    def ids(result: subprocess.CompletedProcess[bytes]) -> set[str]:
        return {j["id"] for j in json.loads(ok(result))}

    assert alice in ids(alice_list)
    assert bob not in ids(alice_list)  # full: only its own jobs
    assert {alice, bob} <= ids(reader_list)  # readonly: every job
    assert_one_line_error(alice_status_bob, 6)  # others' jobs are "not found" for full
    assert_one_line_error(alice_stop_bob, 6)
    assert_one_line_error(reader_start, 5)
    assert_one_line_error(reader_stop, 5)
    assert_one_line_error(reader_signal, 5)
    assert json.loads(ok(reader_status_bob))["owner"] == "bob"
    root_stops_bob, alice_stops_alice = real.many(
        [("root", "stop", "--grace", "1", bob), ("alice", "stop", alice)]
    )
    assert ok(root_stops_bob).decode() == f"{bob} killed (SIGTERM)\n"  # admin: every job
    assert ok(alice_stops_alice).decode().startswith(f"{alice} killed")


def test_certs_work_with_an_official_grpc_client(real: RealServer) -> None:
    def unary(channel: grpc.Channel, method: str, request: object, reply: type) -> object:
        call = channel.unary_unary(
            f"/trioworker.v1.Worker/{method}",
            request_serializer=type(request).SerializeToString,  # type: ignore[attr-defined]
            response_deserializer=reply.FromString,  # type: ignore[attr-defined]
        )
        return call(request, timeout=10)

    with real.grpc_channel("alice") as channel:
        job = unary(channel, "Start", pb.StartRequest(command="true"), pb.Job)
        assert isinstance(job, pb.Job)
        assert job.owner == "alice"
        done = unary(channel, "Wait", pb.WaitRequest(id=job.id), pb.Job)
        assert isinstance(done, pb.Job)
        assert done.state == pb.JOB_STATE_EXITED
    with real.grpc_channel("reader") as channel:
        listing = unary(channel, "List", pb.ListRequest(), pb.ListResponse)
        assert isinstance(listing, pb.ListResponse)
        assert job.id in {j.id for j in listing.jobs}
        with pytest.raises(grpc.RpcError) as denied:
            unary(channel, "Start", pb.StartRequest(command="true"), pb.Job)
        assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with real.grpc_channel("bob") as channel, pytest.raises(grpc.RpcError) as hidden:
        unary(channel, "Status", pb.StatusRequest(id=job.id), pb.Job)
    assert hidden.value.code() == grpc.StatusCode.NOT_FOUND


# --- surviving a dropped connection -------------------------------------------------------


class CuttingProxy:
    """A TCP proxy whose connections the test can cut at any moment, and which can drop
    chosen connections (numbered from 1) right after the client's first TLS record, its
    ClientHello: a cut that lands inside a reconnect's handshake, every time."""

    def __init__(
        self,
        upstream_port: int,
        *,
        drop_at_hello: Collection[int] = (),
        reset: bool = False,
        then: int | None = None,
    ) -> None:
        self.upstream_port = upstream_port
        self.then = then  # where the connections after the first go, if not upstream
        self.drop_at_hello = drop_at_hello
        self.reset = reset  # drop with a TCP reset (SO_LINGER 0), not an orderly FIN
        self.connections = 0
        self.dropped = 0
        self.cuts = 0
        self._open: set[trio.CancelScope] = set()

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        task_status.started(listeners[0].socket.getsockname()[1])
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, client: trio.SocketStream) -> None:
        self.connections += 1
        if self.connections in self.drop_at_hello:
            await _read_record(client)
            self.dropped += 1
            await self._drop(client)
            return
        with trio.CancelScope() as scope:
            self._open.add(scope)
            try:
                port = self.upstream_port
                if self.then is not None and self.connections > 1:
                    port = self.then
                upstream = await trio.open_tcp_stream("127.0.0.1", port)
                async with upstream, trio.open_nursery() as nursery:
                    nursery.start_soon(_pipe, client, upstream)
                    nursery.start_soon(_pipe, upstream, client)
            finally:
                self._open.discard(scope)
        await self._drop(client)

    async def _drop(self, client: trio.SocketStream) -> None:
        if self.reset:
            client.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        await trio.aclose_forcefully(client)

    def cut(self) -> None:
        for scope in list(self._open):
            self.cuts += 1
            scope.cancel()


async def _read_record(stream: trio.SocketStream) -> bytes:
    """One whole TLS record (a 5-byte header, then its length)."""
    data = b""
    while len(data) < 5 or len(data) < 5 + int.from_bytes(data[3:5], "big"):
        more = await stream.receive_some(65536)
        assert more, "the client closed before its ClientHello"
        data += more
    assert data[0] == 0x16, "not a TLS handshake record"
    return data


async def _pipe(source: trio.SocketStream, sink: trio.SocketStream) -> None:
    try:
        while data := await source.receive_some(65536):
            await sink.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass


class Follower:
    """``trio-worker logs -f`` in a subprocess, its stdout and stderr read as they come, so
    a test can cut its connection once output has arrived (not after some time)."""

    def __init__(self, proc: trio.Process) -> None:
        self.proc = proc
        self.stdout = bytearray()
        self.stderr = bytearray()
        self.ended = False  # its stdout is at EOF
        self._grew = trio.Event()

    async def read(self) -> None:
        async def drain(stream: trio.abc.ReceiveStream | None, into: bytearray) -> None:
            assert stream is not None
            while data := await stream.receive_some(65536):
                into += data
                self._grew.set()
                self._grew = trio.Event()
            if into is self.stdout:
                self.ended = True
                self._grew.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(drain, self.proc.stdout, self.stdout)
            nursery.start_soon(drain, self.proc.stderr, self.stderr)

    async def printed(self, size: int) -> None:
        """Until at least ``size`` bytes are on its stdout."""
        while len(self.stdout) < size:
            if self.ended:
                raise AssertionError(f"logs -f ended early: {self.stderr.decode()}")
            await self._grew.wait()


def _said(stderr: bytes) -> list[str]:
    """The reconnection notes' verbs ("lost", "reconnected") in order."""
    return [line.split(" ", 2)[1] for line in stderr.decode().splitlines()]


async def _cli_process(*args: str, env: dict[str, str]) -> trio.Process:
    return await trio.lowlevel.open_process(
        [*COMMAND, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )


LINES = 1500
LINE = 98  # bytes: "000123 ", 90 x, a newline
EXPECTED = b"".join(f"{i:06d} {'x' * 90}\n".encode() for i in range(LINES))
# The job stops at even intervals, each time until the file named by its next argument
# exists: the test cuts the follower there, with the stream live whatever the machine's load.
CHATTY_JOB = (
    "import os, sys, time\n"
    "gates = sys.argv[1:]\n"
    f"for i in range(1, {LINES} + 1):\n"
    "    sys.stdout.write(f'{i - 1:06d} ' + 'x' * 90 + '\\n'); sys.stdout.flush()\n"
    "    for k, gate in enumerate(gates):\n"
    f"        while i == {LINES} * (k + 1) // (len(gates) + 1) and not os.path.exists(gate):\n"
    "            time.sleep(0.02)\n"
)


async def _follow_through_cuts(
    dev: DevServer, tmp_path: Path, proxy: CuttingProxy, cuts: int, *options: str
) -> Follower:
    """Start the chatty job with ``cuts`` stops, follow it (``logs -f`` with ``options``)
    through ``proxy``, and cut the connection at each stop once the follower has printed
    everything up to it: cut ``k`` ends connection ``k``, the only one open."""
    gates = [tmp_path / f"go-on-{k}" for k in range(cuts)]
    job = [sys.executable, "-c", CHATTY_JOB, *map(str, gates)]
    started = await trio.run_process(
        [*COMMAND, "start", "--addr", dev.addr, "--", *job], env=dev.env, capture_stdout=True
    )
    job_id = started.stdout.decode().strip()
    async with trio.open_nursery() as nursery:
        port = await nursery.start(proxy.serve)
        addr = f"127.0.0.1:{port}"
        proc = await _cli_process("logs", "-f", "--addr", addr, *options, job_id, env=dev.env)
        follower = Follower(proc)
        try:
            with trio.fail_after(60):
                async with trio.open_nursery() as reading:
                    reading.start_soon(follower.read)
                    for k, gate in enumerate(gates):
                        await follower.printed(LINES * (k + 1) // (cuts + 1) * LINE)
                        proxy.cut()
                        gate.touch()
                await proc.wait()
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            for gate in gates:
                gate.touch()  # (the job ends, whatever happened)
        nursery.cancel_scope.cancel()
    return follower


async def test_logs_follow_resumes_after_the_connection_is_cut(
    dev: DevServer, tmp_path: Path
) -> None:
    proxy = CuttingProxy(dev.port)
    follower = await _follow_through_cuts(dev, tmp_path, proxy, cuts=2)
    assert follower.proc.returncode == 0, follower.stderr
    assert (proxy.cuts, proxy.connections) == (2, 3)
    assert bytes(follower.stdout) == EXPECTED  # every byte exactly once, in order
    # One line when the connection is lost, one when it is back, for each cut.
    assert _said(follower.stderr) == ["lost", "reconnected"] * 2, follower.stderr


@pytest.mark.parametrize("reset", [False, True], ids=["eof", "reset"])
async def test_logs_follow_retries_a_cut_in_the_reconnects_handshake(
    dev: DevServer, tmp_path: Path, reset: bool
) -> None:
    """The second connection ends after our ClientHello, with EOF or a reset: a blip, not a
    refusal of our certificate, so the third connection resumes the output."""
    proxy = CuttingProxy(dev.port, drop_at_hello={2}, reset=reset)
    follower = await _follow_through_cuts(dev, tmp_path, proxy, cuts=1)
    assert follower.proc.returncode == 0, follower.stderr
    assert (proxy.cuts, proxy.dropped, proxy.connections) == (1, 1, 3)
    assert bytes(follower.stdout) == EXPECTED
    # One run of failures: lost once, back once (the dropped handshake is part of it).
    assert _said(follower.stderr) == ["lost", "reconnected"], follower.stderr


@pytest.mark.parametrize("refuser", ["we", "they"])
async def test_logs_follow_stops_at_a_refusal_in_a_reconnect(
    dev: DevServer, real: RealServer, tmp_path: Path, refuser: str
) -> None:
    """The connection comes back to a server of another CA. Its TLS says no (we cannot
    verify its certificate, or, when we trust its CA too, it refuses ours with an alert):
    trying again would get the same answer, so the command ends at once, on one line,
    keeping what it printed."""
    proxy = CuttingProxy(dev.port, then=real.port)
    ca, cert, key = (dev.state_dir / "pki" / name for name in ("ca.pem", "admin.pem", "admin.key"))
    if refuser == "they":
        both = tmp_path / "both-cas.pem"
        both.write_bytes(ca.read_bytes() + (real.pki_dir / "ca.pem").read_bytes())
        ca = both
    options = ("--ca", str(ca), "--cert", str(cert), "--key", str(key))
    follower = await _follow_through_cuts(dev, tmp_path, proxy, 1, *options)
    err = follower.stderr.decode()
    assert follower.proc.returncode == 4, err
    lost, error = err.splitlines()
    assert lost.startswith("trio-worker: lost the connection to "), err
    refusal = "the server refused our certificate (" if refuser == "they" else "certificate verify"
    # The refusal itself ends the command, not a spent reconnection budget.
    assert re.match(
        rf"trio-worker: error: TLS handshake with [\d.:]+ failed: {re.escape(refusal)}", error
    ), err
    assert proxy.connections == 2  # not retried
    printed = bytes(follower.stdout)
    assert printed == EXPECTED[: LINES // 2 * LINE]  # everything up to the cut, once


async def test_a_server_refusing_our_certificate_is_told_every_time(
    dev: DevServer, real: RealServer, tmp_path: Path
) -> None:
    """Both clients against a server in another process that refuses our certificate
    (its CA is not ours): what it said, its alert, every time. Its close can meet our
    first write before we read the alert (two tries in five, loaded); the alert is read
    all the same, so a refusal is never taken for a blip (``Refused``)."""
    from trio_worker._blocking_client import connect_blocking
    from trio_worker._net._failures import Refused
    from trio_worker.client import connect

    both = tmp_path / "both-cas.pem"
    both.write_bytes(
        b"".join((d / "ca.pem").read_bytes() for d in (dev.state_dir / "pki", real.pki_dir))
    )
    files = {
        "ca": both,
        "cert": dev.state_dir / "pki" / "admin.pem",
        "key": dev.state_dir / "pki" / "admin.key",
    }
    addr = f"127.0.0.1:{real.port}"
    refusal = f"TLS handshake with {addr} failed: the server refused our certificate ("

    def blocking() -> list[str]:
        said = []
        for _ in range(20):
            with pytest.raises(Refused) as info, connect_blocking(addr, **files):
                pass
            said.append(str(info.value))
        return said

    said = await trio.to_thread.run_sync(blocking)
    for _ in range(20):
        with pytest.raises(Refused) as info:
            async with connect(addr, **files):
                pass
        said.append(str(info.value))
    assert all(line.startswith(refusal) for line in said), said


# --- Ctrl-C -----------------------------------------------------------------------------


def _run_until_ready(dev: DevServer, script: str, *extra: str) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [*COMMAND, "run", "--addr", dev.addr, *extra, "--", "sh", "-c", script],
        env=dev.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline() == b"ready\n"
    return proc


def _job_id_of(dev: DevServer, script: str) -> str:
    jobs = json.loads(ok(dev("list", "--json")))
    return next(j["id"] for j in jobs if j["args"] == ["-c", script])


def test_ctrl_c_stops_the_job_and_exits_130(dev: DevServer) -> None:
    script = "trap 'echo got TERM; exit 3' TERM; echo ready; while :; do sleep 0.05; done"
    proc = _run_until_ready(dev, script)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=20)
    assert proc.returncode == 130, err
    assert out == b"got TERM\n"  # the job's last words still arrive
    assert b"stopping job" in err
    assert err.decode().splitlines()[-1].endswith(" exited (3)")  # how it ended, last
    job = json.loads(ok(dev("status", "--json", _job_id_of(dev, script))))
    assert (job["state"], job["exit_code"]) == ("exited", 3)


def test_second_ctrl_c_leaves_at_once(dev: DevServer) -> None:
    script = "trap '' TERM; echo ready; while :; do sleep 0.05; done"
    proc = _run_until_ready(dev, script, "--grace", "30")
    proc.send_signal(signal.SIGINT)
    assert proc.stderr is not None
    # The first press is seen (the job is being stopped) before the second is sent.
    assert b"stopping job" in proc.stderr.readline()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=20)  # well within the 30 s grace
    assert proc.returncode == 130, err
    assert b"Traceback" not in err
    job_id = _job_id_of(dev, script)
    # Still running (it ignores TERM, and the grace is 30 s): kill it now.
    ok(dev("signal", job_id, "KILL"))
    assert dev("wait", job_id).returncode == 137
