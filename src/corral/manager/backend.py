"""Where a VM's runner lives: the interface between the manager and a placement.

The manager only ever says *what* should happen to a VM (adopt what runs, start, stop, apply a
new document, reset, kill, forget) and reads back what is observed; a backend decides *where*
the runner runs. The same interface fits the Kubernetes operator later (a pod per VM, status
from the pod and the runner's status file).

* :class:`EmbeddedBackend` (default): one :class:`~corral.runner.supervisor.VmSupervisor` per
  VM inside the daemon; qemu runs detached in its own session, so the daemon can die or be
  upgraded without stopping a VM, and re-attaches by pidfile + QMP socket when it comes back.
* :class:`~corral.manager.systemd.SystemdBackend`: one unit per VM running ``corral run``.

Backends report every runner event to ``on_event(name, event)``; the manager stores it and
reacts (a crash schedules a restart with backoff).
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from corral.errors import CorralError, NotFound
from corral.manager.retained import RetainedDisks, RetainedSet
from corral.runner.changes import write_display_secret
from corral.runner.config import LOG_SOURCES, LogSource, RunnerPaths, resolve_paths
from corral.runner.status import VmState
from corral.runner.supervisor import ExecResult, VmSupervisor
from corral.spec import HostPolicy, VmDocument

__all__ = ["Backend", "EmbeddedBackend", "EventCallback", "Observed"]

EventCallback = Callable[[str, dict[str, Any]], None]


@dataclass(frozen=True)
class Observed:
    """What a backend sees of one VM right now."""

    state: VmState
    status: dict[str, Any] = field(default_factory=dict)

    @property
    def active(self) -> bool:
        return self.state in (VmState.STARTING, VmState.RUNNING, VmState.STOPPING)


class Backend(Protocol):
    name: str

    async def adopt(self, doc: VmDocument) -> bool:
        """Take over a VM left running by an earlier daemon; True if it is running."""

    async def start(self, doc: VmDocument) -> None: ...

    async def stop(self, name: str, timeout: float | None = None) -> str:
        """Graceful stop; returns how it ended (powerdown, quit, kill, already-stopped)."""

    async def kill(self, name: str) -> None: ...

    async def reset(self, name: str) -> None: ...

    async def apply(self, doc: VmDocument) -> list[str]:
        """Hand a changed document to a running VM; returns what waits for a restart."""

    def observe(self, name: str) -> Observed: ...

    async def forget(self, name: str, *, delete_disks: bool) -> RetainedSet | None:
        """The VM is deleted (and stopped): drop runtime files; its data dir (disks, UUID,
        TPM, firmware vars) is retained for the user (returned) or, if asked, deleted.
        Implementations call :meth:`RetainedDisks.release`, so a new VM of the same name
        never inherits it."""

    def console_socket(self, name: str) -> Path:
        """The serial console's unix socket of a running VM."""

    def log_file(self, name: str, source: LogSource) -> Path:
        """The VM's console or qemu log (whether it ran or not; rotated copy: ``.1``)."""

    async def set_display_password(self, name: str, password: str, expiry: str) -> None:
        """Write the VM's manager-owned display secret and have the running VM apply it."""

    async def exec(
        self, name: str, argv: list[str], *, stdin: bytes | None = None, timeout: float = 60.0
    ) -> ExecResult:
        """Run a program in the guest (guest agent)."""

    async def close(self) -> None:
        """Stop supervising; every VM keeps running."""


class EmbeddedBackend:
    """Supervisors inside the daemon. Data under ``data_root/<name>``, runtime files (sockets,
    pidfiles, status) under ``run_root/<name>``."""

    name = "embedded"

    def __init__(
        self,
        data_root: Path,
        run_root: Path,
        policy: HostPolicy,
        on_event: EventCallback,
        *,
        accelerator: str | None = None,
        on_status: Callable[[str], None] | None = None,
    ) -> None:
        self.data_root = data_root
        self.retained = RetainedDisks(data_root)
        self._on_status = on_status
        self.run_root = run_root
        self.policy = policy
        self._on_event = on_event
        self._accelerator = accelerator
        self._sups: dict[str, VmSupervisor] = {}

    def paths(self, doc: VmDocument) -> RunnerPaths:
        return resolve_paths(
            doc,
            data_dir=str(self.data_root / doc.name),
            runtime_dir=str(self.run_root / doc.name),
            status_file=str(self.run_root / doc.name / "status.json"),
            display_secret_file=str(self.data_root / doc.name / "display-secret"),
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

    def console_socket(self, name: str) -> Path:
        return self._get(name).console_socket

    def log_file(self, name: str, source: LogSource) -> Path:
        sup = self._sups.get(name)
        if sup is not None:
            return sup.paths.log_file(source)
        return self.run_root / name / LOG_SOURCES[source]

    async def set_display_password(self, name: str, password: str, expiry: str) -> None:
        sup = self._get(name)
        secret = sup.paths.display_secret_file or self.data_root / name / "display-secret"
        await asyncio.to_thread(write_display_secret, secret, password, expiry)
        await sup.display_secret_changed()

    async def exec(
        self, name: str, argv: list[str], *, stdin: bytes | None = None, timeout: float = 60.0
    ) -> ExecResult:
        return await self._get(name).exec(argv, stdin=stdin, timeout=timeout)

    async def forget(self, name: str, *, delete_disks: bool) -> RetainedSet | None:
        sup = self._sups.pop(name, None)
        if sup is not None and sup.state not in (VmState.STOPPED, VmState.CRASHED):
            raise CorralError(f"VM {name!r} is still {sup.state.value}")
        shutil.rmtree(self.run_root / name, ignore_errors=True)
        return await self.retained.release(name, delete=delete_disks)

    async def close(self) -> None:
        for sup in list(self._sups.values()):
            with contextlib.suppress(CorralError):
                await sup.detach()
        self._sups.clear()
