"""The reconcile loop: per-VM workers, restarts with backoff, and the Failed judgement.

Reconciling::

    kick(name) ──► per-VM worker (one at a time per VM, in order) ──► reconcile(name)
                       │  bounded by a pool of ``workers`` across VMs
    resync timer ──────┘  (every VM, every ``resyncSeconds``)

    desired Running, not running   -> start (admission again first)
    desired Running, crashed       -> restartPolicy Always: start after backoff
                                      (initial * 2^(n-1), capped); Never: leave it Crashed
    desired Running, spec changed  -> hand the new document to the runner: live changes
                                      apply, the rest is reported pending restart
    desired Stopped, running       -> graceful stop (powerdown, timeout, quit, kill)

Runner events arrive through :meth:`Reconciler._on_event`: a crash schedules a restart (or,
with restartPolicy Never, desires Stopped); a start that fails twice the same way is Failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import Mapping
from typing import Any

from corral.errors import (
    CapacityError,
    Conflict,
    CorralError,
    Forbidden,
    HostError,
    PolicyError,
    QemuError,
    SpecError,
    StoreUnavailable,
)
from corral.manager.backends.base import Capability
from corral.manager.desired import DesiredState
from corral.manager.hub import Backoff, ManagerState
from corral.manager.store import VmRecord
from corral.runner.status import VmState, now_iso

__all__ = ["Reconciler"]

_EXIT_CODE = re.compile(r" \(exit code \d+\); qemu said:")  # the runner's words for it
_START_ERRORS: dict[str, type[CorralError]] = {
    cls.__name__: cls
    for cls in (SpecError, PolicyError, Forbidden, CapacityError, Conflict, HostError, QemuError)
}


def _repeats(error: CorralError) -> bool:
    """Whether a start that failed with ``error`` fails the same way on every retry: the
    document (:class:`SpecError`), the host policy (:class:`PolicyError`, but not
    :class:`CapacityError`: room frees up), a :class:`Conflict` (a taken host port), qemu
    *exiting* with an exit code (it refused its argv). Not a :class:`HostError` (a tool, the
    disk), nor qemu killed by a signal (the OOM killer) or any other end: those may pass."""
    if isinstance(error, CapacityError):
        return False
    if isinstance(error, SpecError | PolicyError | Conflict):
        return True
    return isinstance(error, QemuError) and _EXIT_CODE.search(error.message) is not None


def _start_error(event: Mapping[str, Any]) -> CorralError:
    """A runner's StartFailed event as the error it reports (its class by name)."""
    return _START_ERRORS.get(str(event.get("type")), QemuError)(str(event.get("error")))


class Reconciler(DesiredState):
    """Closes the difference between desired and observed, one VM at a time per VM."""

    async def stop_all(self, timeout: float | None = None) -> dict[str, str]:
        """Host shutdown: stop every running VM gracefully, in parallel, each within its own
        powerdown timeout. Desired state is kept, so they come back when the daemon starts
        again. Returns {name: how it ended}; 'quit' or 'kill' means it needed force.

        Reconciling is suspended first, for the rest of this manager's life: no pending
        restart, resync or request starts a VM again while the host goes down."""
        self._suspended = True
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()

        async def one(name: str) -> tuple[str, str]:
            async with self._lock(name):
                try:
                    how = await self.backend.stop(name, timeout=timeout)
                except CorralError as exc:
                    how = f"error: {exc}"
                self._record_event(name, "HostShutdownStop", {"how": how})
                self._write_status(name)
                return name, how

        active = [n for n in self.store.names() if self._observe(n).active]
        return dict(await asyncio.gather(*(one(n) for n in active)))

    async def _worker(self, name: str) -> None:
        try:
            while name in self._dirty and self.reconciling:
                self._dirty.discard(name)
                async with self._pool, self._lock(name):
                    began = time.monotonic()
                    try:
                        await self._reconcile(name)
                    except CorralError as exc:
                        self._last_error[name] = str(exc)
                        self._record_event(name, "ReconcileFailed", {"error": str(exc)})
                        self._write_status(name)
                    for observe in self.reconcile_observers:
                        observe(time.monotonic() - began)
        finally:
            self._workers.pop(name, None)

    async def _resync_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.resync_seconds)
            try:
                names = self.store.names()
            except StoreUnavailable:
                continue  # the next round reads it again
            for name in names:
                self.kick(name)

    async def _reconcile(self, name: str) -> None:
        record = self.store.find(name)
        if record is None or not self.reconciling or self._writeback.deleting(name):
            return
        observed = self._observe(name)
        pending = self._pending_desired.get(name)
        if record.desired == "Stopped" or (pending is not None and pending[0] == "Stopped"):
            if observed.active:
                how = await self.backend.stop(name)
                self._record_event(name, "Stopped", {"how": how})
            self._write_status(name)
            return
        if name in self._failed:  # not started again until a user start or a spec change
            self._write_status(name)
            return
        if observed.active:
            if self._applied_generation.get(name) != record.generation:
                if Capability.LIVE_APPLY in self.backend.capabilities:
                    document = self._runtime_document(record.document)
                    try:
                        await self.backend.apply(document)
                    finally:
                        self._applied_generation[name] = record.generation
                else:  # the manager asks, never assumes: it takes effect at the next start
                    self._applied_generation[name] = record.generation
                    self._record_event(name, "ApplyDeferred", {
                        "generation": record.generation,
                        "reason": f"the {self.backend.name} backend cannot change a running "
                                  "VM; the change takes effect at its next start",
                    })  # fmt: skip
            self._write_status(name)
            return
        if observed.state is VmState.CRASHED:
            if record.document.spec.restart_policy == "Never":
                self._write_status(name)
                return
            backoff = self._backoff.get(name)
            if backoff is not None and time.monotonic() < backoff.due:
                self.kick(name, backoff.due - time.monotonic())
                self._write_status(name)
                return
        await self._start(record)

    async def _start(self, record: VmRecord) -> None:
        name = record.name
        limit: contextlib.AbstractAsyncContextManager[object] = (
            self._autostart if name in self._autostarting else contextlib.nullcontext()
        )
        async with limit:
            self._autostarting.discard(name)
            if not self.reconciling:
                return
            self._backoff.setdefault(name, Backoff()).attempt += 1
            try:
                self._admit(record.document)
                await self.backend.start(self._runtime_document(record.document))
            except CorralError as exc:
                self._last_error[name] = str(exc)
                backoff = self._backoff[name]
                if backoff.judged == backoff.attempt:  # the runner said it (StartFailed)
                    if name in self._failed:
                        self._failed[name] = exc  # its own class, for waiters
                        self._status_changed(name)
                else:
                    self._judge_start_failure(name, exc)
                if name not in self._failed:
                    self._schedule_restart(name, "StartFailed", str(exc))
                self._write_status(name)
                return
        self._last_error.pop(name, None)
        self._applied_generation[name] = record.generation
        self._write_status(name)

    def _judge_start_failure(self, name: str, error: CorralError) -> None:
        """A start failed: failing the same way as the start before it (no Running between)
        makes the VM Failed, since a retry would only fail again (a taken port, a document
        qemu refuses: :func:`_repeats`); the count starts afresh at a user's start or a spec
        change. Waits on the VM end at once, whether or not its status can be written."""
        backoff = self._backoff.setdefault(name, Backoff())
        message = str(error)
        if not _repeats(error):
            return  # it may pass (room frees up, a tool comes back): retried with backoff
        unavailable = self._writeback.unavailable
        if unavailable is not None and unavailable.reason != "locked":
            # the daemon's own disk is full or failing: the host is in trouble, not the
            # document; retried with backoff, so a start accepted before it runs after it
            return
        if backoff.last_failure != message:
            backoff.last_failure = message
            return
        self._failed[name] = error
        self._status_changed(name)  # waits end now, not when (if) its status is written
        timer = self._timers.pop(name, None)
        if timer is not None:
            timer.cancel()
        self._record_event(
            name,
            "Failed",
            {
                "error": message,
                "hint": f"its start failed twice the same way: fix the cause, then corral start "
                f"{name} (a spec change also tries again)",
            },
        )
        self._write_status(name)
        self._spawn(self._stop_failed(name))

    async def _stop_failed(self, name: str) -> None:
        """A placement that retries on its own (systemd's Restart=) is stopped."""
        async with self._lock(name):
            if name in self._failed:
                with contextlib.suppress(CorralError):
                    await self.backend.stop(name)

    def _schedule_restart(self, name: str, reason: str, detail: str) -> None:
        """Count a failure of the current start attempt (once: a start that fails is seen
        both as the start's error and as the runner's Crashed) and start again after the
        backoff. A VM that ran ``backoffResetSeconds`` before it crashed starts the count
        afresh (systemd's StartLimitIntervalSec, Kubernetes' 10 min reset)."""
        backoff = self._backoff.setdefault(name, Backoff())
        if backoff.counted == backoff.attempt:
            return
        backoff.counted = backoff.attempt
        now = time.monotonic()
        if (
            backoff.running_since is not None
            and now - backoff.running_since >= self.config.backoff_reset_seconds
        ):
            backoff.failures = 0
        backoff.running_since = None
        backoff.failures += 1
        delay = min(
            self.config.backoff_initial_seconds * 2 ** (backoff.failures - 1),
            self.config.backoff_max_seconds,
        )
        backoff.due = time.monotonic() + delay
        self._record_event(
            name,
            "RestartScheduled",
            {"reason": reason, "detail": detail, "failures": backoff.failures, "delay": delay},
        )
        self.kick(name, delay)

    # --- runner events and status ----------------------------------------------------------

    def _on_event(self, name: str, event: dict[str, Any]) -> None:
        """Every runner event: stored, published, and a crash schedules a restart."""
        kind = str(event.get("event", "Event"))
        try:
            if self.store.find(name) is None:
                return
        except StoreUnavailable:
            pass  # cannot tell: recorded anyway (for a deleted VM, an orphan event at worst)
        self._record_event(name, kind, event)
        if kind == "StartFailed":  # the runner's own words (systemd: the only ones we get)
            self._last_error[name] = str(event.get("error"))
            if self.state is ManagerState.OPEN:
                judging = self._backoff.setdefault(name, Backoff())
                judging.judged = judging.attempt
                self._judge_start_failure(name, _start_error(event))
        if kind == "StateChanged":
            self._write_status(name)
            if event.get("state") == VmState.CRASHED.value and self.state is ManagerState.OPEN:
                try:
                    record = self.store.find(name)
                except StoreUnavailable:
                    record = None  # the next resync reconciles the crash instead
                if record is not None and record.desired == "Running" and name not in self._failed:
                    if record.document.spec.restart_policy == "Never":
                        # persisted as desired Stopped, so no later daemon starts it again
                        self._record_event(name, "NotRestarted", {"restartPolicy": "Never"})
                        self._desire(name, "Stopped")
                    else:
                        self._schedule_restart(name, "Crashed", self._crash_detail(name, event))
            elif event.get("state") == VmState.STOPPED.value and event.get("stoppedBy") == "guest":
                # guestShutdownStops: the guest's own poweroff is a wish to be Stopped
                self._desire(name, "Stopped")
            elif event.get("state") == VmState.RUNNING.value:
                self._last_error.pop(name, None)
                backoff = self._backoff.get(name)
                if backoff is not None:
                    backoff.due = 0.0
                    backoff.running_since = time.monotonic()
                    backoff.last_failure = None  # "twice in a row" counts from here
        elif kind in ("ConditionChanged", "Applied", "MediaChanged", "Attached"):
            self._write_status(name)

    def _crash_detail(self, name: str, event: Mapping[str, Any]) -> str:
        """How qemu ended, with its last stderr lines; for a start that failed (no exit in
        the event), the StartFailed error just recorded, which carries them."""
        info = event.get("exit")
        if not isinstance(info, dict):
            return self._last_error.get(name) or "qemu ended"
        if info.get("code") is not None:
            how = f"qemu exited with code {info['code']}"
        elif info.get("signal") is not None:
            how = f"qemu was killed by signal {info['signal']}"
        else:
            how = "qemu ended (exit status unknown: it was not our child)"
        said = info.get("stderr")
        return f"{how}; qemu said:\n{said}" if said else how

    def _write_status(self, name: str) -> None:
        """The VM's observed status, queued for the store (:class:`WriteBack`); status waits
        wake once it is written."""
        try:
            record = self.store.find(name)
        except StoreUnavailable:
            return  # cannot read it now: the next resync writes it
        if record is None:
            return
        observed = self._observe(name)
        status = dict(observed.status)
        status.setdefault("state", observed.state.value)
        status["desiredState"] = record.desired
        status["observedGeneration"] = self._applied_generation.get(name)
        status["backend"] = self.backend.name
        backoff = self._backoff.get(name)
        status["restartCount"] = backoff.failures if backoff else 0
        status["lastError"] = self._last_error.get(name)
        failed = self._failed.get(name)
        if failed is not None and not observed.active:
            status["state"] = VmState.FAILED.value  # the manager's word: not retried
            status["lastError"] = str(failed)
        status["observedAt"] = now_iso()
        self._writeback.status(name, status)
