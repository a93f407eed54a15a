"""The manager's event hub: events recorded, published to followers and subscribers, and the
waits on a VM's status, woken by each status write (no polling).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from corral.errors import CorralError, StoreUnavailable, Timeout
from corral.host.images import ImageStore
from corral.manager.backends import Backend, Observed
from corral.manager.config import ManagerConfig
from corral.manager.daemonlog import event_fields
from corral.manager.retained import RetainedDisks
from corral.manager.store import Store, StoredEvent, VmRecord
from corral.manager.waits import WaitTarget
from corral.manager.writeback import WriteBack
from corral.runner.status import Condition, VmState
from corral.spec import HostPolicy

__all__ = ["Backoff", "EventHub", "ManagerState"]

_events_log = logging.getLogger("corral.events")


class ManagerState(StrEnum):
    NEW = "New"
    OPENING = "Opening"
    OPEN = "Open"
    CLOSING = "Closing"
    CLOSED = "Closed"


@dataclass
class Backoff:
    """One VM's restart backoff and start-failure bookkeeping (kept by the reconcile loop,
    shown as ``restartCount`` in its status)."""

    failures: int = 0
    due: float = 0.0  # time.monotonic() of the next allowed start
    attempt: int = 0  # start attempts so far; each one's failure is counted once
    counted: int = -1  # the attempt whose failure was counted last
    running_since: float | None = None  # time.monotonic() the VM last reached Running
    last_failure: str | None = None  # the last start's error, if no start succeeded since
    judged: int = -1  # the attempt whose failure the runner reported (StartFailed)


class EventHub:
    """Events (recorded, published, followed), status waits, and the state every part of the
    manager shares. The parts are layers of one object (:class:`~corral.manager.manager.
    Manager`): hub, then admission, desired state, reconcile; images and guest access beside
    them. Each module holds one seam; :meth:`Manager.__init__` assigns this state."""

    config: ManagerConfig
    policy: HostPolicy
    store: Store
    images: ImageStore
    retained: RetainedDisks
    backend: Backend
    state: ManagerState
    _locks: dict[str, asyncio.Lock]
    _dirty: set[str]
    _workers: dict[str, asyncio.Task[None]]
    _pool: asyncio.Semaphore
    _applied_generation: dict[str, int]
    _backoff: dict[str, Backoff]
    _timers: dict[str, asyncio.TimerHandle]
    _last_error: dict[str, str]
    # VMs whose start failed the same way twice in a row: not started again until a user
    # starts them or changes their spec (state Failed); the error, to raise to waiters
    _failed: dict[str, CorralError]
    _subscribers: set[tuple[str | None, asyncio.Queue[StoredEvent]]]
    _status_waiters: dict[str, set[asyncio.Future[None]]]  # woken per write
    reconcile_observers: list[Callable[[float], None]]  # seconds of each reconcile pass
    # events and statuses the daemon records on its own: written off the loop, kept and
    # retried while the store cannot be written
    _writeback: WriteBack
    # desired states the daemon decided (restartPolicy Never, a guest's poweroff) that
    # the store has not taken yet: reconcile acts on them meanwhile
    _pending_desired: dict[str, tuple[str, asyncio.Future[object]]]
    _resync: asyncio.Task[None] | None
    _background: set[asyncio.Future[object]]
    _passive: bool
    _suspended: bool  # host shutdown: nothing is started again, nothing reconciled
    _autostart: asyncio.Semaphore
    # VMs the opening reconcile starts (desired Running, no qemu: a host reboot): only these
    # take turns by ``autostartParallel``; a user's burst of starts goes at once (``workers``)
    _autostarting: set[str]
    # capacity admission and the desired-state write it allows happen under this lock,
    # so parallel starts cannot all pass against the same free capacity
    _admission: asyncio.Lock

    # --- events ----------------------------------------------------------------------------

    def events(self, name: str | None = None, after: int = 0) -> list[StoredEvent]:
        if name is not None:
            self.store.get(name)
        return self.store.events(name, after)

    async def follow(self, name: str | None = None, after: int = 0) -> AsyncIterator[StoredEvent]:
        """Past events after ``after``, then live ones as they happen."""
        queue: asyncio.Queue[StoredEvent] = asyncio.Queue(maxsize=10000)
        entry = (name, queue)
        self._subscribers.add(entry)
        try:
            last = 0  # the newest event already yielded: replayed ones also sit in the queue
            for event in self.events(name, after):
                last = event.id
                yield event
            while True:
                event = await queue.get()
                if event.id == 0:  # ephemeral (progress): never stored, never replayed
                    yield event
                elif event.id > last:
                    last = event.id
                    yield event
        finally:
            self._subscribers.discard(entry)

    def _record_event(self, name: str, kind: str, data: Mapping[str, Any]) -> None:
        """Queued for the store (:class:`WriteBack`), published once it is written."""
        self._writeback.event(name, kind, dict(data))
        level = logging.WARNING if kind.endswith(("Failed", "Crashed")) else logging.INFO
        level = logging.DEBUG if kind.endswith("Progress") else level
        _events_log.log(level, kind, extra={"fields": {"vm": name or None, **event_fields(data)}})

    def _publish(self, event: StoredEvent) -> None:
        for vm, queue in list(self._subscribers):
            if vm is None or vm == event.vm:
                with contextlib.suppress(asyncio.QueueFull):
                    queue.put_nowait(event)

    def _spawn(self, coro: Coroutine[Any, Any, object]) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _observe(self, name: str) -> Observed:
        return self.backend.observe(name)

    @property
    def store_unavailable(self) -> StoreUnavailable | None:
        """Why the daemon cannot write its own records to the store now (None: it can)."""
        return self._writeback.unavailable

    # --- waits -----------------------------------------------------------------------------

    async def wait_for(self, name: str, states: set[str], timeout: float) -> VmRecord:
        """Until the VM's observed state is one of ``states`` (``start --wait``: Running).
        A VM that becomes Failed (its start failed twice the same way) ends the wait at once
        with that start's error, unless Failed is what is waited for."""

        def reached(status: Mapping[str, Any]) -> bool:
            return status.get("state") in states

        def timed_out(record: VmRecord) -> Timeout:
            return Timeout(
                f"VM {name!r} is {record.status.get('state')}, not {'/'.join(sorted(states))}"
                f" after {timeout:g}s"
            )

        return await self._wait_status(name, reached, timeout, timed_out, states)

    async def wait(self, name: str, target: WaitTarget | str, timeout: float) -> VmRecord:
        """Until ``target`` holds (``state=Stopped``, ``condition=Booted``...: ``corral wait
        --for``); :class:`Timeout` saying where the VM is after ``timeout`` seconds,
        :class:`NotFound` if it is (or gets) deleted, :class:`SpecError` for a bad target."""
        want = WaitTarget.parse(target) if isinstance(target, str) else target

        def timed_out(record: VmRecord) -> Timeout:
            return Timeout(
                f"VM {name!r}: timed out after {timeout:g}s waiting for {want}; "
                f"it is {want.describe(record.status)}"
            )

        def met(status: Mapping[str, Any]) -> bool:
            if want.met(status):
                return True
            booted = (status.get("conditions") or {}).get(Condition.BOOTED.value) or {}
            wants_boot = want.kind == "condition" and want.name == Condition.BOOTED.value
            if wants_boot and want.value and booted.get("reason") == "BootTimeout":
                # the guest's own bound (bootTimeout) ran out: say why now, not at the timeout
                raise Timeout(f"VM {name!r} did not boot: {booted.get('message')}")
            return False

        wanted = {want.name} if want.kind == "state" else set()
        return await self._wait_status(name, met, timeout, timed_out, wanted)

    def _raise_if_failed(self, name: str, states: set[str]) -> None:
        """A wait for something a Failed VM will not reach ends with its start's error (of
        the same class: a taken port stays a Conflict), not with a timeout."""
        error = self._failed.get(name)
        if error is None or VmState.FAILED.value in states:
            return
        raise type(error)(
            f"VM {name!r} failed to start, twice the same way, and is not retried (state "
            f"Failed; corral start {name} or a spec change tries again): {error.message}",
            error.issues,
        )

    async def _wait_status(
        self,
        name: str,
        met: Callable[[Mapping[str, Any]], bool],
        timeout: float,
        timed_out: Callable[[VmRecord], CorralError],
        states: set[str],
    ) -> VmRecord:
        """The one wait loop: judge the stored status, then sleep until the next status write
        of this VM (:meth:`_write_status` wakes it; no polling) or the deadline. ``met`` may
        raise a :class:`CorralError` to end the wait early (a start that cannot succeed).

        A Failed VM is judged first, from memory (it is woken when the VM becomes Failed): its
        start's error, unless ``states`` (the states waited for) has Failed; the stored status
        may say otherwise for a while (the store cannot be written now)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            self._raise_if_failed(name, states)
            failed = name in self._failed  # and Failed is what is waited for
            record = self.store.get(name)
            if failed or met(record.status):
                return record
            left = deadline - loop.time()
            if left <= 0:
                raise timed_out(record)
            changed: asyncio.Future[None] = loop.create_future()
            waiters = self._status_waiters.setdefault(name, set())
            waiters.add(changed)
            try:
                await asyncio.wait({changed}, timeout=left)
            finally:
                changed.cancel()
                waiters.discard(changed)
                if not waiters and self._status_waiters.get(name) is waiters:
                    del self._status_waiters[name]

    def _status_changed(self, name: str) -> None:
        for changed in self._status_waiters.get(name, ()):
            if not changed.done():
                changed.set_result(None)

    def _statuses_written(self, names: Iterable[str]) -> None:
        for name in names:
            self._status_changed(name)
