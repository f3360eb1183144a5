"""What this host can enforce: the one place that answers it.

A job's limits need cgroup controllers, its isolation needs namespaces; both
lists of problems end up in one ``Unenforceable``, so a caller learns every
reason at once and nothing is ever silently ignored.
"""

from __future__ import annotations

from .._errors import Unenforceable
from .._model import Isolation, Limits
from ._cgroups import CgroupDriver
from ._isolation import isolation_problems

__all__ = ["check_enforceable"]


def check_enforceable(cgroups: CgroupDriver, limits: Limits, isolation: Isolation) -> None:
    """Raise ``Unenforceable`` naming everything this host cannot give the job."""
    problems = cgroups.limit_problems(limits) + isolation_problems(isolation)
    if problems:
        raise Unenforceable("; ".join(problems))
