"""``rm`` and ``prune``: delete ended jobs' records and output from the server.

Both use one connection for every job they remove. ``rm`` goes on past an id it cannot
remove (as ``docker rm`` does), says why on stderr, and exits with the last failure's code.
"""

from __future__ import annotations

import contextlib
import sys
from collections import deque

from .._errors import InvalidRequest, JobNotFound, TrioWorkerError
from .._states import JobState
from ._errors import describe
from ._exit import ExitCode
from ._ids import IdResolver
from ._render import human_size
from ._session import open_client
from ._settings import ClientOptions, resolve_connection

TYPE_CHECKING = False  # typing is for mypy only: a short command never imports it
if TYPE_CHECKING:
    from typing import Annotated

    from .._blocking_client import Pending
    from .._views import JobView
    from ._params import Options, Parameter

__all__ = ["prune", "rm"]

#: Removes in flight at once on the connection (each deletes a directory on the server).
_CONCURRENT_REMOVES = 8


def rm(
    *ids: Annotated[str, Parameter(name="ID")],
    force: Annotated[bool, Parameter(name=["--force", "-f"], negative="")] = False,
    options: Options = None,
) -> int:
    """Remove jobs: their records and their output, on the server.

    A job still running is refused unless -f, which kills it (SIGKILL, all of its
    processes) and removes it once it has ended. Prints each id removed. An id that cannot
    be removed is reported on stderr and the others are still removed; the exit code is
    then the last failure's.

    For example:

        trio-worker rm 01JB7ZQ3X5K2M8N4P6R9T0V1W2
        trio-worker rm 01jb7z 01jb80          # unique prefixes, any case
        trio-worker rm -f $(trio-worker list -q)

    Parameters
    ----------
    ids
        The jobs' ids, or unique prefixes of them.
    force
        Kill jobs still running, then remove them.
    """
    if not ids:
        raise InvalidRequest("ID", "missing; give the id of each job to remove")
    conn = resolve_connection(options or ClientOptions())
    code = ExitCode.OK
    with open_client(conn) as client:
        resolve = IdResolver(client)
        for typed in ids:
            try:
                job_id = resolve(typed)
                client.remove(job_id, force=force)
            except TrioWorkerError as exc:
                failure = describe(exc, command="rm")
                print(f"trio-worker: error: {failure.message}", file=sys.stderr, flush=True)
                code = ExitCode(failure.code)
                continue
            print(job_id, flush=True)
    return code


def prune(*, options: Options = None) -> int:
    """Remove every ended job you may remove, and say how much output that freed.

    Running jobs stay. An admin removes everyone's ended jobs; a full certificate only its
    own.

    For example:

        trio-worker prune
    """
    conn = resolve_connection(options or ClientOptions())
    removed: list[JobView] = []
    with open_client(conn) as client:
        ended = client.list(states=[state for state in JobState if state.ended])
        in_flight: deque[Pending] = deque()

        def collect() -> None:
            with contextlib.suppress(JobNotFound):  # removed by someone else meanwhile
                removed.append(in_flight.popleft().result())

        for job in ended:
            in_flight.append(client.remove_later(job.id))
            if len(in_flight) >= _CONCURRENT_REMOVES:
                collect()
        while in_flight:
            collect()
    freed = sum(job.output_bytes for job in removed)
    jobs = "job" if len(removed) == 1 else "jobs"
    print(f"Removed {len(removed)} ended {jobs}, {human_size(freed)} of output.", flush=True)
    return ExitCode.OK
