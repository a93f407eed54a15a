"""The embedded placement (default): one :class:`~corral.runner.supervisor.VmSupervisor` per
VM inside the daemon. qemu runs detached in its own session, so the daemon can die or be
upgraded without stopping a VM, and re-attaches by pidfile + QMP socket when it comes back.
Data under ``data_root/<name>``, runtime files (sockets, pidfiles, status) under
``run_root/<name>``.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from corral.errors import CorralError, NotFound
from corral.manager.backends.base import (
    Capability,
    Capacity,
    ConsoleStream,
    EventCallback,
    Observed,
    StatusCallback,
    open_unix_console,
)
from corral.manager.retained import RetainedDisks, RetainedSet
from corral.runner.changes import write_display_secret
from corral.runner.config import LogSource, RunnerPaths, resolve_paths
from corral.runner.status import VmState
from corral.runner.supervisor import ExecResult, VmSupervisor
from corral.spec import HostPolicy, VmDocument

if TYPE_CHECKING:
    from corral.manager.config import ManagerConfig

__all__ = ["EmbeddedBackend"]


class EmbeddedBackend:
    """Supervisors inside the daemon; it can do everything a runner can."""

    name = "embedded"
    capabilities = frozenset(Capability)

    def __init__(
        self,
        data_root: Path,
        run_root: Path,
        policy: HostPolicy,
        on_event: EventCallback,
        *,
        accelerator: str | None = None,
        on_status: StatusCallback | None = None,
    ) -> None:
        self.data_root = data_root
        self.retained = RetainedDisks(data_root)
        self._on_status = on_status
        self.run_root = run_root
        self.policy = policy
        self._on_event = on_event
        self._accelerator = accelerator
        self._sups: dict[str, VmSupervisor] = {}

    @classmethod
    def from_config(
        cls,
        config: ManagerConfig,
        policy: HostPolicy,
        on_event: EventCallback,
        on_status: StatusCallback,
    ) -> EmbeddedBackend:
        return cls(
            config.vms, config.run, policy, on_event,
            accelerator=config.accelerator, on_status=on_status,
        )  # fmt: skip

    def capacity(self) -> Capacity:
        return Capacity.this_host()

    def _placed(self, name: str) -> RunnerPaths:
        return RunnerPaths.placed(self.data_root / name, self.run_root / name)

    def paths(self, doc: VmDocument) -> RunnerPaths:
        placed = self._placed(doc.name)
        return resolve_paths(
            doc,
            data_dir=str(placed.data_dir),
            runtime_dir=str(placed.runtime_dir),
            status_file=str(placed.status_file),
            display_secret_file=str(placed.display_secret_default),
        )

    def _supervisor(self, doc: VmDocument) -> VmSupervisor:
        sup = self._sups.get(doc.name)
        if sup is None:
            name = doc.name

            def sink(event: dict[str, Any]) -> None:
                self._on_event(name, event)

            def status_changed(_: object) -> None:
                if self._on_status is not None:
                    self._on_status(name)

            sup = VmSupervisor(
                doc, self.paths(doc), self.policy, accelerator=self._accelerator, events=sink,
                on_status=status_changed,
            )  # fmt: skip
            self._sups[name] = sup
        elif sup.state in (VmState.STOPPED, VmState.CRASHED):
            sup.retarget(doc, self.paths(doc), self.policy)
        return sup

    def _get(self, name: str) -> VmSupervisor:
        sup = self._sups.get(name)
        if sup is None:
            raise NotFound(f"VM {name!r} has no runner")
        return sup

    async def adopt(self, doc: VmDocument) -> bool:
        return await self._supervisor(doc).attach()

    async def start(self, doc: VmDocument) -> None:
        await self._supervisor(doc).start()

    async def stop(self, name: str, timeout: float | None = None) -> str:
        sup = self._sups.get(name)
        if sup is None:
            return "already-stopped"
        return await sup.stop(timeout=timeout)

    async def kill(self, name: str) -> None:
        sup = self._sups.get(name)
        if sup is not None:
            await sup.kill()

    async def reset(self, name: str) -> None:
        await self._get(name).reset()

    async def apply(self, doc: VmDocument) -> list[str]:
        return await self._supervisor(doc).apply(doc)

    def observe(self, name: str) -> Observed:
        sup = self._sups.get(name)
        if sup is None:
            return Observed(VmState.STOPPED)
        return Observed(sup.state, sup.status.to_json())

    def supervisor(self, name: str) -> VmSupervisor | None:
        """The VM's supervisor (for the guest agent and console), if it has one."""
        return self._sups.get(name)

    def open_console(self, name: str) -> AbstractAsyncContextManager[ConsoleStream]:
        return open_unix_console(self._get(name).console_socket, name)

    def log_file(self, name: str, source: LogSource) -> Path:
        sup = self._sups.get(name)
        if sup is not None:
            return sup.paths.log_file(source)
        return self._placed(name).log_file(source)

    async def set_display_password(self, name: str, password: str, expiry: str) -> None:
        sup = self._get(name)
        secret = sup.paths.display_secret_file or self._placed(name).display_secret_default
        await asyncio.to_thread(write_display_secret, secret, password, expiry)
        await sup.display_secret_changed()

    async def exec(
        self, name: str, argv: list[str], *, stdin: bytes | None = None, timeout: float = 60.0
    ) -> ExecResult:
        return await self._get(name).exec(argv, stdin=stdin, timeout=timeout)

    async def block_stats(self, name: str) -> list[dict[str, Any]]:
        sup = self._sups.get(name)
        return await sup.block_stats() if sup is not None else []

    async def forget(self, name: str, *, delete_disks: bool) -> RetainedSet | None:
        sup = self._sups.pop(name, None)
        if sup is not None and sup.state not in (VmState.STOPPED, VmState.CRASHED):
            raise CorralError(f"VM {name!r} is still {sup.state.value}")
        shutil.rmtree(self._placed(name).runtime_dir, ignore_errors=True)
        return await self.retained.release(name, delete=delete_disks)

    async def close(self) -> None:
        for sup in list(self._sups.values()):
            with contextlib.suppress(CorralError):
                await sup.detach()
        self._sups.clear()
