"""``python -m trio_worker``: the ``trio-worker`` command line, as the console script and
``python -m trio_worker.cli`` are."""

from .cli import main

main()
