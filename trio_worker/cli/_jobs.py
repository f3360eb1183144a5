"""The client commands: start, run, status, stop, signal, wait, logs, list.

Each is thin: resolve the connection, open one client, make its calls on it, print. Ids are
taken as typed (unique prefixes, any case: ``_ids``); following output across reconnects
lives in ``_session``; how jobs look in ``_render``.
"""

from __future__ import annotations

import contextlib
import os
import sys
from types import FrameType

from .._errors import (
    ConnectionFailed,
    InvalidRequest,
    JobNotFound,
    JobNotRunning,
    ShuttingDown,
    TrioWorkerError,
)
from .._states import DEFAULT_STOP_GRACE, JobState
from . import _parse
from ._exit import ExitCode
from ._ids import IdResolver
from ._render import (
    describe_state,
    dump_json,
    job_exit,
    job_json,
    print_job,
    print_jobs,
    printable,
)
from ._session import Backoff, OutputSink, follow_output, open_client, retrying
from ._settings import ClientOptions, Connection, Fields, resolve_connection

TYPE_CHECKING = False  # typing is for mypy only: a short command never imports it
if TYPE_CHECKING:
    from typing import Annotated, Any

    from .._blocking_client import BlockingClient
    from .._model import JobInfo
    from .._views import JobView
    from ..client import WorkerClient
    from ._params import (
        JOB_GROUP,
        LIMITS_GROUP,
        Count,
        Cpus,
        Interactive,
        JobFields,
        JobId,
        Offset,
        Options,
        Parameter,
        Seconds,
        Size,
        Tty,
    )

__all__ = ["JobOptions"]


class JobOptions(Fields):
    """What ``start`` and ``run`` ask for besides the command (cyclopts reads these fields
    through ``_params.JobFields``; see ``_settings.ClientOptions``)."""

    env: Annotated[
        list[str] | None,
        Parameter(
            name=["--env", "-e"],
            metavar="KEY=VALUE",
            negative="",
            group=JOB_GROUP,
            help="Set a variable in the job's environment (repeat for more); KEY alone passes "
            "this shell's value. The rest is inherited from the server.",
        ),
    ] = None

    cwd: Annotated[str | None, Parameter(metavar="DIR", group=JOB_GROUP)] = None
    """Working directory of the job: an absolute path on the server. Default: the server's,
    or the home directory of the job's user when that is not the server's."""

    user: Annotated[str | None, Parameter(metavar="USER", group=JOB_GROUP)] = None
    """Unix user (name or uid) to run as. Default: your certificate's first login, else
    the server's default job user."""

    cpus: Annotated[Cpus, Parameter(group=LIMITS_GROUP, show_default=False)] = 0.0
    """CPU limit in CPUs, e.g. 0.5 or 2."""

    memory: Annotated[Size, Parameter(group=LIMITS_GROUP, show_default=False)] = 0
    """Memory limit, e.g. 512K, 64M, 2G (binary multiples)."""

    io_read_bps: Annotated[Size, Parameter(group=LIMITS_GROUP, show_default=False)] = 0
    """Read bandwidth limit per second on each block device, e.g. 10M."""

    io_write_bps: Annotated[Size, Parameter(group=LIMITS_GROUP, show_default=False)] = 0
    """Write bandwidth limit per second on each block device, e.g. 10M."""

    pids: Annotated[Count, Parameter(group=LIMITS_GROUP, show_default=False)] = 0
    """Most processes and threads the job may have at once."""

    isolate: Annotated[
        list[str] | None,
        Parameter(metavar="pid,mount,network", negative="", group=LIMITS_GROUP),
    ] = None
    """Give the job its own namespaces: any of pid, mount, network, comma-separated."""

    def __init__(
        self,
        *,
        env: list[str] | None = None,
        cwd: str | None = None,
        user: str | None = None,
        cpus: float = 0.0,
        memory: int = 0,
        io_read_bps: int = 0,
        io_write_bps: int = 0,
        pids: int = 0,
        isolate: list[str] | None = None,
    ) -> None:
        self.env = env
        self.cwd = cwd
        self.user = user
        self.cpus = cpus
        self.memory = memory
        self.io_read_bps = io_read_bps
        self.io_write_bps = io_write_bps
        self.pids = pids
        self.isolate = isolate

    def env_dict(self) -> dict[str, str] | None:
        if not self.env:
            return None
        try:
            return _parse.parse_env_pairs(self.env, os.environ)
        except ValueError as exc:
            raise InvalidRequest("--env", str(exc)) from None

    def working_dir(self) -> str | None:
        if self.cwd is not None and not os.path.isabs(self.cwd):
            raise InvalidRequest(
                "--cwd",
                f"{self.cwd!r} is relative, but the job runs on the server, where this shell's "
                "directory means nothing; give an absolute path on the server",
            )
        return self.cwd

    def limits(self) -> dict[str, float | int] | None:
        """The limits asked for, by ``Limits``' field names; None for none."""
        if not (self.cpus or self.memory or self.io_read_bps or self.io_write_bps or self.pids):
            return None
        return {
            "cpus": self.cpus,
            "memory_bytes": self.memory,
            "io_read_bps": self.io_read_bps,
            "io_write_bps": self.io_write_bps,
            "pids": self.pids,
        }

    def isolation(self) -> frozenset[str] | None:
        """The namespaces asked for (``Isolation``'s fields to set); None for none."""
        if not self.isolate:
            return None
        try:
            names = _parse.parse_isolation(self.isolate)
        except ValueError as exc:
            raise InvalidRequest("--isolate", str(exc)) from None
        return names or None


def _connection(options: ClientOptions | None) -> Connection:
    return resolve_connection(options or ClientOptions())


#: After Ctrl-C, ``run`` prints at most this much of what the job wrote while stopping.
_LAST_WORDS_BYTES = 64 * 1024


class _StartRequest:
    __slots__ = ("args", "command", "cwd", "env", "isolation", "limits", "user")

    def __init__(
        self,
        command: str,
        args: tuple[str, ...],
        env: dict[str, str] | None,
        cwd: str | None,
        limits: dict[str, float | int] | None,
        isolation: frozenset[str] | None,
        user: str = "",
    ) -> None:
        self.command = command
        self.args = args
        self.env = env
        self.cwd = cwd
        self.limits = limits
        self.isolation = isolation
        self.user = user

    @classmethod
    def build(cls, name: str, command: tuple[str, ...], job: JobOptions | None) -> _StartRequest:
        """Check everything local before any connection is made."""
        if not command:
            raise InvalidRequest(
                "COMMAND", f"missing; give it after --, e.g. trio-worker {name} -- echo hello"
            )
        job = job or JobOptions()
        return cls(
            command[0],
            command[1:],
            job.env_dict(),
            job.working_dir(),
            job.limits(),
            job.isolation(),
            job.user or "",
        )

    def arguments(self) -> dict[str, Any]:
        """``start``'s arguments, for the blocking client (limits by name, isolation as names)."""
        return {
            "command": self.command,
            "args": self.args,
            "env": self.env,
            "cwd": self.cwd,
            "limits": self.limits,
            "isolation": self.isolation,
            "user": self.user,
        }

    def library_arguments(self) -> dict[str, Any]:
        """``start``'s arguments for the trio client (``run -i``): the library's types."""
        from .._model import Isolation, Limits

        arguments = self.arguments()
        if self.limits is not None:
            arguments["limits"] = Limits(**self.limits)  # type: ignore[arg-type]
        if self.isolation is not None:
            arguments["isolation"] = Isolation(**dict.fromkeys(self.isolation, True))
        return arguments


def _report_failed_start(job: JobInfo | JobView) -> int:
    code, note = job_exit(job)
    if note:
        print(f"trio-worker: {note}", file=sys.stderr, flush=True)
    return code


def start(
    *command: str,
    follow: Annotated[
        bool, Parameter(name=["--follow", "-f"], negative="", show_default=False)
    ] = False,
    interactive: Interactive = False,
    tty: Tty = False,
    job: Annotated[JobFields | None, Parameter(name="*")] = None,
    options: Options = None,
) -> int:
    """Start a job and print its id.

    The job runs on the server until it ends or is stopped; this command returns as soon as
    it has started. A command that cannot be executed still gets an id (it stays listed,
    state failed) and exits 127 (not found) or 126.

    For example:

        trio-worker start -- sleep 300
        trio-worker start --memory 512M --cpus 1 --pids 100 -- make -j4
        trio-worker start --env LANG=C --cwd /srv/app --follow -- ./build.sh
        trio-worker start --isolate pid,mount,network -- sh -c 'ps ax'
        trio-worker start -it -- bash    # then: trio-worker attach ID

    Parameters
    ----------
    command
        The command and its arguments, after --.
    follow
        Then stream the job's output until it ends, as logs -f does.
    interactive
        Keep the job's stdin open, for attach to write to.
    tty
        Run the job on a pseudo-terminal (of this terminal's size), for attach.
    """
    request = _StartRequest.build("start", command, job)
    conn = _connection(options)
    size = None
    if tty:
        from ._interactive import local_terminal_size  # only for -t: keeps start light

        size = local_terminal_size()
    with open_client(conn) as client:
        info = client.start(**request.arguments(), stdin=interactive, tty=tty, terminal_size=size)
        print(printable(info.id), flush=True)
        if info.state is JobState.FAILED:
            return _report_failed_start(info)
        if follow:
            return _follow_to_end(client, info.id, OutputSink(), Backoff(conn.addr))
    return ExitCode.OK


def run(
    *command: str,
    grace: Annotated[Seconds | None, Parameter(group=JOB_GROUP)] = None,
    interactive: Interactive = False,
    tty: Tty = False,
    job: Annotated[JobFields | None, Parameter(name="*")] = None,
    options: Options = None,
) -> int:
    """Run a job, stream its output, and exit with its exit code.

    The job's stdout goes to stdout and its stderr to stderr, byte for byte. The exit code
    is the job's; 128+N if signal N killed it; 127 if the command was not found, 126 if it
    could not be executed; 125 if trio-worker itself failed, or if the job was lost (the
    server went away while it ran: its own code is unknown). Ctrl-C stops the printing at
    once and the job (SIGTERM, then SIGKILL after the grace period; what the job writes
    meanwhile is still shown) and exits 130; a second Ctrl-C leaves at once. SIGTERM
    (timeout, kill) does the same and exits 143, as docker run passes it to the job. A dropped
    connection is re-established and the output resumed where it stopped, with a line on
    stderr for each; a server shutting down ends the command at once, saying so.

    For example:

        trio-worker run -- echo hello
        trio-worker run --memory 64M -- python3 -c 'print(42)'
        trio-worker run --addr worker1:50051 -- sh -c 'make test' > test.log
        echo hello | trio-worker run -i -- tr a-z A-Z
        trio-worker run -it -- bash

    With -i, this command's stdin goes to the job (end of input closes the job's). With -t
    the job runs on a pseudo-terminal whose size follows this one, which is in raw mode:
    Ctrl-C is the job's (a key with -i, else SIGINT for it), Ctrl-P Ctrl-Q detaches and
    leaves it running. Without -t, Ctrl-C stops the job as described above.

    Parameters
    ----------
    command
        The command and its arguments, after --.
    grace
        On Ctrl-C, how long the job has between SIGTERM and SIGKILL. Default: the server's (5 s).
    interactive
        Send this command's stdin to the job.
    tty
        Run the job on a pseudo-terminal.
    """
    request = _StartRequest.build("run", command, job)
    conn = _connection(options)
    if interactive or tty:
        import trio  # the interactive session reads the terminal and the connection at once

        from ._interactive import run_interactive  # only for -i/-t: keeps run light

        async def start_job(
            client: WorkerClient, stdin: bool, tty: bool, size: tuple[int, int] | None
        ) -> JobInfo:
            return await client.start(
                **request.library_arguments(), stdin=stdin, tty=tty, terminal_size=size
            )

        async def interactive_session() -> int:
            return await run_interactive(conn, start_job, stdin=interactive, tty=tty, grace=grace)

        return trio.run(interactive_session)
    backoff = Backoff(conn.addr)
    sink = OutputSink()
    with open_client(conn) as client, _CtrlC(sink) as ctrl_c:
        client.watch(ctrl_c.fd, ctrl_c.check)
        started = client.start(**request.arguments())
        if started.state is JobState.FAILED:
            return _report_failed_start(started)
        job_id = ctrl_c.job_id = started.id
        try:
            ctrl_c.arm()  # a Ctrl-C while the job started stops it now
            # Wait is in flight from the start, on the same connection as the output: a
            # server shutting down finishes calls in flight, so the end still arrives
            # (a Wait sent after the output ended would meet a closed port).
            in_flight = [client.wait_later(job_id)]

            def wait_for_end() -> JobView:
                if in_flight:
                    with contextlib.suppress(ConnectionFailed):  # lost with its connection
                        return in_flight.pop().result()
                return client.wait(job_id)

            follow_output(client, job_id, sink, follow=True, backoff=backoff)
            final = retrying(backoff, wait_for_end)
            sink.ended(final.output_bytes)
        except _StopRequested:
            # Printing has stopped; stop the job, then print what it wrote from now on
            # (its last words) once it has ended, never the backlog before.
            last_words_at = retrying(backoff, lambda: client.status(job_id)).output_bytes
            try:
                seconds = DEFAULT_STOP_GRACE if grace is None else grace
                final = retrying(backoff, lambda: client.stop(job_id, seconds))
            except JobNotRunning:  # it ended on its own meanwhile
                final = retrying(backoff, lambda: client.wait(job_id))
            begin = max(last_words_at, final.output_bytes - _LAST_WORDS_BYTES)
            follow_output(client, job_id, OutputSink(begin), follow=False, backoff=backoff)
            # The last line on the screen, below the last words (up to 64 KiB of them, which
            # would scroll the notice away): how the job ended.
            print(f"trio-worker: job {job_id} {describe_state(final)}", file=sys.stderr, flush=True)
            return ctrl_c.exit_code
        code, note = job_exit(final)
        # A job killed by a signal is said by the exit code alone, as a shell does, unless
        # it was the server going away: then that is why the job ended.
        killed = final.state is JobState.KILLED and note is None
        if killed and _server_going_away(client, final.id):
            name = _parse.signal_name(final.signal or 0)
            note = f"job {final.id} was killed by {name}: the server is shutting down"
    if note:
        print(f"trio-worker: {note}", file=sys.stderr, flush=True)
    return code


class _StopRequested(Exception):
    """The first Ctrl-C of ``run``: leave the output, stop the job."""


class _CtrlC:
    """``run``'s SIGINT and SIGTERM: the handler mutes the output at once and counts; what
    to do is decided between two reads of the connection (``check``, through the wake-up
    fd), never in the middle of one. The first stops the job, the second leaves at once.

    SIGTERM (``timeout``, a CI step cancelled, ``kill``) is a Ctrl-C that exits 143, as
    ``docker run`` passes it to the container: left to its default it ended this command
    alone, silently, and the job ran on with nobody watching it."""

    def __init__(self, sink: OutputSink) -> None:
        self._sink = sink
        self._presses = 0
        self._seen = 0
        self._armed = False
        self._stopping = False
        #: The first signal's exit code: 130 for SIGINT, 143 for SIGTERM.
        self.exit_code = int(ExitCode.INTERRUPTED)
        self._by = ""
        self.job_id = ""
        self.fd = -1

    def __enter__(self) -> _CtrlC:
        import signal as _signal  # run's only

        self.fd, self._write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._old_wakeup = _signal.set_wakeup_fd(self._write_fd, warn_on_full_buffer=False)
        self._old_handler = _signal.signal(_signal.SIGINT, self._pressed)
        self._old_term = _signal.signal(_signal.SIGTERM, self._pressed)
        return self

    def __exit__(self, *exc_info: object) -> None:
        import signal as _signal

        _signal.signal(_signal.SIGINT, self._old_handler)
        _signal.signal(_signal.SIGTERM, self._old_term)
        _signal.set_wakeup_fd(self._old_wakeup)
        os.close(self.fd)
        os.close(self._write_fd)

    def _pressed(self, signum: int, frame: FrameType | None) -> None:
        if self._presses == 0:
            self.exit_code = 128 + signum
            self._by = "" if signum == 2 else "SIGTERM: "  # (SIGINT is Ctrl-C's, as before)
        self._presses += 1
        self._sink.mute()  # the notice stays the last line on the screen

    def arm(self) -> None:
        """From now on the first press raises _StopRequested (the job is known)."""
        self._armed = True
        self.check()
        if self._stopping:
            raise _StopRequested

    def check(self) -> None:
        if self._presses == self._seen:
            return
        self._seen = self._presses
        which = f"job {self.job_id}" if self.job_id else "the job"
        if self._stopping or self._presses > 1:
            print(
                f"trio-worker: leaving; {which} may still be running", file=sys.stderr, flush=True
            )
            if self.exit_code != ExitCode.INTERRUPTED:
                raise SystemExit(self.exit_code)
            raise KeyboardInterrupt
        self._stopping = True
        again = "again" if self._by else "Ctrl-C again"
        print(
            f"trio-worker: {self._by}stopping {which} ({again} to leave at once)",
            file=sys.stderr,
            flush=True,
        )
        if self._armed:
            raise _StopRequested


def _server_going_away(client: BlockingClient, job_id: str) -> bool:
    """Whether the server is shutting down (it stops every job then): a quick Status."""
    try:
        client.status(job_id, timeout=2)
    except (ShuttingDown, ConnectionFailed):
        return True
    except (TrioWorkerError, TimeoutError):
        pass
    return False


def status(
    job_id: JobId,
    /,
    *,
    as_json: Annotated[bool, Parameter(name="--json", negative="", show_default=False)] = False,
    options: Options = None,
) -> int:
    """Show one job: state, exit code or signal, pid, times, limits.

    For example:

        trio-worker status 01JB7ZQ3X5K2M8N4P6R9T0V1W2
        trio-worker status --json 01JB7ZQ3X5K2M8N4P6R9T0V1W2 | jq .state

    Parameters
    ----------
    as_json
        Print one JSON object (keys id, owner, command, args, state, pid, exit_code,
        signal, error, started_at, ended_at, output_bytes, oom_killed, limits, isolation).
    """
    with open_client(_connection(options)) as client:
        info = client.status(IdResolver(client)(job_id))
    if as_json:
        dump_json(job_json(info))
    else:
        print_job(info)
    return ExitCode.OK


def list_jobs(
    *,
    as_json: Annotated[bool, Parameter(name="--json", negative="", show_default=False)] = False,
    quiet: Annotated[
        bool, Parameter(name=["--quiet", "-q"], negative="", show_default=False)
    ] = False,
    state: Annotated[
        list[str] | None, Parameter(metavar="STATE", negative="", show_default=False)
    ] = None,
    owner: Annotated[str | None, Parameter(metavar="NAME", show_default=False)] = None,
    options: Options = None,
) -> int:
    """List the jobs you may see (all of them for readonly and admin, your own for full).

    Newest first.

    For example:

        trio-worker list
        trio-worker list --state running --state lost
        trio-worker rm $(trio-worker list -q --state exited)
        trio-worker list --json | jq -r '.[] | select(.exit_code != 0) | .id'

    Parameters
    ----------
    as_json
        Print a JSON array of objects with the keys of status --json.
    quiet
        Print only the ids, one per line.
    state
        Only jobs in this state: running, exited, killed, failed or lost (repeat for more).
    owner
        Only this owner's jobs (the CN of the certificate that started them).
    """
    states = _parse_states(state or [])
    with open_client(_connection(options)) as client:
        jobs = client.list(states=states, owner=owner)  # filtered by the server
    if quiet:
        sys.stdout.write("".join(f"{job.id}\n" for job in jobs))
        sys.stdout.flush()
    elif as_json:
        dump_json([job_json(j) for j in jobs])
    else:
        print_jobs(jobs)
    return ExitCode.OK


def _parse_states(words: list[str]) -> set[JobState]:
    states = set()
    for word in words:
        for part in word.split(","):
            try:
                states.add(JobState(part.strip().lower()))
            except ValueError:
                names = ", ".join(s.value for s in JobState)
                raise InvalidRequest(
                    "--state", f"{part.strip()!r} is not a state; choose from {names}"
                ) from None
    return states


def stop(
    job_id: JobId,
    /,
    *,
    grace: Seconds | None = None,
    options: Options = None,
) -> int:
    """Stop a job: SIGTERM to its process group, SIGKILL after the grace period.

    Returns once the job has ended, and prints how it ended.

    For example:

        trio-worker stop 01JB7ZQ3X5K2M8N4P6R9T0V1W2
        trio-worker stop --grace 30 01JB7ZQ3X5K2M8N4P6R9T0V1W2

    Parameters
    ----------
    grace
        Seconds between SIGTERM and SIGKILL. Default: 5.
    """
    with open_client(_connection(options)) as client:
        full_id = IdResolver(client)(job_id)
        try:
            info = client.stop(full_id, DEFAULT_STOP_GRACE if grace is None else grace)
        except JobNotRunning:
            # Already what was asked for: scripts need no `|| true`.
            ended = client.status(full_id)
            print(
                f"trio-worker: job {ended.id} had already ended: {describe_state(ended)}",
                file=sys.stderr,
                flush=True,
            )
            return ExitCode.OK
    print(f"{printable(info.id)} {describe_state(info)}", flush=True)
    return ExitCode.OK


def signal(
    job_id: JobId,
    signum: Annotated[str, Parameter(name="SIGNAL", help="A name or number: TERM, SIGTERM or 15.")],
    /,
    *,
    options: Options = None,
) -> int:
    """Send a signal to a job's process group.

    For example:

        trio-worker signal 01JB7ZQ3X5K2M8N4P6R9T0V1W2 HUP
        trio-worker signal 01JB7ZQ3X5K2M8N4P6R9T0V1W2 SIGUSR1
        trio-worker signal 01JB7ZQ3X5K2M8N4P6R9T0V1W2 15
    """
    try:
        number = _parse.parse_signal(signum)
    except ValueError as exc:
        raise InvalidRequest("SIGNAL", str(exc)) from None
    with open_client(_connection(options)) as client:
        client.signal(IdResolver(client)(job_id), number)
    return ExitCode.OK


def wait(job_id: JobId, /, *, options: Options = None) -> int:
    """Wait for a job to end and exit with its exit code (as run does).

    128+N if signal N killed it, 127/126 if it could not be started, 125 if trio-worker
    itself failed, or if the job was lost (the server went away while it ran: its own code
    is unknown). A dropped connection is re-established.

    For example:

        trio-worker wait 01JB7ZQ3X5K2M8N4P6R9T0V1W2 && echo succeeded
    """
    conn = _connection(options)
    # The first connection is not retried (a wrong address fails at once), later ones are.
    with open_client(conn) as client:
        full_id = IdResolver(client)(job_id)
        client.status(full_id)
        final = retrying(Backoff(conn.addr), lambda: client.wait(full_id))
    code, note = job_exit(final)
    if note:
        print(f"trio-worker: {note}", file=sys.stderr, flush=True)
    return code


def logs(
    job_id: JobId,
    /,
    *,
    follow: Annotated[
        bool, Parameter(name=["--follow", "-f"], negative="", show_default=False)
    ] = False,
    offset: Annotated[Offset, Parameter(show_default=False)] = 0,
    tail: Annotated[Count | None, Parameter(name=["--tail", "-n"], show_default=False)] = None,
    options: Options = None,
) -> int:
    """Print a job's output: its stdout to stdout, its stderr to stderr, bytes unchanged.

    With -f, keep printing as the job writes, until it ends (Ctrl-C leaves; the job goes
    on). A dropped connection is re-established and the output resumed where it stopped,
    so no byte is lost or repeated.

    For example:

        trio-worker logs 01JB7ZQ3X5K2M8N4P6R9T0V1W2
        trio-worker logs -f 01JB7ZQ3X5K2M8N4P6R9T0V1W2
        trio-worker logs --tail 20 -f 01JB7Z
        trio-worker logs --offset 1048576 01JB7ZQ3X5K2M8N4P6R9T0V1W2 > rest.log

    Parameters
    ----------
    follow
        Keep streaming until the job has ended.
    offset
        Start at this byte of the job's combined output (0 = the beginning).
    tail
        Start at the last N lines instead (of stdout and stderr together).
    """
    if tail is not None and offset:
        raise InvalidRequest("--tail", "give --tail or --offset, not both")
    conn = _connection(options)
    with open_client(conn) as client:
        full_id = IdResolver(client)(job_id)
        if tail is not None:
            offset = _tail_offset(client, full_id, tail)
        backoff = Backoff(conn.addr)
        sink = OutputSink(offset)
        if follow:
            return _follow_to_end(client, full_id, sink, backoff)
        # Read before the output: if the job had ended, its output was whole by then,
        # and what the stream does not bring of it was lost.
        before = client.status(full_id)
        follow_output(client, full_id, sink, follow=False, backoff=backoff)
        if before.ended:
            sink.ended(before.output_bytes)
    return ExitCode.OUTPUT_LOST if sink.lost else ExitCode.OK


def _follow_to_end(client: BlockingClient, job_id: str, sink: OutputSink, backoff: Backoff) -> int:
    """``logs -f``, ``start --follow``: the job's output until it ends; then, as ``run``
    does, one line if its last bytes were lost on the server (no chunk comes after them
    to show the gap): exit code ``OUTPUT_LOST`` for that or a gap on the way."""
    follow_output(client, job_id, sink, follow=True, backoff=backoff)
    try:
        final = retrying(backoff, lambda: client.status(job_id))
    except JobNotFound:  # removed (rm -f) as its output ended: nothing more to tell
        final = None
    if final is not None and final.ended:
        sink.ended(final.output_bytes)
    return ExitCode.OUTPUT_LOST if sink.lost else ExitCode.OK


#: ``logs --tail`` reads this much of the end of the log first, four times more while it
#: finds too few lines, up to the last bound (past it, the lines start where it does).
_TAIL_WINDOWS = (64 * 1024, 1024 * 1024, 16 * 1024 * 1024, 64 * 1024 * 1024)


def _tail_offset(client: BlockingClient, job_id: str, lines: int) -> int:
    """The log offset where the job's last ``lines`` lines begin."""
    end = client.status(job_id).output_bytes
    first = end
    for window in _TAIL_WINDOWS:
        begin = max(0, end - window)
        data = bytearray()
        first = -1
        with client.output(job_id, offset=begin, follow=False) as stream:
            for chunk in stream:
                if first < 0:
                    first = chunk.offset
                if chunk.offset >= end:
                    break
                data += chunk.data[: end - chunk.offset]
        if first < 0:
            return begin  # nothing was written
        # The server keeps nothing before ``first``: the lines cannot start earlier.
        start = _parse.tail_start(bytes(data), lines, whole=first > begin or begin == 0)
        if start is not None:
            return first + start
    return first
