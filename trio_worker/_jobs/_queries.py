"""The query side: the job table (in id order, for paging) and readers of a job's output.

Queries only take snapshots (``Job.info``); nothing here changes a job.
"""

from __future__ import annotations

import bisect
from collections.abc import AsyncIterator, Callable, Collection, Iterator, Sequence

import trio

from .._errors import InvalidRequest, JobNotFound
from .._model import JobInfo, JobState, OutputChunk
from ._job import Job
from ._output import ReadBudget

__all__ = ["JobTable", "open_output"]


class JobTable:
    """Every job the supervisor knows, by id and in id order (ids sort by creation)."""

    def __init__(self) -> None:
        self._jobs: dict[str, Job] = {}
        #: Every id in ``_jobs``, sorted: ``iter_jobs`` pages from it.
        #: Add and remove jobs with ``add`` and ``forget`` to keep it in step.
        self._order: list[str] = []

    def __contains__(self, job_id: object) -> bool:
        return job_id in self._jobs

    def values(self) -> Collection[Job]:
        return self._jobs.values()

    def find(self, job_id: str) -> Job | None:
        return self._jobs.get(job_id)

    def get(self, job_id: str) -> Job:
        """The job, or ``JobNotFound``."""
        try:
            return self._jobs[job_id]
        except (KeyError, TypeError):
            raise JobNotFound(str(job_id)) from None

    def add(self, job: Job) -> None:
        """Put a job in the table (and in id order, for ``iter_jobs``)."""
        self._jobs[job.id] = job
        order = self._order
        if not order or order[-1] < job.id:
            order.append(job.id)  # the usual case: ids grow
        else:
            bisect.insort(order, job.id)

    def forget(self, job_id: str) -> None:
        """Take a job out of the table (its records and files are the caller's)."""
        if self._jobs.pop(job_id, None) is not None:
            i = bisect.bisect_left(self._order, job_id)
            if i < len(self._order) and self._order[i] == job_id:
                del self._order[i]

    def list(self, owner: str | None = None) -> list[JobInfo]:
        """Every job (of ``owner``, if given), oldest first."""
        return [job.info() for job in self._jobs.values() if owner is None or job.owner == owner]

    def iter_jobs(
        self,
        *,
        before: str | None = None,
        states: Collection[JobState] | None = None,
        owner: str | None = None,
        visible: Callable[[str], bool] | None = None,
    ) -> Iterator[JobInfo]:
        """Jobs newest first, for paging: those with an id below ``before`` (all if
        None), in ``states`` (any if None or empty), of ``owner`` (anyone's if
        None), whose owner ``visible`` accepts.

        Lazy: a page costs the snapshots it takes, however many jobs there are.
        Consume it without awaiting in between (the table may change).
        """
        order = self._order
        i = len(order) if before is None else bisect.bisect_left(order, before)
        match = _matcher(states, owner, visible)
        while i > 0:
            i -= 1
            job = self._jobs.get(order[i])
            if job is not None and match(job):
                yield job.info()

    def scan(
        self,
        *,
        before: str | None,
        limit: int,
        states: Collection[JobState] | None = None,
        owner: str | None = None,
        visible: Callable[[str], bool] | None = None,
    ) -> tuple[Sequence[Job], str | None]:
        """``iter_jobs`` in slices: of the (at most) ``limit`` ids below ``before``, newest
        first, the jobs that match; and the id the next slice starts below (None: no more).

        Each slice stands alone (it holds no position in the table), so a caller may await
        between slices: jobs added or forgotten meanwhile never make it repeat or skip one.
        """
        order = self._order
        end = len(order) if before is None else bisect.bisect_left(order, before)
        start = max(0, end - limit)
        match = _matcher(states, owner, visible)
        jobs = [
            job
            for job_id in reversed(order[start:end])
            if (job := self._jobs.get(job_id)) is not None and match(job)
        ]
        return jobs, (order[start] if start > 0 else None)

    def running_count(self, owner: str) -> int:
        """How many of ``owner``'s jobs are running (for quotas: no snapshots made)."""
        running = JobState.RUNNING
        return sum(1 for j in self._jobs.values() if j.owner == owner and j.record.state is running)


def _matcher(
    states: Collection[JobState] | None,
    owner: str | None,
    visible: Callable[[str], bool] | None,
) -> Callable[[Job], bool]:
    """Whether a job is listed: started, in ``states`` (any if None or empty), of ``owner``
    (anyone's if None), whose owner ``visible`` accepts."""
    wanted = frozenset(states) if states else None

    def match(job: Job) -> bool:
        state = job.record.state
        if state is None:
            return False  # not started yet
        if wanted is not None and state not in wanted:
            return False
        if owner is not None and job.owner != owner:
            return False
        return visible is None or visible(job.owner)

    return match


def open_output(
    table: JobTable,
    job_id: str,
    offset: int,
    follow: bool,
    chunk_size: int,
    budget: ReadBudget | None = None,
) -> AsyncIterator[OutputChunk]:
    """An iterator over the job's output, opened at its first ``__anext__`` (so
    ``JobNotFound`` and an offset past an ended log's end come out there, as a
    remote client learns of them from the server's answer)."""
    return _OnFirstNext(lambda: _open_output(table, job_id, offset, follow, chunk_size, budget))


def _open_output(
    table: JobTable,
    job_id: str,
    offset: int,
    follow: bool,
    chunk_size: int,
    budget: ReadBudget | None,
) -> AsyncIterator[OutputChunk]:
    job = table.get(job_id)
    assert job.log is not None
    if job.log.finished and offset > job.log.end:
        raise InvalidRequest("offset", f"{offset} is past the end of the log ({job.log.end})")
    reader = _GoneWhenRemoved(
        job.log.read(offset, follow=follow, chunk_size=chunk_size, budget=budget), table, job
    )
    return _UntilEnded(reader, job.ended) if follow else reader


class _OnFirstNext:
    """An iterator made by ``open`` at the first ``__anext__`` (whose errors come out there)."""

    def __init__(self, open_: Callable[[], AsyncIterator[OutputChunk]]) -> None:
        self._open: Callable[[], AsyncIterator[OutputChunk]] | None = open_
        self._inner: AsyncIterator[OutputChunk] | None = None

    def __aiter__(self) -> _OnFirstNext:
        return self

    async def __anext__(self) -> OutputChunk:
        inner = self._inner
        if inner is None:
            assert self._open is not None
            opener, self._open = self._open, None
            inner = self._inner = opener()
            del opener  # (its closure is not kept while the first chunk is awaited)
        return await inner.__anext__()

    async def aclose(self) -> None:
        aclose = getattr(self._inner, "aclose", None)
        if aclose is not None:
            await aclose()
        else:
            await trio.lowlevel.checkpoint()


class _GoneWhenRemoved:
    """A reader of a job that is removed while it reads: the files it reads from are
    deleted under it, and it ends with ``JobNotFound``, as every call about the job
    does once it is removed (not with the FileNotFoundError of its next block, which
    the server would answer INTERNAL). A file missing for another reason still raises."""

    def __init__(self, reader: AsyncIterator[OutputChunk], table: JobTable, job: Job) -> None:
        self._reader = reader
        self._table = table
        self._job = job

    def __aiter__(self) -> _GoneWhenRemoved:
        return self

    async def __anext__(self) -> OutputChunk:
        try:
            return await self._reader.__anext__()
        except FileNotFoundError:
            if self._table.find(self._job.id) is not self._job:
                raise JobNotFound(self._job.id) from None
            raise

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()


class _UntilEnded:
    """A follower's iterator that ends only once the job's end is recorded.

    The log is complete a moment before the job's final state is: ending the
    stream after both means a client that follows, then asks for the status,
    always sees the job ended.
    """

    def __init__(self, reader: AsyncIterator[OutputChunk], ended: trio.Event) -> None:
        self._reader = reader
        self._ended = ended

    def __aiter__(self) -> _UntilEnded:
        return self

    async def __anext__(self) -> OutputChunk:
        try:
            return await self._reader.__anext__()
        except StopAsyncIteration:
            await self._ended.wait()
            raise

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()
