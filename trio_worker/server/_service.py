"""The Worker gRPC service: authorize, call the supervisor, convert.

Each RPC is three steps: may this caller use this method at all (the role
table in ``_authz``), may it see this job (else NOT_FOUND, so ids cannot be
probed), then the supervisor call (for Start, within the caller's quotas). Our
exceptions become a status code, an ErrorInfo reason and details through the one table
in ``_error_codes``; anything else is a bug, which the transport logs and answers
INTERNAL without details.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial

import trio

from .._convert import (
    chunk_serialized,
    chunk_to_pb,
    duration_to_seconds,
    isolation_from_pb,
    job_to_pb,
    limits_from_pb,
    states_from_pb,
)
from .._errors import (
    InvalidRequest,
    JobNotFound,
    JobNotRunning,
    PermissionDenied,
    TrioWorkerError,
)
from .._host._users import UnixUser, current_user, lookup_user
from .._identity import Identity
from .._jobs._supervisor import Supervisor, end_of, ended_info, output_within, owner_of
from .._model import JobInfo
from .._net._budget import OutputShare
from .._net._transport import (
    BidiTaskMethod,
    CallContext,
    Pieces,
    RpcError,
    StreamMethod,
    SyncUnaryMethod,
    UnaryMethod,
)
from .._net._transport import Method as RpcMethod
from .._pb import worker_pb2 as pb
from ._authz import Method as Op
from ._authz import authorize, can_see, job_user
from ._paging import MAX_PAGE_BYTES, PageFill, decode_token, encode_token, page_size
from ._quota import QuotaPolicy, Quotas
from ._replies import JobReplies

__all__ = ["SERVICE_NAME", "WorkerService", "rpc_error"]

SERVICE_NAME = "trioworker.v1.Worker"
#: How many ids of the table List takes at once (``Supervisor.jobs_slice``): its running
#: jobs' usage is read in one thread, and their snapshots (~10 us each) taken at once.
_LIST_SCAN = 16
#: How many jobs List converts between checkpoints. A listed job costs the loop ~30 us
#: (conversion, size; on 2 shared cores at load 4-5), so a slice well under 1 ms.
_LIST_SLICE = 8


def _listed(info: JobInfo) -> pb.Job:
    """A job as a List page carries it.

    Start refuses arguments that could not fit a page; only a record from
    before that (up to the old 4 MiB request cap) can be too big, and is
    listed without its arguments (Status still has them).
    """
    job = job_to_pb(info)
    if job.ByteSize() > MAX_PAGE_BYTES // 2:
        del job.args[:]
    return job


def _byte_size(job: pb.Job) -> int:
    return int(job.ByteSize())


def _share(ctx: CallContext) -> OutputShare | None:
    """The call's share of its connection's output budget (what its reader reads ahead)."""
    budget = ctx.output_budget
    return None if budget is None else budget.share()


def rpc_error(exc: TrioWorkerError) -> RpcError:
    """``exc`` as the client will see it: the one table in ``_error_codes``."""
    return RpcError.of(exc)


class WorkerService:
    """The handlers of ``trioworker.v1.Worker`` over one supervisor."""

    def __init__(
        self,
        supervisor: Supervisor,
        *,
        default_grace: float = 5.0,
        output_chunk_bytes: int = 256 * 1024,
        quotas: QuotaPolicy | None = None,
        job_user: UnixUser | None = None,
    ) -> None:
        self._sup = supervisor
        self._default_grace = default_grace
        self._chunk = output_chunk_bytes
        #: Who jobs run as when neither the request nor the certificate says.
        self._job_user = job_user if job_user is not None else current_user()
        self._quotas = Quotas(
            quotas or QuotaPolicy(), clock=trio.current_time, running=supervisor.running_count
        )
        #: Status replies, remade only when a job's snapshot changed.
        self._replies = JobReplies()

    def methods(self) -> dict[str, RpcMethod]:
        """Full method path → descriptor, for the transport.

        Status only reads a snapshot, so it runs as a plain function in the
        connection's reader: no task per call, the cheapest path there is. A Wait is
        answered there too when its job has already ended (``wait_ended``: most Waits);
        only one that must wait gets a task. List
        may build 1,000 jobs: it is a task, and yields to the loop between slices.
        """
        path = f"/{SERVICE_NAME}/{{}}".format
        return {
            path("Start"): UnaryMethod(pb.StartRequest, pb.Job, self.start),
            path("Stop"): UnaryMethod(pb.StopRequest, pb.Job, self.stop),
            path("Signal"): UnaryMethod(pb.SignalRequest, pb.Job, self.signal),
            path("Status"): SyncUnaryMethod(pb.StatusRequest, pb.Job, self.status),
            path("Wait"): UnaryMethod(pb.WaitRequest, pb.Job, self.wait, self.wait_ended),
            path("List"): UnaryMethod(pb.ListRequest, pb.ListResponse, self.list),
            path("Output"): StreamMethod(pb.OutputRequest, pb.OutputChunk, self.output),
            path("Remove"): UnaryMethod(pb.RemoveRequest, pb.Job, self.remove),
            path("Attach"): BidiTaskMethod(pb.AttachRequest, pb.AttachResponse, self.attach),
        }

    # -- helpers --------------------------------------------------------------

    def _visible(self, job_id: str, identity: Identity) -> None:
        """Raise unless this caller may see the job; NOT_FOUND alike for absent and hidden."""
        if not job_id:
            raise InvalidRequest("id", "must not be empty")
        if not can_see(identity, owner_of(self._sup, job_id)):
            raise JobNotFound(job_id)

    # -- handlers -------------------------------------------------------------

    async def start(self, request: pb.StartRequest, ctx: CallContext) -> pb.Job:
        try:
            authorize(ctx.identity, Op.START)
            user = await self._user_of(ctx.identity, request.user)
            with self._quotas.admit(ctx.identity.name):
                info = await self._sup.start(
                    request.command,
                    list(request.args),
                    env=dict(request.env),
                    cwd=request.working_dir or None,
                    # (Unset: the policy's limits for a Start that names none, applied once.)
                    limits=(limits_from_pb(request.limits) if request.HasField("limits") else None),
                    isolation=(
                        isolation_from_pb(request.isolation)
                        if request.HasField("isolation")
                        else None
                    ),
                    owner=ctx.identity.name,
                    user=user.label,
                    stdin=request.stdin,
                    tty=request.tty,
                    terminal_size=_terminal_size(request),
                )
        except TrioWorkerError as exc:
            raise rpc_error(exc) from None
        return job_to_pb(info)

    async def _user_of(self, identity: Identity, requested: str) -> UnixUser:
        """Who a Start runs as (the contract's users rule); account lookups block, so
        they go to a thread, unless the answer is the default job user outright."""
        if not requested and not identity.logins:
            return self._job_user
        rule = partial(job_user, identity, requested, default=self._job_user, lookup=lookup_user)
        return await trio.to_thread.run_sync(rule)

    async def stop(self, request: pb.StopRequest, ctx: CallContext) -> pb.Job:
        try:
            authorize(ctx.identity, Op.STOP)
            self._visible(request.id, ctx.identity)
            grace = (
                duration_to_seconds(request.grace, "grace")
                if request.HasField("grace")
                else self._default_grace
            )
            info = await self._sup.stop(request.id, grace=grace)
        except TrioWorkerError as exc:
            raise rpc_error(exc) from None
        return job_to_pb(info)

    async def signal(self, request: pb.SignalRequest, ctx: CallContext) -> pb.Job:
        try:
            authorize(ctx.identity, Op.SIGNAL)
            self._visible(request.id, ctx.identity)
            info = await self._sup.signal(request.id, request.signal)
        except TrioWorkerError as exc:
            raise rpc_error(exc) from None
        return job_to_pb(info)

    async def remove(self, request: pb.RemoveRequest, ctx: CallContext) -> pb.Job:
        try:
            authorize(ctx.identity, Op.REMOVE)
            self._visible(request.id, ctx.identity)
            info = await self._sup.remove(request.id, force=request.force)
        except TrioWorkerError as exc:
            raise rpc_error(exc) from None
        return job_to_pb(info)

    def status(self, request: pb.StatusRequest, ctx: CallContext) -> pb.Job:
        try:
            authorize(ctx.identity, Op.STATUS)
            self._visible(request.id, ctx.identity)
            info = self._sup.status(request.id)
        except TrioWorkerError as exc:
            raise rpc_error(exc) from None
        return self._replies.job(info)

    def wait_ended(self, request: pb.WaitRequest, ctx: CallContext) -> pb.Job | None:
        """Wait's answer made at once, in the reader, if the job has ended; None if it
        runs (``wait`` then waits for it, in a task). The same checks as ``wait``."""
        try:
            authorize(ctx.identity, Op.WAIT)
            self._visible(request.id, ctx.identity)
            info = ended_info(self._sup, request.id)
        except TrioWorkerError as exc:
            raise rpc_error(exc) from None
        return None if info is None else job_to_pb(info)

    async def wait(self, request: pb.WaitRequest, ctx: CallContext) -> pb.Job:
        try:
            authorize(ctx.identity, Op.WAIT)
            self._visible(request.id, ctx.identity)
            info = ended_info(self._sup, request.id) or await self._sup.wait(request.id)
        except TrioWorkerError as exc:
            raise rpc_error(exc) from None
        return job_to_pb(info)

    async def list(self, request: pb.ListRequest, ctx: CallContext) -> pb.ListResponse:
        """A page built a slice at a time, the running jobs' usage read in a thread
        (one per ``_LIST_SCAN`` ids), so a page of 1,000 jobs never holds the loop."""
        try:
            authorize(ctx.identity, Op.LIST)
            before = decode_token(request.page_token)
            states = states_from_pb(request.states)
        except TrioWorkerError as exc:
            raise rpc_error(exc) from None
        identity = ctx.identity
        page = PageFill(page_size(request.page_size), _byte_size)
        response = pb.ListResponse()
        while True:
            infos, below = await self._sup.jobs_slice(
                before=before,
                limit=_LIST_SCAN,
                states=states,
                owner=request.owner or None,
                visible=lambda owner: can_see(identity, owner),
            )
            for start in range(0, len(infos), _LIST_SLICE):
                await trio.lowlevel.checkpoint()
                for info in infos[start : start + _LIST_SLICE]:
                    job = _listed(info)
                    if not page.add(job):  # full, and this one is more
                        response.next_page_token = encode_token(page.items[-1].id)
                        return response
                    response.jobs.append(job)  # a copy: one at a time, not 1,000 at the end
            if below is None:
                return response
            before = below
            if not infos:
                await trio.lowlevel.checkpoint()  # a scan that matched none

    async def output(
        self, request: pb.OutputRequest, ctx: CallContext
    ) -> AsyncIterator[pb.OutputChunk | Pieces]:
        share = _share(ctx)
        try:
            try:
                authorize(ctx.identity, Op.OUTPUT)
                self._visible(request.id, ctx.identity)
                reader = output_within(
                    self._sup, request.id, request.offset, request.follow, self._chunk, share
                )
            except TrioWorkerError as exc:
                raise rpc_error(exc) from None
            try:
                async for chunk in reader:
                    # Serialized here, by hand: the chunk's bytes are copied once, into
                    # the connection's output (see ``chunk_serialized``).
                    yield Pieces(chunk_serialized(chunk))
            except TrioWorkerError as exc:  # JobNotFound comes at the first chunk
                raise rpc_error(exc) from None
        finally:
            if share is not None:
                share.close()

    async def attach(
        self,
        requests: AsyncIterator[pb.AttachRequest],
        send: Callable[[pb.AttachResponse], Awaitable[None]],
        ctx: CallContext,
    ) -> None:
        """One job, interactively: its output from the open's offset, followed live, then
        ``ended``; meanwhile the caller's stdin, close_stdin and resize, in order.

        A request is taken from the stream only once the one before it is done (a stdin
        write completes when the job has read it), so a job that does not read holds its
        writer back through HTTP/2 flow control: the server keeps at most one stream
        window and one message per attached caller. Cancelling (the caller detaching)
        leaves the job running.
        """
        try:
            first = await requests.__anext__()
        except StopAsyncIteration:
            raise rpc_error(InvalidRequest("open", "no message came")) from None
        if first.WhichOneof("event") != "open":
            raise rpc_error(InvalidRequest("open", "must be the first message"))
        job_id = first.open.id
        share = _share(ctx)
        try:
            authorize(ctx.identity, Op.OUTPUT)
            self._visible(job_id, ctx.identity)
            reader = output_within(self._sup, job_id, first.open.offset, True, self._chunk, share)
            final_of = end_of(self._sup, job_id)
        except TrioWorkerError as exc:
            if share is not None:
                share.close()
            raise rpc_error(exc) from None

        typed = _Typed()

        async def forward_output(done: trio.CancelScope) -> None:
            try:
                async for chunk in reader:
                    await send(pb.AttachResponse(output=chunk_to_pb(chunk)))
                final = await final_of()  # at once: the output has ended with the job
            except TrioWorkerError as exc:  # JobNotFound: removed before the first chunk
                raise rpc_error(exc) from None
            await send(pb.AttachResponse(ended=job_to_pb(final)))
            done.cancel()  # the job has ended: input means nothing any more

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(forward_output, nursery.cancel_scope)
                await self._take_input(job_id, requests, ctx, typed)
        except BaseExceptionGroup as group:
            # Our tasks raise RpcError only: let the call end with it, not a group.
            if len(group.exceptions) == 1 and isinstance(group.exceptions[0], RpcError):
                raise group.exceptions[0] from None
            raise
        finally:
            if share is not None:
                share.close()
            typed.audit(ctx, job_id)

    async def _take_input(
        self,
        job_id: str,
        requests: AsyncIterator[pb.AttachRequest],
        ctx: CallContext,
        typed: _Typed,
    ) -> None:
        """Apply the caller's input events one at a time, in arrival order."""
        may_write = False
        async for request in requests:
            kind = request.WhichOneof("event")
            if kind == "open":
                raise rpc_error(InvalidRequest("open", "may only be sent once"))
            if kind is None:
                continue  # an empty message (or a newer event we do not know): nothing to do
            try:
                if not may_write:
                    try:
                        authorize(ctx.identity, Op.STOP)  # readonly may watch, not type
                    except PermissionDenied:
                        raise PermissionDenied(
                            f"{ctx.identity.name!r} may watch this job but not send it input"
                            " or resize its terminal (that takes the right to stop it)"
                        ) from None
                    self._visible(job_id, ctx.identity)
                    may_write = True
                if kind == "stdin":
                    typed.stdin_bytes += len(request.stdin)
                    await self._sup.write_stdin(job_id, request.stdin)
                elif kind == "close_stdin":
                    if request.close_stdin:
                        typed.closed_stdin = True
                        await self._sup.close_stdin(job_id)
                elif kind == "resize":
                    typed.resizes += 1
                    try:
                        await self._sup.resize(job_id, request.resize.rows, request.resize.cols)
                    except InvalidRequest as exc:  # the library names its own parameter
                        raise InvalidRequest("resize", exc.message) from None
            except JobNotRunning:
                # It ended meanwhile: the output side sends ``ended`` and closes the stream.
                await trio.sleep_forever()
            except TrioWorkerError as exc:
                raise rpc_error(exc) from None
        # The caller half-closed: it only watches from now on; the output goes on.
        await trio.sleep_forever()


_audit = logging.getLogger("trio_worker.audit")


@dataclass
class _Typed:
    """What one attached caller sent a job: one audit line when the Attach ends, so the
    log says who watched or typed into which job (never what they typed). The call's own
    ``rpc`` line cannot name the job: it comes in the stream, not in a request."""

    stdin_bytes: int = 0
    closed_stdin: bool = False
    resizes: int = 0

    def audit(self, ctx: CallContext, job_id: str) -> None:
        identity = ctx.identity
        _audit.info(
            json.dumps(
                {
                    "time": datetime.now(UTC).isoformat(timespec="milliseconds"),
                    "event": "attach",
                    "peer": ctx.peer,
                    "identity": identity.name,
                    "role": identity.role.value if identity.role else None,
                    "job_id": job_id,
                    "stdin_bytes": self.stdin_bytes,
                    "closed_stdin": self.closed_stdin,
                    "resizes": self.resizes,
                },
                separators=(",", ":"),
            )
        )


def _terminal_size(request: pb.StartRequest) -> tuple[int, int] | None:
    """The tty's first size, None for the default (or a job without a terminal)."""
    if not request.tty or not request.HasField("terminal_size"):
        return None
    size = request.terminal_size
    if size.rows == 0 and size.cols == 0:
        return None
    return size.rows, size.cols
