"""Status replies made once per job snapshot, not once per call.

``job_to_pb`` costs ~17 us a job (two timestamps, nested limits and isolation), on the
event loop for every Status; comparing a new snapshot (``JobInfo``, frozen) with the one
the last reply was made from costs ~2 us. An ended job's snapshot never changes, and a
running job's changes with its usage, so the reply is remade exactly when it would differ.
"""

from __future__ import annotations

from typing import Final

from .._convert import job_to_pb
from .._model import JobInfo
from .._pb import worker_pb2 as pb

__all__ = ["MAX_KEPT_REPLIES", "MAX_KEPT_REPLY_BYTES", "JobReplies"]

#: Jobs whose last reply is kept (the oldest kept is dropped first), and the largest reply
#: kept: at most 1 MiB of replies, whatever jobs' arguments weigh (a job's can be MiBs).
MAX_KEPT_REPLIES: Final = 256
MAX_KEPT_REPLY_BYTES: Final = 4096


class JobReplies:
    """``job_to_pb(info)``, the same message while a job's snapshot is unchanged.

    The messages are shared between calls: their users (the transport serializes them,
    the audit reads their id) must not change them.
    """

    __slots__ = ("_kept",)

    def __init__(self) -> None:
        self._kept: dict[str, tuple[JobInfo, pb.Job]] = {}

    def __len__(self) -> int:
        return len(self._kept)

    def job(self, info: JobInfo) -> pb.Job:
        kept = self._kept.pop(info.id, None)
        if kept is not None and kept[0] == info:
            self._kept[info.id] = kept  # the most recently asked for, last
            return kept[1]
        message = job_to_pb(info)
        if message.ByteSize() <= MAX_KEPT_REPLY_BYTES:
            if len(self._kept) >= MAX_KEPT_REPLIES:
                del self._kept[next(iter(self._kept))]
            self._kept[info.id] = (info, message)
        return message
