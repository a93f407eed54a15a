"""The message API's request log: the reply each request got, by the request's id, so a
message delivered again (the daemon died before it acknowledged it, the broker restarted) is
answered with the first reply instead of being applied twice.

A request's id is its ``message_id`` when the publisher set one, else its ``correlation_id``
together with its ``reply_to`` (correlation ids are only unique per client). A request with
neither (aetherscale's own client sets none) cannot be told from a new one: it is applied each
time it arrives, as aetherscale does.

One SQLite file beside the manager's store (``<state>/amqp-requests.db``, mode 0600); entries
older than :data:`KEEP_SECONDS` are dropped when the log opens.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import sqlite3
import time
from pathlib import Path
from typing import Any

__all__ = ["KEEP_SECONDS", "RequestLog", "body_digest", "request_key"]

KEEP_SECONDS = 7 * 24 * 3600


def body_digest(body: bytes) -> str:
    """What a recorded reply answered: an id used again for another body is not a
    redelivery, and gets no stale reply."""
    return hashlib.sha256(body).hexdigest()


def request_key(
    message_id: str | None, correlation_id: str | None, reply_to: str | None
) -> str | None:
    """The id a request is known by, or None when it carries none."""
    if message_id:
        return f"m:{message_id}"
    if correlation_id:
        return f"c:{reply_to or ''}\0{correlation_id}"
    return None


class RequestLog:
    """Replies by request id; every call runs the SQLite work off the event loop."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        os.close(fd)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._lock = asyncio.Lock()
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS requests (key TEXT PRIMARY KEY, command TEXT NOT NULL, "
            "reply TEXT NOT NULL, at REAL NOT NULL, body TEXT NOT NULL DEFAULT '')"
        )
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS cursors (name TEXT PRIMARY KEY, value INTEGER NOT NULL)"
        )
        self._puts = 0
        self._prune()

    def _prune(self) -> None:
        self._db.execute("DELETE FROM requests WHERE at < ?", (time.time() - KEEP_SECONDS,))

    def close(self) -> None:
        self._db.close()

    async def get(self, key: str) -> tuple[dict[str, Any], str] | None:
        """The reply recorded for ``key`` and the digest of the body it answered, if any."""

        def read() -> tuple[str, str] | None:
            row = self._db.execute(
                "SELECT reply, body FROM requests WHERE key = ?", (key,)
            ).fetchone()
            return None if row is None else (str(row[0]), str(row[1]))

        async with self._lock:
            found = await asyncio.to_thread(read)
        if found is None:
            return None
        reply: dict[str, Any] = json.loads(found[0])
        return reply, found[1]

    async def put(
        self, key: str, command: str, reply: dict[str, Any], body_digest: str = ""
    ) -> None:
        """Record ``reply`` as the answer to ``key`` (durably: before the message is acked),
        with the digest of the body it answered (:func:`body_digest`)."""
        text = json.dumps(reply)
        self._puts += 1
        prune = self._puts % 1000 == 0  # not only at start: a daemon runs for months

        def write() -> None:
            self._db.execute(
                "INSERT OR REPLACE INTO requests (key, command, reply, at, body) "
                "VALUES (?, ?, ?, ?, ?)",
                (key, command, text, time.time(), body_digest),
            )
            if prune:
                self._prune()

        async with self._lock:
            await asyncio.to_thread(write)

    async def cursor(self, name: str) -> int | None:
        """A saved position (the last event published, for ``events``), if any."""

        def read() -> int | None:
            row = self._db.execute("SELECT value FROM cursors WHERE name = ?", (name,)).fetchone()
            return None if row is None else int(row[0])

        async with self._lock:
            return await asyncio.to_thread(read)

    async def set_cursor(self, name: str, value: int) -> None:
        def write() -> None:
            self._db.execute(
                "INSERT OR REPLACE INTO cursors (name, value) VALUES (?, ?)", (name, value)
            )

        async with self._lock:
            await asyncio.to_thread(write)
