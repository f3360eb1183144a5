"""Which Unix user a job runs as: the contract's "Users" rule, cell by cell, and the
host's account lookups (with real users made by useradd)."""

from __future__ import annotations

import os
import pwd
import secrets
import subprocess
from collections.abc import Iterator

import pytest

from trio_worker import InvalidRequest, PermissionDenied
from trio_worker._host._users import UnixUser, current_user, lookup_user, user_environment
from trio_worker._identity import Identity, Role
from trio_worker.server._authz import job_user

from .conftest import require_root

# --- the rule, on a made-up host --------------------------------------------------------

HOST = {
    "svc": UnixUser("svc", 900, 900, (900,), "/srv", "/bin/sh"),  # the default job user
    "alice": UnixUser("alice", 1001, 1001, (1001,), "/home/alice", "/bin/bash"),
    "build": UnixUser("build", 1002, 1002, (1002, 50), "/home/build", "/bin/sh"),
    "carol": UnixUser("carol", 1003, 1003, (1003,), "/home/carol", "/bin/sh"),
}
BY_UID = {str(u.uid): u for u in HOST.values()}
DEFAULT = HOST["svc"]


def lookup(spec: str) -> UnixUser:
    try:
        return HOST.get(spec) or BY_UID[spec]
    except KeyError:
        raise InvalidRequest("user", "this host has no such user") from None


def run_as(role: Role, logins: tuple[str, ...], requested: str) -> str:
    """The label the rule picks, or the error class's name."""
    identity = Identity("someone", role, logins)
    try:
        return job_user(identity, requested, default=DEFAULT, lookup=lookup).label
    except (PermissionDenied, InvalidRequest) as exc:
        return type(exc).__name__


DENIED, UNKNOWN = "PermissionDenied", "InvalidRequest"


@pytest.mark.parametrize(
    ("role", "logins", "requested", "expected"),
    [
        # empty request: the first login, else the default job user
        (Role.FULL, (), "", "svc"),
        (Role.FULL, ("alice", "build"), "", "alice"),
        (Role.ADMIN, (), "", "svc"),
        (Role.ADMIN, ("build",), "", "build"),
        (Role.FULL, ("ghost",), "", UNKNOWN),  # its first login does not exist here
        # full: its logins and the default job user, by name or uid; nothing else
        (Role.FULL, ("alice", "build"), "build", "build"),
        (Role.FULL, ("alice",), "1001", "alice"),
        (Role.FULL, ("alice",), "svc", "svc"),
        (Role.FULL, (), "svc", "svc"),
        (Role.FULL, (), "900", "svc"),
        (Role.FULL, ("alice",), "carol", DENIED),
        (Role.FULL, ("alice",), "1003", DENIED),
        (Role.FULL, (), "alice", DENIED),
        (Role.FULL, ("alice",), "nosuchuser", DENIED),  # no probing for accounts
        (Role.FULL, ("alice", "ghost"), "ghost", UNKNOWN),  # listed, but not on this host
        (Role.FULL, ("ghost",), "svc", "svc"),
        # admin: anyone the host knows
        (Role.ADMIN, (), "carol", "carol"),
        (Role.ADMIN, ("alice",), "1003", "carol"),
        (Role.ADMIN, (), "nosuchuser", UNKNOWN),
    ],
)
def test_users_rule(role: Role, logins: tuple[str, ...], requested: str, expected: str) -> None:
    assert run_as(role, logins, requested) == expected


def test_denial_names_what_is_allowed_but_not_the_request() -> None:
    identity = Identity("bob", Role.FULL, ("alice",))
    with pytest.raises(PermissionDenied) as info:
        job_user(identity, "x" * 300, default=DEFAULT, lookup=lookup)
    assert "alice, svc" in str(info.value)
    assert "xxx" not in str(info.value)


# --- the host's database ------------------------------------------------------------------


@pytest.fixture
def unix_user() -> Iterator[str]:
    """A real user, made for this test and removed afterwards (with its home)."""
    require_root("creating users")
    name = f"tw{secrets.token_hex(4)}"
    subprocess.run(
        ["useradd", "--create-home", "--shell", "/bin/sh", "--user-group", name], check=True
    )
    try:
        yield name
    finally:
        subprocess.run(["userdel", "--remove", name], check=False, capture_output=True)


def test_lookup_by_name_and_uid(unix_user: str) -> None:
    entry = pwd.getpwnam(unix_user)
    user = lookup_user(unix_user)
    assert user == UnixUser(
        unix_user, entry.pw_uid, entry.pw_gid, (entry.pw_gid,), entry.pw_dir, "/bin/sh"
    )
    assert lookup_user(str(entry.pw_uid)) == user
    assert user.label == unix_user


@pytest.mark.parametrize(
    "spec", ["", "no-such-user-x9", "4294967294", "4294967295", "a\0b", "x" * 300, "ünï"]
)
def test_unknown_users_are_invalid_arguments(spec: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        lookup_user(spec)
    assert info.value.field == "user"
    assert len(str(info.value)) < 200


def test_current_user() -> None:
    me = current_user()
    assert me.uid == os.geteuid()
    assert me.gid == os.getegid()


def test_environment_of_another_user() -> None:
    user = HOST["build"]
    server = {
        "PATH": "/opt/bin:/usr/bin",
        "LANG": "C.UTF-8",
        "LC_TIME": "C",
        "HOME": "/root",
        "AWS_SECRET_ACCESS_KEY": "hunter2",
        "TRIO_WORKER_STATE_DIR": "/var/lib/trio-worker",
    }
    assert user_environment(user, server) == {
        "PATH": "/opt/bin:/usr/bin",
        "LANG": "C.UTF-8",
        "LC_TIME": "C",
        "HOME": "/home/build",
        "USER": "build",
        "LOGNAME": "build",
        "SHELL": "/bin/sh",
    }
    bare = UnixUser(None, 4321, 4321, (), None, None)
    assert user_environment(bare, {}) == {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": "/",
        "USER": "4321",
        "LOGNAME": "4321",
        "SHELL": "/bin/sh",
    }
