"""A hybrid v1 host whose unified mount counts no CPU: the job is in cpuacct then.

A job is only in the v1 hierarchies it needs (``V1Driver.hierarchies_for``); with the
unified mount, its CPU time is read from the unified group's ``cpu.stat``. A group there
has that file only from Linux 4.20 (the base statistics); before (Debian 10's 4.19, Ubuntu
18.04's 4.15, both mount the unified hierarchy), a job left out of cpuacct would report
0 CPU seconds, silently. These trees are fakes (directories and files as the kernel would
show them), so any kernel can be played.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from trio_worker._host._cgroups import V1Driver

#: The files the driver probes to tell a hierarchy is there (its own table).
_PROBES = V1Driver._PROBES


def _fake_hybrid(root: Path, parent: str, unified_files: tuple[str, ...]) -> V1Driver:
    for name, probe in _PROBES.items():
        (root / name / parent).mkdir(parents=True)
        (root / name / "cgroup.procs").write_text("")
        (root / name / parent / probe).write_text("0\n")
    (root / "unified" / parent).mkdir(parents=True)
    (root / "unified" / "cgroup.procs").write_text("")
    for name in unified_files:
        (root / "unified" / parent / name).write_text("")
    return V1Driver(root, parent, "/", own={}, every_hierarchy=False)


@pytest.mark.parametrize(
    ("unified_files", "in_cpuacct"),
    [
        ((), True),  # before 4.20: no cpu.stat in a group without the cpu controller
        (("cpu.stat",), False),  # 4.20 to 5.13: cpu.stat, no cgroup.kill (the freezer)
        (("cpu.stat", "cgroup.kill"), False),  # 5.14 on
    ],
    ids=["linux-4.19", "linux-5.10", "linux-5.14"],
)
def test_a_job_is_in_cpuacct_when_the_unified_group_counts_no_cpu(
    tmp_path: Path, unified_files: tuple[str, ...], in_cpuacct: bool
) -> None:
    driver = _fake_hybrid(tmp_path / "cgroup", "tw", unified_files)
    group = driver.make("J1")
    cpuacct = driver.parents["cpuacct"] / "job-J1"
    assert (cpuacct in group.dirs) is in_cpuacct
    if in_cpuacct:
        # Its CPU time, as the kernel would count it there.
        (cpuacct / "cpuacct.usage").write_text("1500000000\n")
    else:
        (driver.parents["memory"] / "job-J1" / "memory.max_usage_in_bytes").write_text("0\n")
        assert driver.unified is not None
        (driver.unified / "job-J1" / "cpu.stat").write_text("usage_usec 1500000\n")
    usage = group.usage()
    assert usage is not None
    assert usage.cpu_seconds == pytest.approx(1.5)
    assert (driver.parents["freezer"] / "job-J1" in group.dirs) is (
        "cgroup.kill" not in unified_files
    )
