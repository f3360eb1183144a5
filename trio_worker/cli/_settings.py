"""Where the state directory is, and how a client command reaches the server.

Connection settings come from, in order: flags, the environment (``TRIO_WORKER_ADDR``,
``TRIO_WORKER_CA``, ``TRIO_WORKER_CERT``, ``TRIO_WORKER_KEY``, ``TRIO_WORKER_STATE_DIR``),
the TOML config file (``$XDG_CONFIG_HOME/trio-worker/config.toml``, or ``--config`` /
``TRIO_WORKER_CONFIG``), and last the development PKI in the state directory. Under
cyclopts the first three are its own sources (``Parameter.env_var`` and a
``cyclopts.config.Toml`` subclass, in ``_params``); the short commands' own parser
(``_argv``) reads the same ones in the same order. This module reads and checks the TOML
file and falls back to the development PKI; it imports no cyclopts (the annotations name
``Parameter``, which ``_params.bind`` provides when cyclopts needs them).

Nothing here writes a file: a client never creates the development PKI, ``serve`` does.

Paths are strings, joined with ``os.path``: pathlib (with the ``urllib.parse`` and
``ipaddress`` it imports) would be a few milliseconds of every client command's start-up
for nothing it needs.
"""

from __future__ import annotations

import os

from .._errors import InvalidRequest
from .._tls import TLSConfigError
from ._parse import parse_addr

TYPE_CHECKING = False  # typing is for mypy only: a short command never imports it
if TYPE_CHECKING:
    from typing import Annotated, Any

    from cyclopts import Parameter

__all__ = [
    "DEFAULT_ADDR",
    "ENV_VARS",
    "ClientOptions",
    "ConfigFileError",
    "Connection",
    "Fields",
    "config_file_path",
    "default_config_path",
    "default_state_dir",
    "dev_pki_paths",
    "read_config_file",
    "resolve_connection",
    "resolve_state_dir",
]

DEFAULT_ADDR = "127.0.0.1:50051"
#: The keys a config file may hold; each is the client option of the same name.
CONFIG_KEYS = ("addr", "ca", "cert", "key", "state_dir")
_PATH_KEYS = ("ca", "cert", "key", "state_dir")

#: The environment variable of each client option.
ENV_VARS = {
    "addr": "TRIO_WORKER_ADDR",
    "ca": "TRIO_WORKER_CA",
    "cert": "TRIO_WORKER_CERT",
    "key": "TRIO_WORKER_KEY",
    "state_dir": "TRIO_WORKER_STATE_DIR",
    "config": "TRIO_WORKER_CONFIG",
}

#: ``trio_worker.pki.DEV_CLIENT_NAME``, which a test checks: importing ``pki`` here would
#: load cryptography into every client command.
DEV_CLIENT_NAME = "admin"


class ConfigFileError(Exception):
    """The config file cannot be read or holds something it should not."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


# --- the state directory ------------------------------------------------------------


def _absolute(path: str) -> str:
    """``Path.absolute()``: made absolute against the working directory, not normalized
    (``..`` after a symbolic link is not the link's parent)."""
    return path if os.path.isabs(path) else os.path.join(os.getcwd(), path)


def default_state_dir(environ: os._Environ[str] | dict[str, str] | None = None) -> str:
    """systemd's ``STATE_DIRECTORY`` (its first entry), else ``$XDG_STATE_HOME/trio-worker``,
    else ``~/.local/state/trio-worker``. (``TRIO_WORKER_STATE_DIR`` and ``--state-dir``
    come before these; cyclopts handles them.)"""
    env = os.environ if environ is None else environ
    systemd = env.get("STATE_DIRECTORY", "")
    if systemd:
        return systemd.split(":")[0]
    xdg = env.get("XDG_STATE_HOME", "")
    if xdg and os.path.isabs(xdg):  # the XDG spec: relative values are to be ignored
        return os.path.join(xdg, "trio-worker")
    return os.path.join(os.path.expanduser("~"), ".local", "state", "trio-worker")


def resolve_state_dir(explicit: str | os.PathLike[str] | None) -> str:
    """``--state-dir`` (``~`` expanded) or the default, made absolute."""
    chosen = os.path.expanduser(explicit) if explicit is not None else default_state_dir()
    return _absolute(os.fspath(chosen))


def dev_pki_paths(state_dir: str) -> tuple[str, str, str]:
    """(CA, client certificate, client key) of the development PKI that ``serve`` makes
    in ``STATE_DIR/pki`` (see ``trio_worker.pki.ensure_dev_pki``)."""
    directory = os.path.join(state_dir, "pki")
    client = DEV_CLIENT_NAME
    return (
        os.path.join(directory, "ca.pem"),
        os.path.join(directory, f"{client}.pem"),
        os.path.join(directory, f"{client}.key"),
    )


# --- the config file ----------------------------------------------------------------


def default_config_path(environ: os._Environ[str] | dict[str, str] | None = None) -> str:
    env = os.environ if environ is None else environ
    xdg = env.get("XDG_CONFIG_HOME", "")
    base = xdg if xdg and os.path.isabs(xdg) else os.path.join(os.path.expanduser("~"), ".config")
    return os.path.join(base, "trio-worker", "config.toml")


def read_config_file(path: str | os.PathLike[str]) -> dict[str, str]:
    """The connection keys of a config file, relative paths taken from its directory."""
    import tomllib  # only when there is a file to read

    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigFileError(f"config file {path} is not valid TOML: {exc}") from exc
    except OSError as exc:
        raise ConfigFileError(f"cannot read config file {path}: {exc.strerror}") from exc
    unknown = sorted(set(data) - set(CONFIG_KEYS))
    if unknown:
        raise ConfigFileError(
            f"config file {path}: unknown key {unknown[0]!r}; the keys are "
            + ", ".join(CONFIG_KEYS)
        )
    result: dict[str, str] = {}
    for name, value in data.items():
        if not isinstance(value, str) or not value:
            raise ConfigFileError(f"config file {path}: {name} must be a non-empty string")
        if name in _PATH_KEYS:
            # A relative path means relative to the config file, not to wherever the
            # command happens to run.
            value = _absolute(os.path.join(os.path.dirname(path), os.path.expanduser(value)))
        result[name] = value
    return result


def config_file_path(explicit: str | None) -> str:
    """The file named by ``--config``/``TRIO_WORKER_CONFIG`` (which must exist, ``~``
    expanded), or the default one (which may be missing)."""
    if explicit is None:
        return default_config_path()
    explicit = os.path.expanduser(explicit)
    if not os.path.isfile(explicit):
        raise ConfigFileError(
            f"config file {explicit} does not exist; check --config or TRIO_WORKER_CONFIG"
        )
    return explicit


# --- the client options -------------------------------------------------------------


def check_addr(type_: Any, tokens: Any) -> str:
    token = tokens[-1] if isinstance(tokens, list | tuple) else tokens
    value: str = token.value
    try:
        parse_addr(value)
    except ValueError as exc:
        raise InvalidRequest(
            token.keyword or "--addr", f"{exc}; use e.g. 127.0.0.1:50051"
        ) from None
    return value


class Fields:
    """A plain class of keyword fields, equal when their values are (as a dataclass is):
    the options classes, whose fields cyclopts reads through a dataclass of them
    (``_params.fields``), while a short command builds them without ``dataclasses``."""

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Fields):
            return NotImplemented
        related = isinstance(other, type(self)) or isinstance(self, type(other))
        return related and vars(self) == vars(other)

    __hash__ = None  # type: ignore[assignment]  # (mutable, as __eq__ makes it)

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={value!r}" for name, value in vars(self).items())
        return f"{type(self).__name__}({fields})"


class ClientOptions(Fields):
    """The options every client command takes (cyclopts: ``_params.Options``).

    A plain class: its fields, as declared here, are what cyclopts reads (through the
    dataclass ``_params.ClientFields`` makes of them); a short command, parsed by ``_argv``,
    builds it with no ``dataclasses`` to import.
    """

    addr: Annotated[
        str, Parameter(env_var="TRIO_WORKER_ADDR", metavar="HOST:PORT", converter=check_addr)
    ] = DEFAULT_ADDR
    """The server to talk to."""

    ca: Annotated[str | None, Parameter(env_var="TRIO_WORKER_CA", metavar="FILE")] = None
    """CA certificate the server's certificate must be signed by. Default: the development PKI's."""

    cert: Annotated[str | None, Parameter(env_var="TRIO_WORKER_CERT", metavar="FILE")] = None
    """Client certificate (its CN is who you are, its role what you may do)."""

    key: Annotated[str | None, Parameter(env_var="TRIO_WORKER_KEY", metavar="FILE")] = None
    """The client certificate's private key."""

    state_dir: Annotated[
        str | None,
        Parameter(
            env_var="TRIO_WORKER_STATE_DIR",
            metavar="DIR",
            help="Where to find the development PKI when no certificates are given. Default: "
            "STATE_DIRECTORY, else $XDG_STATE_HOME/trio-worker (~/.local/state/trio-worker).",
        ),
    ] = None

    config: Annotated[
        str | None,
        Parameter(
            env_var="TRIO_WORKER_CONFIG",
            metavar="FILE",
            help="TOML file with any of addr, ca, cert, key, state_dir. Default: "
            "$XDG_CONFIG_HOME/trio-worker/config.toml (~/.config/trio-worker/config.toml).",
        ),
    ] = None

    def __init__(
        self,
        *,
        addr: str = DEFAULT_ADDR,
        ca: str | None = None,
        cert: str | None = None,
        key: str | None = None,
        state_dir: str | None = None,
        config: str | None = None,
    ) -> None:
        self.addr = addr
        self.ca = ca
        self.cert = cert
        self.key = key
        self.state_dir = state_dir
        self.config = config


class Connection:
    """Everything ``trio_worker.client.connect`` needs, all resolved."""

    __slots__ = ("addr", "ca", "cert", "key", "origin")

    def __init__(self, addr: str, ca: str, cert: str, key: str, origin: str) -> None:
        self.addr = addr
        self.ca = ca
        self.cert = cert
        self.key = key
        #: Where the certificates came from, for error messages: "the development PKI in X"
        #: or "--ca/--cert/--key".
        self.origin = origin


def resolve_connection(options: ClientOptions) -> Connection:
    """Fill in the development PKI if no certificate was given; check the files exist."""
    given = {"--ca": options.ca, "--cert": options.cert, "--key": options.key}
    if all(value is None for value in given.values()):
        state_dir = resolve_state_dir(options.state_dir)
        ca, cert, key = dev_pki_paths(state_dir)
        missing = [path for path in (ca, cert, key) if not os.path.isfile(path)]
        if missing:
            raise TLSConfigError(
                "no certificates given and there is no development PKI in "
                f"{os.path.dirname(ca)} ({os.path.basename(missing[0])} is missing); start "
                "`trio-worker serve` with this state directory first (it creates one), or give "
                "--ca, --cert and --key"
            )
        origin = f"the development PKI in {os.path.dirname(ca)}"
        return Connection(options.addr, ca, cert, key, origin)
    absent = [flag for flag, value in given.items() if value is None]
    if absent:
        raise TLSConfigError(
            f"{' and '.join(absent)} missing; give --ca, --cert and --key together "
            "(or TRIO_WORKER_CA/_CERT/_KEY, or ca/cert/key in the config file), or none of them "
            "to use the development PKI"
        )
    ca, cert, key = (os.path.expanduser(p or "") for p in (options.ca, options.cert, options.key))
    for flag, path in (("--ca", ca), ("--cert", cert), ("--key", key)):
        if not path:
            raise TLSConfigError(f"{flag} is empty; give the path of a file")
        if not os.path.isfile(path):
            what = "does not exist" if not os.path.exists(path) else "is not a file"
            raise TLSConfigError(f"{flag} {path} {what}; check the path")
    return Connection(options.addr, ca, cert, key, "--ca/--cert/--key")
