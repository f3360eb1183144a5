"""The short client commands' usual command lines, read without cyclopts.

Importing cyclopts (and the attrs and rich it brings) takes longer than a whole
``trio-worker list`` may (0.15 s). The short commands' options are plain, so the command
lines people type are read here: options (``--name VALUE``, ``--name=VALUE``, flags, the
repeatable ones), the id(s), the command after ``--``, then the connection settings from
the environment and the config file, in cyclopts' order (flags, environment, file). The
command's function (the same one cyclopts calls) is then called with what was read.

Anything else goes to cyclopts, which reads it and says what is wrong: help, an option
unknown here, a value that does not convert, a missing or extra argument. So errors are
cyclopts' own words; this module only ever accepts what cyclopts accepts in the same way
(``tests/test_cli_argv.py`` checks both read the same arguments from the same lines).
"""

from __future__ import annotations

import functools
import importlib
import os
from collections.abc import Callable, Mapping, Sequence

from . import _parse
from ._settings import (
    CONFIG_KEYS,
    ENV_VARS,
    ClientOptions,
    ConfigFileError,
    config_file_path,
    read_config_file,
)

TYPE_CHECKING = False  # typing is for mypy only: a short command never imports it
if TYPE_CHECKING:
    from typing import Any, Final, Literal

    Kind = Literal["flag", "value", "list"]

__all__ = ["COMMANDS", "ENV_VARS", "parse_short"]


class Option:
    """One option of a command (plain classes here: NamedTuples cost every command their
    making, and an option is a dict key by identity anyway)."""

    __slots__ = ("convert", "dest", "into", "kind", "names")

    def __init__(
        self,
        names: tuple[str, ...],
        dest: str,
        kind: Kind,
        convert: Callable[[str], Any] = str,
        into: Literal["", "job", "options"] = "",
    ) -> None:
        self.names = names
        #: The function's keyword (for ``job``/``options``: the dataclass field).
        self.dest = dest
        self.kind = kind
        self.convert = convert
        #: Where it goes: the function (""), ``job=JobOptions(...)`` or ``options=ClientOptions``.
        self.into = into


class Command:
    __slots__ = ("options", "positional", "target")

    def __init__(
        self,
        target: str,
        options: tuple[Option, ...],
        positional: int | Literal["*", "command"],
    ) -> None:
        #: ``module:function`` in this package (``_commands.COMMANDS``' target).
        self.target = target
        self.options = options
        #: How many positional arguments: a number, "*" (any: ids), or "command" (after --).
        self.positional = positional


def _addr(value: str) -> str:
    _parse.parse_addr(value)  # ValueError: cyclopts says it
    return value


_CLIENT: Final = (
    Option(("--addr",), "addr", "value", _addr, "options"),
    Option(("--ca",), "ca", "value", str, "options"),
    Option(("--cert",), "cert", "value", str, "options"),
    Option(("--key",), "key", "value", str, "options"),
    Option(("--state-dir",), "state_dir", "value", str, "options"),
    Option(("--config",), "config", "value", str, "options"),
)
_JOB: Final = (
    Option(("--env", "-e"), "env", "list", str, "job"),
    Option(("--cwd",), "cwd", "value", str, "job"),
    Option(("--user",), "user", "value", str, "job"),
    Option(("--cpus",), "cpus", "value", _parse.parse_cpus, "job"),
    Option(("--memory",), "memory", "value", _parse.parse_size, "job"),
    Option(("--io-read-bps",), "io_read_bps", "value", _parse.parse_size, "job"),
    Option(("--io-write-bps",), "io_write_bps", "value", _parse.parse_size, "job"),
    Option(("--pids",), "pids", "value", _parse.parse_count, "job"),
    Option(("--isolate",), "isolate", "list", str, "job"),
)
_INTERACTIVE: Final = (
    Option(("--interactive", "-i"), "interactive", "flag"),
    Option(("--tty", "-t"), "tty", "flag"),
)
_JSON: Final = Option(("--json",), "as_json", "flag")
_FOLLOW: Final = Option(("--follow", "-f"), "follow", "flag")
_GRACE: Final = Option(("--grace",), "grace", "value", _parse.parse_seconds)

#: The commands read here, by name.
COMMANDS: Final[Mapping[str, Command]] = {
    "start": Command("_jobs:start", (_FOLLOW, *_INTERACTIVE, *_JOB, *_CLIENT), "command"),
    "run": Command("_jobs:run", (_GRACE, *_INTERACTIVE, *_JOB, *_CLIENT), "command"),
    "status": Command("_jobs:status", (_JSON, *_CLIENT), 1),
    "list": Command(
        "_jobs:list_jobs",
        (
            _JSON,
            Option(("--quiet", "-q"), "quiet", "flag"),
            Option(("--state",), "state", "list"),
            Option(("--owner",), "owner", "value"),
            *_CLIENT,
        ),
        0,
    ),
    "stop": Command("_jobs:stop", (_GRACE, *_CLIENT), 1),
    "signal": Command("_jobs:signal", _CLIENT, 2),
    "wait": Command("_jobs:wait", _CLIENT, 1),
    "logs": Command(
        "_jobs:logs",
        (
            _FOLLOW,
            Option(
                ("--offset",),
                "offset",
                "value",
                functools.partial(_parse.parse_count, maximum=_parse.MAX_UINT64),
            ),
            Option(("--tail", "-n"), "tail", "value", _parse.parse_count),
            *_CLIENT,
        ),
        1,
    ),
    "rm": Command("_remove:rm", (Option(("--force", "-f"), "force", "flag"), *_CLIENT), "*"),
    "prune": Command("_remove:prune", _CLIENT, 0),
}


class _Leave(Exception):
    """Not a command line for this parser: cyclopts reads it."""


def parse_short(
    tokens: Sequence[str], environ: Mapping[str, str] | None = None
) -> tuple[Callable[..., Any], tuple[str, ...], dict[str, Any]] | None:
    """The function, positional arguments and keywords for ``tokens`` (the command's name
    first), or None when cyclopts should read them."""
    if not tokens or tokens[0] not in COMMANDS:
        return None
    command = COMMANDS[tokens[0]]
    try:
        positional, values = _read(command, tokens[1:])
        keywords = _keywords(command, values, os.environ if environ is None else environ)
    except (_Leave, ValueError, ConfigFileError):
        return None  # cyclopts reads it again, and says what is wrong in its words
    module, _, name = command.target.partition(":")
    function = getattr(importlib.import_module(f"{__package__}.{module}"), name)
    return function, tuple(positional), keywords


def _read(command: Command, tokens: Sequence[str]) -> tuple[list[str], dict[Option, Any]]:
    by_name = {name: option for option in command.options for name in option.names}
    positional: list[str] = []
    values: dict[Option, Any] = {}
    rest = list(tokens)
    while rest:
        token = rest.pop(0)
        if token == "--":
            if command.positional == "command" and positional:
                raise _Leave  # words before --: cyclopts says where the command goes
            positional += rest
            break
        if not token.startswith("-") or token == "-":
            if command.positional == "command":
                raise _Leave
            positional.append(token)
            continue
        name, equals, inline = token.partition("=")
        option = by_name.get(name)
        if option is None:
            raise _Leave  # --help, --version, -it, an unknown option...
        if option.kind == "flag":
            if equals or option in values:
                raise _Leave
            values[option] = True
            continue
        if equals and inline:
            value = inline
        elif rest and rest[0] and not rest[0].startswith("-") and not equals:
            value = rest.pop(0)
        else:
            raise _Leave  # no value, an empty one, or one that looks like an option
        if option.kind == "list":
            values.setdefault(option, []).append(option.convert(value))
        elif option in values:
            raise _Leave
        else:
            values[option] = option.convert(value)
    wanted = command.positional
    if isinstance(wanted, int) and len(positional) != wanted:
        raise _Leave
    if wanted == "command" and not positional:
        raise _Leave  # cyclopts passes no command; the function says it is missing
    return positional, values


def _keywords(
    command: Command, values: dict[Option, Any], env: Mapping[str, str]
) -> dict[str, Any]:

    keywords: dict[str, Any] = {}
    job: dict[str, Any] = {}
    client: dict[str, Any] = {}
    for option, value in values.items():
        {"": keywords, "job": job, "options": client}[option.into][option.dest] = value
    if job:
        from ._jobs import JobOptions

        keywords["job"] = JobOptions(**job)
    # The environment, then the config file, fill what the flags left unset.
    converters = {o.dest: o.convert for o in command.options if o.into == "options"}
    for dest, variable in ENV_VARS.items():
        if dest not in client and variable in env:
            if not env[variable]:
                raise _Leave
            client[dest] = converters[dest](env[variable])
    explicit = client.get("config")
    path = config_file_path(explicit)
    if os.path.isfile(path):
        for key, value in read_config_file(path).items():
            if key in CONFIG_KEYS and key not in client:
                client[key] = converters[key](value)
    keywords["options"] = ClientOptions(**client)
    return keywords
