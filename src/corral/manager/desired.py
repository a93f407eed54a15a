"""Desired state: the store's ``spec.vm.state``, written by users' verbs and by the daemon's
own decisions (restartPolicy Never, a guest's poweroff), and the kick that follows a write.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import ParamSpec, TypeVar

from corral.errors import NotFound, StoreUnavailable, VersionConflict
from corral.manager.admission import Admission
from corral.manager.hub import ManagerState
from corral.manager.store import VmRecord
from corral.spec import parse_document

__all__ = ["DesiredState"]

_P = ParamSpec("_P")
_T = TypeVar("_T")


class DesiredState(Admission):
    """Writes of ``spec.vm.state`` (a user's, or the daemon's own: retried while the store
    cannot take them), and kicks that ask for a VM to be reconciled."""

    @property
    def reconciling(self) -> bool:
        """Whether the manager acts on desired state (False before :meth:`open`, when opened
        passively, and after :meth:`stop_all`)."""
        return self.state is ManagerState.OPEN and not self._passive and not self._suspended

    def _lock(self, name: str) -> asyncio.Lock:
        return self._locks.setdefault(name, asyncio.Lock())

    def kick(self, name: str, delay: float = 0.0) -> None:
        """Ask for ``name`` to be reconciled (after ``delay`` seconds)."""
        if not self.reconciling:
            return
        if delay > 0:
            old = self._timers.pop(name, None)
            if old is not None:
                old.cancel()
            loop = asyncio.get_running_loop()
            self._timers[name] = loop.call_later(delay, self._timer_fired, name)
            return
        self._dirty.add(name)
        if name not in self._workers:
            task = asyncio.ensure_future(self._worker(name))
            self._workers[name] = task

    async def _worker(self, name: str) -> None:
        """Reconcile ``name`` while it is kicked (:class:`~corral.manager.reconcile.Reconciler`
        implements it)."""
        raise NotImplementedError

    def _timer_fired(self, name: str) -> None:
        self._timers.pop(name, None)
        self.kick(name)

    async def _set_desired(
        self, name: str, state: str, *, own: bool = False, fresh: bool = False
    ) -> VmRecord:
        """Only ``spec.vm.state`` changes: no admission (a host whose policy was tightened can
        still stop, kill or delete what it runs); starting is admitted by :meth:`start`.
        A user's wish (not ``own``, the daemon's) supersedes one the daemon has pending and
        ends a Failed state (``fresh``, a user's start: the backoff starts afresh too), once
        the store holds it: a refused write (503) changed nothing, not those either."""
        for _ in range(20):  # retry on a concurrent writer: this is a read-modify-write
            current = self.store.get(name)
            if current.desired == state:
                if not own:
                    self._user_wish(name, fresh=fresh)
                return current
            data = current.document.model_dump(mode="json", by_alias=True, exclude_none=True)
            data["spec"]["vm"]["state"] = state
            try:
                record = await self._write(
                    self.store.replace, parse_document(data), current.resource_version
                )
            except VersionConflict:
                await asyncio.sleep(0.01)
                continue
            if not own:
                self._user_wish(name, fresh=fresh)
            self._record_event(name, "SpecChanged", {"generation": record.generation})
            self.kick(name)
            await self._writeback.settle()
            return record
        raise VersionConflict(f"VM {name!r} changes too fast to set its state; retry")

    def _user_wish(self, name: str, *, fresh: bool) -> None:
        """A user's desired state is in the store: it supersedes the daemon's pending one and
        ends a Failed state; a start (``fresh``) also clears the backoff and last error."""
        self._supersede(name)
        self._failed.pop(name, None)
        if fresh:
            self._backoff.pop(name, None)
            self._last_error.pop(name, None)

    async def _own_desired(self, name: str, state: str) -> object:
        """A desired state the daemon decided (restartPolicy Never, a guest's poweroff):
        reconcile acts on it at once, and it is written when the store can take it (retried
        while it cannot), unless a user's request for this VM supersedes it first."""
        delay = 0.5
        try:
            while True:
                try:
                    return await self._set_desired(name, state, own=True)
                except NotFound:
                    return None
                except (StoreUnavailable, VersionConflict):
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 5.0)
        finally:
            pending = self._pending_desired.get(name)
            if pending is not None and pending[1] is asyncio.current_task():
                del self._pending_desired[name]

    def _desire(self, name: str, state: str) -> None:
        self._supersede(name)
        task = asyncio.ensure_future(self._own_desired(name, state))
        self._pending_desired[name] = (state, task)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _supersede(self, name: str) -> None:
        pending = self._pending_desired.pop(name, None)
        if pending is not None:
            pending[1].cancel()

    async def _write(self, fn: Callable[_P, _T], /, *args: _P.args, **kwargs: _P.kwargs) -> _T:
        """A request's own write, on the store's writer thread (:class:`StoreUnavailable` if
        the store cannot take it); a success also tells the write-back to retry now."""
        result = await self.store.run(fn, *args, **kwargs)
        self._writeback.wake()
        return result
