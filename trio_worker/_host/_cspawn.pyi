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
