"""Where a VM's runner lives: the interface between the manager and a placement.

The manager only ever says *what* should happen to a VM (adopt what runs, start, stop, apply a
new document, reset, kill, forget) and reads back what is observed; a backend decides *where*
the runner runs. The same interface fits the Kubernetes operator later (a pod per VM, status
from the pod and the runner's status file).

A backend says what it can do (:attr:`Backend.capabilities`); the manager asks before it
calls, and refuses with :class:`~corral.errors.Unsupported` (501) naming the backend and the
reason, so no backend has to raise for what it was never asked to do. The console is a byte
stream (:meth:`Backend.open_console`), not a local path: a placement on another host (a pod)
serves it over its own transport.

Backends report every runner event to ``on_event(name, event)``; the manager stores it and
reacts (a crash schedules a restart with backoff).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from corral.errors import CorralError, NotFound, Unsupported
from corral.qemu.agent import ExecResult
from corral.runner.config import LogSource
from corral.runner.status import VmState
from corral.spec import HostPolicy, VmDocument

if TYPE_CHECKING:
    from contextlib import AbstractAsyncContextManager

    from corral.manager.config import ManagerConfig
    from corral.manager.retained import RetainedSet

__all__ = [
    "Backend",
    "BackendFactory",
    "Capability",
    "Capacity",
    "ConsoleStream",
    "EventCallback",
    "Observed",
    "StatusCallback",
    "open_stream",
    "open_unix_console",
    "require_capability",
]

EventCallback = Callable[[str, dict[str, Any]], None]
StatusCallback = Callable[[str], None]
ConsoleStream = tuple[asyncio.StreamReader, asyncio.StreamWriter]


class Capability(StrEnum):
    """What a placement can do besides start, stop, kill, apply and observe."""

    EXEC = "exec"  # run a program in the guest (guest agent)
    CONSOLE = "console"  # the serial console as a byte stream
    RESET = "reset"  # a hard reset of the running VM
    LIVE_APPLY = "live_apply"  # a changed document reaches the running VM
    DISPLAY = "display"  # a display password set on the running VM
    BLOCK_STATS = "block_stats"  # per-drive I/O counters of the running VM (query-blockstats)


@dataclass(frozen=True)
class Observed:
    """What a backend sees of one VM right now."""

    state: VmState
    status: dict[str, Any] = field(default_factory=dict)

    @property
    def active(self) -> bool:
        return self.state in (VmState.STARTING, VmState.RUNNING, VmState.STOPPING)


@dataclass(frozen=True)
class Capacity:
    """What a placement offers VMs in all, before the manager's overcommit factors: CPUs
    (cores) and RAM (bytes). The manager counts what is used against it."""

    cpus: int
    ram: int

    @classmethod
    def this_host(cls) -> Capacity:
        """The cores this process may run on, and the host's physical memory."""
        return cls(
            len(os.sched_getaffinity(0)), os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        )


class Backend(Protocol):
    name: str
    capabilities: frozenset[Capability]

    def capacity(self) -> Capacity:
        """What this placement offers in all (the manager counts the VMs it holds)."""

    async def adopt(self, doc: VmDocument) -> bool:
        """Take over a VM left running by an earlier daemon; True if it is running."""

    async def start(self, doc: VmDocument) -> None: ...

    async def stop(self, name: str, timeout: float | None = None) -> str:
        """Graceful stop; returns how it ended (powerdown, quit, kill, already-stopped)."""

    async def kill(self, name: str) -> None: ...

    async def reset(self, name: str) -> None:
        """Only called if :attr:`capabilities` has :attr:`Capability.RESET`."""

    async def apply(self, doc: VmDocument) -> list[str]:
        """Hand a changed document to a running VM; returns what waits for a restart."""

    def observe(self, name: str) -> Observed: ...

    async def forget(self, name: str, *, delete_disks: bool) -> RetainedSet | None:
        """The VM is deleted (and stopped): drop runtime files; its data dir (disks, UUID,
        TPM, firmware vars) is retained for the user (returned) or, if asked, deleted.
        Implementations call :meth:`RetainedDisks.release`, so a new VM of the same name
        never inherits it."""

    def open_console(self, name: str) -> AbstractAsyncContextManager[ConsoleStream]:
        """The serial console of a running VM as a (reader, writer) byte stream, closed on
        exit; :class:`NotFound` if it has none. Only with :attr:`Capability.CONSOLE`."""

    def log_file(self, name: str, source: LogSource) -> Path:
        """The VM's console or qemu log (whether it ran or not; rotated copy: ``.1``)."""

    async def set_display_password(self, name: str, password: str, expiry: str) -> None:
        """Write the VM's manager-owned display secret and have the running VM apply it."""

    async def block_stats(self, name: str) -> list[dict[str, Any]]:
        """qemu's ``query-blockstats`` of the running VM (empty when it is not running). Only
        with :attr:`Capability.BLOCK_STATS`."""

    async def exec(
        self, name: str, argv: list[str], *, stdin: bytes | None = None, timeout: float = 60.0
    ) -> ExecResult:
        """Run a program in the guest (guest agent). Only with :attr:`Capability.EXEC`."""

    async def close(self) -> None:
        """Stop supervising; every VM keeps running."""


class BackendFactory(Protocol):
    """The one signature every registered backend is built with (``from_config``)."""

    def __call__(
        self,
        config: ManagerConfig,
        policy: HostPolicy,
        on_event: EventCallback,
        on_status: StatusCallback,
    ) -> Backend: ...


def require_capability(backend: Backend, capability: Capability, what: str) -> None:
    """:class:`Unsupported` (501) if ``backend`` cannot do ``capability``."""
    if capability not in backend.capabilities:
        raise Unsupported(
            f"the {backend.name} backend cannot {what} (it does not declare {capability.value!r};"
            f" it can: {', '.join(sorted(c.value for c in backend.capabilities)) or 'none'})"
        )


@contextlib.asynccontextmanager
async def open_stream(
    connect: Callable[[], Awaitable[ConsoleStream]],
    refuse: Callable[[Exception], CorralError],
    timeout: float = 5.0,
) -> AsyncIterator[ConsoleStream]:
    """A stream from ``connect`` (an ``asyncio.open_*connection``) within ``timeout``, closed
    on exit; a connection that fails or times out raises ``refuse(exc)``."""
    try:
        reader, writer = await asyncio.wait_for(connect(), timeout)
    except (OSError, TimeoutError) as exc:
        raise refuse(exc) from exc
    try:
        yield reader, writer
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


def open_unix_console(path: Path, name: str) -> AbstractAsyncContextManager[ConsoleStream]:
    """The console stream of a placement on this host: qemu's console socket at ``path``
    (qemu serves one client at a time; a second waits in the listen queue)."""
    return open_stream(
        lambda: asyncio.open_unix_connection(str(path)),
        lambda exc: NotFound(f"console unavailable: {exc}"),
    )
