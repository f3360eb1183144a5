"""Job ids as people type them: any unique prefix, in either case, as docker takes them.

A whole id (26 characters) is used as it is; a shorter one is looked up among the jobs the
caller may see (one List per command, however many ids it takes). No match is
``JobNotFound``; more than one is a usage error saying how many jobs match.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from .._errors import InvalidRequest, JobNotFound

TYPE_CHECKING = False  # typing is for mypy only: a short command never imports it
if TYPE_CHECKING:
    from .._blocking_client import BlockingClient

__all__ = ["ID_LENGTH", "IdResolver", "needs_list", "resolve_id"]

#: The length of a job id (ULID-style: 26 Crockford base32 characters, upper case).
ID_LENGTH = 26


def needs_list(typed: str) -> bool:
    """Whether ``typed`` is a prefix to look up (a whole id is used as it is)."""
    return 0 < len(typed.strip()) < ID_LENGTH


def resolve_id(typed: str, ids: Callable[[], Sequence[str]]) -> str:
    """The one id ``typed`` names; ``ids()`` lists the jobs the caller may see (called
    only for a prefix)."""
    wanted = typed.strip().upper()
    if not wanted:
        raise InvalidRequest("ID", "is empty; give a job id or the start of one")
    if len(wanted) >= ID_LENGTH:
        return wanted  # whole (or too long to be a prefix: the server says NOT_FOUND)
    matches = [job_id for job_id in ids() if job_id.startswith(wanted)]
    if not matches:
        raise JobNotFound(typed)
    if len(matches) > 1:
        # Ids start with their creation time: say where these begin to differ.
        first, last = min(matches), max(matches)  # their common prefix is everyone's
        same = next(
            (i for i, (a, b) in enumerate(zip(first, last, strict=False)) if a != b), len(first)
        )
        differ = same + 1
        raise InvalidRequest(
            "ID",
            f"{typed!r} matches {len(matches)} jobs; give more of the id (they differ "
            f"from character {differ} on)",
        )
    return matches[0]


class IdResolver:
    """Turns what was typed into a job id, listing the jobs at most once."""

    def __init__(self, client: BlockingClient) -> None:
        self._client = client
        self._ids: list[str] | None = None

    def _list(self) -> list[str]:
        if self._ids is None:
            self._ids = [job.id for job in self._client.list()]
        return self._ids

    def __call__(self, typed: str) -> str:
        return resolve_id(typed, self._list)
