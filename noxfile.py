"""Developer tasks. ``nox`` alone runs what CI runs: tests, lint, typecheck."""

from __future__ import annotations

import os

import nox

nox.options.sessions = ["tests", "lint", "typecheck"]
nox.options.reuse_existing_virtualenvs = True
nox.options.error_on_missing_interpreters = True

PYTHON = "3.11"


@nox.session(python=PYTHON)
def tests(session: nox.Session) -> None:
    """The whole test suite (root-only tests fail instead of skipping in CI)."""
    session.install("-e", ".[test]")
    env = {}
    if os.environ.get("CI") == "true":
        env["TRIO_WORKER_REQUIRE_ROOT"] = "1"
    session.run("pytest", *session.posargs, env=env)


@nox.session(python=PYTHON)
def lint(session: nox.Session) -> None:
    session.install("ruff>=0.15,<0.18")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session(python=PYTHON)
def typecheck(session: nox.Session) -> None:
    session.install("-e", ".[test]", "mypy>=1.15,<3")
    session.run("mypy")


@nox.session(python=PYTHON)
def bench(session: nox.Session) -> None:
    """Throughput and memory figures, each next to a baseline from the same run."""
    session.install("-e", ".[test]")
    for tool in (
        "bench_capture.py",  # step 1: capture into the log, followers, RSS
        "bench_server.py",  # step 2: end to end over mTLS, grpcio as load generator
        "bench_transport.py",  # the transport alone, next to a grpcio server
        "bench_client.py",  # our trio client against one server
        "bench_lifecycle.py",  # restart with 10,000 jobs, shutdown with 100 running
        "bench_store.py",  # the SQLite store alone
        "bench_cli_startup.py",  # each command start to exit, next to python -c pass
        "bench_connect.py",  # a new connection's set-up: dial + List, handshake, SETTINGS
        "bench_peer.py",  # the table: ratios to the grpcio peer (../shared/bench)
        "bench_jobmem.py",  # where a sleeping job's memory goes (in-process)
    ):
        session.run("python", f"tools/{tool}", *session.posargs)


@nox.session(python=PYTHON)
def proto(session: nox.Session) -> None:
    """Regenerate trio_worker/_pb from worker.proto."""
    session.install("-e", ".[test]")
    session.run("python", "tools/gen_proto.py")
