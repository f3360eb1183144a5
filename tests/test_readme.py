"""The README's library example is real code: run it."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_library_example_runs_and_prints_what_it_says() -> None:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    example = next(b for b in blocks if "open_supervisor" in b)
    assert len(example.strip().splitlines()) <= 25
    out = subprocess.run(
        [sys.executable, "-c", example], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    # Order across the two pipes is not defined; within each it is.
    lines = set(out.splitlines()[:2])
    assert lines in (
        {"STDOUT 0 b'out\\n'", "STDERR 4 b'err\\n'"},
        {"STDERR 0 b'err\\n'", "STDOUT 4 b'out\\n'"},
    )
    assert "JobState.EXITED 3" in out
    assert out.rstrip().endswith("JobState.KILLED")


def test_readme_cli_tour_runs_as_written(tmp_path: Path) -> None:
    """The command-line tour, line by line, in a shell against a real server: every line
    must work as the README says (``set -e``), with only the address and state directory
    given through the environment, as a user's shell would."""
    from tests.test_cli import ServerProcess, clean_env, own_cgroup

    text = README.read_text()
    tour = re.search(r"A short tour.*?```sh\n(.*?)```", text, flags=re.S)
    assert tour is not None
    script = tour[1]
    env = clean_env(tmp_path, TRIO_WORKER_STATE_DIR=str(tmp_path / "state"))
    server = ServerProcess.start(["--listen", "127.0.0.1:0", *own_cgroup(tmp_path)], env)
    try:
        env["TRIO_WORKER_ADDR"] = f"127.0.0.1:{server.port()}"
        server.wait_for(r"^Try it", stream="stdout")
        bindir = str(Path(sys.executable).parent)
        env["PATH"] = f"{bindir}:{env.get('PATH', '/usr/bin:/bin')}"
        result = subprocess.run(
            ["sh", "-e", "-c", script], env=env, capture_output=True, text=True, timeout=120
        )
    finally:
        server.stop()
    assert result.returncode == 0, result.stderr
    out = result.stdout.splitlines()
    assert out[0] == "42"
    assert "exit 143" in out
    assert re.search(r"^Removed \d+ ended jobs?, .* of output\.$", result.stdout, re.M)
    assert "trio-worker: error" not in result.stderr, result.stderr
