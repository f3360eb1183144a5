"""What a command loads at start-up: the import graph of the command line, guarded.

Start-up is most of what a client command costs (``trio-worker list`` should take 0.15 s), and
every module imported is paid on every call. Each command runs in a fresh interpreter, and
the modules it loaded are compared with what it may load: the top-level help loads neither
cyclopts nor trio; client commands load nothing of the server side (supervisor, cgroups,
store, transport, the server's wire core), nor cryptography or rich, nor dataclasses, typing,
protobuf's runtime or the public value types (the blocking client reads jobs by hand:
``_pbwire``, ``_views``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.test_cli import ServerProcess, clean_env, own_cgroup
from trio_worker import pki

#: Modules of ours that client commands may load (``_pb.*`` and ``_wire.*`` too).
CLIENT_MODULES = {
    "trio_worker",
    "trio_worker._error_codes",
    "trio_worker._errors",
    "trio_worker._limits",
    "trio_worker._states",  # the enums of the value types, not their dataclasses (``_views``)
    "trio_worker._views",
    "trio_worker._net",  # the package (its __init__ imports nothing)...
    "trio_worker._net._sockets",  # ...the socket options both ends set; not the server...
    "trio_worker._net._failures",  # ...what a failed dial says...
    "trio_worker._net._blocking",  # ...and the blocking driver; not trio's
    "trio_worker._blocking_client",
    "trio_worker._pbwire",  # the messages, by hand: no protobuf runtime (see below)
    "trio_worker._util",
    "trio_worker._wire",
    "trio_worker._tls",
    "trio_worker.cli",
    "trio_worker.cli._argv",
    "trio_worker.cli._commands",
    "trio_worker.cli._errors",
    "trio_worker.cli._exit",
    "trio_worker.cli._ids",
    "trio_worker.cli._jobs",
    "trio_worker.cli._lazy",
    "trio_worker.cli._logs",
    "trio_worker.cli._remove",
    "trio_worker.cli._parse",
    "trio_worker.cli._render",
    "trio_worker.cli._session",
    "trio_worker.cli._settings",
}
CLIENT_PREFIXES = ("trio_worker._wire.",)
#: ...but not the server's half of the wire core.
NEVER_OURS_FOR_CLIENTS = ("trio_worker._wire._h2server",)
#: Libraries no client command needs: X.509 parsing (OpenSSL checks the files), rich (help
#: only), markdown (help only), SQLite (the server's store), the event loops (the short
#: commands use the blocking driver: importing trio alone takes longer than a whole
#: ``trio-worker list`` may; purerpc's package imports anyio, its ``grpclib`` is ours), and
#: cyclopts with attrs (``_argv`` reads their command lines; cyclopts only for help).
NEVER_FOR_CLIENTS = (
    "cryptography",
    "rich",
    "markdown_it",
    "sqlite3",
    "_sqlite3",
    "trio",
    "anyio",
    "purerpc",
    "sniffio",
    "cyclopts",
    "attrs",
    "attr",
    "pathlib",  # paths are strings (``_settings``): it and fnmatch are a few ms of start-up
    # Jobs are read into ``_views``, options are plain classes: no dataclass is defined, so
    # neither it nor the inspect, ast, dis and tokenize it imports are loaded (~15 ms).
    "dataclasses",
    "inspect",
    "ast",
    "dis",
    # Nothing of theirs imports typing (protobuf did) and ours imports it for mypy only.
    "typing",
)
#: Modules that libraries import and no client command runs: deferred (``cli._lazy``), so they
#: are in ``sys.modules`` unexecuted, and what only they import never loads.
NEVER_RUN_BY_CLIENTS = ("google.protobuf.text_format", "google.protobuf.internal.decoder", "pickle")
#: protobuf's runtime and our generated modules: the blocking client writes and reads its
#: messages by hand (``_pbwire``); protobuf is imported only to read a failed call's details.
NEVER_RUN_BY_CLIENTS += (
    "google._upb._message",
    "google.protobuf.descriptor",
    "google.protobuf.message",
    "trio_worker._pb.worker_pb2",
    "trio_worker._requests",
    "trio_worker._convert",
    "trio_worker._model",
)

#: ``trio-worker --help`` and a mistyped command: the package (whose names are imported on
#: first use), the table, the exit codes.
OVERVIEW_MODULES = {
    "trio_worker",
    "trio_worker._util",
    "trio_worker.cli",
    "trio_worker.cli._commands",
    "trio_worker.cli._exit",
}
#: What a command's ``--help`` (and any command line ``_argv`` leaves to cyclopts) loads
#: besides: cyclopts' side of the signatures, and the certs sub-app it registers.
HELP_MODULES = {"trio_worker.cli._app", "trio_worker.cli._params", "trio_worker.cli._certs"}

#: Records what the command imports, not what the interpreter had already (site, .pth files).
_PROBE = """
import atexit, json, os, sys
before = set(sys.modules)
def dump():
    with open(os.environ["MODULES_OUT"], "w") as f:
        json.dump(sorted(set(sys.modules) - before), f)
atexit.register(dump)
from trio_worker.cli import main
main(sys.argv[1:])
"""


def loaded_by(
    args: list[str],
    tmp_path: Path,
    *,
    # A port nothing listens on: the command connects, fails, and exits.
    addr: str = "127.0.0.1:1",
    state_dir: Path | None = None,
    expect: int | None = None,
) -> set[str]:
    out = tmp_path / "modules.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRIO_WORKER_")}
    env.update(
        MODULES_OUT=str(out),
        HOME=str(tmp_path),
        TRIO_WORKER_STATE_DIR=str(state_dir or tmp_path / "state"),
        TRIO_WORKER_ADDR=addr,
    )
    result = subprocess.run(
        [sys.executable, "-c", _PROBE, *args],
        env=env,
        capture_output=True,
        timeout=60,
        check=False,
    )
    if expect is not None:
        assert result.returncode == expect, result.stderr.decode(errors="replace")
    return set(json.loads(out.read_text()))


@pytest.fixture
def dev_pki(tmp_path: Path) -> Path:
    pki.ensure_dev_pki(tmp_path / "state")
    return tmp_path


@pytest.mark.parametrize("args", [[], ["--help"], ["-h"], ["lsit"]])
def test_the_overview_loads_neither_cyclopts_nor_trio(args: list[str], tmp_path: Path) -> None:
    modules = loaded_by(args, tmp_path)
    ours = {m for m in modules if m.split(".")[0] == "trio_worker"}
    assert ours <= OVERVIEW_MODULES, ours - OVERVIEW_MODULES
    # Nor anything of a connection: the wire, TLS, protobuf, the value types.
    heavy = {"cyclopts", "rich", "trio", "attrs", "ssl", "google", "h2", "dataclasses"}
    assert not {m.split(".")[0] for m in modules} & heavy


@pytest.mark.parametrize(
    "args",
    [
        ["list"],
        ["list", "-q", "--state", "running", "--json"],
        ["status", "01ARZ3NDEKTSV4RRFFQ69G5FAV"],
        ["run", "--", "true"],
        ["run", "--memory", "64M", "-e", "A=b", "--isolate", "pid", "--", "true"],
        ["start", "--cwd", "/", "--", "true"],
        ["wait", "01ARZ3NDEKTSV4RRFFQ69G5FAV"],
        ["signal", "01ARZ3NDEKTSV4RRFFQ69G5FAV", "HUP"],
        ["logs", "-f", "01ARZ3NDEKTSV4RRFFQ69G5FAV"],
        ["stop", "01ARZ3NDEKTSV4RRFFQ69G5FAV"],
        ["rm", "-f", "01ARZ3NDEKTSV4RRFFQ69G5FAV"],
        ["prune"],
        ["list", "--help"],
    ],
)
def test_client_commands_load_nothing_of_the_server(args: list[str], dev_pki: Path) -> None:
    modules = loaded_by(args, dev_pki)
    ours = {m for m in modules if m.split(".")[0] == "trio_worker"}
    allowed = CLIENT_MODULES | (HELP_MODULES if "--help" in args else set())
    extra = {m for m in ours - allowed if not m.startswith(CLIENT_PREFIXES)}
    extra |= ours & set(NEVER_OURS_FOR_CLIENTS)
    assert not extra, f"{args}: client command loaded {sorted(extra)}"
    if "--help" not in args:
        assert "trio_worker._blocking_client" in modules  # the probe did reach the connection
        banned = _banned(modules)
        assert not banned, f"{args}: loaded {sorted(banned)}"


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """A development server, for command lines that go all the way."""
    home = tmp_path_factory.mktemp("home")
    server = ServerProcess.start(["--listen", "127.0.0.1:0", *own_cgroup(home)], clean_env(home))
    try:
        addr = f"127.0.0.1:{server.port()}"
        server.wait_for(r"^Try it", stream="stdout")
        yield addr, home / ".local" / "state" / "trio-worker"
    finally:
        assert server.stop() == 0, server.stderr


def test_whole_short_commands_load_no_event_loop_and_no_cyclopts(
    live: tuple[str, Path], tmp_path: Path
) -> None:
    """All the way through: a job run with its output streamed, its status, its logs, its
    end, its removal; the modules a failed dial never reaches are guarded too."""
    addr, state_dir = live

    def load(*args: str, expect: int = 0) -> set[str]:
        return loaded_by(list(args), tmp_path, addr=addr, state_dir=state_dir, expect=expect)

    for args, expect in (
        (["run", "--", "sh", "-c", "echo out; echo err >&2; exit 3"], 3),
        (["start", "--", "true"], 0),
        (["list"], 0),
        (["list", "-q", "--state", "exited"], 0),
    ):
        assert not _banned(load(*args, expect=expect)), args
    job_id = _run_list(addr, state_dir, tmp_path)[0]
    for args in (["status", job_id], ["wait", job_id], ["logs", job_id], ["rm", job_id]):
        assert not _banned(load(*args)), args


#: ``main()`` as the console script calls it; reports the collector's state as it leaves.
_GC_PROBE = """
import gc, json, os, sys
leave = os._exit
def report():
    with open(os.environ["GC_OUT"], "w") as f:
        json.dump([gc.isenabled(), gc.get_freeze_count()], f)
def exit_(code):
    report()
    leave(code)
os._exit = exit_
sys.argv = ["trio-worker", *sys.argv[1:]]
from trio_worker.cli import main
try:
    main()
finally:
    report()
"""


def _collector_as_it_leaves(args: list[str], addr: str, state_dir: Path, tmp: Path) -> list[int]:
    out = tmp / "gc.json"
    env = clean_env(tmp, TRIO_WORKER_ADDR=addr, TRIO_WORKER_STATE_DIR=str(state_dir))
    result = subprocess.run(
        [sys.executable, "-c", _GC_PROBE, *args],
        env={**env, "GC_OUT": str(out)},
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    got: list[int] = json.loads(out.read_text())
    return got


def test_a_short_command_collects_cycles_once_connected_and_other_commands_always(
    live: tuple[str, Path], tmp_path: Path
) -> None:
    """Start-up runs without the cycle collector (``cli._lazy``); a connected command has it
    back, with start-up's objects frozen out of its reach; a command cyclopts runs (help
    here, ``serve`` alike) has it as Python does, nothing frozen."""
    addr, state_dir = live
    enabled, frozen = _collector_as_it_leaves(["list"], addr, state_dir, tmp_path)
    assert enabled
    assert frozen > 1000  # the modules' objects
    assert _collector_as_it_leaves(["list", "--help"], addr, state_dir, tmp_path) == [True, 0]


def _banned(modules: set[str]) -> set[str]:
    """What of ``NEVER_FOR_CLIENTS`` and ``NEVER_RUN_BY_CLIENTS`` was loaded (purerpc's
    ``grpclib`` is the wire's)."""
    return {
        m
        for m in modules
        if m.split(".")[0] in NEVER_FOR_CLIENTS and not m.startswith("purerpc.grpclib")
    } | (modules & set(NEVER_RUN_BY_CLIENTS))


def test_a_deferred_module_runs_when_it_is_first_used() -> None:
    """Deferring may cost time on a path not foreseen, never correctness: the module runs
    on first use, by ``from package import module`` as protobuf imports it too."""
    probe = """
import sys
from trio_worker.cli._lazy import DEFERRED, defer
defer()
from trio_worker._pb import worker_pb2
assert "google.protobuf.text_format" not in sys.modules
job = worker_pb2.Job(id="x", args=["a"])
assert worker_pb2.Job.FromString(job.SerializeToString()) == job
from google.protobuf.internal import python_message
assert python_message.GeneratedProtocolMessageType  # runs it...
assert "google.protobuf.text_format" in sys.modules  # ...with what it imports
print(DEFERRED)
"""
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "python_message" in result.stdout


def _run_list(addr: str, state_dir: Path, tmp_path: Path) -> list[str]:
    env = clean_env(tmp_path, TRIO_WORKER_ADDR=addr, TRIO_WORKER_STATE_DIR=str(state_dir))
    result = subprocess.run(
        [sys.executable, "-m", "trio_worker.cli", "list", "-q"],
        env=env,
        capture_output=True,
        timeout=60,
        check=True,
    )
    return result.stdout.decode().splitlines()


def test_the_command_table_matches_the_commands() -> None:
    """The overview lists each command with its docstring's first line, without importing it."""
    import importlib

    from trio_worker.cli._app import app
    from trio_worker.cli._commands import COMMANDS, NAMES

    assert set(NAMES) == {name for name in app if not name.startswith("-")}
    for command in COMMANDS:
        module, _, attr = command.target.partition(":")
        target = getattr(importlib.import_module(f"trio_worker.cli.{module}"), attr)
        doc = target.help if command.name == "certs" else target.__doc__
        assert doc.strip().splitlines()[0] == command.summary, command.name


def test_a_command_help_shows_its_whole_description(capsys: pytest.CaptureFixture[str]) -> None:
    from trio_worker.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["run", "--help"])
    assert exit_.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "Run a job, stream its output, and exit with its exit code." in out
    assert "trio-worker run -- echo hello" in out  # from the docstring's body
