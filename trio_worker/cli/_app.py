"""The cyclopts application and the parameter types the commands share.

Commands live in their own modules (``_serve``, ``_jobs``, ``_certs``) and are registered
here by import path (cyclopts' lazy commands), each with its one-line summary: a command
imports its module, and what that module needs, only when it runs or shows its own help.
``trio-worker --help`` imports none of them. ``trio_worker.cli.main`` runs ``app``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

from cyclopts import App, Group, Parameter

from .. import __version__
from .._errors import InvalidRequest
from . import _parse
from ._certs import certs
from ._commands import COMMANDS, DESCRIPTION

__all__ = [
    "CLIENT_CONFIG",
    "Count",
    "Cpus",
    "Offset",
    "Seconds",
    "Size",
    "app",
    "converter",
]

T = TypeVar("T")

app = App(
    name="trio-worker",
    help=DESCRIPTION,
    # trio-worker --help is _commands.overview(), not cyclopts'; commands use markdown.
    help_format="markdown",
    version=__version__,
    backend="trio",
    # main() prints errors itself: one line, and the exit code of the error's class.
    exit_on_error=False,
    print_error=False,
    suppress_keyboard_interrupt=False,
    result_action="return_value",
)


def _load_config_file(app: Any, commands: Any, arguments: Any) -> None:
    from ._settings import load_config_file  # tomllib and the file checks: client commands

    load_config_file(app, commands, arguments)


#: The config sources of client commands; cyclopts applies them after flags and env.
CLIENT_CONFIG = (_load_config_file,)

JOB_GROUP = Group("Job", sort_key=1)
LIMITS_GROUP = Group("Limits and isolation", sort_key=2)


def converter(parse: Callable[[str], T]) -> Callable[[Any, Any], T]:
    """A cyclopts converter calling ``parse`` on the token; its ``ValueError`` becomes
    ``InvalidRequest`` named after the option (``--memory: '12XB' is not a size; ...``)."""

    def convert(type_: Any, tokens: Any) -> T:
        token = tokens[-1] if isinstance(tokens, list | tuple) else tokens
        try:
            return parse(str(token.value))
        except ValueError as exc:
            raise InvalidRequest(str(token.keyword or "value"), str(exc)) from None

    return convert


Size = Annotated[int, Parameter(converter=converter(_parse.parse_size), metavar="SIZE")]
Cpus = Annotated[float, Parameter(converter=converter(_parse.parse_cpus), metavar="N")]
Count = Annotated[int, Parameter(converter=converter(_parse.parse_count), metavar="N")]
Offset = Annotated[
    int,
    Parameter(
        converter=converter(functools.partial(_parse.parse_count, maximum=_parse.MAX_UINT64)),
        metavar="N",
    ),
]
Seconds = Annotated[float, Parameter(converter=converter(_parse.parse_seconds), metavar="SECONDS")]


for _command in COMMANDS:
    if _command.name == "certs":
        # The certs commands import ``pki`` (and cryptography) only when they run.
        app.command(certs)
        continue
    _extra: dict[str, Any] = {"config": CLIENT_CONFIG} if _command.client else {}
    app.command(
        f"{__package__}.{_command.target}",
        name=_command.name,
        help=_command.summary,
        help_format="markdown",
        **_extra,
    )


def resolve_command(name: str) -> App:
    """The command's App, imported, with its whole docstring as its help: cyclopts puts the
    one-line summary it was registered with in its place."""
    command = app[name]
    if name != "certs":
        command.help = None  # back to the function's docstring
    return command
