"""What every part of a :class:`~corral.runner.supervisor.VmSupervisor` shares: the VM's
document, paths and status, how it reports (the status file and sink, the event sink), its
background tasks, and qemu's process (spawn, kill, its exit as a future).

The supervisor is built from mixins on top of :class:`SupervisorCore`, one per seam:
:class:`~corral.runner.live.LiveSettings` (apply a document live),
:class:`~corral.runner.watchers.Watchers` (QMP events, exit, agent, console, logs, swtpm) and
:class:`~corral.runner.supervisor.VmSupervisor` itself (start, attach, stop, kill, reset).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass

from corral.errors import CorralError, HostError
from corral.host import (
    Swtpm,
    find_qemu,
)
from corral.qemu.agent import GuestAgent
from corral.qemu.monitor import Monitor
from corral.runner.config import RunnerPaths, machine_uuid
from corral.runner.contract import EventSink, StatusSink
from corral.runner.filechannel import write_status
from corral.runner.states import check_state
from corral.runner.status import (
    Condition,
    VmState,
    VmStatus,
    make_event,
    now_iso,
)
from corral.spec import HostPolicy, VmDocument
from corral.spec.models import default_uuid

__all__ = ["LIFECYCLE", "ExitInfo", "SupervisorCore", "merged", "one_line", "watch_pid"]

_KILL_WAIT = 5.0
CANCEL_WAIT = 2.0
"""Seconds a supervisor waits for a task it cancelled to end (a task never outlives it)."""
LIFECYCLE = (Condition.BOOTED, Condition.AGENT_CONNECTED, Condition.DISPLAY_CONNECTED)
"""Conditions every VM has; TpmAvailable (useTpm) and QmpConnected (an orphan) only when
they say something."""


@dataclass(frozen=True)
class ExitInfo:
    code: int | None
    signal: int | None
    known: bool  # False when qemu was not our child (re-attached): no exit status to read

    def to_json(self) -> dict[str, object]:
        return {"code": self.code, "signal": self.signal, "known": self.known}


class SupervisorCore:
    """State and reporting of one VM's supervisor (see the module docstring)."""

    def __init__(
        self,
        doc: VmDocument,
        paths: RunnerPaths,
        policy: HostPolicy,
        *,
        accelerator: str | None = None,
        events: EventSink | None = None,
        boot_marker: str | None = None,
        on_status: StatusSink | None = None,
        status_sinks: Sequence[StatusSink] | None = None,
    ) -> None:
        """Each status goes to ``status_sinks`` (default: the status file of ``paths``, the
        file channel; a placement that reports elsewhere, a Kubernetes status patch, gives
        its own), then to ``on_status``."""
        self.doc = doc
        self.paths = paths
        self.policy = policy
        self.status = VmStatus(name=doc.name)
        self._accel_override = accelerator
        self._sink = events
        self._boot_marker = boot_marker
        self._status_sinks: list[StatusSink] = (
            list(status_sinks) if status_sinks is not None else [self._write_status_file]
        )
        if on_status is not None:
            self._status_sinks.append(on_status)
        self._started_doc: VmDocument | None = None
        self._proc: asyncio.subprocess.Process | None = None
        self._pid: int | None = None
        self._monitor: Monitor | None = None
        self._agent: GuestAgent | None = None
        self._swtpm: Swtpm | None = None
        self._exited: asyncio.Future[ExitInfo] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._reaper: asyncio.Future[None] | None = None
        self._stopping = False
        self._restart_on_exit = False
        self._shutdown_seen = asyncio.Event()
        self._kill_requested = asyncio.Event()  # kill() aborts a stop() waiting on powerdown
        self._needs_restart: list[str] = []  # faults only a restart mends (swtpm died)
        self._finished = asyncio.Event()
        self._lock = asyncio.Lock()
        self._displays = 0
        self._want_cpus_online = False
        self._console_offset = 0
        self._tail_from = 0  # console.log offset where this qemu's output begins, if known
        self._secret_applied: tuple[str | None, str | None] | None = None
        self._fd_media: dict[str, str] = {}  # /dev/fdset/N -> the CD image passed as it

    # --- reporting -------------------------------------------------------------------------

    def _event(self, kind: str, **fields: object) -> None:
        if self._sink is not None:
            self._sink(make_event(self.doc.name, kind, **fields))

    def _publish(self) -> None:
        self.status.updated_at = now_iso()
        for sink in self._status_sinks:
            try:
                sink(self.status)
            except OSError as exc:
                self._event("StatusWriteFailed", error=str(exc))

    def _write_status_file(self, status: VmStatus) -> None:
        """The default status sink: the file channel's status file (of the current paths:
        :meth:`retarget` may change them)."""
        write_status(self.paths.status_file, status)

    def _set_state(self, state: VmState, **fields: object) -> None:
        if self.status.state is not state:
            previous = self.status.state
            self.status.state = state
            self._event("StateChanged", state=state.value, previous=previous.value, **fields)
        self._publish()

    def _condition(self, condition: Condition, value: bool, reason: str) -> None:
        if self.status.set_condition(condition, value, reason):
            self._event("ConditionChanged", condition=condition.value, status=value, reason=reason)
            if condition is Condition.BOOTED and value:
                self.status.booted_at = now_iso()
            self._publish()

    @property
    def state(self) -> VmState:
        return self.status.state

    @property
    def pid(self) -> int | None:
        return self._pid

    @property
    def boot_marker(self) -> str | None:
        """Text on the serial console that means "booted": the runner's option, else the
        document's ``runner.bootMarker`` (read at each start, so an applied one counts)."""
        if self._boot_marker:
            return self._boot_marker
        return self.doc.runner.boot_marker if self.doc.runner is not None else None

    def retarget(self, doc: VmDocument, paths: RunnerPaths, policy: HostPolicy) -> None:
        """A stopped VM's next start uses this document, these paths and this policy (the
        document may name another emulator; the manager may own other files now)."""
        check_state(self, (VmState.STOPPED, VmState.CRASHED), "retarget")
        self.doc = doc
        self.paths = paths
        self.policy = policy

    @property
    def files(self) -> RunnerPaths:
        """The VM's files (the same :class:`RunnerPaths` as :attr:`paths`)."""
        return self.paths

    @property
    def agent(self) -> GuestAgent | None:
        return self._agent if self.status.condition(Condition.AGENT_CONNECTED) else None

    @property
    def monitor(self) -> Monitor | None:
        return self._monitor

    async def wait_finished(self) -> VmState:
        """Until the VM is Stopped or Crashed with no restart coming; returns that state."""
        await self._finished.wait()
        return self.status.state

    # --- tasks and qemu's process ----------------------------------------------------------

    def _spawn_task(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            self._event("InternalError", error=repr(exc))

    def _live_qemus(self) -> list[int]:
        """This VM's qemu processes, found by argv (pidfile path, or UUID and name)."""
        doc = self.doc
        uuid = machine_uuid(doc, self.paths) or default_uuid(doc.name)
        return find_qemu(self.files.pidfile, uuid=str(uuid), name=doc.name)

    async def _spawn(self, argv: list[str], pass_fds: tuple[int, ...] = ()) -> None:
        for stale in (self.files.qmp, self.files.qga, self.files.pidfile):
            stale.unlink(missing_ok=True)
        try:
            self._console_offset = self.files.console_log.stat().st_size
        except OSError:
            self._console_offset = 0
        loop = asyncio.get_running_loop()
        with open(self.files.stderr, "ab") as stderr:
            stderr.write(f"--- {now_iso()} starting qemu\n".encode())  # see _STARTING
            stderr.flush()
            try:
                self._proc = await asyncio.create_subprocess_exec(
                    *argv,
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=stderr,
                    stderr=stderr,
                    start_new_session=True,
                    pass_fds=pass_fds,
                )
            except OSError as exc:
                raise HostError(f"cannot start {argv[0]}: {exc}") from exc
        self._pid = self.status.pid = self._proc.pid
        proc = self._proc
        exited: asyncio.Future[ExitInfo] = loop.create_future()
        self._exited = exited

        async def reap() -> None:
            rc = await proc.wait()
            if not exited.done():
                exited.set_result(
                    ExitInfo(
                        code=rc if rc >= 0 else None, signal=-rc if rc < 0 else None, known=True
                    )
                )

        self._reaper = asyncio.ensure_future(reap())

    async def _kill_qemu(self) -> None:
        pid = self._pid
        if pid is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        if self._exited is not None:
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(self._exited), _KILL_WAIT)

    async def _start_locked(self) -> None:
        """Start qemu, the lock held (:class:`~corral.runner.supervisor.VmSupervisor`); a
        watcher restarts a guest that rebooted itself through it."""
        raise NotImplementedError


def merged(first: list[str], more: list[str]) -> list[str]:
    return [*first, *(m for m in more if m not in first)]


def one_line(exc: CorralError) -> str:
    issues = "; ".join(str(i) for i in exc.issues)
    return f"{exc.message}: {issues}" if issues else exc.message


def watch_pid(pid: int) -> asyncio.Future[ExitInfo]:
    """A future that completes when a process that is not our child exits (pidfd)."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[ExitInfo] = loop.create_future()
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        fut.set_result(ExitInfo(None, None, known=False))
        return fut

    def on_exit() -> None:
        loop.remove_reader(fd)
        os.close(fd)
        if not fut.done():
            fut.set_result(ExitInfo(None, None, known=False))

    loop.add_reader(fd, on_exit)

    def cleanup(_: asyncio.Future[ExitInfo]) -> None:
        if fut.cancelled():
            with contextlib.suppress(Exception):
                loop.remove_reader(fd)
                os.close(fd)

    fut.add_done_callback(cleanup)
    return fut
