"""The CLI's pure parsers: sizes, ``K=V`` pairs, signals, ``--isolate``; and the error table."""

from __future__ import annotations

import logging
import os
import re
import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

import trio_worker
from trio_worker import InvalidRequest, JobNotFound, PermissionDenied
from trio_worker._tls import TLSConfigError
from trio_worker.cli import _parse, main
from trio_worker.cli._errors import ExitCode, describe
from trio_worker.cli._settings import ClientOptions, default_state_dir, resolve_connection

UNITS = {"": 1, "B": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}


# --- sizes ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("512K", 512 * 1024),
        ("64M", 64 * 1024**2),
        ("2G", 2 * 1024**3),
        ("4096", 4096),
        ("0", 0),
        ("1.5G", 1536 * 1024**2),
        ("64MiB", 64 * 1024**2),
        ("64mb", 64 * 1024**2),
        ("10k", 10240),
        ("7B", 7),
        (" 3M ", 3 * 1024**2),
    ],
)
def test_size_examples(text: str, expected: int) -> None:
    assert _parse.parse_size(text) == expected


@pytest.mark.parametrize(
    "text", ["12XB", "", "M", "-1M", "1..5G", "1e3", "0x10", "5 M B", "64MiBs"]
)
def test_size_rejects(text: str) -> None:
    with pytest.raises(ValueError, match=r"is not a size; use e\.g\. 512K, 64M, 2G"):
        _parse.parse_size(text)


def test_size_too_large() -> None:
    with pytest.raises(ValueError, match="too large"):
        _parse.parse_size("99999999P")


@given(st.integers(min_value=0, max_value=2**40), st.sampled_from(sorted(UNITS)))
def test_size_number_times_unit(number: int, unit: str) -> None:
    value = number * UNITS[unit]
    if value > _parse.MAX_UINT64:
        return
    assert _parse.parse_size(f"{number}{unit}") == value
    assert _parse.parse_size(f"{number}{unit.lower()}") == value


@given(st.integers(min_value=0, max_value=_parse.MAX_UINT64))
def test_size_format_round_trips(value: int) -> None:
    text = _parse.format_size(value)
    assert _parse.parse_size(text) == value
    assert len(text) <= len(str(value))


@given(st.text(max_size=12))
def test_size_never_crashes(text: str) -> None:
    error = ""
    try:
        value = _parse.parse_size(text)
    except ValueError as exc:
        error = str(exc)
    if error:
        assert repr(text) in error
    else:
        assert 0 <= value <= _parse.MAX_UINT64


# --- env pairs ------------------------------------------------------------------------

keys = st.text(
    alphabet=st.characters(exclude_characters="=\0", exclude_categories=("Cs",)), min_size=1
)
values = st.text(alphabet=st.characters(exclude_characters="\0", exclude_categories=("Cs",)))


@given(keys, values)
def test_env_pair_round_trips(key: str, value: str) -> None:
    assert _parse.parse_env(f"{key}={value}") == (key, value)


@given(st.lists(st.tuples(keys, values), max_size=8))
def test_env_pairs_last_wins(pairs: list[tuple[str, str]]) -> None:
    assert _parse.parse_env_pairs(f"{k}={v}" for k, v in pairs) == dict(pairs)


@pytest.mark.parametrize("text", ["FOO", "=value", "", "A\0B=1"])
def test_env_pair_rejects(text: str) -> None:
    with pytest.raises(ValueError, match=r"KEY=VALUE|NUL"):
        _parse.parse_env(text, {})


def test_env_name_alone_takes_this_process_value() -> None:
    assert _parse.parse_env("HOME", {"HOME": "/root"}) == ("HOME", "/root")
    assert _parse.parse_env("EMPTY", {"EMPTY": ""}) == ("EMPTY", "")
    with pytest.raises(ValueError, match="'NOPE' is not set here"):
        _parse.parse_env("NOPE", {"HOME": "/root"})


@pytest.mark.parametrize(
    ("data", "lines", "whole", "expected"),
    [
        (b"a\nb\nc\n", 2, False, b"b\nc\n"),
        (b"a\nb\nc", 2, False, b"b\nc"),  # a last line without its newline counts
        (b"a\nb\nc\n", 3, False, None),  # the first line may be cut: read further back
        (b"a\nb\nc\n", 3, True, b"a\nb\nc\n"),
        (b"a\nb\nc\n", 4, True, b"a\nb\nc\n"),  # fewer lines than asked: all of them
        (b"\n\n", 1, False, b"\n"),
        (b"a\n", 0, False, b""),
        (b"", 1, False, None),
        (b"", 1, True, b""),
    ],
)
def test_tail_start_finds_the_last_lines(
    data: bytes, lines: int, whole: bool, expected: bytes | None
) -> None:
    start = _parse.tail_start(data, lines, whole=whole)
    assert (None if start is None else data[start:]) == expected


@given(
    st.lists(st.binary(max_size=5).filter(lambda b: b"\n" not in b), max_size=8), st.integers(1, 9)
)
def test_tail_start_agrees_with_splitlines(parts: list[bytes], lines: int) -> None:
    data = b"".join(part + b"\n" for part in parts)
    assert _parse.tail_start(data, lines, whole=True) is not None
    start = _parse.tail_start(data, lines, whole=False)
    if lines >= len(parts):
        assert start is None or data[start:] == data
    else:
        assert start is not None
        assert data[start:] == b"".join(part + b"\n" for part in parts[len(parts) - lines :])


def test_env_value_keeps_equals_and_may_be_empty() -> None:
    assert _parse.parse_env("A=b=c") == ("A", "b=c")
    assert _parse.parse_env("EMPTY=") == ("EMPTY", "")


# --- signals --------------------------------------------------------------------------

named = sorted(
    (s for s in signal.Signals if not s.name.startswith("SIG_") and s.name.isupper()),
    key=lambda s: s.value,
)


@given(st.sampled_from(named))
def test_signal_by_any_spelling(sig: signal.Signals) -> None:
    short = sig.name.removeprefix("SIG")
    for text in (sig.name, short, short.lower(), sig.name.lower(), str(int(sig))):
        assert _parse.parse_signal(text) == int(sig)


@given(st.integers(min_value=1, max_value=int(signal.SIGRTMAX)))
def test_signal_numbers(number: int) -> None:
    assert _parse.parse_signal(str(number)) == number


def test_signal_realtime() -> None:
    assert _parse.parse_signal("RTMIN+2") == signal.SIGRTMIN + 2
    assert _parse.parse_signal("SIGRTMAX") == signal.SIGRTMAX


@pytest.mark.parametrize("text", ["FOO", "SIGFOO", "0", "-1", "999", "", "TERM15", "RTMAX+1"])
def test_signal_rejects(text: str) -> None:
    with pytest.raises(ValueError, match=r"signal|SIGRT"):
        _parse.parse_signal(text)


def test_signal_name() -> None:
    assert _parse.signal_name(15) == "SIGTERM"
    assert _parse.signal_name(200) == "200"


# --- isolation, counts, durations --------------------------------------------------------


def test_isolation() -> None:
    assert _parse.parse_isolation(["pid,mount"]) == {"pid", "mount"}
    assert _parse.parse_isolation(["network", "PID"]) == {"pid", "network"}
    assert _parse.parse_isolation([" pid , "]) == {"pid"}
    with pytest.raises(ValueError, match="'user' is not a namespace"):
        _parse.parse_isolation(["pid,user"])


def test_counts_cpus_seconds() -> None:
    assert _parse.parse_count("100") == 100
    assert _parse.parse_cpus("0.5") == 0.5
    assert _parse.parse_seconds("2.5") == 2.5
    assert _parse.parse_seconds("10s") == 10
    assert _parse.parse_seconds("1m") == 60
    assert _parse.parse_seconds("250ms") == 0.25
    for parse, text in [
        (_parse.parse_count, "-1"),
        (_parse.parse_count, "1.5"),
        (_parse.parse_count, str(2**32)),
        (_parse.parse_cpus, "nan"),
        (_parse.parse_cpus, "-1"),
        (_parse.parse_seconds, "soon"),
        (_parse.parse_seconds, "-3"),
    ]:
        with pytest.raises(ValueError, match=repr(text)):
            parse(text)


# --- the error table and settings ---------------------------------------------------


def test_error_table_codes_and_one_line() -> None:
    cases = [
        (InvalidRequest("--memory", "'12XB' is not a size"), ExitCode.USAGE),
        (JobNotFound("X"), ExitCode.NOT_FOUND),
        (PermissionDenied("role readonly may not call Start"), ExitCode.PERMISSION),
        (TLSConfigError("cannot read certificate /x: No such file\nor directory"), ExitCode.CONFIG),
        (RuntimeError("boom"), ExitCode.BUG),
        (KeyboardInterrupt(), ExitCode.INTERRUPTED),
    ]
    for exc, code in cases:
        failure = describe(exc)
        assert failure.code == code
        assert "\n" not in failure.message
        # run and wait: every failure of trio-worker itself is 125
        if code not in (ExitCode.INTERRUPTED,):
            assert describe(exc, job_exit=True).code == ExitCode.TOOL_FAILED


def test_error_inside_exception_group_is_found() -> None:
    group = BaseExceptionGroup("x", [ExceptionGroup("y", [JobNotFound("X")])])
    assert describe(group).code == ExitCode.NOT_FOUND
    assert describe(BaseExceptionGroup("x", [ValueError(), KeyboardInterrupt()])).code == 130


def test_state_dir_defaults() -> None:
    home = str(Path.home())
    assert default_state_dir({}) == f"{home}/.local/state/trio-worker"
    assert default_state_dir({"XDG_STATE_HOME": "/x"}) == "/x/trio-worker"
    assert default_state_dir({"XDG_STATE_HOME": "relative"}) == f"{home}/.local/state/trio-worker"
    assert default_state_dir({"STATE_DIRECTORY": "/var/lib/tw:/other"}) == "/var/lib/tw"


def test_partial_certificate_options_refused(tmp_path: Path) -> None:
    with pytest.raises(TLSConfigError, match="--ca and --key missing"):
        resolve_connection(ClientOptions(cert=str(tmp_path / "c.pem")))
    with pytest.raises(TLSConfigError, match="no development PKI"):
        resolve_connection(ClientOptions(state_dir=str(tmp_path)))
    with pytest.raises(TLSConfigError, match="--ca is empty"):
        resolve_connection(ClientOptions(ca="", cert=str(tmp_path), key=str(tmp_path)))
    with pytest.raises(TLSConfigError, match=f"--cert {tmp_path} is not a file"):
        resolve_connection(ClientOptions(ca=__file__, cert=str(tmp_path), key=__file__))


# --- errors found before any connection: main() in-process, one line and the code -----------


@pytest.fixture
def run_main(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsysbinary: pytest.CaptureFixture[bytes]
) -> Iterator[Callable[..., tuple[int, bytes, str]]]:
    """``main(args)`` in this process with a fresh HOME: (exit code, stdout, stderr)."""
    for name in list(os.environ):
        if name.startswith(("TRIO_WORKER_", "XDG_")) or name == "STATE_DIRECTORY":
            monkeypatch.delenv(name)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    root = logging.getLogger()
    saved = root.handlers[:], root.level

    def run(*args: str | Path) -> tuple[int, bytes, str]:
        with pytest.raises(SystemExit) as exited:
            main([str(a) for a in args])
        out, err = capsysbinary.readouterr()
        code = exited.value.code
        assert isinstance(code, int)
        return code, out, err.decode()

    yield run
    root.handlers[:], root.level = saved


LOCAL_ERRORS: list[tuple[list[str], int, str]] = [
    (["start", "--memory", "12XB", "--", "true"], 2, "--memory: '12XB' is not a size; use e.g."),
    (["run", "--memory", "12XB", "--", "true"], 125, "--memory: '12XB' is not a size"),
    (["run", "--io-read-bps", "fast", "--", "true"], 125, "--io-read-bps: 'fast' is not a size"),
    (["start", "--cpus", "lots", "--", "true"], 2, "--cpus: 'lots' is not a number of CPUs"),
    (["start", "--env", "NOVALUE_X", "--", "true"], 2, "--env: 'NOVALUE_X' is not set here"),
    (["start", "--cwd", "build", "--", "true"], 2, "--cwd: 'build' is relative"),
    (["logs", "--tail", "3", "--offset", "9", "X"], 2, "--tail: give --tail or --offset"),
    (["start", "--isolate", "pid,user", "--", "true"], 2, "'user' is not a namespace"),
    (["start"], 2, "COMMAND: missing; give it after --"),
    (["run", "ls", "-l"], 125, "the command after it: trio-worker run [OPTIONS] --"),
    (["list", "--bogus"], 2, "Unknown option: --bogus; see `trio-worker list --help`"),
    (["bogus"], 2, "see `trio-worker --help`"),
    (["status"], 2, "requires an argument"),
    (["signal", "01ARZ3NDEKTSV4RRFFQ69G5FAV", "SIGFOO"], 2, "'SIGFOO' is not a signal"),
    (["list", "--addr", "localhost"], 2, "--addr: expected HOST:PORT"),
    (["serve", "--listen", "nowhere"], 2, "--listen: expected HOST:PORT"),
    (["serve", "--cert", "x.pem"], 3, "--ca and --key missing"),
    (["list"], 3, "no development PKI"),
    (["list", "--ca", "ca.pem"], 3, "--cert and --key missing"),
    (["list", "--ca", "/nonexistent/ca.pem", "--cert", "c", "--key", "k"], 3, "does not exist"),
    (["list", "--config", "/nonexistent/c.toml"], 3, "c.toml does not exist"),
    (["certs", "client", "--dir", ".", "eve", "--role", "root"], 2, "--role"),
    (["certs", "client", "--dir", ".", "../eve", "--role", "full"], 2, "NAME: '../eve' is not"),
    (["certs", "server", "--dir", "/nonexistent"], 2, "--host"),
    (["certs", "show", "/nonexistent.pem"], 3, "/nonexistent.pem does not exist"),
]


@pytest.mark.parametrize(("args", "code", "needle"), LOCAL_ERRORS, ids=lambda v: str(v)[:40])
def test_local_errors_are_one_line_with_their_code(
    run_main: Callable[..., tuple[int, bytes, str]], args: list[str], code: int, needle: str
) -> None:
    got, out, err = run_main(*args)
    assert (got, out) == (code, b""), err
    assert err.startswith("trio-worker: error: "), err
    assert err.count("\n") == 1, err
    assert needle in err, err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    "args",
    [
        ["certs", "revoke", "--dir", "/nonexistent", "mallory"],
        ["certs", "client", "--dir", "/nonexistent", "eve", "--role", "full"],
        ["certs", "server", "--dir", "/nonexistent", "--host", "localhost"],
    ],
    ids=lambda v: v[1],
)
def test_certs_missing_files_point_at_dir_not_at_client_options(
    run_main: Callable[..., tuple[int, bytes, str]], args: list[str]
) -> None:
    """``certs`` takes --dir, not --ca/--cert/--key: its hint must not send the operator
    to options and variables it does not read."""
    code, out, err = run_main(*args)
    assert (code, out) == (3, b""), err
    assert "does not exist" in err
    assert "--dir" in err, err
    assert "TRIO_WORKER_CA" not in err, err
    assert "--ca/" not in err, err


def test_config_file_keys_and_relative_paths(
    run_main: Callable[..., tuple[int, bytes, str]], tmp_path: Path
) -> None:
    config = tmp_path / "c.toml"
    config.write_text('adress = "x"\n')
    code, _, err = run_main("list", "--config", config)
    assert code == 3
    assert "unknown key 'adress'; the keys are addr, ca, cert, key, state_dir" in err
    config.write_text('ca = "pki/ca.pem"\ncert = "pki/me.pem"\nkey = "pki/me.key"\n')
    code, _, err = run_main("list", "--config", config)
    assert code == 3
    assert f"--ca {tmp_path / 'pki' / 'ca.pem'} does not exist" in err  # relative to the file
    config.write_text("addr = [")
    code, _, err = run_main("list", "--config", config)
    assert code == 3
    assert "is not valid TOML" in err


def test_help_on_every_command_has_examples(
    run_main: Callable[..., tuple[int, bytes, str]],
) -> None:
    commands = ["serve", "start", "run", "status", "stop", "signal", "wait", "logs", "list"]
    certs = [["certs", sub] for sub in ("init", "server", "client", "show")]
    for args in [[c] for c in commands] + certs:
        code, out, _ = run_main(*args, "--help")
        text = out.decode()
        assert code == 0
        assert "Usage: trio-worker " + " ".join(args) in text
        assert "For example:" in text
        assert f"trio-worker {' '.join(args)} " in text.split("For example:")[1]


def test_version(run_main: Callable[..., tuple[int, bytes, str]]) -> None:
    code, out, _ = run_main("--version")
    assert (code, out.strip()) == (0, trio_worker.__version__.encode())


def test_tables_print_data_as_it_is(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from datetime import UTC, datetime

    monkeypatch.setenv("COLUMNS", "200")

    from trio_worker._model import JobInfo, JobState
    from trio_worker.cli._render import job_json, print_jobs

    job = JobInfo(
        id="01ARZ3NDEKTSV4RRFFQ69G5FAV",
        owner="alice",
        command="echo",
        args=("[bold]x[/bold]", ":smile:", "24:AB:CE"),
        state=JobState.KILLED,
        pid=42,
        exit_code=None,
        signal=9,
        error="",
        started_at=datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC),
        ended_at=None,
        output_bytes=0,
    )
    print_jobs([job])
    out = capsys.readouterr().out
    assert out.splitlines()[1].endswith("echo '[bold]x[/bold]' :smile: 24:AB:CE")
    assert "\x1b[" not in out  # no colours when stdout is not a terminal
    assert "killed (SIGKILL)" in out
    assert not any(line != line.rstrip() for line in out.splitlines())
    data = job_json(job)
    assert data["state"] == "killed"
    assert data["started_at"] == "2024-01-02T03:04:05.000Z"
    assert data["ended_at"] is None


def _job(**changes: object) -> object:
    from datetime import UTC, datetime

    from trio_worker._model import JobInfo, JobState

    fields: dict[str, object] = {
        "id": "01ARZ3NDEKTSV4RRFFQ69G5FAV",
        "owner": "alice",
        "command": "sh",
        "args": ("-c", "echo " + "x" * 200),
        "state": JobState.EXITED,
        "pid": 42,
        "exit_code": 0,
        "signal": None,
        "error": "",
        "started_at": datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC),
        "ended_at": datetime(2024, 1, 2, 3, 6, 17, tzinfo=UTC),
        "output_bytes": 3 * 1024 * 1024,
    }
    fields.update(changes)
    return JobInfo(**fields)  # type: ignore[arg-type]


def test_list_fits_80_columns_and_cuts_the_command(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from trio_worker.cli._render import print_jobs

    monkeypatch.setenv("COLUMNS", "80")
    print_jobs([_job(), _job(id="01ARZ3NDEKTSV4RRFFQ69G5FAW", owner="bob")])  # type: ignore[list-item]
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["ID", "OWNER", "STATE", "STARTED", "COMMAND"]  # two owners
    assert all(len(line) <= 80 for line in lines), lines
    assert lines[1].endswith("…")
    assert re.search(r"  \d+d ago  ", lines[1])


def test_list_of_several_owners_and_users_fits_80_columns_too(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """OWNER and USER columns (an admin's list on a shared server), a killed job, an old
    one: the names are cut (with …) before a line passes 80 columns, the command still
    shows its start."""
    import dataclasses

    from trio_worker._model import JobState
    from trio_worker.cli._render import print_jobs

    monkeypatch.setenv("COLUMNS", "80")
    killed = dataclasses.replace(
        _job(id="01ARZ3NDEKTSV4RRFFQ69G5FAW", owner="continuous-integration"),  # type: ignore[type-var]
        user="trio-jobs-runner",
        state=JobState.KILLED,
        signal=15,
    )
    print_jobs([_job(), killed])  # type: ignore[list-item]
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["ID", "OWNER", "USER", "STATE", "STARTED", "COMMAND"]
    assert all(len(line) <= 80 for line in lines), [len(line) for line in lines]
    assert "killed (SIGTERM)" in lines[2]
    assert re.search(r"  cont…  trio…  ", lines[2]), lines[2]
    assert re.search(r"  sh -c \S*…$", lines[2]), lines[2]


def test_status_shows_sizes_durations_zones_usage_and_limits(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import time

    from trio_worker._model import Limits, Usage
    from trio_worker.cli._render import print_job

    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    job = _job(
        user="nobody",
        usage=Usage(cpu_seconds=75.5, memory_peak_bytes=200 * 1024 * 1024),
        limits=Limits(memory_bytes=512 * 1024 * 1024, cpus=1.5),
    )
    print_job(job)  # type: ignore[arg-type]
    out = capsys.readouterr().out
    assert re.search(r"^User\s+nobody$", out, re.M)
    assert re.search(r"^Started\s+2024-01-02 03:04:05 UTC \(\d+d ago\)$", out, re.M)
    assert re.search(r"^Ended\s+2024-01-02 03:06:17 UTC \(ran 2m12s\)$", out, re.M)
    assert re.search(r"^Output\s+3\.0 MiB$", out, re.M)
    assert re.search(r"^CPU\s+1m15s$", out, re.M)
    assert re.search(r"^Peak memory\s+200 MiB$", out, re.M)
    assert re.search(r"^Limits\s+cpus 1\.5, memory 512M$", out, re.M)
    monkeypatch.undo()
    time.tzset()


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (0, "0 B"),
        (1023, "1023 B"),
        (1536, "1.5 KiB"),
        (10 * 1024**2, "10 MiB"),
        (5 * 1024**5, "5.0 PiB"),
    ],
)
def test_human_sizes(value: int, text: str) -> None:
    from trio_worker.cli._render import human_size

    assert human_size(value) == text


def test_states_are_coloured_on_a_terminal_unless_no_color(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import io

    from trio_worker.cli import _render

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.setenv("TERM", "xterm")
    assert _render.colours_on(Tty())
    assert not _render.colours_on(io.StringIO())
    monkeypatch.setenv("NO_COLOR", "1")
    assert not _render.colours_on(Tty())
    assert _render.state_cell(_job()) == ("exited (0)", "32")  # type: ignore[arg-type]
    assert _render.state_cell(_job(exit_code=2))[1] == "31"  # type: ignore[arg-type]


def test_an_unknown_command_names_every_command(
    run_main: Callable[..., tuple[int, bytes, str]],
) -> None:
    from trio_worker.cli._commands import NAMES

    code, out, err = run_main("lsit", "-q")
    assert (code, out) == (2, b"")
    assert err.count("\n") == 1
    assert err.startswith("trio-worker: error: unknown command 'lsit' (did you mean list?)")
    for name in NAMES:
        assert re.search(rf"\b{name}\b", err), name
    assert ", ;" not in err


def test_the_overview_lists_every_command_within_80_columns(
    run_main: Callable[..., tuple[int, bytes, str]],
) -> None:
    from trio_worker.cli._commands import NAMES

    for args in ((), ("--help",), ("-h",)):
        code, out, _ = run_main(*args)
        assert code == 0
        text = out.decode()
        assert all(len(line) <= 80 for line in text.splitlines())
        listed = re.findall(r"^  (\w+)  ", text, re.M)
        assert set(NAMES) <= set(listed)


@pytest.mark.parametrize(
    ("error", "why"),
    [
        ("lost the connection to h:1: the server closed the connection", "the server closed"),
        ("cannot connect to h:1: connection refused", "cannot connect to h:1: connection"),
    ],
)
def test_the_lost_connection_line_says_it_once(
    error: str, why: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from trio_worker import ConnectionFailed
    from trio_worker.cli._session import Backoff

    Backoff("h:1", budget=60).wait(ConnectionFailed(error))
    line = capsys.readouterr().err
    assert line.startswith("trio-worker: lost the connection to h:1 (")
    assert line.count("lost the connection") == 1, line
    assert why in line
