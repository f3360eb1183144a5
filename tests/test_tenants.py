"""Jobs run as Unix users named in certificates, and reach none of the server's state.

Real users (made by useradd, unique names, removed afterwards), a real server with the
development PKI in its state directory, real jobs that try, from inside, to read what
is not theirs and to lift their own limits.
"""

from __future__ import annotations

import json
import logging
import os
import pwd
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio

from trio_worker import InvalidRequest, JobInfo, Limits, PermissionDenied, pki
from trio_worker._host._users import lookup_user
from trio_worker._identity import Role
from trio_worker._jobs._supervisor import open_supervisor
from trio_worker._model import Isolation
from trio_worker.client import WorkerClient, connect
from trio_worker.server._run import ServerSettings, run_server

from .conftest import require_root

pytestmark = pytest.mark.root


@dataclass(frozen=True)
class Account:
    name: str
    uid: int
    gid: int
    home: str


@pytest.fixture(scope="module")
def accounts() -> Iterator[dict[str, Account]]:
    """Three real users: two tenants and the server's default job user."""
    require_root("creating users")
    tag = secrets.token_hex(3)
    made: dict[str, Account] = {}
    try:
        for role in ("alice", "bob", "svc"):
            name = f"tw{role[:3]}{tag}"
            subprocess.run(
                ["useradd", "--create-home", "--shell", "/bin/sh", "--user-group", name],
                check=True,
            )
            entry = pwd.getpwnam(name)
            made[role] = Account(name, entry.pw_uid, entry.pw_gid, entry.pw_dir)
        subprocess.run(["groupadd", f"twgrp{tag}"], check=True)
        subprocess.run(["usermod", "-aG", f"twgrp{tag}", made["alice"].name], check=True)
        yield made
    finally:
        for account in made.values():
            subprocess.run(["userdel", "--remove", account.name], check=False, capture_output=True)
        subprocess.run(["groupdel", f"twgrp{tag}"], check=False, capture_output=True)


@dataclass
class Served:
    port: int
    state: Path
    pki: Path
    accounts: dict[str, Account]

    def connect(self, name: str) -> Any:
        return connect(
            f"127.0.0.1:{self.port}",
            ca=self.pki / "ca.pem",
            cert=self.pki / f"{name}.pem",
            key=self.pki / f"{name}.key",
            server_hostname="localhost",
        )


@pytest.fixture
def public_parent() -> Iterator[Path]:
    """A directory anyone may enter: only the state directory's own mode protects it."""
    parent = Path(tempfile.mkdtemp(prefix="tw-tenants-"))
    parent.chmod(0o755)
    try:
        yield parent
    finally:
        shutil.rmtree(parent, ignore_errors=True)


@pytest.fixture
async def served(accounts: dict[str, Account], public_parent: Path) -> AsyncIterator[Served]:
    parent = public_parent
    state = parent / "state"
    dev = pki.ensure_dev_pki(state)  # ca.key in the state directory, as `serve` makes it
    certs = parent / "certs"
    pki.init_ca(certs)
    pki.issue_server(certs, ["localhost"])
    a, b = accounts["alice"].name, accounts["bob"].name
    pki.issue_client(certs, "alice", Role.FULL, logins=[a])
    pki.issue_client(certs, "bob", Role.FULL, logins=[b])
    pki.issue_client(certs, "carol", Role.FULL)  # no logins
    pki.issue_client(certs, "ghosted", Role.FULL, logins=["nosuchuser0x"])
    pki.issue_client(certs, "root", Role.ADMIN)
    settings = ServerSettings(
        ca=certs / "ca.pem",
        cert=certs / "server.pem",
        key=certs / "server.key",
        state_dir=state,
        port=0,
        job_user=lookup_user(accounts["svc"].name),
    )
    assert dev.ca.key.exists()
    async with trio.open_nursery() as nursery:
        port = await nursery.start(
            lambda task_status: run_server(settings, handle_signals=False, task_status=task_status)
        )
        yield Served(port, state, certs, accounts)
        nursery.cancel_scope.cancel()


async def output_of(client: WorkerClient, job: JobInfo) -> str:
    data = b"".join([chunk.data async for chunk in client.output(job.id)])
    return data.decode()


async def run(client: WorkerClient, script: str, **kw: Any) -> tuple[JobInfo, str]:
    job = await client.start("sh", ["-c", script], **kw)
    text = await output_of(client, job)
    return await client.wait(job.id), text


IDENTITY = 'echo "$(id -u) $(id -g) $(id -G) $(pwd) $HOME $USER $LOGNAME $SHELL"'


async def test_who_jobs_run_as(served: Served, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="trio_worker.audit")
    acc = served.accounts
    alice, bob, svc = acc["alice"], acc["bob"], acc["svc"]
    extra_gid = next(g for g in os.getgrouplist(alice.name, alice.gid) if g != alice.gid)
    async with (
        served.connect("alice") as as_alice,
        served.connect("carol") as as_carol,
        served.connect("root") as as_root,
        served.connect("ghosted") as as_ghost,
    ):
        # A full client's first login; uid, primary gid, groups, cwd and passwd variables.
        job, text = await run(as_alice, IDENTITY)
        assert job.user == alice.name
        uid, gid, *groups, cwd, home, user, logname, shell = text.split()
        assert (int(uid), int(gid)) == (alice.uid, alice.gid)
        assert sorted(map(int, groups)) == sorted({alice.gid, extra_gid})
        assert (cwd, home, user, logname, shell) == (
            alice.home,
            alice.home,
            alice.name,
            alice.name,
            "/bin/sh",
        )
        # The request's env overrides; an explicit cwd wins.
        job, text = await run(as_alice, 'echo "$HOME $(pwd)"', env={"HOME": "/x"}, cwd="/tmp")
        assert text.split() == ["/x", "/tmp"]
        # The server's environment does not follow a job to another user.
        job, text = await run(as_alice, "env")
        assert "TRIO_WORKER" not in text
        # Naming the default job user is allowed, by name or uid; another login is not.
        job, text = await run(as_alice, "id -u", user=svc.name)
        assert (job.user, text.strip()) == (svc.name, str(svc.uid))
        job, _ = await run(as_alice, "true", user=str(alice.uid))
        assert job.user == alice.name
        before = len(await as_alice.list())
        for other in (bob.name, str(bob.uid), "root", "nosuchuser0y"):
            with pytest.raises(PermissionDenied):
                await as_alice.start("touch", ["/tmp/must-not-exist"], user=other)
        assert len(await as_alice.list()) == before  # nothing ran
        # No logins: the server's default job user.
        job, text = await run(as_carol, "id -un")
        assert (job.user, text.strip()) == (svc.name, svc.name)
        with pytest.raises(PermissionDenied):
            await as_carol.start("true", user=alice.name)
        # A login the host does not know.
        with pytest.raises(InvalidRequest) as info:
            await as_ghost.start("true")
        assert info.value.field == "user"
        # An admin may name anyone the host knows.
        job, text = await run(as_root, "id -un", user=bob.name)
        assert (job.user, text.strip()) == (bob.name, bob.name)
        job, text = await run(as_root, "id -u", user="root")
        assert (job.user, text.strip()) == ("root", "0")
        with pytest.raises(InvalidRequest):
            await as_root.start("true", user="nosuchuser0z")
        # Status and List report it.
        listed = {j.id: j.user for j in await as_root.list()}
        assert listed[job.id] == "root"
        assert (await as_root.status(job.id)).user == "root"
    starts = [json.loads(r.getMessage()) for r in caplog.records if "/Start" in r.getMessage()]
    assert {"identity": "alice", "job_user": alice.name, "status": "OK"}.items() <= starts[
        0
    ].items()
    denied = [s for s in starts if s["status"] == "PERMISSION_DENIED"]
    assert denied
    assert all(s["job_user"] is None for s in denied)  # nothing ran


@pytest.mark.parametrize("isolation", [None, Isolation(mount=True)], ids=["plain", "ns"])
async def test_a_directory_is_entered_with_the_users_rights(
    served: Served, isolation: Isolation | None
) -> None:
    """The server does not look at another user's --cwd for it (which would tell a client
    what exists where only root can see): the job's own chdir does, as that user."""
    private = served.state / "jobs"  # exists; root only
    async with served.connect("alice") as as_alice, served.connect("root") as as_root:
        errors = []
        for cwd in (str(private), str(private / "no-such-dir")):
            job = await as_alice.start("true", cwd=cwd, isolation=isolation)
            job = await as_alice.wait(job.id)
            assert job.state.name == "FAILED", job
            errors.append(job.error.replace(cwd, "CWD"))
        assert errors[0] == errors[1]  # the same answer: nothing learnt
        assert "Permission denied" in errors[0]
        with pytest.raises(InvalidRequest):  # the server's own user: checked up front
            await as_root.start("true", cwd="/no-such-dir-0x", user="root")


def _probe(state: Path, other_job: str, other_pid: int) -> str:
    """A script trying everything a job must not reach; one 'NAME: reached' line each time
    it gets through, 'NAME: denied' otherwise."""
    targets = {
        "state-dir": f"ls {state}",
        "database": f"head -c1 {state}/jobs.db",
        "other-output": f"head -c1 {state}/jobs/{other_job}/output.log",
        "ca-key": f"head -c1 {state}/pki/ca.key",
        "server-key": f"head -c1 {state}/pki/server.key",
        "client-key": f"head -c1 {state}/pki/admin.key",
        "server-environ": f"head -c1 /proc/{os.getpid()}/environ",
        "signal-server": f"kill -0 {os.getpid()}",
        "signal-other-job": f"kill -0 {other_pid}",  # bob's, as bob
    }
    lines = [
        f'if {cmd} >/dev/null 2>&1; then echo "{name}: reached"; else echo "{name}: denied"; fi'
        for name, cmd in targets.items()
    ]
    # Its own cgroup's limit files (every hierarchy it is in), and moving out of it.
    lines.append(
        """
for dir in $(sed -n 's/^[0-9]*:[^:]*:\\(.*\\)$/\\1/p' /proc/self/cgroup | sort -u); do
  for mount in /sys/fs/cgroup /sys/fs/cgroup/*; do
    group="$mount$dir"
    [ -d "$group" ] || continue
    for f in "$group"/*.max "$group"/*limit_in_bytes "$group"/cpu.cfs_quota_us \\
             "$group"/pids.max "$group"/memory.swap.max "$group"/io.max "$group"/cgroup.procs \\
             "$group"/../cgroup.procs "$group"/../tasks; do
      [ -e "$f" ] || continue
      echo found >> /dev/null
      if (echo max > "$f") 2>/dev/null || (echo $$ > "$f") 2>/dev/null; then
        echo "cgroup $f: reached"
      else
        echo "cgroup-file: denied"
      fi
    done
  done
done
ls /proc/self/fd | tr '\\n' ' '; echo
"""
    )
    return "\n".join(lines)


@pytest.mark.parametrize("isolation", [None, Isolation(pid=True, mount=True)], ids=["plain", "ns"])
async def test_a_job_of_another_user_reaches_none_of_the_servers_state(
    served: Served, isolation: Isolation | None
) -> None:
    async with served.connect("alice") as as_alice, served.connect("bob") as as_bob:
        bobs = await as_bob.start("sh", ["-c", "echo secret; sleep 60"])
        async with as_bob.output(bobs.id) as follow:
            await anext(aiter(follow))  # it has written output
        log = served.state / "jobs" / bobs.id / "output.log"
        with trio.fail_after(10):  # (its log's files come with the flush of its first output)
            while not log.is_file():  # noqa: ASYNC110
                await trio.sleep(0.01)
        for path in ("jobs.db", f"jobs/{bobs.id}/output.log", "pki/ca.key", "pki/admin.key"):
            assert (served.state / path).is_file()  # there to be refused
        job, text = await run(
            as_alice,
            _probe(served.state, bobs.id, bobs.pid or 0),
            limits=Limits(memory_bytes=256 * 1024 * 1024, pids=64),
            isolation=isolation,
        )
        await as_bob.stop(bobs.id, grace=0)
    assert job.user == served.accounts["alice"].name
    assert job.exit_code == 0, text
    lines = text.splitlines()
    reached = [line for line in lines if line.endswith(": reached")]
    assert reached == [], text
    for name in ("state-dir", "database", "other-output", "ca-key", "server-key", "client-key"):
        assert f"{name}: denied" in lines, text
    assert "server-environ: denied" in lines
    assert "signal-server: denied" in lines
    assert "signal-other-job: denied" in lines
    assert lines.count("cgroup-file: denied") >= 3, text  # it found its limit files
    assert lines[-1].split() == ["0", "1", "2", "3"], text  # no descriptor of the server's


async def test_supervisor_user_and_default_directories(
    accounts: dict[str, Account], tmp_path: Path
) -> None:
    async with open_supervisor(tmp_path / "state") as sup:
        mine = await sup.start("pwd")
        root = await sup.start("pwd", user="root")  # the server's own user, named
        other = await sup.start("pwd", user=accounts["bob"].name)
        texts = []
        for job in (mine, root, other):
            await sup.wait(job.id)
            texts.append(b"".join([c.data async for c in sup.output(job.id)]).decode().strip())
        assert texts == [os.getcwd(), os.getcwd(), accounts["bob"].home]
        assert (mine.user, root.user, other.user) == ("root", "root", accounts["bob"].name)
        homeless = await sup.start("pwd", user="nobody")
        await sup.wait(homeless.id)
        out = b"".join([c.data async for c in sup.output(homeless.id)]).decode().strip()
        assert out == "/" or Path(out) == Path(pwd.getpwnam("nobody").pw_dir)
        with pytest.raises(InvalidRequest):
            await sup.start("true", user="nosuchuser0q")
        # On a terminal, the terminal is the user's (as login makes it).
        tty = await sup.start(
            "sh", ["-c", "stat -c %U $(tty)"], user=accounts["bob"].name, tty=True
        )
        await sup.wait(tty.id)
        out = b"".join([c.data async for c in sup.output(tty.id)]).decode().strip()
        assert out == accounts["bob"].name


def test_users_through_the_cli(accounts: dict[str, Account], public_parent: Path) -> None:
    from .test_cli import ServerProcess, assert_one_line_error, clean_env, cli, ok, own_cgroup

    alice, bob, svc = accounts["alice"], accounts["bob"], accounts["svc"]
    env = clean_env(public_parent)
    d = public_parent / "pki"
    ok(cli("certs", "init", "--dir", d, env=env))
    ok(cli("certs", "server", "--dir", d, "--host", "localhost", env=env))
    made = cli(
        "certs", "client", "--dir", d, "alice", "--role", "full", "--login", alice.name, env=env
    )
    assert f"logins {alice.name}" in ok(made).decode()
    server = ServerProcess.start(
        [
            *("--listen", "127.0.0.1:0", "--state-dir", public_parent / "state"),
            *("--ca", d / "ca.pem", "--cert", d / "server.pem", "--key", d / "server.key"),
            *("--job-user", svc.name, *own_cgroup(public_parent)),
        ],
        env,
    )
    try:
        creds = [
            *("--addr", f"localhost:{server.port()}", "--ca", d / "ca.pem"),
            *("--cert", d / "alice.pem", "--key", d / "alice.key"),
        ]
        job = ok(cli("start", *creds, "--", "sleep", "60", env=env)).decode().strip()
        other = ok(cli("start", *creds, "--user", svc.name, "--", "true", env=env)).decode()
        status = ok(cli("status", *creds, job, env=env)).decode()
        assert any(line.split()[:2] == ["User", alice.name] for line in status.splitlines())
        rows = ok(cli("list", *creds, env=env)).decode().splitlines()
        assert rows[0].split()[:2] == ["ID", "USER"]  # one owner, two users
        assert rows[1].split()[:2] == [other.strip(), svc.name]  # newest first
        assert rows[2].split()[:2] == [job, alice.name]
        ran = cli("run", *creds, "--user", svc.name, "--", "id", "-un", env=env)
        assert ok(ran).decode() == f"{svc.name}\n"
        denied = cli("run", *creds, "--user", bob.name, "--", "true", env=env)
        assert "may run jobs only as" in assert_one_line_error(denied, 125)
        denied = cli("start", *creds, "--user", bob.name, "--", "true", env=env)
        assert "may run jobs only as" in assert_one_line_error(denied, 5)
        ok(cli("stop", *creds, "--grace", "0", job, env=env))
    finally:
        assert server.stop() == 0, server.stderr
    assert not any("warning" in line for line in server.stderr), server.stderr
