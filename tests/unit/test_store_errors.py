"""A store that cannot be written (issue 11, faults 3): real SQLite errors map to
:class:`StoreUnavailable` (503, a reason, Retry-After) and nothing else does; a refused write
changes nothing and leaves the store usable; the daemon's own records are kept while the store
is locked and written, in order and with their own times, once it is not."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from corral.errors import CorralError, StoreUnavailable
from corral.manager import Manager, ManagerConfig, Store, StoredEvent
from corral.manager.store import store_error
from corral.manager.writeback import WriteBack
from corral.runner.status import now_iso
from corral.spec import HostPolicy, parse_document


def vm(name: str) -> dict[str, Any]:
    return {"metadata": {"name": name}, "spec": {"vm": {"maximumRam": "256Mi", "state": "Stopped"}}}


@contextmanager
def locked(db: Path) -> Iterator[None]:
    """Another connection holds the store's write lock (``BEGIN EXCLUSIVE`` left open)."""
    other = sqlite3.connect(db, isolation_level=None)
    try:
        other.execute("BEGIN EXCLUSIVE")
        other.execute("INSERT INTO meta (key, value) VALUES ('other', '1')")
        yield
        other.execute("ROLLBACK")
    finally:
        other.close()


def error_of(db: Path, *statements: str, uri: bool = False) -> sqlite3.Error:
    conn = sqlite3.connect(db, isolation_level=None, uri=uri)
    try:
        for sql in statements:
            conn.execute(sql)
    except sqlite3.Error as exc:
        return exc
    finally:
        conn.close()
    raise AssertionError(f"no error from {statements}")


def test_sqlite_errors_map_to_store_unavailable_with_reason(tmp_path: Path) -> None:
    db = tmp_path / "s.db"
    Store(db).close()

    with locked(db):
        exc = error_of(db, "PRAGMA busy_timeout=0", "BEGIN IMMEDIATE")
    busy = store_error(exc, db)
    assert busy is not None and busy.reason == "locked" and busy.status == 503
    assert busy.problem_type == "urn:corral:store-unavailable" and busy.retry_after >= 1
    assert "another process holds the write lock" in str(busy) and "locked" in str(busy)

    exc = error_of(db, "PRAGMA max_page_count=8",
                   "INSERT INTO meta (key, value) VALUES ('big', zeroblob(1000000))")  # fmt: skip
    full = store_error(exc, db)
    assert full is not None and full.reason == "full" and "is full" in str(full)

    exc = error_of(
        Path(f"file:{db}?mode=ro"), "INSERT INTO meta (key, value) VALUES ('ro', '1')", uri=True
    )
    ro = store_error(exc, db)
    assert ro is not None and ro.reason == "read-only" and "read-only" in str(ro)

    # not about availability: a constraint, a syntax error stay what they are
    dup = error_of(db, "INSERT INTO meta (key, value) VALUES ('k', '1')",
                   "INSERT INTO meta (key, value) VALUES ('k', '2')")  # fmt: skip
    assert isinstance(dup, sqlite3.IntegrityError) and store_error(dup, db) is None
    assert store_error(error_of(db, "SELEKT 1"), db) is None


def test_a_locked_store_refuses_writes_fast_changes_nothing_and_still_reads(
    tmp_path: Path,
) -> None:
    db = tmp_path / "s.db"
    store = Store(db, busy_timeout=0.2)
    try:
        store.create(parse_document(vm("a")))
        with locked(db):
            t0 = time.monotonic()
            with pytest.raises(StoreUnavailable, match="locked") as caught:
                store.create(parse_document(vm("b")))
            assert time.monotonic() - t0 < 2
            assert caught.value.reason == "locked"
            with pytest.raises(StoreUnavailable):
                store.set_status("a", {"state": "Running"})
            assert [r.name for r in store.all()] == ["a"]  # reads go on (WAL)
            assert store.get("a").status == {}
        # nothing half-made, and no transaction left open behind the refusal
        assert store.find("b") is None
        store.create(parse_document(vm("b")))
        store.set_status("a", {"state": "Running"})
        assert store.names() == ["a", "b"] and store.get("a").status == {"state": "Running"}
    finally:
        store.close()


async def test_rest_api_answers_503_problem_json_with_retry_after(tmp_path: Path) -> None:
    from corral.api.app import create_app
    from corral.client import _error

    config = ManagerConfig(state_dir=tmp_path / "state")
    async with Manager(config, policy=HostPolicy()) as m:
        await m.create(vm("a"))
        transport = httpx.ASGITransport(app=create_app(m))
        async with httpx.AsyncClient(transport=transport, base_url="http://corral") as http:
            with locked(config.store):
                r = await http.post("/v1/vms", json=vm("b"))
                assert r.status_code == 503
                assert r.headers["content-type"] == "application/problem+json"
                assert r.headers["retry-after"] == "2"
                body = r.json()
                assert body["type"] == "urn:corral:store-unavailable"
                assert body["reason"] == "locked" and "locked" in body["detail"]
                assert (await http.get("/v1/vms")).status_code == 200
                assert (await http.get("/v1/vms/b")).status_code == 404
                r = await http.post("/v1/vms/a/start")
                assert r.status_code == 503
                # a client gets the same error back, reason and all
                err = _error(r)
                assert isinstance(err, StoreUnavailable) and isinstance(err, CorralError)
                assert err.reason == "locked" and err.retry_after == 2
            assert (await http.post("/v1/vms", json=vm("b"))).status_code == 201
            assert m.get("a").desired == "Stopped"


async def test_write_back_keeps_records_while_locked_and_writes_them_in_order(
    tmp_path: Path,
) -> None:
    db = tmp_path / "s.db"
    store = Store(db, busy_timeout=0.1)
    published: list[StoredEvent] = []
    written: list[str] = []
    wb = WriteBack(store, published.append, written.extend)
    try:
        store.create(parse_document(vm("a")))
        with locked(db):
            wb.event("a", "First", {"n": 1})
            wb.status("a", {"state": "Starting"})
            wb.event("a", "Second", {"n": 2})
            wb.status("a", {"state": "Running"})  # supersedes Starting
            await wb.settle()  # returns although nothing could be written
            assert isinstance(wb.unavailable, StoreUnavailable)
            assert wb.unavailable.reason == "locked"
            assert wb.pending == 3 and published == [] and store.events("a") == []
            await asyncio.sleep(1.2)  # retries fail meanwhile; the records stay
            assert wb.pending == 3 and store.events("a") == []
            released = now_iso()
        wb.wake()
        deadline = time.monotonic() + 10
        while wb.pending and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert wb.pending == 0 and wb.unavailable is None
        events = store.events("a")
        assert [(e.kind, e.data) for e in events] == [("First", {"n": 1}), ("Second", {"n": 2})]
        assert [e.id for e in published] == [e.id for e in events]
        assert store.get("a").status == {"state": "Running"} and written == ["a"]
        # their times are when they happened, not when the store took them
        assert events[0].ts <= events[1].ts < released
    finally:
        await wb.close()
        store.close()


async def test_write_back_close_never_stores_a_batch_twice(tmp_path: Path) -> None:
    """close() while a batch is on the store's writer thread (waiting for a lock another
    process holds, then committing once it is let go): that batch is stored once, not again
    by close()'s last try (review of 8d5345c, item 9)."""
    db = tmp_path / "s.db"
    store = Store(db, busy_timeout=3.0)
    store.create(parse_document(vm("a")))
    wb = WriteBack(store, lambda _: None, lambda _: None)
    try:
        with locked(db):
            wb.event("a", "Once", {})
            await asyncio.sleep(0.3)  # the drain's batch now waits for the lock, on the thread
            closing = asyncio.ensure_future(wb.close())
            await asyncio.sleep(0.3)
        assert await asyncio.wait_for(closing, 10) == 0
        assert [e.kind for e in store.events("a")] == ["Once"]
    finally:
        store.close()


async def test_patch_retries_only_a_stale_version_not_a_taken_port(tmp_path: Path) -> None:
    """A patch without resourceVersion merges again after another writer (a
    :class:`VersionConflict`), but a taken host port (another :class:`Conflict`) would only
    repeat: it is the caller's answer at once, naming the field (review of 8d5345c, item 4)."""
    import socket

    from corral.errors import Conflict, VersionConflict

    field = "spec.vm.networks[0].user.portForwards[0].hostPort"
    config = ManagerConfig(state_dir=tmp_path / "state")
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = int(held.getsockname()[1])
        doc = vm("pt-a")
        doc["spec"]["vm"]["networks"] = [
            {"user": {"portForwards": [{"hostPort": port, "guestPort": 22}]}}
        ]
        async with Manager(config, policy=HostPolicy()) as m:
            first = await m.create(doc)
            await m.patch("pt-a", {"metadata": {"labels": {"x": "1"}}})
            with pytest.raises(VersionConflict, match="resourceVersion"):  # a stale version
                m.store.replace(first.document, first.resource_version)
            begun = time.monotonic()
            with pytest.raises(Conflict) as caught:
                await m.patch("pt-a", {"spec": {"vm": {"state": "Running"}}})
            assert time.monotonic() - begun < 1
            assert not isinstance(caught.value, VersionConflict)
            assert "changes too fast" not in str(caught.value)
            assert [i.loc for i in caught.value.issues] == [field]
            assert f"127.0.0.1:{port} is taken on this host" in str(caught.value)
            assert m.get("pt-a").desired == "Stopped"
