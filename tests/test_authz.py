"""Every cell of the contract's authorization table.

| role     | Start | Stop, Signal, Remove | Status, Wait, Output, List |
| readonly | no    | no           | every job                  |
| full     | yes   | own jobs     | own jobs (others: NOT_FOUND, absent from List) |
| admin    | yes   | every job    | every job                  |

A certificate without a (valid) role may do nothing.
"""

from __future__ import annotations

import pytest

from trio_worker import PermissionDenied
from trio_worker._identity import Identity, Role
from trio_worker.server._authz import Method, authorize, can_see

M = Method
OK, DENIED, NOT_FOUND = "ok", "permission denied", "not found"

# (role, method) -> (outcome on the caller's own job, outcome on someone else's job).
# START and LIST are not about one job: for them both columns are the same.
TABLE: dict[tuple[Role | None, Method], tuple[str, str]] = {
    (Role.READONLY, M.START): (DENIED, DENIED),
    (Role.READONLY, M.STOP): (DENIED, DENIED),
    (Role.READONLY, M.SIGNAL): (DENIED, DENIED),
    (Role.READONLY, M.STATUS): (OK, OK),
    (Role.READONLY, M.WAIT): (OK, OK),
    (Role.READONLY, M.OUTPUT): (OK, OK),
    (Role.READONLY, M.LIST): (OK, OK),
    (Role.READONLY, M.REMOVE): (DENIED, DENIED),
    (Role.FULL, M.START): (OK, OK),
    (Role.FULL, M.STOP): (OK, NOT_FOUND),
    (Role.FULL, M.SIGNAL): (OK, NOT_FOUND),
    (Role.FULL, M.STATUS): (OK, NOT_FOUND),
    (Role.FULL, M.WAIT): (OK, NOT_FOUND),
    (Role.FULL, M.OUTPUT): (OK, NOT_FOUND),
    (Role.FULL, M.LIST): (OK, OK),
    (Role.FULL, M.REMOVE): (OK, NOT_FOUND),
    (Role.ADMIN, M.START): (OK, OK),
    (Role.ADMIN, M.STOP): (OK, OK),
    (Role.ADMIN, M.SIGNAL): (OK, OK),
    (Role.ADMIN, M.STATUS): (OK, OK),
    (Role.ADMIN, M.WAIT): (OK, OK),
    (Role.ADMIN, M.OUTPUT): (OK, OK),
    (Role.ADMIN, M.LIST): (OK, OK),
    (Role.ADMIN, M.REMOVE): (OK, OK),
    **{(None, method): (DENIED, DENIED) for method in Method},
}


def _outcome(identity: Identity, method: Method, owner: str) -> str:
    """What the service answers, in its order: method first, then visibility of the job."""
    try:
        authorize(identity, method)
    except PermissionDenied:
        return DENIED
    if method in (M.START, M.LIST) or can_see(identity, owner):
        return OK
    return NOT_FOUND


def test_table_covers_every_role_and_method() -> None:
    assert set(TABLE) == {(r, m) for r in (*Role, None) for m in Method}


@pytest.mark.parametrize(("role", "method"), list(TABLE), ids=lambda v: getattr(v, "name", v))
def test_cell(role: Role | None, method: Method) -> None:
    me = Identity("me", role)
    assert (_outcome(me, method, "me"), _outcome(me, method, "someone-else")) == TABLE[role, method]


@pytest.mark.parametrize(
    ("role", "own", "others"),
    [
        (Role.READONLY, True, True),
        (Role.FULL, True, False),
        (Role.ADMIN, True, True),
        (None, False, False),
    ],
)
def test_list_shows_exactly_the_visible_jobs(role: Role | None, own: bool, others: bool) -> None:
    me = Identity("me", role)
    assert can_see(me, "me") is own
    assert can_see(me, "someone-else") is others


def test_full_user_does_not_see_jobs_of_similar_names() -> None:
    me = Identity("me", Role.FULL)
    assert not can_see(me, "me ")
    assert not can_see(me, "ME")
    assert not can_see(me, "")


def test_denial_names_the_caller_and_the_method() -> None:
    with pytest.raises(PermissionDenied, match=r"'carol'.*readonly.*Start"):
        authorize(Identity("carol", Role.READONLY), M.START)
    with pytest.raises(PermissionDenied, match=r"'dave'.*no valid role.*Status"):
        authorize(Identity("dave", None), M.STATUS)


def test_method_values_are_the_grpc_method_names() -> None:
    assert [m.value for m in Method] == [
        "Start",
        "Stop",
        "Signal",
        "Status",
        "Wait",
        "Output",
        "List",
        "Remove",
    ]
