"""The exit codes of every command; a module of its own so that ``main`` can exit
without importing cyclopts.

Exit codes (the README's table is this one):

====  ==========================================================================
0     success
1     unexpected error: a bug (``--debug`` shows the traceback)
2     usage: bad option or argument, or a request the server found invalid
3     local configuration: certificate, key, config file or state directory
4     cannot talk to the server: unreachable, TLS handshake failed, connection lost
5     permission denied: the certificate's role does not allow this
6     no such job (or not one you may see)
7     the job is not running any more
8     the host cannot enforce the limits or isolation asked for
9     the server is at a limit (jobs, connections), or the caller at a quota
10    the server is shutting down
11    the server failed (internal error)
12    the job is still running (``rm`` without ``-f``)
13    our output could not be written (disk full, I/O error)
14    ``logs``, ``start --follow``: bytes of the job's output were lost on the server
      (never written: its disk was full); a line on stderr says which
125   ``run``/``wait``: trio-worker itself failed (any of 1-13), or the job was lost
      (the server went away while it ran: its own code is unknown)
126   ``run``/``wait``/``start``: the command could not be executed
127   ``run``/``wait``/``start``: the command was not found
128+N ``run``/``wait``: the job was killed by signal N
130   interrupted (Ctrl-C)
141   stdout was closed by its reader (``trio-worker logs ID | head``)
====  ==========================================================================
"""

from __future__ import annotations

import enum

__all__ = ["ExitCode"]


class ExitCode(enum.IntEnum):
    OK = 0
    BUG = 1
    USAGE = 2
    CONFIG = 3
    CONNECTION = 4
    PERMISSION = 5
    NOT_FOUND = 6
    NOT_RUNNING = 7
    UNENFORCEABLE = 8
    EXHAUSTED = 9
    SHUTTING_DOWN = 10
    SERVER = 11
    RUNNING = 12
    UNWRITABLE = 13
    #: ``logs``/``start --follow``: not every byte of the job's output was printed.
    OUTPUT_LOST = 14
    #: ``run``/``wait`` only: trio-worker failed, not the job.
    TOOL_FAILED = 125
    CANNOT_EXECUTE = 126
    NOT_FOUND_COMMAND = 127
    INTERRUPTED = 130
    BROKEN_PIPE = 141
