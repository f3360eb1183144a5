"""A job's input side: the write end of its stdin pipe, or the master of its terminal.

Writes go straight from the caller's buffer into the kernel: nothing is queued here, so
a job that does not read makes its writer wait (``wait_writable``) and costs no memory
beyond the pipe's or the terminal's own buffer. One lock keeps concurrent writers in
arrival order (trio's locks are fair), and keeps a write from being interleaved with
another's bytes.

A terminal's master is one file for both directions; the job's output is read from it by
the output pump, and this module writes to a duplicate of it, so closing one direction
never pulls the other's descriptor away.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
import termios
from typing import Any

import trio

__all__ = ["DEFAULT_TERMINAL_SIZE", "StdinClosed", "StdinWriter", "check_terminal_size"]

#: The size a terminal starts with when the caller names none (what VT100s had).
DEFAULT_TERMINAL_SIZE = (24, 80)
#: Largest size accepted in either dimension (the kernel keeps them as 16-bit values).
_MAX_DIMENSION = 0xFFFF
#: Most bytes handed to one write(2): bounds the time one call holds the event loop.
_WRITE_BYTES = 256 * 1024
_WINSIZE = struct.Struct("HHHH")


class StdinClosed(Exception):
    """The job's stdin was closed (by ``close``, or because the job ended)."""


def check_terminal_size(rows: object, cols: object) -> tuple[int, int]:
    """``(rows, cols)`` as ints within 1..65535, or ValueError saying which is wrong."""
    for name, value in (("rows", rows), ("cols", cols)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name} must be an integer, got {value!r}")
        if not 1 <= value <= _MAX_DIMENSION:
            raise ValueError(f"{name} must be within 1..{_MAX_DIMENSION}, got {value}")
    assert isinstance(rows, int)
    assert isinstance(cols, int)
    return rows, cols


def _special(attrs: list[Any], index: int) -> bytes:
    """One of a terminal's special characters (``c_cc[index]``) as one byte."""
    char = attrs[6][index]
    return char if isinstance(char, bytes) else bytes([char])


def set_terminal_size(fd: int, rows: int, cols: int) -> None:
    """TIOCSWINSZ: the kernel signals SIGWINCH to the terminal's foreground group when the
    size changes."""
    fcntl.ioctl(fd, termios.TIOCSWINSZ, _WINSIZE.pack(rows, cols, 0, 0))


class StdinWriter:
    """The job's stdin, for the supervisor to write to.

    ``fd`` is the write end of a pipe, or (``tty``) a duplicate of the terminal's master;
    this object owns it. After ``close`` (or ``release`` at the job's end) every write
    raises :class:`StdinClosed`. Bytes the job can no longer read (it closed its stdin,
    or it and everything holding its terminal exited) are dropped, as a pipe whose reader
    is gone would: the writer learns of the end from the job, not from its input.
    """

    def __init__(self, fd: int, *, tty: bool) -> None:
        os.set_blocking(fd, False)
        self._fd: int | None = fd
        self.tty = tty
        self._lock = trio.Lock()
        self._eof_sent = False
        self._reader_gone = False
        #: The last byte written to the terminal (None: none yet): whether a line is
        #: still open in its line discipline when input ends (see ``close``).
        self._last_byte: int | None = None

    @property
    def closed(self) -> bool:
        """No more bytes will be taken: closed by ``close``, or the job has ended."""
        return self._fd is None or self._eof_sent

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        """Write all of ``data``, waiting while the job does not read.

        Cancelled, it may have written a prefix of ``data``; the rest is not written.
        """
        async with self._lock:
            view = memoryview(data).cast("B")
            while view:
                fd = self._fd
                if fd is None or self._eof_sent:
                    raise StdinClosed()
                if self._reader_gone:
                    break
                try:
                    n = os.write(fd, view[:_WRITE_BYTES])
                except BlockingIOError:
                    try:
                        await trio.lowlevel.wait_writable(fd)
                    except trio.ClosedResourceError:
                        raise StdinClosed() from None
                    continue
                except OSError as exc:
                    if exc.errno in (errno.EPIPE, errno.EIO):
                        self._reader_gone = True  # nobody will ever read it
                        break
                    raise
                if self.tty and n:
                    self._last_byte = view[n - 1]
                view = view[n:]
                if view:
                    await trio.lowlevel.checkpoint()
            await trio.lowlevel.checkpoint()

    async def close(self) -> None:
        """End of input: a pipe is closed (the job reads EOF); a terminal gets its EOF
        character (VEOF, normally Ctrl-D), after the bytes written before it.

        In canonical mode one EOF character after a partial line (bytes with no newline
        after them) only hands that line to the reader; the end of file is a second one.
        So it goes twice then, once otherwise (and once in raw mode, where it is a byte)."""
        async with self._lock:
            if self.closed:
                await trio.lowlevel.checkpoint()
                return
            if not self.tty:
                self.release()
                await trio.lowlevel.checkpoint()
                return
            fd = self._fd
            assert fd is not None
            try:
                attrs = termios.tcgetattr(fd)
            except termios.error:
                attrs = None
            eof_byte = _special(attrs, termios.VEOF) if attrs is not None else b"\x04"
            eof = eof_byte * (2 if self._line_open(attrs) else 1)
            self._eof_sent = True
            while not self._reader_gone:
                try:
                    written = os.write(fd, eof)
                    if written == len(eof):
                        break
                    eof = eof[written:]
                except BlockingIOError:
                    try:
                        await trio.lowlevel.wait_writable(fd)
                    except trio.ClosedResourceError:
                        break
                except OSError as exc:
                    if exc.errno in (errno.EPIPE, errno.EIO):
                        break
                    raise
            await trio.lowlevel.checkpoint()

    def _line_open(self, attrs: list[Any] | None) -> bool:
        """Whether the terminal (in canonical mode) holds a partial line: the last byte
        written ends none (newline, EOL, EOL2, EOF; CR where ICRNL makes it one)."""
        last = self._last_byte
        if attrs is None or last is None or not attrs[3] & termios.ICANON:
            return False
        ends = {ord("\n")}
        for index in (termios.VEOF, termios.VEOL, termios.VEOL2):
            char = _special(attrs, index)
            if char != b"\0":  # _POSIX_VDISABLE: that character is off
                ends.add(char[0])
        if attrs[0] & termios.ICRNL and not attrs[0] & termios.IGNCR:
            ends.add(ord("\r"))
        return last not in ends

    def resize(self, rows: int, cols: int) -> None:
        """Set the terminal's size (SIGWINCH to its foreground group if it changed)."""
        if not self.tty:
            raise ValueError("the job has no terminal")
        if self._fd is None:
            raise StdinClosed()
        try:
            set_terminal_size(self._fd, rows, cols)
        except OSError as exc:
            if exc.errno != errno.EIO:
                raise

    def foreground_group(self) -> int | None:
        """The terminal's foreground process group (None: no terminal, or none now)."""
        if not self.tty or self._fd is None:
            return None
        try:
            group = os.tcgetpgrp(self._fd)
        except OSError:
            return None
        return group if group > 0 else None

    def release(self) -> None:
        """Close the descriptor now (the job has ended); waiting writers get StdinClosed."""
        fd, self._fd = self._fd, None
        if fd is not None:
            trio.lowlevel.notify_closing(fd)
            os.close(fd)
