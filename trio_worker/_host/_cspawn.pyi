from collections.abc import Sequence

def spawn(
    paths: Sequence[bytes],
    argv: Sequence[bytes],
    envp: Sequence[bytes],
    cwd: bytes | None,
    stdin: int,
    stdout: int,
    stderr: int,
    cgroup_fds: Sequence[int],
    new_session: bool,
    ctty: bool,
    uid: int,
    gid: int,
    groups: Sequence[int] | None,
    pdeathsig: int,
    parent: int,
    nofile_soft: int,
    /,
) -> tuple[int, int, int, int]: ...

HAVE_SEED: int

def proc_start_time(pid: int, /) -> int | None: ...
def release_seed_slots() -> None: ...
def seed_slots() -> tuple[int, ...]: ...

class Seed:
    pid: int
    go_fd: int
    report_fd: int
    def __init__(
        self,
        cgroup_fds: Sequence[int],
        stdin: int,
        stdout: int,
        stderr: int,
        nofile_soft: int,
        max_fd: int,
        /,
    ) -> None: ...
    def go(
        self,
        paths: Sequence[bytes],
        argv: Sequence[bytes],
        envp: Sequence[bytes],
        cwd: bytes | None,
        uid: int,
        gid: int,
        groups: Sequence[int] | None,
        pdeathsig: int,
        parent: int,
        /,
    ) -> None: ...
    def collect(self) -> tuple[int, int, int] | None: ...
    def kill(self) -> None: ...
