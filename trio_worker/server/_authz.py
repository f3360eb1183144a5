"""Who may call what, on whose jobs: the contract's authorization table as data.

Two questions, asked in this order by the service: may this caller use this method at all
(:func:`authorize`, else PERMISSION_DENIED), and may it see this job (:func:`can_see`,
else the job is NOT_FOUND for it and absent from List, so that callers cannot probe for
other people's job ids). For Start, a third: which Unix user the job runs as
(:func:`job_user`, the contract's "Users" rule).
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Final

from .._errors import InvalidRequest, PermissionDenied
from .._host._users import UnixUser
from .._identity import Identity, Role

__all__ = ["Method", "authorize", "can_see", "job_user"]


class Method(enum.Enum):
    """The Worker service's methods; values are the gRPC method names."""

    START = "Start"
    STOP = "Stop"
    SIGNAL = "Signal"
    STATUS = "Status"
    WAIT = "Wait"
    OUTPUT = "Output"
    LIST = "List"
    REMOVE = "Remove"


_READ: Final = frozenset({Method.STATUS, Method.WAIT, Method.OUTPUT, Method.LIST})

# role -> (methods it may call, whether it sees every job or only its own)
_TABLE: Final[Mapping[Role, tuple[frozenset[Method], bool]]] = MappingProxyType(
    {
        Role.READONLY: (_READ, True),
        Role.FULL: (frozenset(Method), False),
        Role.ADMIN: (frozenset(Method), True),
    }
)


def authorize(identity: Identity, method: Method) -> None:
    """Raise :class:`PermissionDenied` unless ``identity``'s role allows ``method``."""
    if identity.role is None:
        raise PermissionDenied(
            f"{identity.name!r} has no valid role in its certificate, so it may not call "
            f"{method.value}"
        )
    allowed, _ = _TABLE[identity.role]
    if method not in allowed:
        raise PermissionDenied(
            f"{identity.name!r} has role {identity.role.value}, which may not call {method.value}"
        )


def can_see(identity: Identity, owner: str) -> bool:
    """Whether ``identity`` may see (and so act on) a job owned by ``owner``."""
    if identity.role is None:
        return False
    _, sees_all = _TABLE[identity.role]
    return sees_all or owner == identity.name


def job_user(
    identity: Identity,
    requested: str,
    *,
    default: UnixUser,
    lookup: Callable[[str], UnixUser],
) -> UnixUser:
    """The Unix user a Start by ``identity`` runs as (``lookup`` may block: NSS).

    ``requested`` empty: the certificate's first login, else ``default`` (the server's
    default job user). An admin may name any user. Anyone else may name only one of its
    logins or the default job user, by name or uid; naming another is PERMISSION_DENIED
    whether or not the host knows that user, so a full caller cannot probe for accounts.
    A user the host does not know is INVALID_ARGUMENT (:func:`lookup` raises it).
    """
    if not requested:
        return lookup(identity.logins[0]) if identity.logins else default
    if identity.role is Role.ADMIN:
        return lookup(requested)
    allowed = {*identity.logins, default.label}
    if requested in allowed:
        return lookup(requested) if requested != default.label else default
    try:
        user = lookup(requested)
    except InvalidRequest:
        user = None
    if user is not None:
        uids = {default.uid}
        for login in identity.logins:
            try:
                uids.add(lookup(login).uid)
            except InvalidRequest:
                continue
        if user.uid in uids:
            return user
    raise PermissionDenied(
        f"{identity.name!r} may run jobs only as "
        + ", ".join(sorted(allowed))
        + " (its certificate's logins and the server's default job user)",
        field="user",
    )
