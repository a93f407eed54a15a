"""The manager: desired state for many VMs on one host, and the loop that makes it so.

It keeps what should be (the store), observes what is (the backend), and closes the
difference. The Python API here (create, replace, patch, start, stop, restart, reset, kill,
delete, list, get, events, images, retained disks, stop_all) is what the REST API, the CLI
and the other interfaces call; it is async, typed, and raises the :mod:`corral.errors` tree.

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

Lifecycle: :meth:`open` first re-attaches to every VM that still runs (pidfile + QMP), in
parallel, restarting none; only then does it reconcile, which starts the VMs that are desired
Running and have no qemu (a host reboot), ``autostartParallel`` at a time. :meth:`close`
leaves every VM running (upgrade-safe) unless asked to stop them (host shutdown).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
import os
import re
import time
from collections.abc import (
    AsyncGenerator,
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Coroutine,
    Iterable,
    Mapping,
)
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

from corral.errors import (
    CapacityError,
    Conflict,
    CorralError,
    FieldIssue,
    Forbidden,
    HostError,
    NotFound,
    PolicyError,
    QemuError,
    SpecError,
    StoreUnavailable,
    Timeout,
    VersionConflict,
)
from corral.host.atomic import ensure_private_dir
from corral.host.consolelog import LogFollower, log_exists, read_spans, tail_spans
from corral.host.images import ImageRecord, ImageStore, Progress, host_path
from corral.host.ports import host_ports, port_busy
from corral.manager.backend import Backend, EmbeddedBackend, Observed
from corral.manager.config import ManagerConfig
from corral.manager.daemonlog import event_fields
from corral.manager.retained import RetainedDisks, RetainedSet
from corral.manager.store import NOTHING_CHANGED, Store, StoredEvent, VmRecord
from corral.manager.systemd import SystemdBackend
from corral.manager.waits import WaitTarget
from corral.manager.writeback import WriteBack
from corral.runner.config import LogSource, check_host
from corral.runner.status import Condition, VmState, now_iso
from corral.runner.supervisor import ExecResult
from corral.spec import HostPolicy, VmDocument, load_policy, parse_document
from corral.spec.policy import DEFAULT_POLICY_FILE, path_within

__all__ = ["Manager", "ManagerState", "json_merge_patch"]

_events_log = logging.getLogger("corral.events")
_log = logging.getLogger("corral.manager")

_P = ParamSpec("_P")
_T = TypeVar("_T")
_LOG_POLL = 0.25  # seconds between looks at a followed log that has nothing new
_EXIT_CODE = re.compile(r" \(exit code \d+\); qemu said:")  # the runner's words for it
_START_ERRORS: dict[str, type[CorralError]] = {
    cls.__name__: cls
    for cls in (SpecError, PolicyError, Forbidden, CapacityError, Conflict, HostError, QemuError)
}

_RUNNER_FIELDS_OWNED = (
    "data_dir",
    "runtime_dir",
    "status_file",
    "display_secret_file",
    "emulator",
)
"""Runner paths a managed document may not set: under the manager they are the manager's (a
document naming a FIFO, /dev/zero or another VM's files as its display secret or status file
would reach the daemon's own I/O)."""


class ManagerState(StrEnum):
    NEW = "New"
    OPENING = "Opening"
    OPEN = "Open"
    CLOSING = "Closing"
    CLOSED = "Closed"


def json_merge_patch(target: object, patch: object) -> object:
    """RFC 7386: objects merge recursively, ``null`` deletes, anything else replaces."""
    if not isinstance(patch, Mapping):
        return copy.deepcopy(patch)
    result: dict[str, object] = dict(target) if isinstance(target, Mapping) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = json_merge_patch(result.get(key), value)
    return result


def _check_version(version: str | None) -> str | None:
    """A ``resourceVersion`` precondition: None (absent) means no check; anything else must be
    a version the store handed out (1, 2, ...): ``""`` or ``"0"`` is not a way to skip it."""
    if version is None or (version.isascii() and version.isdigit() and int(version) > 0):
        return version
    raise SpecError.single(
        "metadata.resourceVersion",
        f"{version!r} is not a resourceVersion (a positive integer read from the VM); "
        "leave it out to write without a check",
    )


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


def _host_cpus() -> int:
    return len(os.sched_getaffinity(0))


def _host_ram() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


@dataclass
class _Backoff:
    failures: int = 0
    due: float = 0.0  # time.monotonic() of the next allowed start
    attempt: int = 0  # start attempts so far; each one's failure is counted once
    counted: int = -1  # the attempt whose failure was counted last
    running_since: float | None = None  # time.monotonic() the VM last reached Running
    last_failure: str | None = None  # the last start's error, if no start succeeded since
    judged: int = -1  # the attempt whose failure the runner reported (StartFailed)


class Manager:
    def __init__(
        self,
        config: ManagerConfig,
        *,
        policy: HostPolicy | None = None,
        backend: Backend | None = None,
    ) -> None:
        self.config = config
        self.policy = policy if policy is not None else load_policy(config.policy_file)
        for own in (config.state_dir, config.vms, config.run):  # they hold cloud-init data
            ensure_private_dir(own, tighten=True)
        self.store = Store(config.store)
        self.images = ImageStore(config.images)
        self.retained = RetainedDisks(config.vms)
        self.backend: Backend = backend or (
            SystemdBackend.from_config(config, self._on_event)
            if config.backend == "systemd"
            else EmbeddedBackend(
                config.vms,
                config.run,
                self.policy,
                self._on_event,
                accelerator=config.accelerator,
                on_status=self._write_status,
            )
        )
        self.state = ManagerState.NEW
        self._locks: dict[str, asyncio.Lock] = {}
        self._dirty: set[str] = set()
        self._workers: dict[str, asyncio.Task[None]] = {}
        self._pool = asyncio.Semaphore(config.workers)
        self._applied_generation: dict[str, int] = {}
        self._backoff: dict[str, _Backoff] = {}
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._last_error: dict[str, str] = {}
        # VMs whose start failed the same way twice in a row: not started again until a user
        # starts them or changes their spec (state Failed); the error, to raise to waiters
        self._failed: dict[str, CorralError] = {}
        self._subscribers: set[tuple[str | None, asyncio.Queue[StoredEvent]]] = set()
        self._status_waiters: dict[str, set[asyncio.Future[None]]] = {}  # woken per write
        # events and statuses the daemon records on its own: written off the loop, kept and
        # retried while the store cannot be written
        self._writeback = WriteBack(self.store, self._publish, self._statuses_written)
        # desired states the daemon decided (restartPolicy Never, a guest's poweroff) that
        # the store has not taken yet: reconcile acts on them meanwhile
        self._pending_desired: dict[str, tuple[str, asyncio.Future[object]]] = {}
        self._resync: asyncio.Task[None] | None = None
        self._background: set[asyncio.Future[object]] = set()
        self._passive = False
        self._suspended = False  # host shutdown: nothing is started again, nothing reconciled
        self._autostart = asyncio.Semaphore(config.autostart_parallel)
        # capacity admission and the desired-state write it allows happen under this lock,
        # so parallel starts cannot all pass against the same free capacity
        self._admission = asyncio.Lock()

    # --- lifecycle -------------------------------------------------------------------------

    async def open(self, *, reconcile: bool = True) -> dict[str, bool]:
        """Re-attach to every running VM (restarting none), then reconcile everything
        (``reconcile=False``: only re-attach, e.g. to stop them all at host shutdown).

        Returns {name: re-attached} for the VMs in the store.
        """
        if self.state is not ManagerState.NEW:
            raise Conflict(f"manager is {self.state.value}")
        self.state = ManagerState.OPENING
        records = self.store.all()
        try:  # data dirs that no VM owns (left by an older corral): listed, never inherited
            for orphan in self.retained.retain_orphans({r.name for r in records}):
                self._record_event(orphan.vm, "DisksRetained", {"retainedDisks": orphan.id})
        except CorralError as exc:  # create retains them too, or refuses if it cannot
            self._record_event("", "RetainFailed", {"error": str(exc)})
        try:  # temporary files of imports killed with an earlier daemon
            leftovers = await self.images.remove_leftovers()
        except (OSError, CorralError) as exc:
            self._record_event("", "ImageLeftoversFailed", {"error": str(exc)})
        else:
            if leftovers:
                self._record_event("", "ImageLeftoversRemoved", {"files": leftovers})

        async def adopt(rec: VmRecord) -> bool:
            try:
                attached = await self.backend.adopt(self._runtime_document(rec.document))
            except CorralError as exc:
                self._record_event(rec.name, "AdoptFailed", {"error": str(exc)})
                return False
            if attached:
                self._applied_generation[rec.name] = rec.generation
                self._record_event(
                    rec.name, "Adopted", {"pid": self._observe(rec.name).status.get("pid")}
                )
            self._write_status(rec.name)
            return attached

        results = await asyncio.gather(*(adopt(r) for r in records))
        self.state = ManagerState.OPEN
        if reconcile:
            for rec in records:
                self.kick(rec.name)
            self._resync = asyncio.ensure_future(self._resync_loop())
        else:
            self._passive = True
        await self._writeback.settle()
        return {r.name: ok for r, ok in zip(records, results, strict=True)}

    async def close(self, *, stop_vms: bool = False) -> dict[str, str]:
        """Stop reconciling. VMs keep running unless ``stop_vms`` (host shutdown)."""
        if self.state in (ManagerState.CLOSING, ManagerState.CLOSED):
            return {}
        self.state = ManagerState.CLOSING
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        desired = {name: state for name, (state, _) in self._pending_desired.items()}
        tasks: list[asyncio.Future[Any]] = [*self._workers.values(), *self._background]
        if self._resync is not None:
            tasks.append(self._resync)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        result = await self.stop_all() if stop_vms else {}
        await self.backend.close()
        lost = await self._last_desired(desired)
        unwritten = await self._writeback.close()  # one last try
        if lost or unwritten:  # what the store cannot take now is lost
            _log.warning(
                "StoreRecordsLost",
                extra={"fields": {"desiredStates": lost, "records": unwritten,
                                  "error": str(self._writeback.unavailable or "")}},
            )  # fmt: skip
        self.store.close()
        self.state = ManagerState.CLOSED
        return result

    async def _last_desired(self, desired: Mapping[str, str]) -> dict[str, str]:
        """One last write of the desired states the daemon decided and the store has not
        taken yet (at close); returns those it still could not write."""
        lost: dict[str, str] = {}
        for name, state in desired.items():
            if lost:  # the store refused one just now: the rest would wait for nothing
                lost[name] = state
                continue
            try:
                await self._set_desired(name, state, own=True)
            except NotFound:
                pass
            except CorralError:
                lost[name] = state
        return lost

    async def __aenter__(self) -> Manager:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def reconciling(self) -> bool:
        """Whether the manager acts on desired state (False before :meth:`open`, when opened
        passively, and after :meth:`stop_all`)."""
        return self.state is ManagerState.OPEN and not self._passive and not self._suspended

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

    # --- the API: VMs ----------------------------------------------------------------------

    def list_vms(self, *, state: str | None = None, label: str | None = None) -> list[VmRecord]:
        """VMs, filtered by observed state (Running, Stopped, ...) and/or a label selector
        ``key=value`` or ``key`` (has the label)."""
        records = self.store.all()
        if state is not None:
            records = [r for r in records if r.status.get("state", "Stopped") == state]
        if label is not None:
            key, sep, value = label.partition("=")
            records = [
                r for r in records if key in r.labels and (not sep or r.labels[key] == value)
            ]
        return records

    def get(self, name: str) -> VmRecord:
        return self.store.get(name)

    async def create(
        self, doc: VmDocument | Mapping[str, Any], *, adopt_disks: str | None = None
    ) -> VmRecord:
        """A new VM starts with an empty data dir (whatever an earlier VM left there is
        retained), unless ``adopt_disks`` names a retained set (its id, or the name of the VM
        that left it) to become its data dir: disks, UUID, TPM and firmware vars come back.
        A refusal changes nothing."""
        document = self._parse(doc)
        async with self._admission:
            return await self._create(document, adopt_disks)

    async def _create(self, document: VmDocument, adopt_disks: str | None) -> VmRecord:
        self._admit(document)
        name = document.name
        if self.store.find(name) is not None:
            raise Conflict(f"VM {name!r} already exists")
        adopted: RetainedSet | None = None
        if adopt_disks is not None:
            adopted = self.retained.adopt(adopt_disks, name)
            data: dict[str, object] = {"adoptedDisks": adopted.id}
        else:
            stale = self.retained.retain(name)
            data = {"retainedDisks": stale.id} if stale is not None else {}
        try:
            record = await self._write(self.store.create, document)
        except BaseException:
            if adopted is not None:
                self.retained.unadopt(adopted, name)
            raise
        self._supersede(name)
        self._record_event(record.name, "Created", {"generation": record.generation, **data})
        self._write_status(record.name)
        self.kick(record.name)
        await self._writeback.settle()
        return self.store.get(record.name)

    async def replace(
        self, doc: VmDocument | Mapping[str, Any], resource_version: str | None = None
    ) -> VmRecord:
        document = self._parse(doc)
        resource_version = _check_version(resource_version)
        self.store.get(document.name)
        async with self._admission:
            self._admit(document)
            record = await self._write(self.store.replace, document, resource_version)
        if self._failed.pop(record.name, None) is not None:  # the change may be the fix
            self._backoff.pop(record.name, None)
        self._supersede(record.name)
        self._record_event(record.name, "SpecChanged", {"generation": record.generation})
        self.kick(record.name)
        await self._writeback.settle()
        return record

    async def apply(
        self, doc: VmDocument | Mapping[str, Any], *, adopt_disks: str | None = None
    ) -> VmRecord:
        """Create or replace (``kubectl apply``); ``adopt_disks`` only when it creates."""
        document = self._parse(doc)
        if self.store.find(document.name) is None:
            return await self.create(document, adopt_disks=adopt_disks)
        if adopt_disks is not None:
            raise Conflict(f"VM {document.name!r} exists: only a new VM can adopt disks")
        return await self.replace(document)

    async def patch(
        self, name: str, patch: Mapping[str, Any], resource_version: str | None = None
    ) -> VmRecord:
        """A JSON merge patch (RFC 7386) on the VM document (metadata and spec).

        Without ``resource_version`` it applies to the document as it is when written: a
        concurrent writer in between (the store's writes are awaited) makes it merge again."""
        self.store.get(name)  # NotFound before a bad version
        expected = _check_version(resource_version)
        for _ in range(20):
            current = self.store.get(name)
            body = current.document.model_dump(mode="json", by_alias=True, exclude_none=True)
            merged = json_merge_patch(body, {k: v for k, v in patch.items() if k != "status"})
            if not isinstance(merged, dict):
                raise SpecError.single("", "a merge patch must be an object")
            meta = merged.get("metadata")
            if not isinstance(meta, dict) or meta.get("name") != name:
                raise SpecError.single("metadata.name", "a VM cannot be renamed")
            try:
                return await self.replace(merged, expected or current.resource_version)
            except VersionConflict:  # not a taken port, say: that one would only repeat
                if expected is not None:
                    raise
                await asyncio.sleep(0.01)
        raise VersionConflict(f"VM {name!r} changes too fast to patch it; retry")

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

    async def start(self, name: str, *, wait: float | None = None) -> VmRecord:
        """Desired Running, if this host admits it (:class:`PolicyError` with the reason if
        not: capacity counts every VM desired Running *and* every VM still running, a
        stopping one included)."""
        async with self._admission:
            current = self.store.get(name)
            if current.desired != "Running" or not self._observe(name).active:
                data = current.document.model_dump(mode="json", by_alias=True, exclude_none=True)
                data["spec"]["vm"]["state"] = "Running"
                self._admit(parse_document(data))
            # a user's start tries again (a Failed VM too), once the store holds it
            record = await self._set_desired(name, "Running", fresh=True)
        self.kick(name)
        if wait:
            await self.wait_for(name, {"Running"}, wait)
        return record

    async def stop(self, name: str, *, wait: float | None = None) -> VmRecord:
        record = await self._set_desired(name, "Stopped")
        self.kick(name)
        if wait:
            await self.wait_for(name, {"Stopped", "Crashed"}, wait)
        return record

    async def restart(self, name: str, *, wait: float | None = None) -> VmRecord:
        """Stop gracefully and start again (with the latest document: pending changes apply)."""
        self.store.get(name)
        async with self._lock(name):
            await self.backend.stop(name)
            self._write_status(name)
        return await self.start(name, wait=wait)

    async def reset(self, name: str) -> None:
        self.store.get(name)
        async with self._lock(name):
            await self.backend.reset(name)
            self._record_event(name, "ResetRequested", {})
        await self._writeback.settle()

    async def kill(self, name: str) -> VmRecord:
        """SIGKILL qemu now; the VM is then desired Stopped (nothing restarts it).

        Never waits behind a graceful stop in flight (``virsh destroy``): the VM's lock is
        not taken, the backend aborts that stop (whose caller is told ``kill``)."""
        record = await self._set_desired(name, "Stopped")
        await self.backend.kill(name)
        self._record_event(name, "Killed", {})
        self._write_status(name)
        await self._writeback.settle()
        return record

    async def delete(
        self, name: str, *, delete_disks: bool = False, force: bool = False
    ) -> RetainedSet | None:
        """Stop the VM gracefully and forget it. Its data dir (disks, UUID, TPM, firmware
        vars) is retained, and returned, unless ``delete_disks``: no later VM inherits it.
        ``force`` kills it instead of a graceful stop, aborting one in flight
        (``kubectl delete --grace-period=0 --force``).

        The store must take the delete: a store that cannot be written refuses it (503)
        before anything is stopped or moved, and desired Stopped is written first, so nothing
        starts the VM again whatever happens next. Once its disks are deleted or retained
        there is no way back: if the store cannot delete the record then, the deletion is
        kept and retried in the background (the VM is not reconciled meanwhile), and the
        :class:`StoreUnavailable` says so."""
        self.store.get(name)
        await self._write(self.store.touch)
        await self._set_desired(name, "Stopped")
        if force:
            await self.kill(name)
        async with self._lock(name):
            uid = self.store.get(name).uid
            await self.backend.stop(name)
            retained = await self.backend.forget(name, delete_disks=delete_disks)
            data: dict[str, object] = {"deleteDisks": delete_disks}
            if retained is not None:
                data["retainedDisks"] = retained.id
            try:
                await self._write(self.store.delete, name)
            except StoreUnavailable as exc:
                self._forget(name)
                self._record_event(name, "Deleted", {**data, "recordPending": True})
                self._writeback.delete(name, uid)
                disks = (
                    "its disks are deleted" if delete_disks
                    else f"its disks are retained as {retained.id}" if retained is not None
                    else "it had no disks"
                )  # fmt: skip
                raise StoreUnavailable(
                    f"VM {name!r} is stopped and {disks}, but the store cannot delete its "
                    f"record now ({exc.message.removesuffix(NOTHING_CHANGED)}): the deletion "
                    "is kept and retried in the background, and nothing starts the VM",
                    reason=exc.reason,
                    retry_after=exc.retry_after or 1,
                ) from exc
            self._forget(name)
            self._record_event(name, "Deleted", data)
            self._status_changed(name)  # a wait on it ends: NotFound
        await self._writeback.settle()
        return retained

    def _forget(self, name: str) -> None:
        """What the manager keeps in memory about a deleted VM."""
        self._applied_generation.pop(name, None)
        self._backoff.pop(name, None)
        self._failed.pop(name, None)
        self._last_error.pop(name, None)
        timer = self._timers.pop(name, None)
        if timer is not None:
            timer.cancel()

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

    # --- the API: guest access --------------------------------------------------------------

    def _running(self, name: str) -> VmRecord:
        record = self.store.get(name)
        state = self._observe(name).state
        if state is not VmState.RUNNING:
            raise Conflict(f"VM {name!r} is {state.value}, not Running")
        return record

    def console_socket(self, name: str) -> Path:
        """The serial console socket of a running VM (for the console proxy)."""
        self._running(name)
        return self.backend.console_socket(name)

    def logs(
        self, name: str, source: LogSource = "console", *, tail: int | None = None,
        follow: bool = False,
    ) -> AsyncGenerator[bytes, None]:  # fmt: skip
        """The VM's console log (what the guest printed) or qemu's log (its stderr), bytes as
        written: the last ``tail`` lines (``None``: all) of the log and its rotated copy; with
        ``follow``, then what is appended, across rotations and restarts, until the VM is
        deleted or the consumer stops iterating (memory: one 64 KiB chunk at a time).

        Checked before the stream starts: :class:`NotFound` for an unknown VM,
        :class:`Conflict` for one that has no such log yet (it never ran here), unless it is
        followed while it is meant to be Running (its log is about to appear)."""
        record = self.store.get(name)
        path = self.backend.log_file(name, source)
        if not log_exists(path) and not (follow and record.desired == "Running"):
            raise Conflict(
                f"VM {name!r} has no {source} log yet: it has not run since it was created"
                f" (corral start {name})"
            )
        return self._log_stream(record, path, tail, follow)

    async def _log_stream(
        self, record: VmRecord, path: Path, tail: int | None, follow: bool
    ) -> AsyncGenerator[bytes, None]:
        spans, end = await asyncio.to_thread(tail_spans, path, tail)
        for chunk in read_spans(spans):
            yield chunk
        if not follow:
            return
        log = LogFollower(path, end)
        while True:
            chunk = log.read()
            if chunk:
                yield chunk
                continue
            if self.state in (ManagerState.CLOSING, ManagerState.CLOSED):
                return  # the daemon stops: the follow ends, cleanly
            try:
                current: VmRecord | None = self.store.find(record.name)
            except StoreUnavailable:
                current = record  # cannot tell now: still there
            if current is None or current.uid != record.uid:
                return  # deleted (its runtime dir and logs with it)
            if self._writeback.deleting(record.name):
                return  # deleted, but for its record
            await asyncio.sleep(_LOG_POLL)

    async def display(self, name: str, expiry: int = 30) -> dict[str, Any]:
        """A fresh display password for a running VM, valid ``expiry`` seconds, and the
        ``spice://``/``vnc://`` URLs to use it (``virsh domdisplay --include-password``).
        The password goes into the VM's own display secret, never into an event or log."""
        import secrets
        from datetime import UTC, datetime, timedelta

        record = self._running(name)
        display = record.document.vm.display
        if display is None or (display.spice is None and display.vnc is None):
            raise Conflict(f"VM {name!r} has no display (spec.vm.display: spice or vnc)")
        # VNC authentication uses only the first 8 characters: give VNC exactly 8
        password = secrets.token_urlsafe(6 if display.vnc is not None else 16)
        await self.backend.set_display_password(name, password, f"+{expiry}")
        until = datetime.now(UTC) + timedelta(seconds=expiry)
        displays = []
        for protocol, cfg in (("spice", display.spice), ("vnc", display.vnc)):
            if cfg is not None:
                host = cfg.address if cfg.address not in ("0.0.0.0", "::") else "127.0.0.1"  # noqa: S104
                host = f"[{host}]" if ":" in host else host
                url = f"{protocol}://{host}:{cfg.port}"
                if protocol == "spice":
                    url += f"?password={password}"
                displays.append({"protocol": protocol, "address": cfg.address,
                                 "port": cfg.port, "url": url})  # fmt: skip
        self._record_event(name, "DisplayPasswordIssued", {"expirySeconds": expiry})
        return {
            "name": name,
            "displays": displays,
            "password": password,
            "expiresAt": until.isoformat(timespec="seconds").replace("+00:00", "Z"),
        }

    async def exec(
        self, name: str, argv: list[str], *, stdin: bytes | None = None, timeout: float = 60.0
    ) -> ExecResult:
        """Run ``argv`` in the guest via its agent; exit code, stdout, stderr."""
        self._running(name)
        result = await self.backend.exec(name, argv, stdin=stdin, timeout=timeout)
        self._record_event(name, "GuestExec", {"argv0": argv[0], "exitCode": result.exit_code})
        return result

    # --- the API: images -------------------------------------------------------------------

    def image_users(self) -> dict[str, list[str]]:
        """{image path: [VM names whose disks overlay it, and ``disk/<id>`` for retained
        disks that do: deleting the image would take their data]}."""
        users: dict[str, list[str]] = {}
        for record in self.store.all():
            for disk in record.document.vm.disks:
                if disk.file is not None and disk.file.image is not None:
                    path = str(self._image_path(disk.file.image))
                    users.setdefault(path, []).append(record.name)
        for found in self.retained.all():
            for overlay in found.disks:
                if overlay.backing_file is not None:
                    users.setdefault(overlay.backing_file, []).append(f"disk/{found.id}")
        return users

    async def import_image(
        self,
        name: str,
        source: str,
        *,
        checksum: str | None = None,
        progress: Callable[[int, int | None], None] | None = None,
        replace: bool = False,
    ) -> ImageRecord:
        """Import an http(s) URL, or a path on this host inside the policy's ``imagePaths``.

        Whoever calls this (an API client, maybe over TCP) names a file the daemon would
        read, so a host path is :class:`Forbidden` unless the host offers it: with no
        ``imagePaths`` every path is refused; a client sends its own file's bytes with
        :meth:`upload_image` instead.
        """
        path = host_path(source)
        roots = self._import_roots(source, path) if path is not None else None
        return await self._importing(
            name, progress, replace,
            lambda report, users: self.images.import_image(
                name, source, checksum=checksum, progress=report, replace=replace, users=users,
                local_roots=roots,
            ),
        )  # fmt: skip

    async def upload_image(
        self,
        name: str,
        chunks: AsyncIterable[bytes],
        *,
        total: int | None = None,
        filename: str | None = None,
        checksum: str | None = None,
        progress: Callable[[int, int | None], None] | None = None,
        replace: bool = False,
    ) -> ImageRecord:
        """Import the bytes a client sends (``total``: their announced length) as ``name``:
        verified, probed and published like any import; the record's source is
        ``upload:FILENAME``."""
        source = f"upload:{filename}" if filename else "upload"
        return await self._importing(
            name, progress, replace,
            lambda report, users: self.images.import_stream(
                name, chunks, total=total, source=source, checksum=checksum, progress=report,
                replace=replace, users=users,
            ),
        )  # fmt: skip

    def _import_roots(self, source: str, path: Path) -> list[str]:
        """The policy's ``imagePaths`` if ``source`` (host path ``path``) may be imported;
        else raise. The store checks the file it opens against them again."""
        allowed = self.policy.image_paths
        policy_file = self.config.policy_file or DEFAULT_POLICY_FILE
        if allowed is None:
            raise Forbidden(
                "refused by host policy",
                [FieldIssue("source", f"{source} is a path on the daemon's host, and this host "
                            "allows no host-path imports; set imagePaths in "
                            f"{policy_file} to the directories images may be imported from, "
                            "or upload the file (`corral image import NAME ./file` does)")],
            )  # fmt: skip
        if not os.path.isabs(source):
            raise SpecError(
                "invalid image import",
                [FieldIssue("source", f"{source!r} must be an absolute path on the daemon's host")],
            )
        if not path_within(str(path), allowed):
            raise Forbidden(
                "refused by host policy",
                [FieldIssue("source", f"{source} (resolved: {os.path.realpath(path)}) is "
                            f"outside the host's imagePaths {allowed} ({policy_file})")],
            )  # fmt: skip
        return allowed

    async def _importing(
        self,
        name: str,
        progress: Callable[[int, int | None], None] | None,
        replace: bool,
        run: Callable[[Progress, list[str]], Awaitable[ImageRecord]],
    ) -> ImageRecord:
        """An import's shared part: the VMs a replace must not pull the base from under,
        progress events, and the ImageImported/ImageImportFailed record."""
        users: list[str] = []
        if replace:
            with contextlib.suppress(NotFound):
                users = self.image_users().get(str(self.images.path(name)), [])

        def report(done: int, total: int | None) -> None:
            self._publish(
                StoredEvent(0, "", now_iso(), "ImageImportProgress",
                            {"image": name, "bytes": done, "total": total})
            )  # fmt: skip
            if progress is not None:
                progress(done, total)

        try:
            record = await run(report, users)
        except CorralError as exc:
            self._record_event("", "ImageImportFailed", {"image": name, "error": str(exc)})
            raise
        self._record_event("", "ImageImported", record.to_json())
        return record

    def list_images(self) -> list[tuple[ImageRecord, list[str]]]:
        users = self.image_users()
        return [(img, users.get(str(img.path), [])) for img in self.images.list()]

    async def delete_image(self, name: str) -> None:
        users = self.image_users().get(str(self.images.path(name)), [])
        await self.images.delete(name, users=users)

    # --- the API: retained disks (data dirs of deleted VMs) ---------------------------------

    def list_retained(self) -> list[RetainedSet]:
        return self.retained.all()

    async def delete_retained(self, ref: str) -> RetainedSet:
        """Delete a retained set (by id, or by the name of the VM that left only one)."""
        removed = await self.retained.delete(ref)
        self._record_event("", "RetainedDisksDeleted", {"id": removed.id})
        return removed

    # --- admission -------------------------------------------------------------------------

    def _parse(self, doc: VmDocument | Mapping[str, Any]) -> VmDocument:
        return doc if isinstance(doc, VmDocument) else parse_document(dict(doc))

    def _image_path(self, image: str) -> Path:
        """A disk's ``image``: an absolute path, or the name of an image in the store."""
        return Path(image) if "/" in image else self.images.path(image)

    def _runtime_document(self, doc: VmDocument) -> VmDocument:
        """The document the runner gets: image-store names resolved to paths."""
        if not any(d.file is not None and d.file.image and "/" not in d.file.image
                   for d in doc.vm.disks):  # fmt: skip
            return doc
        data = doc.model_dump(mode="json", by_alias=True, exclude_none=True)
        for disk in data["spec"]["vm"]["disks"]:
            image = disk.get("file", {}).get("image")
            if image and "/" not in image:
                disk["file"]["image"] = str(self.images.path(image))
        return parse_document(data)

    def _admit(self, doc: VmDocument) -> None:
        """Refuse (changing nothing) what this host must not run: policy, limits, files."""
        issues: list[FieldIssue] = []
        if doc.runner is not None:
            for field in _RUNNER_FIELDS_OWNED:
                if getattr(doc.runner, field) is not None:
                    camel = field.split("_")[0] + "".join(p.title() for p in field.split("_")[1:])
                    issues.append(FieldIssue(f"runner.{camel}", "is set by the manager; remove it"))
        for i, disk in enumerate(doc.vm.disks):
            image = disk.file.image if disk.file is not None else None
            if image and "/" not in image:
                try:
                    self.images.get(image)
                except NotFound:
                    issues.append(
                        FieldIssue(
                            f"spec.vm.disks[{i}].file.image",
                            f"no image {image!r} in the image store (corral image list)",
                        )
                    )
        if issues:
            raise PolicyError.of(issues)
        check_host(
            self._runtime_document(doc),
            self.policy,
            forbidden=self._own_dirs(),
            read_only_ok=[str(self.config.images)],
        )
        if doc.vm.state == "Running":
            self._check_capacity(doc)
            if not self._observe(doc.name).active:  # a running VM's own qemu holds them
                self._check_ports(doc)

    def _check_ports(self, doc: VmDocument) -> None:
        """The host ports the VM's qemu would listen on (port forwards, SPICE, VNC) are free,
        and no other VM running or desired Running asks for them: qemu exits at once when
        one is taken, and would again on every retry. :class:`Conflict` naming each field."""
        mine = host_ports(doc)
        if not mine:
            return
        others = [
            (record.name, port)
            for record in self.store.all()
            if record.name != doc.name and self._holds(record)
            for port in host_ports(record.document)
        ]
        issues = []
        for port in mine:
            owner = next((vm for vm, theirs in others if theirs.overlaps(port)), None)
            if owner is not None:
                issues.append(
                    FieldIssue(
                        port.field,
                        f"{port}: VM {owner!r} (running or desired Running) listens on it too",
                    )
                )
            elif (why := port_busy(port)) is not None:
                issues.append(FieldIssue(port.field, f"{port} is taken on this host ({why})"))
        if issues:
            raise Conflict("a host port this VM listens on is taken", issues)

    def _holds(self, record: VmRecord) -> bool:
        """Whether a VM holds its CPUs, RAM and ports: its qemu runs, or it is desired Running
        and not Failed (a Failed VM's qemu is stopped, and nothing starts it on its own)."""
        wanted = record.desired == "Running" and record.name not in self._failed
        return wanted or self._observe(record.name).active

    def _own_dirs(self) -> list[str]:
        """The manager's own files: no document path may point into them (the image store
        only through ``file.image``, other VMs' disks and the store never)."""
        c = self.config
        return sorted({str(c.state_dir), str(c.images), str(c.vms), str(c.run)})

    def _check_capacity(self, doc: VmDocument) -> None:
        cpus, ram = doc.vm.max_cpus, doc.vm.maximum_ram
        for record in self.store.all():
            if record.name != doc.name and self._holds(record):
                cpus += record.document.vm.max_cpus
                ram += record.document.vm.maximum_ram
        cpu_limit = int(_host_cpus() * self.config.cpu_overcommit)
        ram_limit = int(_host_ram() * self.config.ram_overcommit)
        issues = []
        if cpus > cpu_limit:
            issues.append(
                FieldIssue(
                    "spec.vm.maximumCpus",
                    f"VMs running, stopping or desired Running would have {cpus} CPUs; "
                    f"this host allows {cpu_limit} "
                    f"({_host_cpus()} cores x cpuOvercommit {self.config.cpu_overcommit:g})",
                )
            )
        if ram > ram_limit:
            issues.append(
                FieldIssue(
                    "spec.vm.maximumRam",
                    f"VMs running, stopping or desired Running would have {ram // 2**20} MiB; "
                    "this host allows "
                    f"{ram_limit // 2**20} MiB (ramOvercommit {self.config.ram_overcommit:g})",
                )
            )
        if issues:
            raise CapacityError.of(issues)

    # --- reconciling -----------------------------------------------------------------------

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

    def _timer_fired(self, name: str) -> None:
        self._timers.pop(name, None)
        self.kick(name)

    async def _worker(self, name: str) -> None:
        try:
            while name in self._dirty and self.reconciling:
                self._dirty.discard(name)
                async with self._pool, self._lock(name):
                    try:
                        await self._reconcile(name)
                    except CorralError as exc:
                        self._last_error[name] = str(exc)
                        self._record_event(name, "ReconcileFailed", {"error": str(exc)})
                        self._write_status(name)
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

    def _observe(self, name: str) -> Observed:
        return self.backend.observe(name)

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
                document = self._runtime_document(record.document)
                try:
                    await self.backend.apply(document)
                finally:
                    self._applied_generation[name] = record.generation
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
        async with self._autostart:
            if not self.reconciling:
                return
            self._backoff.setdefault(name, _Backoff()).attempt += 1
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
        backoff = self._backoff.setdefault(name, _Backoff())
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
        backoff = self._backoff.setdefault(name, _Backoff())
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

    # --- events and status -----------------------------------------------------------------

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
                judging = self._backoff.setdefault(name, _Backoff())
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

    def _spawn(self, coro: Coroutine[Any, Any, object]) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

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

    def _statuses_written(self, names: Iterable[str]) -> None:
        for name in names:
            self._status_changed(name)

    @property
    def store_unavailable(self) -> StoreUnavailable | None:
        """Why the daemon cannot write its own records to the store now (None: it can)."""
        return self._writeback.unavailable
