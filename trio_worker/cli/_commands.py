"""The command table, and the top-level help made from it without cyclopts.

``trio-worker``, ``trio-worker --help`` and a mistyped command are answered from here, before
cyclopts (and rich, which it renders help with) is imported: together they take longer than
the whole of ``trio-worker --help`` may (0.1 s). A command's own ``--help`` is cyclopts'.
"""

from __future__ import annotations

TYPE_CHECKING = False  # typing is for mypy only: a short command never imports it
if TYPE_CHECKING:
    from typing import Final


__all__ = ["ALIASES", "COMMANDS", "Command", "overview", "unknown_command"]


class Command:
    """One row of the table (a plain class: a NamedTuple costs every command its making)."""

    __slots__ = ("client", "name", "summary", "target")

    def __init__(self, name: str, target: str, summary: str, *, client: bool = True) -> None:
        self.name = name
        #: ``module:function`` inside ``trio_worker.cli`` (cyclopts imports it when it runs).
        self.target = target
        #: What ``--help`` lists: the first line of the function's docstring (a test checks it).
        self.summary = summary
        #: A client command: takes the connection options and the config file.
        self.client = client


COMMANDS: Final = (
    Command(
        "serve",
        "_serve:serve",
        "Run the server until SIGINT or SIGTERM (Ctrl-C), then shut down gracefully.",
        client=False,
    ),
    Command("start", "_jobs:start", "Start a job and print its id."),
    Command("run", "_jobs:run", "Run a job, stream its output, and exit with its exit code."),
    Command(
        "status", "_jobs:status", "Show one job: state, exit code or signal, pid, times, limits."
    ),
    Command(
        "list",
        "_jobs:list_jobs",
        "List the jobs you may see (all of them for readonly and admin, your own for full).",
    ),
    Command(
        "stop",
        "_jobs:stop",
        "Stop a job: SIGTERM to its process group, SIGKILL after the grace period.",
    ),
    Command("signal", "_jobs:signal", "Send a signal to a job's process group."),
    Command(
        "wait", "_jobs:wait", "Wait for a job to end and exit with its exit code (as run does)."
    ),
    Command(
        "logs",
        "_jobs:logs",
        "Print a job's output: its stdout to stdout, its stderr to stderr, bytes unchanged.",
    ),
    Command("rm", "_remove:rm", "Remove jobs: their records and their output, on the server."),
    Command(
        "prune",
        "_remove:prune",
        "Remove every ended job you may remove, and say how much output that freed.",
    ),
    Command(
        "attach",
        "_interactive:attach",
        "Attach to a running job: follow its output from now on, and type into it.",
    ),
    Command(
        "certs",
        "_certs:certs",
        "Make certificates: a CA, the server's, and clients' with roles; show one.",
        client=False,
    ),
)

#: Every command name, in the order the overview lists them.
NAMES: Final = tuple(command.name for command in COMMANDS)

#: Other names of commands, as docker's (``main`` puts the command's own name in their
#: place before anything reads the command line; the contract's names stay the commands').
ALIASES: Final = {"ps": "list"}

DESCRIPTION: Final = """\
Run and control Linux processes on a host, over gRPC with mutual TLS.

Start a server (the first run creates a development PKI), then use the client
commands:

    trio-worker serve
    trio-worker run -- echo hello
    trio-worker start -- sleep 100   # prints the job id
    trio-worker logs -f ID
    trio-worker stop ID

Every command takes --help. --debug (anywhere before --) shows tracebacks and
debug logs."""


def overview() -> str:
    """``trio-worker --help``: what it is, the commands, the global options."""
    import textwrap  # not for the commands, which only look up their name here

    options = (
        ("--help, -h", "Show this message; COMMAND --help shows a command's."),
        ("--version", "Show the version."),
        ("--debug", "Show tracebacks and debug logs (also TRIO_WORKER_DEBUG=1)."),
    )
    width = max(len(name) for name in (*NAMES, *(option for option, _ in options)))
    lines = ["Usage: trio-worker COMMAND [OPTIONS] [ARGS...]", "", DESCRIPTION, "", "Commands:"]
    rows = [(command.name, command.summary) for command in COMMANDS]
    rows += [(alias, f"The same as {name} (as in docker).") for alias, name in ALIASES.items()]
    for name, text in rows:  # wrapped to 80 columns
        summary = textwrap.wrap(text, 80 - width - 4)
        lines.append(f"  {name:<{width}}  {summary[0]}")
        lines += [" " * (width + 4) + rest for rest in summary[1:]]
    lines += ["", "Options:"]
    lines += [f"  {option:<{width}}  {text}" for option, text in options]
    return "\n".join(lines) + "\n"


def unknown_command(word: str) -> str:
    """The one line for a first word that is no command."""
    import difflib

    close = difflib.get_close_matches(word, NAMES, n=1)
    guess = f" (did you mean {close[0]}?)" if close else ""
    return f"unknown command {word!r}{guess}; the commands are {', '.join(NAMES)}"
