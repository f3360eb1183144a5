"""List pages: page tokens and how much goes in one page. Pure, no I/O.

A page holds at most ``page_size`` jobs (0 = ``DEFAULT_PAGE_SIZE``, never more
than ``MAX_PAGE_SIZE``) and always fits in ``MAX_PAGE_BYTES``, however large
the jobs' arguments are, so a List never builds a response that a client (or
the server's memory) cannot take. Jobs come newest first; the token names the
last job of the page, and the next page starts below it, so jobs started or
removed in between never make a page repeat or skip one.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from .._errors import InvalidRequest
from .._wire._h2conn import MAX_MESSAGE

__all__ = [
    "DEFAULT_PAGE_SIZE",
    "MAX_PAGE_BYTES",
    "MAX_PAGE_SIZE",
    "PageFill",
    "decode_token",
    "encode_token",
    "fill_page",
    "page_size",
]

#: A caller that does not page (a plain ``List()``, as most ad-hoc clients send) sees
#: up to this many jobs; the 4 MiB byte bound still holds whatever the jobs weigh.
DEFAULT_PAGE_SIZE = 1000
MAX_PAGE_SIZE = 1000
#: A whole ListResponse, the token and the gRPC framing included: the largest message a
#: client takes.
MAX_PAGE_BYTES = MAX_MESSAGE
#: What the jobs of one page may take: room is left for the token, each
#: entry's field tag and length, and the message's gRPC frame header.
_JOBS_BUDGET = MAX_PAGE_BYTES - 4096
#: Field tag + the longest length prefix of one repeated entry.
_ENTRY_OVERHEAD = 1 + 5
_PREFIX = b"tw1:"
_ID = re.compile(rb"[0-9A-Z]{26}")

_T = TypeVar("_T")


def encode_token(last_id: str) -> str:
    """The token of the page after the one that ended with ``last_id``."""
    return base64.urlsafe_b64encode(_PREFIX + last_id.encode("ascii")).decode("ascii")


def decode_token(token: str) -> str | None:
    """The id a page starts below; None for no token (the first page).

    Anything this server did not make is ``InvalidRequest`` (the token is
    not echoed: it is the caller's input).
    """
    if not token:
        return None
    try:
        raw = base64.urlsafe_b64decode(token.encode("ascii"))
    except (ValueError, binascii.Error, UnicodeEncodeError):
        raw = b""
    last_id = raw.removeprefix(_PREFIX)
    if not raw.startswith(_PREFIX) or not _ID.fullmatch(last_id):
        raise InvalidRequest("page_token", "is not a page token from this server")
    return last_id.decode("ascii")


def page_size(requested: int) -> int:
    """How many jobs a page may hold for a request's ``page_size``."""
    if requested <= 0:
        return DEFAULT_PAGE_SIZE
    return min(requested, MAX_PAGE_SIZE)


def fill_page(
    items: Iterator[_T],
    size: int,
    cost: Callable[[_T], int],
    *,
    budget: int = _JOBS_BUDGET,
) -> tuple[list[_T], bool]:
    """Take up to ``size`` items whose ``cost`` (bytes) fits ``budget``; say if more remain.

    The first item is taken whatever its cost (the caller makes sure one job
    always fits); after that, the page ends before the item that would not.
    """
    page = PageFill(size, cost, budget=budget)
    for item in items:
        if not page.add(item):
            return page.items, True
    return page.items, False


class PageFill(Generic[_T]):
    """``fill_page`` an item at a time, for a page built in slices (awaiting in between)."""

    __slots__ = ("_budget", "_cost", "_size", "_used", "items")

    def __init__(self, size: int, cost: Callable[[_T], int], *, budget: int = _JOBS_BUDGET) -> None:
        self.items: list[_T] = []
        self._size = size
        self._cost = cost
        self._budget = budget
        self._used = 0

    def add(self, item: _T) -> bool:
        """Take ``item`` if it fits; False if not (the page is full, and more remain)."""
        if len(self.items) >= self._size:
            return False
        spent = self._cost(item) + _ENTRY_OVERHEAD
        if self.items and self._used + spent > self._budget:
            return False
        self.items.append(item)
        self._used += spent
        return True
