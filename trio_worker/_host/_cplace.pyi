from collections.abc import Sequence

from ._cspawn import Seed

#: A place's seed: (it, its pidfd, its stdout's and stderr's read ends, its start time).
Planted = tuple[Seed, int, int, int, int | None]

def make_place(
    directory: bytes,
    files: Sequence[bytes],
    contents: Sequence[bytes | None],
    groups: Sequence[bytes],
    procs: Sequence[bool],
    seed: tuple[int, tuple[int, ...]] | None = None,
    made: bool = False,
    /,
) -> list[int] | tuple[int, int, bytes] | tuple[list[int], Planted | OSError]: ...
def remove_dirs(dirs: Sequence[bytes], /) -> list[tuple[int, int]]: ...
def recycle(
    operations: Sequence[tuple[int, bytes, bytes, bytes, int]], names: Sequence[bytes], /
) -> list[tuple[int, ...] | None]: ...
