"""``python -m trio_worker.cli``: the same as the ``trio-worker`` console script."""

from . import main

main()
