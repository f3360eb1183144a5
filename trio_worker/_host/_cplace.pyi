from collections.abc import Sequence

def make_place(
    directory: bytes,
    files: Sequence[bytes],
    contents: Sequence[bytes | None],
    groups: Sequence[bytes],
    procs: Sequence[bool],
    /,
) -> list[int] | tuple[int, int, bytes]: ...
def remove_dirs(dirs: Sequence[bytes], /) -> list[tuple[int, int]]: ...
