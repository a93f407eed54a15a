"""The manager's store: everything a restart needs, in one SQLite file (WAL).

Per VM: the document (desired state included), a ``generation`` bumped on every spec change,
a ``resourceVersion`` for optimistic concurrency (one counter for the whole store, like the
Kubernetes API server's, so a version is never reused), the observed status and a bounded
event history. Nothing the manager needs after a restart lives only in memory.

Calls are synchronous. Two connections: reads (single rows or a listing, never waiting on a
writer in WAL mode) may run on an event loop; writes wait for SQLite's write lock, so a daemon
runs them on the store's own writer thread (:meth:`Store.run`), never on its loop. A write
waits at most ``busy_timeout`` seconds for a lock another process holds.

A store that cannot be used (write-locked by another process, its filesystem full, an I/O
error, read-only) raises :class:`~corral.errors.StoreUnavailable` naming the cause, and the
write it refused changed nothing (each write is one transaction, rolled back on any error).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import sqlite3
import threading
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

from corral.errors import Conflict, HostError, NotFound, StoreUnavailable, VersionConflict
from corral.host.atomic import ensure_private_dir
from corral.runner.status import now_iso
from corral.spec import VmDocument, parse_document

__all__ = [
    "BUSY_TIMEOUT",
    "EVENTS_PER_VM",
    "NOTHING_CHANGED",
    "NewEvent",
    "Store",
    "StoredEvent",
    "VmRecord",
    "store_error",
]

EVENTS_PER_VM = 500
BUSY_TIMEOUT = 1.0
"""Seconds a write waits for a write lock another process holds (a backup, an admin's
``sqlite3``) before it is refused with :class:`StoreUnavailable`: long enough to ride out a
short transaction, short enough for an API client to get its 503 at once."""
NOTHING_CHANGED = "; nothing was changed, retry later"
"""How a :class:`StoreUnavailable` of this store ends (a caller that did change something, a
delete whose disks are gone, says so instead)."""
_READ_BUSY_TIMEOUT = 0.2  # WAL readers wait on nobody, but for a recovery or exclusive mode

_P = ParamSpec("_P")
_T = TypeVar("_T")

# SQLite's primary result codes that mean "not now" rather than "a bug": what they tell a user
_UNAVAILABLE = {
    5: "locked",  # SQLITE_BUSY
    6: "locked",  # SQLITE_LOCKED
    8: "read-only",  # SQLITE_READONLY
    10: "io",  # SQLITE_IOERR
    13: "full",  # SQLITE_FULL
    14: "io",  # SQLITE_CANTOPEN
    15: "locked",  # SQLITE_PROTOCOL (WAL lock contention)
}
_RETRY_AFTER = {"locked": 2, "full": 30, "read-only": 30, "io": 10}

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS vms (
    name TEXT PRIMARY KEY,
    uid TEXT NOT NULL,
    document TEXT NOT NULL,
    generation INTEGER NOT NULL,
    resource_version INTEGER NOT NULL,
    status TEXT NOT NULL,
    created TEXT NOT NULL,
    updated TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    vm TEXT NOT NULL,
    ts TEXT NOT NULL,
    kind TEXT NOT NULL,
    data TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_vm ON events (vm, id);
"""


@dataclass(frozen=True)
class VmRecord:
    """One VM as stored: what is wanted (``document``) and what was last seen (``status``)."""

    name: str
    uid: str
    document: VmDocument
    generation: int
    resource_version: str
    status: dict[str, Any]
    created: str
    updated: str

    @property
    def desired(self) -> str:
        return self.document.vm.state

    @property
    def labels(self) -> dict[str, str]:
        return dict(self.document.metadata.labels)

    def to_json(self) -> dict[str, Any]:
        """The VM document as the API shows it: metadata with identity, spec, status."""
        doc = self.document.model_dump(mode="json", by_alias=True, exclude_none=True)
        doc.pop("runner", None)
        meta = doc.setdefault("metadata", {})
        meta.update(
            uid=self.uid,
            generation=self.generation,
            resourceVersion=self.resource_version,
            creationTimestamp=self.created,
        )
        doc["status"] = dict(self.status)
        return doc


@dataclass(frozen=True)
class NewEvent:
    """An event not written yet: its time is when it happened, not when it is written."""

    vm: str
    kind: str
    ts: str
    data: dict[str, Any]

    @classmethod
    def of(cls, vm: str, kind: str, data: Mapping[str, Any]) -> NewEvent:
        ts = str(data.get("time") or now_iso())
        body = {k: v for k, v in data.items() if k not in ("time", "vm", "event")}
        return cls(vm, kind, ts, body)


@dataclass(frozen=True)
class StoredEvent:
    id: int
    vm: str
    ts: str
    kind: str
    data: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "vm": self.vm, "time": self.ts, "event": self.kind, **self.data}


class Store:
    def __init__(self, path: Path, *, busy_timeout: float = BUSY_TIMEOUT) -> None:
        self.path = path
        ensure_private_dir(path.parent)
        _make_private(path)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._lock = threading.RLock()  # the write connection (and any sync caller's writes)
        self._rdb = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._rlock = threading.Lock()  # the read connection
        self._writer: ThreadPoolExecutor | None = None
        self._parsed: dict[str, tuple[str, VmDocument]] = {}
        with self._lock, self._guard():
            self._db.execute(f"PRAGMA busy_timeout={int(busy_timeout * 1000)}")
            self._rdb.execute(f"PRAGMA busy_timeout={int(_READ_BUSY_TIMEOUT * 1000)}")
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.shutdown(wait=True)
        with self._lock, self._rlock:
            self._rdb.close()
            self._db.close()

    async def run(self, fn: Callable[_P, _T], /, *args: _P.args, **kwargs: _P.kwargs) -> _T:
        """``fn`` (a method of this store: a write) on the store's own writer thread, one at a
        time, in the order asked: the caller's event loop never waits for SQLite's lock."""
        if self._writer is None:
            self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="corral-store")
        call = functools.partial(fn, *args, **kwargs)
        return await asyncio.get_running_loop().run_in_executor(self._writer, call)

    @contextmanager
    def _guard(self) -> Iterator[None]:
        try:
            yield
        except sqlite3.Error as exc:
            unavailable = store_error(exc, self.path)
            if unavailable is None:
                raise
            raise unavailable from exc

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction: committed whole, or (any error, the commit's own included)
        rolled back whole."""
        with self._lock, self._guard():
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        self._db.execute("ROLLBACK")
                raise

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        with self._rlock, self._guard():
            yield self._rdb

    def _next_version(self, db: sqlite3.Connection) -> int:
        row = db.execute("SELECT value FROM meta WHERE key = 'resourceVersion'").fetchone()
        version = int(row[0]) + 1 if row else 1
        db.execute(
            "INSERT INTO meta (key, value) VALUES ('resourceVersion', ?) "
            "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (str(version),),
        )
        return version

    def _document(self, name: str, text: str) -> VmDocument:
        """Parse a stored document, once per distinct text (listing 1000 VMs would otherwise
        validate 1000 documents per call; they change rarely)."""
        cached = self._parsed.get(name)
        if cached is not None and cached[0] == text:
            return cached[1]
        doc = parse_document(json.loads(text))
        self._parsed[name] = (text, doc)
        return doc

    def _record(self, row: tuple[Any, ...]) -> VmRecord:
        name, uid, document, generation, version, status, created, updated = row
        return VmRecord(
            name=name,
            uid=uid,
            document=self._document(name, document),
            generation=int(generation),
            resource_version=str(version),
            status=json.loads(status),
            created=created,
            updated=updated,
        )

    _COLUMNS = "name, uid, document, generation, resource_version, status, created, updated"

    # --- VMs -----------------------------------------------------------------------------

    def create(self, doc: VmDocument) -> VmRecord:
        now = now_iso()
        text = _dump(doc)
        with self._tx() as db:
            if db.execute("SELECT 1 FROM vms WHERE name = ?", (doc.name,)).fetchone():
                raise Conflict(f"VM {doc.name!r} already exists")
            version = self._next_version(db)
            db.execute(
                f"INSERT INTO vms ({self._COLUMNS}) VALUES (?, ?, ?, 1, ?, ?, ?, ?)",  # noqa: S608
                (doc.name, str(uuid.uuid4()), text, version, json.dumps({}), now, now),
            )
        return self.get(doc.name)

    def get(self, name: str) -> VmRecord:
        with self._read() as db:
            row = db.execute(
                f"SELECT {self._COLUMNS} FROM vms WHERE name = ?",  # noqa: S608 (constant columns)
                (name,),
            ).fetchone()
        if row is None:
            raise NotFound(f"VM {name!r} not found")
        return self._record(row)

    def find(self, name: str) -> VmRecord | None:
        try:
            return self.get(name)
        except NotFound:
            return None

    def all(self) -> list[VmRecord]:
        with self._read() as db:
            rows = db.execute(
                f"SELECT {self._COLUMNS} FROM vms ORDER BY name"  # noqa: S608 (constant columns)
            ).fetchall()
        return [self._record(r) for r in rows]

    def names(self) -> list[str]:
        with self._read() as db:
            return [r[0] for r in db.execute("SELECT name FROM vms ORDER BY name")]

    def replace(self, doc: VmDocument, expected_version: str | None = None) -> VmRecord:
        """Store a new document; the generation goes up only when the document changed.

        ``expected_version`` (the resourceVersion the caller read) must still be current,
        else :class:`VersionConflict`: someone else wrote in between.
        """
        text = _dump(doc)
        with self._tx() as db:
            row = db.execute(
                "SELECT document, generation, resource_version FROM vms WHERE name = ?",
                (doc.name,),
            ).fetchone()
            if row is None:
                raise NotFound(f"VM {doc.name!r} not found")
            old_text, generation, version = row
            if expected_version is not None and str(version) != str(expected_version):
                raise VersionConflict(
                    f"VM {doc.name!r} was changed since resourceVersion {expected_version} "
                    f"(now {version}): read it again and retry"
                )
            if old_text != text:
                db.execute(
                    "UPDATE vms SET document = ?, generation = ?, resource_version = ?, "
                    "updated = ? WHERE name = ?",
                    (text, generation + 1, self._next_version(db), now_iso(), doc.name),
                )
        return self.get(doc.name)

    def set_status(self, name: str, status: dict[str, Any]) -> None:
        """Observed state: does not bump resourceVersion (a spec writer never conflicts with
        the manager's own observations)."""
        with self._tx() as db:
            db.execute(
                "UPDATE vms SET status = ? WHERE name = ?",
                (json.dumps(status, default=str), name),
            )

    def touch(self) -> None:
        """A write that changes nothing anyone reads: whether the store can be written now
        (before a step that cannot be undone), :class:`StoreUnavailable` if not."""
        with self._tx() as db:
            db.execute(
                "INSERT INTO meta (key, value) VALUES ('touched', ?) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (now_iso(),),
            )

    def delete(self, name: str) -> None:
        with self._tx() as db:
            if db.execute("DELETE FROM vms WHERE name = ?", (name,)).rowcount == 0:
                raise NotFound(f"VM {name!r} not found")
            self._parsed.pop(name, None)

    # --- events ----------------------------------------------------------------------------

    def add_event(self, vm: str, kind: str, data: dict[str, Any]) -> StoredEvent:
        (event,) = self.write_back([NewEvent.of(vm, kind, data)], {})
        return event

    def write_back(
        self,
        events: Sequence[NewEvent],
        statuses: Mapping[str, dict[str, Any]],
        deletes: Mapping[str, str] | None = None,
    ) -> list[StoredEvent]:
        """The daemon's own records, in one transaction: ``events`` in order, then the latest
        observed status of each VM in ``statuses`` (a VM no longer stored is skipped), then
        the rows of ``deletes`` ({name: uid}: VMs whose deletion is done but for their row;
        one already gone, or a newer VM of that name, is left alone)."""
        stored = []
        with self._tx() as db:
            for e in events:
                cur = db.execute(
                    "INSERT INTO events (vm, ts, kind, data) VALUES (?, ?, ?, ?)",
                    (e.vm, e.ts, e.kind, json.dumps(e.data, default=str)),
                )
                stored.append(StoredEvent(int(cur.lastrowid or 0), e.vm, e.ts, e.kind, e.data))
            for vm in dict.fromkeys(e.vm for e in events):
                db.execute(
                    "DELETE FROM events WHERE vm = ? AND id NOT IN "
                    "(SELECT id FROM events WHERE vm = ? ORDER BY id DESC LIMIT ?)",
                    (vm, vm, EVENTS_PER_VM),
                )
            for name, status in statuses.items():
                db.execute(
                    "UPDATE vms SET status = ? WHERE name = ?",
                    (json.dumps(status, default=str), name),
                )
            for name, uid in (deletes or {}).items():
                db.execute("DELETE FROM vms WHERE name = ? AND uid = ?", (name, uid))
        for name in deletes or {}:
            self._parsed.pop(name, None)
        return stored

    def events(self, vm: str | None = None, after: int = 0, limit: int = 1000) -> list[StoredEvent]:
        query = "SELECT id, vm, ts, kind, data FROM events WHERE id > ?"
        args: list[Any] = [min(after, 2**63 - 1)]  # SQLite integers are 64-bit: no id is past
        if vm is not None:
            query += " AND vm = ?"
            args.append(vm)
        query += " ORDER BY id LIMIT ?"
        args.append(limit)
        with self._read() as db:
            rows = db.execute(query, args).fetchall()
        return [StoredEvent(r[0], r[1], r[2], r[3], json.loads(r[4])) for r in rows]


def store_error(exc: sqlite3.Error, path: Path) -> StoreUnavailable | None:
    """The :class:`StoreUnavailable` an SQLite error means (its result code: locked, full,
    I/O error, read-only), or None for an error that is not about the store's availability
    (a constraint, a bug): that one propagates as it is."""
    code = getattr(exc, "sqlite_errorcode", None)
    reason = _UNAVAILABLE.get(code & 0xFF) if isinstance(code, int) else None
    if reason is None:
        return None
    cause = {
        "locked": f"another process holds the write lock on {path}",
        "full": f"the filesystem holding {path} is full",
        "read-only": f"{path} (or its directory) is read-only",
        "io": f"I/O error on {path}",
    }[reason]
    name = getattr(exc, "sqlite_errorname", "") or "SQLite"
    return StoreUnavailable(
        f"the store is unavailable: {cause} ({name}: {exc}){NOTHING_CHANGED}",
        reason=reason,
        retry_after=_RETRY_AFTER[reason],
    )


def _make_private(path: Path) -> None:
    """The store holds cloud-init data (passwords, keys): it and its -wal/-shm/-journal files
    are 0600, as libvirt and Incus keep theirs. SQLite gives the files it creates the mode
    of the database file, so creating that one 0600 first is enough for new stores; the
    chmod tightens a store an older corral made 0644."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            os.fchmod(fd, 0o600)
        finally:
            os.close(fd)
        for suffix in ("-wal", "-shm", "-journal"):
            with contextlib.suppress(FileNotFoundError):
                os.chmod(path.with_name(path.name + suffix), 0o600)
    except OSError as exc:
        raise HostError(f"cannot open the store {path}: {exc}") from exc


def _dump(doc: VmDocument) -> str:
    return json.dumps(doc.model_dump(mode="json", by_alias=True, exclude_none=True), sort_keys=True)
