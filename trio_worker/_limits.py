"""Limits: their bounds, their one validation, and the server's policy.

A start request's limits are validated once, by ``LimitPolicy.apply``; the
cgroup drivers only translate valid limits into cgroup files.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from ._errors import InvalidRequest
from ._model import Limits
from ._util import final

__all__ = [
    "CPU_PERIOD_US",
    "MAX_BPS",
    "MAX_CPUS",
    "MAX_MEMORY",
    "MAX_PIDS",
    "MIN_CPUS",
    "MIN_MEMORY",
    "LimitPolicy",
    "validate_limits",
]

#: CFS period: quota = cpus * period. 100 ms is the kernel's default.
CPU_PERIOD_US = 100_000
#: The kernel's smallest CFS quota is 1 ms, i.e. 0.01 CPUs at a 100 ms period.
MIN_CPUS = 0.01
#: More CPUs than any Linux build supports (NR_CPUS <= 8192).
MAX_CPUS = 8192.0
#: Below this, not even a shell starts; the kernel would OOM-kill at once.
MIN_MEMORY = 1 << 20
#: The page counters of both cgroup versions top out near 2**63.
MAX_MEMORY = 1 << 62
#: PID_MAX_LIMIT: no pids.max above this means anything.
MAX_PIDS = 4 * 1024 * 1024
MAX_BPS = (1 << 63) - 1


#: The fields of ``Limits`` that are whole numbers (all but ``cpus``).
_INTEGERS = tuple(f.name for f in fields(Limits) if f.name != "cpus")
#: Every field of ``Limits``, in order.
_FIELDS = tuple(f.name for f in fields(Limits))

# -- limits --------------------------------------------------------------------


def validate_limits(limits: Limits) -> None:
    """Reject limits no kernel would take or no job could live with.

    Raises ``InvalidRequest`` naming the field and the bound.
    """
    limits.validate()
    for name in _INTEGERS:
        value = getattr(limits, name)
        if type(value) is not int and (isinstance(value, bool) or not isinstance(value, int)):
            raise InvalidRequest(f"limits.{name}", f"must be an integer, got {value!r}")
    if 0 < limits.cpus < MIN_CPUS:
        raise InvalidRequest(
            "limits.cpus",
            f"must be 0 (no limit) or at least {MIN_CPUS} CPUs (a 1 ms CFS quota "
            f"per {CPU_PERIOD_US // 1000} ms period), got {limits.cpus}",
        )
    if limits.cpus > MAX_CPUS:
        raise InvalidRequest("limits.cpus", f"must be at most {MAX_CPUS:g}, got {limits.cpus}")
    if 0 < limits.memory_bytes < MIN_MEMORY:
        raise InvalidRequest(
            "limits.memory_bytes",
            f"must be 0 (no limit) or at least {MIN_MEMORY} bytes (1 MiB), "
            f"got {limits.memory_bytes}",
        )
    if limits.memory_bytes > MAX_MEMORY:
        raise InvalidRequest(
            "limits.memory_bytes", f"must be at most {MAX_MEMORY} bytes, got {limits.memory_bytes}"
        )
    for name in ("io_read_bps", "io_write_bps"):
        if getattr(limits, name) > MAX_BPS:
            raise InvalidRequest(f"limits.{name}", f"must be at most {MAX_BPS}")
    if limits.pids > MAX_PIDS:
        raise InvalidRequest("limits.pids", f"must be at most {MAX_PIDS}, got {limits.pids}")


@final
@dataclass(frozen=True, slots=True)
class LimitPolicy:
    """The server's limit configuration: defaults fill unset fields, maximums cap them.

    0 means "unset" in ``defaults`` and "no maximum" in ``maximums``. Since 0
    also means "no limit" in a request (proto3 cannot tell unset from 0), a
    field left at 0 gets the default, or else the maximum: a server with a
    maximum never runs a job unlimited in that resource.
    """

    defaults: Limits = field(default_factory=Limits)
    maximums: Limits = field(default_factory=Limits)

    def __post_init__(self) -> None:
        validate_limits(self.defaults)
        validate_limits(self.maximums)
        for f in fields(Limits):
            default, maximum = getattr(self.defaults, f.name), getattr(self.maximums, f.name)
            if maximum and default > maximum:
                raise ValueError(f"default {f.name}={default} is above the maximum {maximum}")

    def apply(self, requested: Limits) -> Limits:
        """The limits a job gets; ``InvalidRequest`` if it asks above a maximum."""
        validate_limits(requested)
        defaults, maximums = self.defaults, self.maximums
        chosen: list[float] = []
        for name in _FIELDS:
            value: float = getattr(requested, name)
            maximum: float = getattr(maximums, name)
            if maximum and value > maximum:
                raise InvalidRequest(
                    f"limits.{name}", f"must be at most {maximum} on this server, got {value}"
                )
            chosen.append(value or getattr(defaults, name) or maximum)
        cpus, memory_bytes, io_read_bps, io_write_bps, pids = chosen
        return Limits(
            cpus=float(cpus),
            memory_bytes=int(memory_bytes),
            io_read_bps=int(io_read_bps),
            io_write_bps=int(io_write_bps),
            pids=int(pids),
        )
