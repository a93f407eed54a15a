"""The daemon's own records (events, observed status), written behind its back.

A request's write (create, a spec change, a desired state) is the request: it is awaited, and
refused with :class:`~corral.errors.StoreUnavailable` (a 503) if the store cannot take it.
What the daemon records on its own (a runner's event, a VM's observed status) comes from
callbacks that cannot wait and must not fail, so it goes through here instead, and so does the
row of a deleted VM whose disks are already handled (the deletion cannot be undone)::

    event(vm, kind, data) ─┐                     one transaction per batch, on the store's
    status(vm, status) ────┼─► in memory, in ──► writer thread (never the event loop)
    delete(vm, uid) ───────┘   order               │ ok: publish the events, wake status waits
                                                   └ StoreUnavailable: keep them all, retry
                                                     after 0.5, 1, 2 ... 5 s

Nothing is lost while the store cannot be written, within bounds: every status but the
latest of a VM is superseded anyway, and past ``max_events`` unwritten events the oldest are
dropped and counted (an ``EventsDropped`` event says how many, once the store is back). Events
keep the time they happened. :attr:`WriteBack.unavailable` says why writing fails (``/readyz``
shows it), :meth:`WriteBack.settle` lets a request return after its records are in the store.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from corral.errors import StoreUnavailable
from corral.manager.store import NewEvent, Store, StoredEvent

__all__ = ["WriteBack"]

_BATCH = 500
_RETRY_INITIAL = 0.5
_RETRY_MAX = 5.0


class WriteBack:
    """Events and statuses of one store, written in order off the event loop (see the module
    docstring). ``publish`` gets each event once it is stored (with its id); ``written``
    the names of the VMs whose status was just stored, or whose row was just deleted."""

    def __init__(
        self,
        store: Store,
        publish: Callable[[StoredEvent], None],
        written: Callable[[Iterable[str]], None],
        *,
        max_events: int = 10000,
    ) -> None:
        self._store = store
        self._publish = publish
        self._written = written
        self._max_events = max_events
        self._events: deque[tuple[int, NewEvent]] = deque()
        self._statuses: dict[str, tuple[int, dict[str, Any]]] = {}
        self._deletes: dict[str, tuple[int, str]] = {}  # {vm: (sequence, uid)}
        self._dropped = 0
        self._queued = 0  # sequence number of the last record queued
        self._tried = 0  # every record up to this one was written, or tried and kept
        self._tried_event = asyncio.Event()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self.unavailable: StoreUnavailable | None = None
        """Why the last write failed, until one succeeds."""

    @property
    def pending(self) -> int:
        """Records waiting to be written."""
        return (
            len(self._events)
            + len(self._statuses)
            + len(self._deletes)
            + (1 if self._dropped else 0)
        )

    def deleting(self, vm: str) -> bool:
        """Whether ``vm``'s row waits to be deleted (the rest of its deletion is done)."""
        return vm in self._deletes

    def event(self, vm: str, kind: str, data: Mapping[str, Any]) -> None:
        if len(self._events) >= self._max_events:
            self._events.popleft()
            self._dropped += 1
        self._queued += 1
        self._events.append((self._queued, NewEvent.of(vm, kind, data)))
        self._kick()

    def status(self, vm: str, status: dict[str, Any]) -> None:
        self._queued += 1
        self._statuses[vm] = (self._queued, status)
        self._kick()

    def delete(self, vm: str, uid: str) -> None:
        """Delete the row of VM ``vm`` (only while its uid is ``uid``), after every record
        queued before."""
        self._queued += 1
        self._deletes[vm] = (self._queued, uid)
        self._kick()

    def wake(self) -> None:
        """The store took a write just now: retry at once instead of after the backoff."""
        self._wake.set()

    async def settle(self) -> None:
        """Return once every record queued so far is in the store, or was tried and kept
        because the store is unavailable (then at once: no request waits for a retry)."""
        target = self._queued
        while self._tried < target and self.unavailable is None and self._running():
            await self._tried_event.wait()

    async def close(self) -> int:
        """Stop retrying after one last try; returns how many records could not be written.

        A batch the drain has on the store's writer thread is awaited, never cancelled: the
        thread would commit it anyway, and the last try would then write it a second time."""
        self._closed = True
        self._wake.set()  # a drain waiting out its backoff ends now
        if self._task is not None:
            await asyncio.wait({self._task})
        if self.pending:
            with contextlib.suppress(Exception):
                await self._write_once()
        return self.pending

    # --- the drain ---------------------------------------------------------------------------

    def _running(self) -> bool:
        return self._task is not None and not self._task.done()

    def _kick(self) -> None:
        if self._closed:
            return
        try:
            asyncio.get_running_loop()
        except RuntimeError:  # no loop (a script on the sync API): write now, keep on failure
            with contextlib.suppress(StoreUnavailable):
                self._store.write_back(*self._batch())
                self._events.clear()
                self._statuses.clear()
                self._deletes.clear()
                self._dropped = 0
            return
        if not self._running():
            self._task = asyncio.ensure_future(self._drain())

    def _batch(self) -> tuple[list[NewEvent], dict[str, dict[str, Any]], dict[str, str]]:
        events = [e for _, e in list(self._events)[:_BATCH]]
        if self._dropped:
            events.insert(0, NewEvent.of("", "EventsDropped", {"count": self._dropped}))
        # statuses and deletes only with every event queued before them (never run ahead)
        complete = len(self._events) <= _BATCH
        statuses = {vm: s for vm, (_, s) in self._statuses.items()} if complete else {}
        deletes = {vm: uid for vm, (_, uid) in self._deletes.items()} if complete else {}
        return events, statuses, deletes

    async def _write_once(self) -> None:
        """One batch in one transaction; raises (keeping everything) if the store refuses."""
        complete = len(self._events) <= _BATCH
        upto = self._queued if complete else self._events[_BATCH - 1][0]
        dropped = self._dropped
        events, statuses, deletes = self._batch()
        try:
            stored = await self._store.run(self._store.write_back, events, statuses, deletes)
        finally:
            self._tried = max(self._tried, upto)
            self._tried_event.set()
            self._tried_event = asyncio.Event()
        while self._events and self._events[0][0] <= upto:
            self._events.popleft()
        self._dropped -= dropped
        for vm in statuses:
            if vm in self._statuses and self._statuses[vm][0] <= upto:
                del self._statuses[vm]
        for vm in deletes:
            if vm in self._deletes and self._deletes[vm][0] <= upto:
                del self._deletes[vm]
        self.unavailable = None
        for event in stored:
            self._publish(event)
        if statuses or deletes:
            self._written([*statuses, *deletes])

    async def _drain(self) -> None:
        delay = _RETRY_INITIAL
        while self.pending and not self._closed:
            try:
                await self._write_once()
            except StoreUnavailable as exc:
                self.unavailable = exc
            except Exception as exc:  # not about availability (a bug): retried too, bounded
                self.unavailable = StoreUnavailable(f"the store refused a write: {exc!r}")
            else:
                delay = _RETRY_INITIAL
                continue
            if self._closed:  # close() makes the last try
                break
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), delay)
            delay = min(delay * 2, _RETRY_MAX)
