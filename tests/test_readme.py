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
