"""The cyclopts application.

Commands live in their own modules (``_serve``, ``_jobs``, ``_certs``) and are registered
here by import path (cyclopts' lazy commands), each with its one-line summary: a command
imports its module, and what that module needs, only when it runs or shows its own help.
``trio-worker --help`` imports none of them. ``trio_worker.cli.main`` runs ``app`` for
help, ``serve``, ``certs``, ``attach`` and any command line ``_argv`` does not read; the
parameter types the commands share are in ``_params``.
"""

from __future__ import annotations

import importlib
from typing import Any

from cyclopts import App

from .. import __version__
from . import _params
from ._certs import certs
from ._commands import COMMANDS, DESCRIPTION

__all__ = ["CLIENT_CONFIG", "app", "resolve_command"]

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

#: The config sources of client commands; cyclopts applies them after flags and env.
CLIENT_CONFIG = (_params.load_config_file,)

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
    one-line summary it was registered with in its place.

    Client commands' modules import no cyclopts: their annotations get the names they use
    here (``_params.bind``), before cyclopts reads them."""
    for _command in COMMANDS:
        if _command.name == name and _command.client:
            module = importlib.import_module(f"{__package__}.{_command.target.split(':')[0]}")
            _params.bind(module)
            _params.bind(importlib.import_module(f"{__package__}._settings"))
    command = app[name]
    if name != "certs":
        command.help = None  # back to the function's docstring
    return command
