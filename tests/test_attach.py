"""Attach end to end: trio_worker.client against run_server (real TLS, real processes, real
pseudo-terminals). Output from an offset then live, stdin in order with close_stdin,
resizes, ``ended`` then the end of the stream, several attachers, detach and re-attach,
and the role rules."""

from __future__ import annotations

import pytest
import trio

from tests.test_client import Certs, Server, certs, server, stop_quietly
from trio_worker import (
    InvalidRequest,
    JobNotFound,
    JobState,
    NoStdin,
    OutputStream,
    PermissionDenied,
)
from trio_worker.client import Attachment, WorkerClient

__all__ = ["certs", "server"]  # fixtures, used by name


async def read_until(session: Attachment, needle: bytes) -> bytes:
    seen = b""
    async for chunk in session:
        seen += chunk.data
        if needle in seen:
            return seen
    raise AssertionError(f"{needle!r} never came; got {seen!r}")


async def rest_of(session: Attachment) -> bytes:
    return b"".join([c.data async for c in session])


async def test_echo_through_cat_then_ended_then_the_stream_closes(server: Server) -> None:
    async with server.connect() as client:
        job = await client.start("cat", stdin=True)
        assert job.stdin
        async with client.attach(job.id) as session:
            await session.write(b"hello\n")
            assert await read_until(session, b"hello\n") == b"hello\n"
            await session.write(b"x" * 1_000_000)  # several messages, one order
            await session.close_stdin()
            rest = await rest_of(session)
            assert rest == b"x" * 1_000_000
            assert session.ended is not None
            assert (session.ended.state, session.ended.exit_code) == (JobState.EXITED, 0)
            assert session.ended.output_bytes == 1_000_006


async def test_output_comes_from_the_offset_and_an_ended_job_replays(server: Server) -> None:
    async with server.connect() as client:
        job = await client.start("sh", ["-c", "printf 0123456789 >&2"])
        await client.wait(job.id)
        async with client.attach(job.id, offset=4) as session:
            chunks = [c async for c in session]
        assert b"".join(c.data for c in chunks) == b"456789"
        assert {c.stream for c in chunks} == {OutputStream.STDERR}
        assert chunks[0].offset == 4
        assert session.ended is not None
        assert session.ended.exit_code == 0


async def test_attach_to_an_ended_job_that_printed_nothing(server: Server) -> None:
    # (Its log has no file, nor its directory: they come with a job's first output.)
    async with server.connect() as client:
        job = await client.start("true")
        await client.wait(job.id)
        async with client.attach(job.id) as session:
            assert [c async for c in session] == []
        assert session.ended is not None
        assert (session.ended.exit_code, session.ended.output_bytes) == (0, 0)


async def test_two_attachers_both_see_everything_and_either_may_type(server: Server) -> None:
    async with server.connect() as one, server.connect("admin") as two:
        job = await one.start("cat", stdin=True)
        async with one.attach(job.id) as first, two.attach(job.id) as second:
            await first.write(b"from-one\n")
            await read_until(first, b"from-one\n")
            await second.write(b"from-two\n")
            await second.close_stdin()
            assert await rest_of(first) == b"from-two\n"
            assert await rest_of(second) == b"from-one\nfrom-two\n"
            assert first.ended is not None
            assert second.ended is not None
            assert first.ended.state is JobState.EXITED


async def test_detach_leaves_the_job_running_and_reattach_resumes(server: Server) -> None:
    async with server.connect() as client:
        job = await client.start("cat", stdin=True)
        async with client.attach(job.id) as session:
            await session.write(b"before\n")
            await read_until(session, b"before\n")
        # Detached (the stream was reset): the job goes on.
        assert (await client.status(job.id)).state is JobState.RUNNING
        async with client.attach(job.id, offset=len(b"before\n")) as session:
            await session.write(b"after\n")
            await session.close_stdin()
            assert await rest_of(session) == b"after\n"
        assert (await client.wait(job.id)).exit_code == 0


async def test_cancelling_an_attach_detaches(server: Server) -> None:
    async with server.connect() as client:
        job = await client.start("sleep", ["100"], stdin=True)
        with trio.move_on_after(0.5):
            async with client.attach(job.id) as session:
                await rest_of(session)
        assert (await client.status(job.id)).state is JobState.RUNNING
        await stop_quietly(client, job.id)


async def test_tty_job_resize_through_attach(server: Server) -> None:
    async with server.connect() as client:
        script = 'trap "stty size" WINCH; stty size; until read x; do :; done; echo got:$x'
        job = await client.start("sh", ["-c", script], stdin=True, tty=True, terminal_size=(20, 70))
        assert job.tty
        async with client.attach(job.id) as session:
            await read_until(session, b"20 70")
            await session.resize(44, 144)
            await read_until(session, b"44 144")
            await session.write(b"hi\r")
            out = await rest_of(session)
            assert b"got:hi" in out
            assert session.ended is not None
            assert session.ended.exit_code == 0


async def test_a_bad_resize_is_invalid_argument_naming_the_resize_field(server: Server) -> None:
    # BadRequest names the field of the request: AttachRequest's is ``resize`` (Start's
    # is ``terminal_size``).
    async with server.connect() as client:
        job = await client.start("sleep", ["30"], stdin=True, tty=True)

        async def resize_to_no_rows() -> None:
            async with client.attach(job.id) as session:
                await session.resize(0, 80)
                await rest_of(session)

        try:
            with pytest.raises(InvalidRequest) as info:
                await resize_to_no_rows()
            assert info.value.field == "resize"
            assert str(info.value).startswith("resize: rows must be within 1..65535")
        finally:
            await stop_quietly(client, job.id)


async def test_writing_needs_a_job_started_with_stdin(server: Server) -> None:
    async with server.connect() as client:
        job = await client.start("sleep", ["100"])
        async with client.attach(job.id) as session:
            await session.write(b"x")
            with pytest.raises(NoStdin):
                await rest_of(session)
        await stop_quietly(client, job.id)


async def roles_case(client: WorkerClient, job_id: str) -> None:
    async with client.attach(job_id) as session:
        await session.write(b"typed\n")
        await rest_of(session)


async def test_role_rules_for_attach(server: Server, certs: Certs) -> None:
    async with (
        server.connect("alice") as alice,
        server.connect("bob") as bob,
        server.connect("reader") as reader,
        server.connect("admin") as admin,
    ):
        job = await alice.start("cat", stdin=True)
        # readonly may watch...
        async with reader.attach(job.id) as watching, alice.attach(job.id) as owner:
            await owner.write(b"seen\n")
            assert await read_until(watching, b"seen\n") == b"seen\n"
        # ...but not type.
        with pytest.raises(PermissionDenied):
            await roles_case(reader, job.id)
        # Another full user does not see the job at all.
        with pytest.raises(JobNotFound):
            async with bob.attach(job.id) as session:
                await rest_of(session)
        # An admin may type into anyone's job.
        async with admin.attach(job.id) as session:
            await session.write(b"admin\n")
            await session.close_stdin()
            assert (await rest_of(session)).endswith(b"admin\n")
        assert (await alice.wait(job.id)).exit_code == 0


async def test_a_job_removed_while_attached_ends_the_stream_with_its_end(server: Server) -> None:
    # The contract: once the job has ended and every byte was sent, ``ended``, then the
    # stream closes. A force Remove ends the job (SIGKILL) and then deletes it: the
    # attached caller still gets the end, as a pending Wait does (not NOT_FOUND), so
    # ``attach`` exits 137 and not with "no such job".
    async with server.connect() as client:
        job = await client.start("cat", stdin=True)
        async with client.attach(job.id) as session:
            await session.write(b"x\n")
            await read_until(session, b"x\n")
            removed = await client.remove(job.id, force=True)
            assert await rest_of(session) == b""
            assert session.ended is not None
            assert session.ended.state is JobState.KILLED
            assert session.ended.signal == removed.signal == 9
        with pytest.raises(JobNotFound):
            await client.status(job.id)
