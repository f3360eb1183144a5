"""Being told when a directory (or a file in it) is deleted, moved or made again: inotify
watches on the file, the directory, and the directory's name in its parent.

For the state directory: a server whose directory is removed under it goes on with its
open files, nameless, and nothing would say so. Event-driven: no periodic check.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import struct
from pathlib import Path
from types import TracebackType
from typing import Self, final

import trio

__all__ = ["PathWatch"]

_IN_ATTRIB = 0x4  # a link count changed: the file was unlinked (we keep it open)
_IN_MOVED_FROM = 0x40
_IN_MOVED_TO = 0x80
_IN_CREATE = 0x100
_IN_DELETE = 0x200
_IN_DELETE_SELF = 0x400
_IN_MOVE_SELF = 0x800
_IN_ONLYDIR = 0x01000000
_EVENT = struct.Struct("iIII")  # wd, mask, cookie, length of the name that follows

_libc = ctypes.CDLL(None, use_errno=True)
_libc.inotify_init1.argtypes = [ctypes.c_int]
_libc.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]


def _check(result: int, path: Path | None = None) -> int:
    if result < 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), None if path is None else str(path))
    return result


@final
class PathWatch:
    """An inotify fd that turns readable when ``directory`` (or ``file`` in it) is
    deleted or moved, or something is made, moved or removed under the directory's name
    in its parent; ``news`` says whether what it read was about them (the parent's other
    entries are not). Blocking (paths looked up: make it in a thread); raises OSError if
    inotify cannot watch them (out of watches, a path gone)."""

    def __init__(self, directory: Path, file: Path) -> None:
        directory = Path(os.path.abspath(directory))  # (its parent: "." is no name)
        self.fd = _check(_libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC))
        self._name = os.fsencode(directory.name)
        # The parent, for the name coming back (a directory moved back): a parent we may
        # not read (a server's user under /var/lib) leaves it out, and that news with it.
        parent: int = _libc.inotify_add_watch(
            self.fd,
            os.fsencode(directory.parent),
            _IN_CREATE | _IN_DELETE | _IN_MOVED_FROM | _IN_MOVED_TO | _IN_ONLYDIR,
        )
        self._parent = parent if parent >= 0 else -2  # (-1 is a lost event's wd)
        try:
            for path, mask in (
                (directory, _IN_DELETE_SELF | _IN_MOVE_SELF | _IN_ONLYDIR),
                (file, _IN_ATTRIB | _IN_DELETE_SELF | _IN_MOVE_SELF),
            ):
                _check(_libc.inotify_add_watch(self.fd, os.fsencode(path), mask), path)
        except OSError:
            os.close(self.fd)
            raise

    async def wait(self) -> None:
        """Until something happened to the watched paths (events about the parent's other
        entries are read and let go)."""
        while True:
            await trio.lowlevel.wait_readable(self.fd)
            if self.news():
                return

    def news(self) -> bool:
        """Read the queued events: whether one is about the watched paths."""
        news = False
        try:
            while data := os.read(self.fd, 4096):
                offset = 0
                while offset < len(data):
                    wd, _, _, length = _EVENT.unpack_from(data, offset)
                    offset += _EVENT.size
                    name = data[offset : offset + length].rstrip(b"\0")
                    offset += length
                    # (A lost event's wd is -1: news too, as anything of the watched.)
                    news = news or wd != self._parent or name == self._name
        except BlockingIOError:
            pass
        return news

    def close(self) -> None:
        if self.fd >= 0:
            with contextlib.suppress(RuntimeError):  # (outside trio: nobody waits on it)
                trio.lowlevel.notify_closing(self.fd)
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
