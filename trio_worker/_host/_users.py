"""Unix users from the host's account database: who a job runs as.

Lookups go through NSS (``pwd``, ``grp``, ``getgrouplist``), which may read files or ask a
directory service: they block, so the event loop calls them through a worker thread.
Knows nothing of jobs or certificates.
"""

from __future__ import annotations

import os
import pwd
from collections.abc import Mapping
from dataclasses import dataclass

from .._errors import InvalidRequest

__all__ = ["UnixUser", "current_user", "lookup_user", "start_directory", "user_environment"]

#: Longer "names" are not names: refused before asking NSS about them.
_MAX_NAME = 256
#: Variables of the server's environment a job of another user keeps, as sudo's
#: env_reset does: the rest may hold the server's secrets.
_KEPT = ("PATH", "LANG", "LANGUAGE", "TZ")
_DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"


@dataclass(frozen=True, slots=True)
class UnixUser:
    """An account: uid, primary gid, supplementary groups, and its passwd fields.

    ``name`` is None for a uid without a passwd entry (only ever the server's own).
    """

    name: str | None
    uid: int
    gid: int
    groups: tuple[int, ...]
    home: str | None
    shell: str | None

    @property
    def label(self) -> str:
        """How a job reports it (``Job.user``): the name, else the uid in decimal."""
        return self.name if self.name is not None else str(self.uid)


def _from_passwd(entry: pwd.struct_passwd) -> UnixUser:
    try:
        groups = tuple(sorted(set(os.getgrouplist(entry.pw_name, entry.pw_gid))))
    except OSError:  # pragma: no cover - NSS failure
        groups = (entry.pw_gid,)
    return UnixUser(
        name=entry.pw_name,
        uid=entry.pw_uid,
        gid=entry.pw_gid,
        groups=groups,
        home=entry.pw_dir or None,
        shell=entry.pw_shell or None,
    )


def lookup_user(spec: str) -> UnixUser:
    """The user ``spec`` names: a user name, or a uid in decimal. Blocking (NSS).

    Raises :class:`InvalidRequest` (field ``user``) for a user the host does not know;
    the message never echoes a long or odd ``spec``.
    """
    if not isinstance(spec, str) or not spec:
        raise InvalidRequest("user", "must be a user name or a decimal uid")
    shown = repr(spec) if len(spec) <= 64 and spec.isprintable() else "the user given"
    if len(spec) > _MAX_NAME or "\0" in spec or not spec.isprintable():
        raise InvalidRequest("user", f"{shown} is not a user name")
    try:
        if spec.isascii() and spec.isdigit():
            uid = int(spec)
            if uid >= 2**32 - 1:  # (uid_t)-1 means "unchanged" to setuid
                raise InvalidRequest("user", f"{shown} is not a valid uid")
            entry = pwd.getpwuid(uid)
        else:
            entry = pwd.getpwnam(spec)
    except KeyError:
        raise InvalidRequest("user", f"this host has no user {shown}") from None
    return _from_passwd(entry)


def current_user() -> UnixUser:
    """The user this process runs as (its effective uid), with or without a passwd entry."""
    uid = os.geteuid()
    try:
        return _from_passwd(pwd.getpwuid(uid))
    except KeyError:
        return UnixUser(None, uid, os.getegid(), tuple(os.getgroups()), None, None)


def start_directory(user: UnixUser) -> str:
    """Where a job of ``user`` starts when it names no directory: its home, else ``/``.
    Blocking (a stat)."""
    return user.home if user.home and os.path.isdir(user.home) else "/"


def user_environment(user: UnixUser, server_env: Mapping[str, str]) -> dict[str, str]:
    """The base environment of a job running as ``user``, another user than the server's:
    a few harmless variables of the server's (PATH, locale, time zone), then HOME, USER,
    LOGNAME and SHELL from the passwd entry. A request's env goes on top."""
    env = {key: server_env[key] for key in _KEPT if key in server_env}
    env.update({key: value for key, value in server_env.items() if key.startswith("LC_")})
    env.setdefault("PATH", _DEFAULT_PATH)
    env["HOME"] = user.home or "/"
    env["USER"] = env["LOGNAME"] = user.label
    env["SHELL"] = user.shell or "/bin/sh"
    return env
