"""The manager: desired state for many VMs on one host, and the loop that makes it so.

It keeps what should be (the store), observes what is (the backend), and closes the
difference. The Python API here (create, replace, patch, start, stop, restart, reset, kill,
delete, list, get, events, images, retained disks, stop_all) is what the REST API, the CLI
and the other interfaces call; it is async, typed, and raises the :mod:`corral.errors` tree.

The parts live beside this facade, one seam each: :mod:`~corral.manager.hub` (events,
waits), :mod:`~corral.manager.admission`, :mod:`~corral.manager.desired`,
:mod:`~corral.manager.reconcile` (the loop, backoff, Failed), :mod:`~corral.manager.images`
and :mod:`~corral.manager.guest`.

Lifecycle: :meth:`open` first re-attaches to every VM that still runs (pidfile + QMP), in
parallel, restarting none; only then does it reconcile, which starts the VMs that are desired
Running and have no qemu (a host reboot), ``autostartParallel`` at a time. :meth:`close`
leaves every VM running (upgrade-safe) unless asked to stop them (host shutdown).
"""

from __future__ import annotations

import asyncio
import copy
import logging
from collections.abc import Mapping
from typing import Any

from corral.errors import (
    Conflict,
    CorralError,
    NotFound,
    SpecError,
    StoreUnavailable,
    VersionConflict,
)
from corral.host.atomic import ensure_private_dir
from corral.host.images import ImageStore
from corral.manager.backends import Backend, Capability, create_backend, require_capability
from corral.manager.config import ManagerConfig
from corral.manager.guest import GuestAccess
from corral.manager.hub import ManagerState
from corral.manager.images import ImagesFacade
from corral.manager.reconcile import Reconciler
from corral.manager.retained import RetainedDisks, RetainedSet
from corral.manager.store import NOTHING_CHANGED, Store, VmRecord
from corral.manager.writeback import WriteBack
from corral.spec import HostPolicy, VmDocument, load_policy, parse_document

__all__ = ["Manager", "ManagerState", "json_merge_patch"]

_log = logging.getLogger("corral.manager")


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


class Manager(Reconciler, GuestAccess, ImagesFacade):
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
        self.backend = backend or create_backend(
            config, self.policy, self._on_event, self._write_status
        )
        self.state = ManagerState.NEW
        self._locks = {}
        self._dirty = set()
        self._workers = {}
        self._pool = asyncio.Semaphore(config.workers)
        self._applied_generation = {}
        self._backoff = {}
        self._timers = {}
        self._last_error = {}
        # VMs whose start failed the same way twice in a row: not started again until a user
        # starts them or changes their spec (state Failed); the error, to raise to waiters
        self._failed = {}
        self._subscribers = set()
        self._status_waiters = {}  # woken per write
        self.reconcile_observers = []  # /metrics: the reconcile latency histogram
        # events and statuses the daemon records on its own: written off the loop, kept and
        # retried while the store cannot be written
        self._writeback = WriteBack(self.store, self._publish, self._statuses_written)
        # desired states the daemon decided (restartPolicy Never, a guest's poweroff) that
        # the store has not taken yet: reconcile acts on them meanwhile
        self._pending_desired = {}
        self._resync = None
        self._background = set()
        self._passive = False
        self._suspended = False  # host shutdown: nothing is started again, nothing reconciled
        self._autostart = asyncio.Semaphore(config.autostart_parallel)
        self._autostarting = set()
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
            self._autostarting = {
                r.name for r, ok in zip(records, results, strict=True)
                if not ok and r.desired == "Running"
            }  # fmt: skip
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
        """Create or replace (``kubectl apply``; :func:`corral.manager.apply.apply_document`,
        which also says which it did); ``adopt_disks`` only when it creates."""
        from corral.manager.apply import apply_document

        if isinstance(doc, VmDocument):
            doc = doc.model_dump(mode="json", by_alias=True, exclude_none=True)
        return (await apply_document(self, doc, adopt_disks=adopt_disks))[1]

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
        require_capability(self.backend, Capability.RESET, "reset a VM (use restart)")
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
