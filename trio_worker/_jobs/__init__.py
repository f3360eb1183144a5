"""A job's parts: lifecycle (pure), process, output log, store, supervisor.

Nothing here knows the wire; host mechanisms come from ``trio_worker._host``.
"""
