"""A job's environment encoded once (``_host._spawn.Environment``): whatever the server's
part and a Start's own variables hold, the child gets the same envp, the same command
search and the same exec size as from encoding the merged dict for each Start."""

from __future__ import annotations

import os

from hypothesis import given
from hypothesis import strategies as st

from trio_worker._host._spawn import Environment, exec_candidates
from trio_worker._jobs._exec_limit import exec_size

_FS_TEXT = st.text(
    st.characters(exclude_categories=["Cs"])
    | st.characters(min_codepoint=0xDC80, max_codepoint=0xDCFF, categories=["Cs"])
)
_KEYS = st.sampled_from(["PATH", "HOME", "A", "LC_ALL"]) | _FS_TEXT.filter(
    lambda k: bool(k) and "=" not in k
)
_PATHS = st.lists(st.sampled_from(["", ".", "/usr/bin", "/bin/", "rel/dir", "/x:y"]), max_size=4)


@given(
    st.dictionaries(_KEYS, _FS_TEXT, max_size=6),
    st.dictionaries(_KEYS, _FS_TEXT, max_size=4),
    st.none() | _PATHS.map(os.pathsep.join),
    st.sampled_from(["true", "sub/tool", "/bin/true", "é"]),
    st.lists(_FS_TEXT, min_size=1, max_size=3),
)
def test_an_environment_gives_the_child_what_the_merged_dict_would(
    base: dict[str, str],
    added: dict[str, str],
    path: str | None,
    command: str,
    argv: list[str],
) -> None:
    if path is not None:
        base["PATH"] = path
    merged = {**base, **added}
    env = Environment(base).updated(added)
    assert dict(env) == merged
    assert list(env) == list(merged)  # the server's variables first, as execve got them
    assert env.envp == [os.fsencode(f"{k}={v}") for k, v in merged.items()]
    assert env.candidates(command) == exec_candidates(command, merged.get("PATH"))
    assert exec_size(argv, env) == exec_size(argv, merged)


def test_the_servers_part_is_encoded_once_and_shared() -> None:
    """A Start with no variables of its own takes the server's environment as it is, and
    its search list: what the encoding saves (~65 us of the loop's time per Start)."""
    base = Environment({"PATH": "/usr/bin:/bin", "HOME": "/root"})
    assert base.updated({}) is base
    assert base.candidates("ls") == [b"/usr/bin/ls", b"/bin/ls"]
    other = base.updated({"PATH": "/opt/bin"})
    assert other.candidates("ls") == [b"/opt/bin/ls"]
    assert base.candidates("ls") == [b"/usr/bin/ls", b"/bin/ls"]
    assert base.updated({"X": "1"}).candidates("ls") == [b"/usr/bin/ls", b"/bin/ls"]
