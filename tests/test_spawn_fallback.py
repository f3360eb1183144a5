"""The spawn where the kernel refuses ``clone3``, as container runtimes make it do.

Docker's default seccomp profile answers ``clone3`` with ENOSYS (so that libc falls back
to ``clone``), other sandboxes with EPERM, and a kernel from before Linux 5.7 refuses
``CLONE_INTO_CGROUP`` (EINVAL, or E2BIG for the larger ``struct clone_args``). In each case
the command must still be in every group of its job before its first instruction: the
child joins the v2 group by writing to its ``cgroup.procs``, as for v1 hierarchies.

A seccomp filter is for the life of a process: each case runs in a fresh interpreter.
"""

from __future__ import annotations

import errno
import platform
import subprocess
import sys
import textwrap

import pytest

from .conftest import cgroup_parent, require_root

_SCRIPT = textwrap.dedent(
    """
    import ctypes, os, secrets, struct, sys
    from trio_worker._host._cgroups import NoDriver, detect
    from trio_worker._host._spawn import spawn
    from trio_worker._model import Limits

    def refuse_clone3(err):
        # BPF: on x86-64, clone3 (435) answers -err; every other call is allowed.
        ld, jeq, ret = 0x20, 0x15, 0x06
        allow, error = 0x7FFF0000, 0x00050000 | err
        program = [
            (ld, 0, 0, 4), (jeq, 1, 0, 0xC000003E), (ret, 0, 0, allow),
            (ld, 0, 0, 0), (jeq, 0, 1, 435), (ret, 0, 0, error), (ret, 0, 0, allow),
        ]
        code = ctypes.create_string_buffer(b"".join(struct.pack("HBBI", *i) for i in program))

        class Prog(ctypes.Structure):
            _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

        prog = Prog(len(program), ctypes.addressof(code))
        libc = ctypes.CDLL(None, use_errno=True)
        assert libc.prctl(38, 1, 0, 0, 0) == 0  # PR_SET_NO_NEW_PRIVS
        assert libc.prctl(22, 2, ctypes.byref(prog), 0, 0) == 0  # SECCOMP_MODE_FILTER
        # The filter is on: clone3 itself now fails so.
        assert libc.syscall(435, None, 0) == -1 and ctypes.get_errno() == err

    refuse_clone3(int(sys.argv[1]))
    driver = detect(f"trio-worker-test-{secrets.token_hex(4)}")
    if isinstance(driver, NoDriver):
        print("SKIP", driver.reason)
        sys.exit(0)
    try:
        group = driver.create("job1", Limits())
        fds = group.open_join()
        read, write = os.pipe2(os.O_CLOEXEC)
        null = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        pid = spawn("cat", ["cat", "/proc/self/cgroup"], dict(os.environ), None,
                    stdin=null, stdout=write, stderr=write, cgroup_fds=fds)
        os.close(write)
        out = b""
        while chunk := os.read(read, 65536):
            out += chunk
        _, status = os.waitpid(pid, 0)
        for fd in (*fds, read, null):
            os.close(fd)
        lines = out.decode().splitlines()
        joined = [line for line in lines if line.endswith("/" + group.path.name)]
        print("EXIT", os.waitstatus_to_exitcode(status))
        print("JOINED", len(joined), "OF", len(group.dirs))
        print("\\n".join(lines))
        group.remove()
    finally:
        driver.cleanup_leftovers()
        driver.close()
    """
)


@pytest.mark.root
@pytest.mark.skipif(platform.machine() != "x86_64", reason="the filter is written for x86-64")
@pytest.mark.parametrize(
    "refusal",
    [errno.ENOSYS, errno.EPERM, errno.EINVAL, errno.E2BIG],
    ids=["ENOSYS-docker", "EPERM-sandbox", "EINVAL-old-kernel", "E2BIG-old-kernel"],
)
def test_a_refused_clone3_still_puts_the_command_in_every_group(refusal: int) -> None:
    require_root("cgroups")
    done = subprocess.run(
        [sys.executable, "-c", _SCRIPT, str(refusal)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    if done.stdout.startswith("SKIP"):
        pytest.skip(done.stdout)
    lines = done.stdout.splitlines()
    assert lines[0] == "EXIT 0", done.stdout
    _, joined, _, total = lines[1].split()
    assert int(total) >= 1
    assert joined == total, done.stdout


_SUPERVISOR = _SCRIPT.split("refuse_clone3(int(sys.argv[1]))")[0] + textwrap.dedent(
    """
    import tempfile, trio
    from trio_worker import JobState, open_supervisor

    refuse_clone3(int(sys.argv[1]))

    async def main():
        with tempfile.TemporaryDirectory() as tmp:
            parent = sys.argv[2]
            async with open_supervisor(tmp + "/state", cgroup_parent=parent) as sup:
                if not sup.cgroups.tracks:
                    print("SKIP no cgroups")
                    return
                launcher = sup._admission.launcher
                await launcher.settled()
                print("SEEDS", sum(p.seed is not None for p in launcher.ready_places()))
                job = await sup.start("cat", ["/proc/self/cgroup"])
                end = await sup.wait(job.id)
                out = b"".join([c.data async for c in sup.output(job.id)]).decode()
                dirs = sup.cgroups.planned(job.id).dirs
                joined = [line for line in out.splitlines() if line.endswith(f"/job-{job.id}")]
                print("EXIT", end.exit_code)
                print("JOINED", len(joined), "OF", len(dirs))

    trio.run(main)
    """
)


@pytest.mark.root
@pytest.mark.skipif(platform.machine() != "x86_64", reason="the filter is written for x86-64")
def test_a_refused_clone3_means_no_seeds_and_starts_take_the_thread_path() -> None:
    # ENOSYS as Docker's profile answers: glibc then makes threads with clone (under
    # EPERM it makes none at all, and no supervisor runs).
    require_root("cgroups")
    done = subprocess.run(
        [sys.executable, "-c", _SUPERVISOR, str(errno.ENOSYS), cgroup_parent()],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    if "SKIP" in done.stdout:
        pytest.skip(done.stdout)
    assert done.stdout.splitlines() == ["SEEDS 0", "EXIT 0", *done.stdout.splitlines()[2:]]
    _, joined, _, total = done.stdout.splitlines()[2].split()
    assert int(total) >= 1
    assert joined == total, done.stdout
