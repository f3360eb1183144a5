"""The short commands' own parser (``cli/_argv``) reads command lines as cyclopts does.

``_argv`` exists only to spare the short commands cyclopts' import time; whatever it reads
it must read exactly as cyclopts would (same function, same arguments), and whatever it
does not take it must leave to cyclopts (which then says what is wrong, or shows help).
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import pytest

from trio_worker.cli import _argv
from trio_worker.cli._app import app, resolve_command
from trio_worker.cli._jobs import JobOptions
from trio_worker.cli._settings import ClientOptions

ID = "01ARZ3NDEKTSV4RRFFQ69G5FAV"

#: Command lines ``_argv`` reads itself.
READ_HERE = [
    ["list"],
    ["list", "-q"],
    ["list", "--json", "--state", "running", "--state=lost,exited", "--owner", "alice"],
    ["list", "--addr", "10.0.0.1:7000", "--ca", "ca.pem", "--cert", "c.pem", "--key", "k.pem"],
    ["list", "--state-dir", "/srv/state"],
    ["status", ID],
    ["status", "--json", "01arz"],
    ["stop", "--grace", "2.5", ID],
    ["stop", ID, "--grace=30"],
    ["signal", ID, "HUP"],
    ["signal", ID, "15"],
    ["wait", ID],
    ["logs", ID],
    ["logs", "-f", "--tail", "20", ID],
    ["logs", "--offset", "1048576", "-f", ID],
    ["logs", "-n", "3", ID],
    ["rm", ID],
    ["rm", "-f", ID, "01ARZ"],
    ["rm"],
    ["prune"],
    ["start", "--", "sleep", "300"],
    ["start", "-f", "--env", "LANG=C", "--cwd", "/srv/app", "--", "./build.sh", "-j", "4"],
    ["start", "-i", "--", "cat"],
    ["run", "--", "echo", "hello"],
    ["run", "--memory", "64M", "--cpus", "0.5", "--pids", "100", "--", "true"],
    ["run", "-e", "A=1", "-e", "B", "--isolate", "pid,mount", "--user", "nobody", "--", "id"],
    ["run", "--io-read-bps", "10M", "--io-write-bps=1G", "--grace", "1", "--", "dd"],
    ["run", "--", "sh", "-c", "echo --memory 5; exit 3"],
]

#: Command lines it leaves to cyclopts.
LEFT_TO_CYCLOPTS = [
    ["list", "--help"],
    ["status", "-h", ID],
    ["list", "--bogus"],
    ["list", "extra"],
    ["status"],
    ["status", ID, ID],
    ["signal", ID],
    ["run", "--memory", "12XB", "--", "true"],
    ["run", "echo", "hi"],
    ["run", "--"],
    ["run", "-it", "--", "bash"],
    ["list", "--json=yes"],
    ["list", "--owner"],
    ["list", "--owner="],
    ["list", "--owner", ""],
    ["stop", "--grace", "-1", ID],
    ["list", "--addr", "nowhere"],
    ["list", "--owner", "a", "--owner", "b"],
    ["attach", ID],
    ["serve"],
]


@pytest.fixture(autouse=True)
def _environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in _argv.ENV_VARS.values():
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))


def _normalized(function: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    bound = inspect.signature(function).bind(*args, **kwargs)
    bound.apply_defaults()
    arguments = dict(bound.arguments)
    if arguments.get("job") is None and "job" in arguments:
        arguments["job"] = JobOptions()
    if arguments.get("options") is None:
        arguments["options"] = ClientOptions()
    return arguments


def _cyclopts(tokens: list[str]) -> tuple[Any, dict[str, Any]]:
    resolve_command(tokens[0])
    function, bound, _ = app.parse_args(tokens)
    return function, _normalized(function, bound.args, bound.kwargs)


@pytest.mark.parametrize("tokens", READ_HERE, ids=" ".join)
def test_read_as_cyclopts_reads_it(tokens: list[str]) -> None:
    parsed = _argv.parse_short(tokens)
    assert parsed is not None, tokens
    function, args, kwargs = parsed
    expected_function, expected = _cyclopts(tokens)
    assert function is expected_function
    assert _normalized(function, args, kwargs) == expected


@pytest.mark.parametrize("tokens", LEFT_TO_CYCLOPTS, ids=" ".join)
def test_anything_else_is_left_to_cyclopts(tokens: list[str]) -> None:
    assert _argv.parse_short(tokens) is None


def test_environment_then_config_file_as_cyclopts_applies_them(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    config = tmp_path / "config" / "trio-worker" / "config.toml"
    config.parent.mkdir(parents=True)
    config.write_text('addr = "10.1.1.1:1"\nca = "pki/ca.pem"\nstate_dir = "/var/x"\n')
    monkeypatch.setenv("TRIO_WORKER_ADDR", "10.2.2.2:2")
    monkeypatch.setenv("TRIO_WORKER_CERT", "/env/c.pem")
    for tokens in (["list"], ["list", "--addr", "10.3.3.3:3", "--ca", "/flag/ca.pem"]):
        parsed = _argv.parse_short(tokens)
        assert parsed is not None
        got = _normalized(*parsed)["options"]
        assert got == _cyclopts(tokens)[1]["options"]
    assert got.addr == "10.3.3.3:3"  # flag over environment over file
    assert got.cert == "/env/c.pem"
    assert got.state_dir == "/var/x"


def test_every_option_of_a_short_command_is_one_cyclopts_knows() -> None:
    for name, command in _argv.COMMANDS.items():
        known = {
            option
            for argument in resolve_command(name).assemble_argument_collection()
            for option in argument.names
            if option.startswith("-")
        }
        ours = {option for spec in command.options for option in spec.names}
        assert ours == known, name
