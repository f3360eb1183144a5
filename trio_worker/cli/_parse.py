"""Pure parsers for what people type: sizes, ``K=V`` pairs, signals, ``--isolate`` lists.

Each function takes the text and returns the value, or raises ``ValueError`` whose message
says what was wrong and shows a correct example; the caller prefixes the option name (see
``_app.converter``), giving lines like
``--memory: '12XB' is not a size; use e.g. 512K, 64M, 2G``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping

from .._net._sockets import split_host_port

__all__ = [
    "MAX_SECONDS",
    "MAX_UINT32",
    "MAX_UINT64",
    "format_size",
    "parse_addr",
    "parse_count",
    "parse_cpus",
    "parse_env",
    "parse_env_pairs",
    "parse_isolation",
    "parse_seconds",
    "parse_signal",
    "parse_size",
    "signal_name",
    "tail_start",
]

MAX_UINT64 = 2**64 - 1
MAX_UINT32 = 2**32 - 1

#: Binary multiples: K is 1024, as in ``docker --memory`` and systemd's MemoryMax=.
_MULTIPLIERS = {"": 1, "B": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40, "P": 2**50}
#: Compiled by the first size read (``re`` keeps it): most commands read none.
_SIZE = r"\s*(?P<number>\d+(?:\.\d*)?|\.\d+)\s*(?P<unit>(?:[KMGTP](?:I?B)?|B)?)\s*"
_SIZE_HINT = "use e.g. 512K, 64M, 2G (binary multiples) or a number of bytes"


def parse_size(text: str) -> int:
    """``512K``, ``64M``, ``2G``, ``1.5G``, ``64MiB``, ``4096`` → bytes (K = 1024).

    Fractions are allowed with a unit and rounded down to whole bytes.
    """
    from decimal import Decimal, InvalidOperation  # sizes only: not every command's

    match = re.fullmatch(_SIZE, text, re.IGNORECASE)
    if match is None:
        raise ValueError(f"{text!r} is not a size; {_SIZE_HINT}")
    unit = match["unit"].upper()
    multiplier = _MULTIPLIERS[unit[:1] if unit not in ("", "B") else unit]
    try:
        number = Decimal(match["number"])
    except InvalidOperation:  # pragma: no cover - the pattern admits only decimals
        raise ValueError(f"{text!r} is not a size; {_SIZE_HINT}") from None
    value = int(number * multiplier)  # int() rounds toward zero: whole bytes
    if value > MAX_UINT64:
        raise ValueError(f"{text!r} is too large: the maximum is {format_size(MAX_UINT64)}")
    return value


def format_size(value: int) -> str:
    """The shortest exact spelling of ``value`` bytes that ``parse_size`` reads back."""
    if value < 0:
        raise ValueError(f"a size cannot be negative: {value}")
    for unit in ("P", "T", "G", "M", "K"):
        multiplier = _MULTIPLIERS[unit]
        if value and value % multiplier == 0:
            return f"{value // multiplier}{unit}"
    return str(value)


def parse_addr(value: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[V6]:PORT`` → (host, port); port 0 is allowed (``serve``)."""
    return split_host_port(value)


def parse_cpus(text: str) -> float:
    """``0.5``, ``2`` → a number of CPUs; 0 means no limit."""
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a number of CPUs; use e.g. 0.5 or 2") from None
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{text!r} is not a number of CPUs; use a number >= 0, e.g. 0.5 or 2")
    return value


def parse_count(text: str, *, maximum: int = MAX_UINT32) -> int:
    """A whole number from 0 to ``maximum`` (``--pids``, ``--offset``)."""
    stripped = text.strip()
    if not stripped.isdigit():
        raise ValueError(f"{text!r} is not a whole number; use e.g. 100")
    value = int(stripped)
    if value > maximum:
        raise ValueError(f"{text!r} is too large: the maximum is {maximum}")
    return value


#: The longest duration (s) a flag takes: protobuf's Duration's range; beyond it the
#: request's builders met Python's timedelta's limit and said it in its words.
MAX_SECONDS = 315_576_000_000


def parse_seconds(text: str) -> float:
    """``5``, ``0.5``, ``2s``, ``1m`` → seconds (>= 0)."""
    stripped = text.strip().lower()
    scale = 1.0
    if stripped.endswith("ms"):
        stripped, scale = stripped[:-2], 0.001
    elif stripped.endswith("s"):
        stripped = stripped[:-1]
    elif stripped.endswith("m"):
        stripped, scale = stripped[:-1], 60.0
    try:
        value = float(stripped) * scale
    except ValueError:
        raise ValueError(f"{text!r} is not a duration; use e.g. 5, 0.5 or 10s") from None
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{text!r} is not a duration; use a number of seconds >= 0")
    if value > MAX_SECONDS:
        raise ValueError(f"{text!r} is too long; the most is {MAX_SECONDS} seconds (10,000 years)")
    return value


def parse_env(text: str, environ: Mapping[str, str] | None = None) -> tuple[str, str]:
    """``KEY=VALUE`` → (KEY, VALUE); the value may be empty and may contain ``=``.

    ``KEY`` alone takes this process's value of KEY (``environ``), as ``docker run -e``
    does; one that is not set here is an error rather than silently left out.
    """
    if "\0" in text:
        raise ValueError(f"{text!r} contains a NUL byte, which the environment cannot hold")
    key, sep, value = text.partition("=")
    if not key:
        raise ValueError(f"{text!r} is not KEY=VALUE; use e.g. --env PATH=/usr/bin:/bin")
    if not sep:
        here = environ if environ is not None else {}
        if key not in here:
            raise ValueError(
                f"{key!r} is not set here, so there is no value to pass; use KEY=VALUE "
                "(KEY alone passes this shell's value)"
            )
        return key, here[key]
    return key, value


def parse_env_pairs(
    items: Iterable[str], environ: Mapping[str, str] | None = None
) -> dict[str, str]:
    """Several ``KEY=VALUE`` (or ``KEY``): a later value for the same key wins, as in
    ``env(1)``."""
    result: dict[str, str] = {}
    for item in items:
        key, value = parse_env(item, environ)
        result[key] = value
    return result


def tail_start(data: bytes, lines: int, *, whole: bool) -> int | None:
    """Where the last ``lines`` lines of ``data`` begin (a last line need not end in a
    newline, as in ``tail``). ``whole``: ``data`` is the start of the log, so fewer lines
    than asked means all of it; otherwise that is None (read further back)."""
    if lines <= 0:
        return len(data)
    end = len(data) - 1 if data.endswith(b"\n") else len(data)
    for _ in range(lines):
        if end <= 0:
            return 0 if whole else None
        end = data.rfind(b"\n", 0, end)
        if end < 0:
            return 0 if whole else None
    return end + 1


_SIGNAL_HINT = "use a name or number, e.g. TERM, SIGTERM or 15"


def parse_signal(text: str) -> int:
    """``TERM``, ``SIGTERM``, ``sigterm``, ``15``, ``RTMIN+2`` → the signal number."""
    import signal  # the commands that name a signal only (its enums take a while to make)

    stripped = text.strip()
    if stripped.isdigit():
        number = int(stripped)
        if not 1 <= number <= signal.SIGRTMAX:
            raise ValueError(
                f"{text!r} is not a signal number; numbers go from 1 to {int(signal.SIGRTMAX)}"
            )
        return number
    name = stripped.upper()
    if not name.startswith("SIG"):
        name = "SIG" + name
    rt = re.fullmatch(r"SIGRT(MIN|MAX)([+-]\d+)?", name)
    if rt is not None:
        base = signal.SIGRTMIN if rt[1] == "MIN" else signal.SIGRTMAX
        number = base + int(rt[2] or 0)
        if not signal.SIGRTMIN <= number <= signal.SIGRTMAX:
            raise ValueError(f"{text!r} is outside SIGRTMIN..SIGRTMAX")
        return int(number)
    try:
        return int(signal.Signals[name])
    except KeyError:
        raise ValueError(f"{text!r} is not a signal; {_SIGNAL_HINT}") from None


def signal_name(number: int) -> str:
    """``15`` → ``SIGTERM``; an unnamed number stays a number."""
    import signal

    try:
        return signal.Signals(number).name
    except ValueError:
        return str(number)


_NAMESPACES = ("pid", "mount", "network")


def parse_isolation(items: Iterable[str]) -> frozenset[str]:
    """``pid,mount`` (and/or several ``--isolate``) → ``{"pid", "mount"}``: the names of
    ``Isolation``'s fields to set."""
    chosen: set[str] = set()
    for item in items:
        for part in item.split(","):
            name = part.strip().lower()
            if not name:
                continue
            if name not in _NAMESPACES:
                raise ValueError(
                    f"{part.strip()!r} is not a namespace; choose from pid, mount, network "
                    "(e.g. --isolate pid,mount)"
                )
            chosen.add(name)
    return frozenset(chosen)
