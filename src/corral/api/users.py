"""Local users for the pages and the TCP API: a YAML file of bcrypt hashes and roles.

The users file (``users:`` in the daemon config, or ``corral serve --users FILE``) is a list::

    - name: alice
      passwordHash: $2b$12$...      # bcrypt; never a password
      roles: [admin]

``corral user add NAME --role R --file F`` writes an entry (the password is read from a prompt
or stdin, never from argv). The file must be private (0600, like the tokens file): a hash
leaked is a password offered to offline guessing. Role ``admin`` may do everything; any other
role means only what a VM's ``spec.permissions`` grant it (:mod:`corral.api.permissions`).

Checking a password costs the same for an unknown user as for a wrong password (a fixed dummy
hash of the same cost is checked), so the time of a refusal says nothing about who exists.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

import bcrypt
import yaml

from corral.errors import FieldIssue, HostError, NotFound, SpecError

__all__ = [
    "ADMIN_ROLE", "ANONYMOUS", "LOCAL", "MAX_PASSWORD_BYTES", "Principal", "User", "UsersFile",
    "add_user", "hash_password", "read_private", "remove_user",
]  # fmt: skip

ADMIN_ROLE = "admin"
MAX_PASSWORD_BYTES = 72  # bcrypt reads no further; longer ones are refused, never cut short
_NAME = re.compile(r"[A-Za-z0-9_.@-]{1,64}")
_ROLE = re.compile(r"[A-Za-z0-9_.@:-]{1,64}")
_ROUNDS = 12


@functools.cache
def _dummy_hash(rounds: int) -> bytes:
    """A hash of the users' cost, checked for an unknown name (made once, when first needed)."""
    return bcrypt.hashpw(b"corral: no such user", bcrypt.gensalt(rounds))


def _rounds(digest: bytes) -> int:
    """The cost of a bcrypt hash (``$2b$12$...``)."""
    try:
        return min(max(int(digest.split(b"$")[2]), 4), 31)
    except (IndexError, ValueError):
        return _ROUNDS


def read_private(path: Path, what: str) -> str:
    """The text of a file of secrets (hashes too), refused unless only its owner may read it
    (mode 0600 or stricter, like ssh's keys)."""
    try:
        st = path.stat()
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise HostError(f"cannot read {what} {path}: {exc}") from exc
    if stat.S_IMODE(st.st_mode) & 0o077:
        raise HostError(
            f"{what} {path} is readable by others (mode {stat.S_IMODE(st.st_mode):o}); chmod 600 it"
        )
    return text


@dataclass(frozen=True)
class User:
    name: str
    roles: tuple[str, ...]

    @property
    def admin(self) -> bool:
        return ADMIN_ROLE in self.roles


def _check_name(name: str, where: str = "name") -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise SpecError("invalid user", [FieldIssue(where, "1-64 letters, digits or . _ @ -")])
    return name


def _check_roles(roles: object, where: str) -> tuple[str, ...]:
    if not isinstance(roles, list):
        raise SpecError("invalid user", [FieldIssue(where, "must be a list of role names")])
    for i, role in enumerate(roles):
        if not isinstance(role, str) or not _ROLE.fullmatch(role):
            reason = "1-64 letters, digits or . _ @ : -"
            raise SpecError("invalid user", [FieldIssue(f"{where}[{i}]", reason)])
    return tuple(dict.fromkeys(roles))


def hash_password(password: str, rounds: int = _ROUNDS) -> str:
    raw = password.encode()
    if not raw:
        raise SpecError("invalid password", [FieldIssue("password", "must not be empty")])
    if len(raw) > MAX_PASSWORD_BYTES:
        reason = f"at most {MAX_PASSWORD_BYTES} bytes (bcrypt ignores the rest)"
        raise SpecError("invalid password", [FieldIssue("password", reason)])
    return bcrypt.hashpw(raw, bcrypt.gensalt(rounds)).decode()


@dataclass(frozen=True)
class _Entry:
    user: User
    password_hash: bytes


@dataclass(frozen=True)
class UsersFile:
    path: Path
    entries: dict[str, _Entry]

    @property
    def rounds(self) -> int:
        """The cost an unknown name is checked at: the users' highest."""
        return max((_rounds(e.password_hash) for e in self.entries.values()), default=_ROUNDS)

    @classmethod
    def load(cls, path: Path) -> UsersFile:
        text = read_private(path, "users file")
        try:
            data = yaml.safe_load(text) or []
        except yaml.YAMLError as exc:
            raise SpecError(f"users file {path} is not YAML: {exc}") from exc
        if not isinstance(data, list):
            raise SpecError("invalid users file", [FieldIssue(str(path), "must be a list")])
        entries: dict[str, _Entry] = {}
        for i, item in enumerate(data):
            where = f"{path}[{i}]"
            if not isinstance(item, dict) or set(item) - {"name", "passwordHash", "roles"}:
                reason = "expected {name, passwordHash, roles}"
                raise SpecError("invalid users file", [FieldIssue(where, reason)])
            name = _check_name(item.get("name"), f"{where}.name")  # type: ignore[arg-type]
            digest = item.get("passwordHash")
            if not isinstance(digest, str) or not digest.startswith(("$2b$", "$2a$", "$2y$")):
                reason = "must be a bcrypt hash ($2b$...; corral user add writes one)"
                raise SpecError("invalid users file", [FieldIssue(f"{where}.passwordHash", reason)])
            if name in entries:
                raise SpecError("invalid users file", [FieldIssue(f"{where}.name", "duplicate")])
            roles = _check_roles(item.get("roles", []), f"{where}.roles")
            entries[name] = _Entry(User(name, roles), digest.encode())
        return cls(path, entries)

    def verify(self, name: str, password: str) -> User | None:
        """The user if ``password`` is theirs, else None; as slow for an unknown name as for a
        wrong password (blocking: call it in a thread)."""
        entry = self.entries.get(name)
        raw = password.encode()
        dummy = _dummy_hash(self.rounds)
        digest = entry.password_hash if entry is not None else dummy
        try:
            ok = bcrypt.checkpw(raw[:MAX_PASSWORD_BYTES], digest)
        except ValueError:  # a hash bcrypt cannot read: no one logs in with it
            bcrypt.checkpw(b"x", dummy)
            ok = False
        if entry is None or not ok or len(raw) > MAX_PASSWORD_BYTES:
            return None
        return entry.user


def _entries(path: Path) -> list[dict[str, object]]:
    if not path.exists():
        return []
    UsersFile.load(path)  # refuse to rewrite a broken or public file
    return list(yaml.safe_load(path.read_text(encoding="utf-8")) or [])


def _write(path: Path, items: list[dict[str, object]]) -> None:
    """``items`` into ``path`` (0600) through a private temporary file and a rename: a daemon
    reading it never sees it half-written, and notices the change (a new inode)."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)  # a stale one, or a link planted to make us write another file
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            os.write(fd, yaml.safe_dump(items, sort_keys=False).encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as exc:
        raise HostError(f"cannot write users file {path}: {exc}") from exc


def add_user(path: Path, name: str, password: str, roles: tuple[str, ...]) -> None:
    """Add ``name`` to ``path`` (created 0600), or replace its password and roles (a new
    password ends the user's sessions in a running daemon)."""
    _check_name(name)
    checked = _check_roles(list(roles), "role")
    items = _entries(path)
    digest = hash_password(password)
    for item in items:  # the same password again keeps its hash: the user's sessions stay
        old = item.get("passwordHash")
        if item.get("name") == name and isinstance(old, str):
            with contextlib.suppress(ValueError):
                if bcrypt.checkpw(password.encode(), old.encode()):
                    digest = old
    entry: dict[str, object] = {"name": name, "passwordHash": digest, "roles": list(checked)}
    _write(path, [i for i in items if i.get("name") != name] + [entry])


def remove_user(path: Path, name: str) -> None:
    """Remove ``name`` from ``path``; a running daemon ends their sessions."""
    items = _entries(path)
    kept = [i for i in items if i.get("name") != name]
    if len(kept) == len(items):
        raise NotFound(f"no user {name!r} in {path}")
    _write(path, kept)


@dataclass(frozen=True)
class Principal:
    """Who a request acts for: ``via`` says how it proved it. A bearer token and the unix
    socket are admins (they were before users existed); a session is its user's roles."""

    name: str
    roles: tuple[str, ...]
    via: str  # "socket" | "token" | "session"

    @property
    def admin(self) -> bool:
        return ADMIN_ROLE in self.roles

    @classmethod
    def of_user(cls, user: User) -> Principal:
        return cls(user.name, user.roles, "session")

    @classmethod
    def of_token(cls, name: str) -> Principal:
        return cls(name, (ADMIN_ROLE,), "token")


LOCAL = Principal("local", (ADMIN_ROLE,), "socket")
"""The caller of an app no authentication layer wraps: the unix socket (its file mode and group
are the access control) or an in-process client."""
ANONYMOUS = Principal("anonymous", (), "anonymous")
"""The caller of an open path on TCP (the probes, the login, the pages' code): no roles."""
