"""The server puts its start-up objects out of the cycle collector's reach (a full
collection would scan them all, with the loop stopped): in a process of its own."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

_SERVER = textwrap.dedent(
    """
    import gc, sys, trio
    from pathlib import Path
    from trio_worker import pki
    from trio_worker.server._run import ServerSettings, run_server

    d = Path(sys.argv[1])
    pki.init_ca(d)
    pki.issue_server(d, ["localhost"])
    settings = ServerSettings(
        ca=d / "ca.pem", cert=d / "server.pem", key=d / "server.key",
        state_dir=Path(sys.argv[2]), port=0,
    )

    async def main():
        before = gc.get_freeze_count()
        async with trio.open_nursery() as nursery:
            await nursery.start(
                lambda task_status: run_server(
                    settings, handle_signals=False, task_status=task_status
                )
            )
            print(before, gc.get_freeze_count(), flush=True)
            nursery.cancel_scope.cancel()

    trio.run(main)
    """
)


def test_a_ready_server_has_frozen_its_start_up_objects(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-c", _SERVER, str(tmp_path / "pki"), str(tmp_path / "state")],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    before, after = (int(n) for n in out.stdout.split())
    assert before == 0
    assert after > 10_000  # modules, classes, protocol tables
