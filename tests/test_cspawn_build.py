"""``_host/_cspawn.c`` builds where this machine's headers would not tell: other
architectures (no ``clone3`` child in assembly: vfork and the ``cgroup.procs`` write) and
kernel headers older than the kernel features it uses (``close_range``, Linux 5.9: Ubuntu
20.04 and RHEL 8 ship older ones, and both have a Python 3.11).

Each case compiles the file (syntax and types only) after the system headers, with what
such a system would lack taken away; the include guards keep the file's own includes from
bringing it back.
"""

from __future__ import annotations

import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest

from .conftest import require_program

SOURCE = Path(__file__).resolve().parent.parent / "trio_worker" / "_host" / "_cspawn.c"

_HEADERS = """
#define PY_SSIZE_T_CLEAN
#define _GNU_SOURCE
#include <Python.h>
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <sched.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>
"""


def _compile(tmp_path: Path, taken_away: str) -> subprocess.CompletedProcess[str]:
    compiler = shutil.which("cc") or require_program("gcc", "building the C extension")
    wrapper = tmp_path / "wrapper.c"
    wrapper.write_text(f'{_HEADERS}\n{taken_away}\n#include "{SOURCE}"\n')
    include = sysconfig.get_paths()["include"]
    # Warnings as the build has them; what is an error on newer compilers is one here too
    # (a function the headers do not declare), not every cosmetic warning a compiler adds.
    flags = ["-fsyntax-only", "-Wall", "-Wextra", "-Wno-unused-parameter"]
    flags += ["-Werror=implicit-function-declaration", "-Werror=int-conversion"]
    return subprocess.run(
        [compiler, *flags, f"-I{include}", str(wrapper)],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )


@pytest.mark.parametrize(
    "taken_away",
    [
        "",
        "#undef __x86_64__",
        "#undef SYS_close_range\n#undef __NR_close_range",
    ],
    ids=["as-is", "another-architecture", "headers-before-linux-5.9"],
)
def test_the_extension_builds(tmp_path: Path, taken_away: str) -> None:
    done = _compile(tmp_path, taken_away)
    assert done.returncode == 0, done.stderr
