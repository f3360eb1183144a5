"""The cyclopts application and the parameter types the commands share.

Commands live in their own modules (``_serve``, ``_jobs``, ``_certs``) and register
themselves on ``app`` here; ``trio_worker.cli.main`` imports them and runs it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

from cyclopts import App, Group, Parameter

from .. import __version__
from .._errors import InvalidRequest
from . import _parse
from ._settings import load_config_file

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
    help="""Run and control Linux processes on a host, over gRPC with mutual TLS.

Start a server (the first run creates a development PKI), then use the client commands:

    trio-worker serve
    trio-worker run -- echo hello
    trio-worker start -- sleep 100   # prints the job id
    trio-worker logs -f ID
    trio-worker stop ID

Every command takes --help. --debug (anywhere before --) shows tracebacks and debug logs.""",
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
CLIENT_CONFIG = (load_config_file,)

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
