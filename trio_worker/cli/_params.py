"""What cyclopts needs to read the client commands' signatures: the parameter types, the
groups, the config-file source.

The client commands' modules (``_jobs``, ``_remove``, ``_settings``) do not import
cyclopts: their short runs are parsed by ``_argv`` (cyclopts and the rich it renders help
with would take longer than a whole ``trio-worker list`` may). Their annotations are
strings naming what is defined here; :func:`bind` puts these names into a module before
cyclopts evaluates its annotations (``_app.resolve_command``). So there is one signature
per command, read by cyclopts for help and for any command line ``_argv`` leaves to it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import cyclopts
from cyclopts import Group, Parameter

from .._errors import InvalidRequest
from . import _parse
from ._jobs import JobOptions
from ._settings import ClientOptions, ConfigFileError, config_file_path, read_config_file

__all__ = [
    "CONNECTION",
    "JOB_GROUP",
    "LIMITS_GROUP",
    "ClientFields",
    "Count",
    "Cpus",
    "Interactive",
    "JobFields",
    "JobId",
    "Offset",
    "Options",
    "Parameter",
    "Seconds",
    "Size",
    "Tty",
    "bind",
    "converter",
    "fields",
    "load_config_file",
]

T = TypeVar("T")

JOB_GROUP = Group("Job", sort_key=1)
LIMITS_GROUP = Group("Limits and isolation", sort_key=2)
CONNECTION = Group("Connection", sort_key=100)


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

JobId = Annotated[
    str, Parameter(name="ID", help="The job's id, as start printed it, or a unique prefix.")
]
Interactive = Annotated[
    bool, Parameter(name=["--interactive", "-i"], negative="", show_default=False)
]
Tty = Annotated[bool, Parameter(name=["--tty", "-t"], negative="", show_default=False)]


def fields(cls: type[T]) -> type[T]:
    """The options class ``cls`` as cyclopts reads it: a frozen keyword-only dataclass
    subclass with the fields ``cls`` declares (annotations, defaults; cyclopts finds their
    help in ``cls``'s attribute docstrings). Equality stays ``cls``'s (``_settings.Fields``),
    so what cyclopts builds equals what ``_argv`` builds for the same command line."""
    namespace: dict[str, Any] = {
        "__module__": cls.__module__,
        "__qualname__": cls.__qualname__,
        "__doc__": cls.__doc__,
        "__annotations__": dict(cls.__annotations__),
    }
    made: type[T] = dataclass(frozen=True, kw_only=True, eq=False, repr=False)(
        type(cls.__name__, (cls,), namespace)
    )
    return made


if TYPE_CHECKING:
    ClientFields = ClientOptions
    JobFields = JobOptions
else:
    ClientFields = fields(ClientOptions)
    JobFields = fields(JobOptions)

#: The connection options every client command takes, flattened into its own.
Options = Annotated[ClientFields | None, Parameter(name="*", group=CONNECTION)]


def bind(module: ModuleType) -> None:
    """Give ``module`` the names its annotations use, for cyclopts to evaluate them
    (``Annotated`` too: those modules import ``typing`` for mypy only)."""
    names = {name: globals()[name] for name in __all__ if name[0].isupper()}
    names["Annotated"] = Annotated
    module.__dict__.update({k: v for k, v in names.items() if k not in module.__dict__})


class _ConfigFileRefused(cyclopts.CycloptsError, ConfigFileError):
    """``ConfigFileError`` as cyclopts lets it through (it rewords other exceptions)."""

    def __init__(self, message: str) -> None:
        cyclopts.CycloptsError.__init__(self, msg=message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class _ConnectionToml(cyclopts.config.Toml):
    """The config file (``_settings.read_config_file``) as a cyclopts source."""

    def _load_config(self, path: Path) -> dict[str, Any]:
        try:
            return read_config_file(path)
        except ConfigFileError as exc:
            raise _ConfigFileRefused(exc.message) from exc


def load_config_file(
    app: cyclopts.App, commands: tuple[str, ...], arguments: cyclopts.ArgumentCollection
) -> None:
    """A cyclopts config source: the TOML file named by ``--config``/``TRIO_WORKER_CONFIG``
    or the default one. Cyclopts calls it after the flags and environment variables, and
    it fills only what they left unset."""
    explicit: str | None = None
    for argument in arguments:
        if argument.field_info.name == "config" and argument.tokens:
            explicit = str(argument.tokens[-1].value)
    source = _ConnectionToml(
        config_file_path(explicit), use_commands_as_keys=False, allow_unknown=True
    )
    source(app, commands, arguments)
