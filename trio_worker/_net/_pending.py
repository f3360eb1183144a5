"""Whether any server connection has bytes waiting unread: what lets the supervisor's
pieces of loop work skip their turns when there is nothing to let go first
(``_jobs/_turns.Turns``)."""

from __future__ import annotations

import select
from contextlib import suppress
from types import TracebackType

__all__ = ["PendingInput"]


class PendingInput:
    """A level-triggered epoll of the server's connection sockets (trio's own epoll is
    one-shot and its events are trio's: not to be polled by anyone else). Calling it
    is one ``epoll_wait`` with a zero timeout: True while any socket is readable (bytes
    the kernel holds, or its end), whether its reader is about to run or not, or while
    a reader holds bytes it read and has not handled yet (``held``: a TLS read that
    found them at once hands them back after a turn of the loop, and OpenSSL may have
    read a second record with the first, which no socket shows).
    """

    __slots__ = ("_epoll", "_owners", "held")

    def __init__(self) -> None:
        self._epoll = select.epoll()
        #: Reads handing their bytes back after a turn (``TLSSocketStream.holding``).
        self.held = 0
        #: fd -> the connection watching it: a closed socket leaves the epoll by itself,
        #: and its number may serve the next connection before the first forgets it.
        self._owners: dict[int, object] = {}

    def watch(self, fd: int, owner: object) -> None:
        """Watch ``fd`` (a connection's socket) for ``owner`` until ``forget``."""
        try:
            self._epoll.register(fd, select.EPOLLIN)
        except FileExistsError:
            self._epoll.modify(fd, select.EPOLLIN)
        self._owners[fd] = owner

    def forget(self, fd: int, owner: object) -> None:
        """Stop watching ``fd``, if ``owner`` still watches it (call before its close)."""
        if self._owners.get(fd) is not owner:
            return
        del self._owners[fd]
        with suppress(OSError):  # (closed already: it left the epoll then)
            self._epoll.unregister(fd)

    def __call__(self) -> bool:
        """Whether any connection has input waiting now (never blocks)."""
        return self.held > 0 or (bool(self._owners) and bool(self._epoll.poll(0, 1)))

    def close(self) -> None:
        self._owners.clear()
        self._epoll.close()

    def __enter__(self) -> PendingInput:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
