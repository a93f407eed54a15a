"""``VmSupervisor``: one VM, from files on disk to a running qemu and back.

The same supervisor runs inside ``corral run`` (a process, a systemd unit, a pod) and inside
the manager daemon. It owns:

* **start**: data dir (overlays, OVMF vars, cloud-init seed, TPM state), swtpm, then qemu
  started paused (``-S``) in its own session, so that the supervisor's death never kills it;
  then QMP, live settings (display password, balloon), ``cont``.
* **attach**: the same VM found alive by pidfile + QMP socket after a supervisor restart.
* **stop**: ACPI powerdown, wait up to ``powerdownTimeout``, ``quit``, SIGKILL; swtpm after.
* **apply**: a new document: live changes over QMP and the guest agent, the rest reported as
  pending restart; a refused document changes nothing.
* **watch**: qemu's exit (Crashed when nobody asked), QMP events, the guest agent (whose
  replies are checked and bounded), and console.log/qemu.log (rotated at the policy's cap).

State machine (methods are guarded by state)::

    Stopped/Crashed --start--> Starting --> Running --stop--> Stopping --> Stopped
                                              |  qemu died on its own --> Crashed
                                              |  guest powered off: guestShutdownStops
                                              |      ? Stopped : restart (Starting)

This module holds the lifecycle (start, attach, stop, kill, reset; guarded by state with
:func:`~corral.runner.states.require`); the rest is in mixins: :mod:`.core` (state,
reporting, qemu's process), :mod:`.live` (apply) and :mod:`.watchers`; :mod:`.prepare` makes
the VM's files and taps.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from pathlib import Path
from typing import Any, Literal

from corral.errors import Conflict, CorralError, QemuError
from corral.host import (
    Swtpm,
    process_age,
    process_exe_name,
    read_pidfile,
)
from corral.host.ports import busy_ports
from corral.qemu.agent import ExecResult
from corral.qemu.fingerprint import find_emulator, resolve_accelerator
from corral.qemu.monitor import Monitor
from corral.runner.changes import cdrom_media
from corral.runner.config import check_host, render_for_host
from corral.runner.core import CANCEL_WAIT, LIFECYCLE, ExitInfo, watch_pid
from corral.runner.filechannel import read_started, write_started
from corral.runner.prepare import open_taps, prepare_files
from corral.runner.states import require
from corral.runner.status import (
    Condition,
    VmState,
    now_iso,
    write_atomic,
)
from corral.runner.watchers import Watchers, boot_failure
from corral.spec import VmDocument

__all__ = ["POWERDOWN_REPEAT", "ExecResult", "ExitInfo", "VmSupervisor", "boot_failure"]

_QUIT_WAIT = 10.0
_DETACHED: set[asyncio.subprocess.Process] = set()  # qemus detach() left running
POWERDOWN_REPEAT = 10.0
"""Seconds between ACPI power-button presses while a stop waits for the guest: one that missed
the first (still booting, acpid not up yet, a desktop that asked and got no answer) gets
another, until ``powerdownTimeout``."""


class VmSupervisor(Watchers):
    """One VM's lifecycle (see the module docstring); its parts are in :mod:`.core`,
    :mod:`.live` and :mod:`.watchers`."""

    # --- start -----------------------------------------------------------------------------

    async def start(self) -> None:
        async with self._lock:
            await self._start_locked()

    @require(VmState.STOPPED, VmState.CRASHED, action="start")
    async def _start_locked(self) -> None:
        doc = self.doc
        check_host(doc, self.policy, self.paths.emulator)
        running = self._live_qemus()
        if running:
            raise Conflict(
                f"VM {doc.name}: its qemu (pid {running[0]}) is still running; "
                "stop or kill it before starting another"
            )
        self._finished.clear()
        self._stopping = False
        self._restart_on_exit = False
        self._shutdown_seen.clear()
        self.status.stopped_by = None
        self.status.exit = None
        self.status.pending_restart = []
        self._needs_restart = []
        self.status.started_at = now_iso()
        self.status.booted_at = None
        self.status.stopped_at = None
        for cond in LIFECYCLE:  # reason and message too: no BootTimeout of the last run
            self.status.report_condition(cond, False, "Starting", None)
        for cond in (Condition.TPM_AVAILABLE, Condition.QMP_CONNECTED):
            self.status.conditions.pop(cond.value, None)
        self._set_state(VmState.STARTING)
        try:
            busy = busy_ports(doc)
            if busy:  # qemu would exit at once, and again on every retry
                raise Conflict(f"VM {doc.name}: a host port it listens on is taken", busy)
            await prepare_files(doc, self.paths)
            emulator = find_emulator(self.paths.emulator)
            accel = self._accel_override or resolve_accelerator(doc.vm.accelerator.value, emulator)
            taps = await open_taps(doc, self.policy)
            try:
                argv = render_for_host(
                    doc, self.paths, self.policy, accelerator=accel, paused=True,
                    no_shutdown=True, tap_fds=taps,
                )  # fmt: skip
                self.status.accelerator = accel
                await self._start_swtpm(doc)
                await self._spawn(argv, pass_fds=tuple(taps.values()))
                self._tail_from = self._console_offset
            finally:
                for fd in taps.values():
                    os.close(fd)
            assert self._exited is not None
            self._monitor = await Monitor.connect(self.files.qmp, timeout=30, alive=self._exited)
            self._started_doc = doc
            write_started(
                self.files.started,
                doc,
                argv,
                started_at=self.status.started_at,
                accelerator=accel,
            )
            self._watch()
            await self._apply_display_secret(force=True)
            if doc.vm.current_ram is not None and doc.vm.cur_ram < doc.vm.maximum_ram:
                await self._monitor.execute("balloon", {"value": doc.vm.cur_ram})
            await self._monitor.execute("cont")
        except BaseException as exc:
            failure = self._start_failure(exc)
            await self._abort_start(failure)
            if failure is exc:
                raise
            raise failure from exc
        await self._refresh_live()
        self.status.cdrom = cdrom_media(doc)
        self._set_state(VmState.RUNNING, pid=self._pid)

    def _start_failure(self, exc: BaseException) -> BaseException:
        """A start that failed once qemu was spawned says what qemu said: its last stderr
        lines (:meth:`_stderr_tail`) and how it exited join the error, and are its
        ``stderr``. Other failures pass unchanged."""
        if not isinstance(exc, QemuError) or self._pid is None or exc.stderr:
            return exc
        tail = self._stderr_tail()
        if not tail:
            return exc
        how = ""
        exited = self._exited
        if exited is not None and exited.done() and not exited.cancelled():
            info = exited.result()
            how = (
                f" (exit code {info.code})" if info.code is not None
                else f" (signal {info.signal})" if info.signal is not None
                else ""
            )  # fmt: skip
        return QemuError(f"{exc.message}{how}; qemu said:\n{tail}", exc.issues, stderr=tail)

    async def _abort_start(self, exc: BaseException) -> None:
        said = {"stderr": exc.stderr} if isinstance(exc, QemuError) and exc.stderr else {}
        self._event("StartFailed", error=str(exc), type=type(exc).__name__, **said)
        self._stopping = True
        spawned = self._pid is not None
        for task in list(self._tasks):
            task.cancel()
        await self._kill_qemu()
        await self._teardown()
        self.status.exit = {"error": str(exc)}
        if spawned:
            self.status.exit["stderr"] = self._stderr_tail()
        self.status.pid = None
        self._set_state(VmState.CRASHED if spawned else VmState.STOPPED)
        self._finished.set()

    async def _start_swtpm(self, doc: VmDocument) -> None:
        if not doc.vm.use_tpm:
            return
        existing = Swtpm.attach(self.files.swtpm_pid, self.files.swtpm_sock)
        if existing is not None:
            await existing.stop()
        self._swtpm = Swtpm()
        self.status.swtpm_pid = await self._swtpm.start(
            self.paths.tpm_state,
            self.files.swtpm_sock,
            self.files.swtpm_pid,
            self.files.swtpm_log,
        )

    # --- attach ----------------------------------------------------------------------------

    async def attach(self) -> bool:
        """Re-attach to this VM's qemu if it is alive; False if it is not.

        The qemu is found by its pidfile, confirmed by its argv, and else by its argv alone
        (the runtime dir may be gone): see :func:`~corral.host.process.find_qemu`. One whose
        QMP socket is gone cannot be controlled, yet runs: it is reported (event
        ``OrphanedQemuFound``, condition ``QmpConnected`` False), Running, never started
        twice, and stop/kill end it by signal."""
        async with self._lock:
            found = await self._attach_locked()
        if found == "attached":
            with contextlib.suppress(CorralError):  # a refused document is reported in status
                await self.apply(self.doc)
        return found != "none"

    @require(VmState.STOPPED, VmState.CRASHED, action="attach")
    async def _attach_locked(self) -> Literal["none", "orphan", "attached"]:
        live = self._live_qemus()
        pid = read_pidfile(self.files.pidfile)
        if pid is None or pid not in live:
            pid = live[0] if live else None
        if pid is None or "qemu" not in (process_exe_name(pid) or ""):
            return "none"
        self._pid = self.status.pid = pid
        self._proc = None
        self._exited = watch_pid(pid)
        # qemu makes its QMP socket within ms of starting: one seconds older than that
        # without it never will (its runtime dir was deleted), so do not wait 10 s for it
        age = process_age(pid)
        patience = 10.0 if self.files.qmp.exists() or age is None else max(0.0, 5.0 - age)
        try:
            self._monitor = await Monitor.connect(
                self.files.qmp, timeout=patience, alive=self._exited
            )
        except QemuError as exc:
            if self._exited.done():
                self._pid = self.status.pid = None
                return "none"
            self._adopt_orphan(pid, exc)
            return "orphan"
        self._finished.clear()
        self._stopping = False
        started = self._load_started()
        self._started_doc = started[0] if started else self.doc
        if started:
            self.status.started_at, self.status.accelerator = started[1], started[2]
        self._swtpm = Swtpm.attach(self.files.swtpm_pid, self.files.swtpm_sock)
        self.status.swtpm_pid = self._swtpm.pid if self._swtpm else None
        self._needs_restart = []
        if self._swtpm is None and self._started_doc.vm.use_tpm:
            self._swtpm_lost(read_pidfile(self.files.swtpm_pid))
        try:
            self._console_offset = self.files.console_log.stat().st_size
        except OSError:
            self._console_offset = 0
        self._tail_from = 0  # what it printed before this runner came is its too
        self._watch()
        run = await self._monitor.query_dict("query-status")
        if run.get("status") == "prelaunch" or run.get("status") == "paused":
            await self._monitor.execute("cont")
        await self._refresh_live()
        self.status.cdrom = cdrom_media(self._started_doc)
        self._event("Attached", pid=pid)
        self._set_state(VmState.RUNNING, pid=pid, attached=True)
        return "attached"

    def _adopt_orphan(self, pid: int, exc: QemuError) -> None:
        """A live qemu of this VM whose QMP socket is gone (runtime dir deleted): watch it
        for its exit, say the truth, and keep it from being started twice."""
        self.paths.runtime_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        with contextlib.suppress(OSError):
            write_atomic(self.files.pidfile, f"{pid}\n".encode(), 0o600)
        self._finished.clear()
        self._stopping = False
        self._started_doc = self.doc
        self.status.swtpm_pid = None
        for cond in LIFECYCLE:
            self.status.report_condition(cond, False, "QmpUnavailable", None)
        self.status.set_condition(Condition.QMP_CONNECTED, False, "QmpSocketGone")
        self._needs_restart = ["qemu has no QMP socket: stop and start the VM"]
        self.status.pending_restart = list(self._needs_restart)
        self._event(
            "OrphanedQemuFound",
            pid=pid,
            qmp=str(self.files.qmp),
            error=str(exc),
            hint="qemu runs but cannot be controlled; stop ends it by SIGTERM (no ACPI), "
            "kill by SIGKILL",
        )
        self._spawn_task(self._watch_exit())
        self._set_state(VmState.RUNNING, pid=pid, attached=True, orphaned=True)

    def _load_started(self) -> tuple[VmDocument, str | None, str | None] | None:
        """What the running qemu was started with: document, start time, accelerator."""
        record = read_started(self.files.started)
        if record is None:
            return None
        return record.document, record.started_at, record.accelerator

    # --- guest access ----------------------------------------------------------------------

    @property
    def console_socket(self) -> Path:
        """The serial console's unix socket (qemu serves one client at a time)."""
        return self.files.console

    async def exec(
        self, argv: list[str], *, stdin: bytes | None = None, timeout: float = 60.0
    ) -> ExecResult:
        """Run a program in the guest through the guest agent and wait for it."""
        agent = self.agent
        if agent is None or self.state is not VmState.RUNNING:
            raise QemuError(
                f"VM {self.doc.name}: the guest agent is not connected "
                f"(state {self.state.value}; is qemu-guest-agent running in the guest?)"
            )
        return await agent.exec(argv, stdin=stdin, timeout=timeout)

    # --- stop ------------------------------------------------------------------------------

    async def stop(self, *, timeout: float | None = None) -> str:
        """Graceful stop; returns how it ended: powerdown, quit, kill (or already-stopped).
        A guest that never booted (``Booted`` False with reason ``BootTimeout``) *and* shows
        proof that nothing in it can answer ACPI (qemu says the guest panicked; the console's
        last lines are a firmware's or kernel's failure: :func:`boot_failure`) is quit at once
        (event ``PowerdownSkipped``, ``quit-unbooted``) instead of waiting
        ``powerdownTimeout`` for nothing. Without proof it gets the whole timeout: a guest
        without an agent that did boot looks unbooted, and must power down cleanly.

        The ACPI request is repeated every :data:`POWERDOWN_REPEAT` seconds until the guest
        powers off or ``powerdownTimeout`` runs out (event ``PowerdownRepeated``). A
        :meth:`kill` while this waits for the guest aborts the wait at once: qemu gets SIGKILL
        and this returns ``kill``. A qemu without QMP (an orphan) gets SIGTERM, qemu's own
        clean quit, instead of an ACPI request.

        ``status.stoppedBy`` is written *before* each step (powerdown, quit, kill), in the same
        step that marks the stop: the exit watcher that reports Stopped when qemu goes away
        may run at any await here, and always finds how the stop is ending, never null."""
        async with self._lock:
            if self.state in (VmState.STOPPED, VmState.CRASHED):
                return "already-stopped"
            exited = self._exited
            monitor = self._monitor
            assert exited is not None
            self._stopping = True
            self._restart_on_exit = False
            self._kill_requested.clear()
            limit = self.doc.vm.powerdown_timeout if timeout is None else timeout
            # only proof that nothing in the guest can answer skips ACPI: a guest without an
            # agent that did boot looks the same as one that never did, and must power down
            unbooted = await self._cannot_answer_acpi(monitor)
            acpi = monitor is not None and limit > 0 and not exited.done() and not unbooted
            how = "powerdown" if acpi else "quit-unbooted" if unbooted else "quit"
            self.status.stopped_by = how
            if unbooted:
                self._event("PowerdownSkipped", reason="NeverBooted", evidence=unbooted,
                            timeout=limit)  # fmt: skip
            self._set_state(VmState.STOPPING)
            if acpi:
                assert monitor is not None
                try:
                    run = await monitor.query_dict("query-status")
                    if run.get("status") == "running":
                        await monitor.execute("system_powerdown")
                        self._event(
                            "PowerdownRequested", timeout=limit, repeatEvery=POWERDOWN_REPEAT
                        )
                        if await self._wait_powerdown(monitor, exited, limit) == "timeout":
                            self._event("PowerdownTimeout", timeout=limit)
                            how = "quit"
                    else:
                        how = "quit"  # paused or shut down: no guest to ask
                except QemuError as exc:
                    self._event("PowerdownFailed", error=str(exc))
                    how = "quit"
            if not exited.done() and not self._kill_requested.is_set():
                self.status.stopped_by = how  # before the quit: the exit it causes says so
                if monitor is not None:
                    with contextlib.suppress(QemuError):
                        await monitor.execute("quit", timeout=5)
                elif self._pid is not None:
                    self._event("QuitBySignal", pid=self._pid, signal="SIGTERM")
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(self._pid, signal.SIGTERM)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(exited), _QUIT_WAIT)
            if not exited.done() and not self._kill_requested.is_set():
                self.status.stopped_by = "kill"
                await self._kill_qemu()
            if self._kill_requested.is_set():  # kill() wrote stoppedBy before its SIGKILL
                self.status.stopped_by = "kill"
            how = self.status.stopped_by or how
        await self._finished.wait()
        return how

    async def _wait_powerdown(
        self, monitor: Monitor, exited: asyncio.Future[ExitInfo], limit: float
    ) -> str:
        """Until the guest powers off (``powerdown``), qemu exits, :meth:`kill` is called
        (``kill``) or ``limit`` seconds pass (``timeout``); the power button is pressed again
        every :data:`POWERDOWN_REPEAT` seconds meanwhile (timers, not polling)."""
        shutdown: asyncio.Future[Any] = asyncio.ensure_future(self._shutdown_seen.wait())
        gone: asyncio.Future[Any] = asyncio.ensure_future(asyncio.shield(exited))
        killed: asyncio.Future[Any] = asyncio.ensure_future(self._kill_requested.wait())
        loop = asyncio.get_running_loop()
        deadline = loop.time() + limit
        presses = 1
        try:
            while True:
                left = deadline - loop.time()
                if left <= 0:
                    return "timeout"
                done, _ = await asyncio.wait(
                    {shutdown, gone, killed},
                    timeout=min(left, POWERDOWN_REPEAT),
                    return_when=asyncio.FIRST_COMPLETED,
                )
                if done:
                    break
                if deadline - loop.time() <= 0:
                    return "timeout"
                presses += 1
                try:
                    await monitor.execute("system_powerdown")
                except QemuError as exc:  # qemu going away: `gone` ends the wait
                    self._event("PowerdownFailed", error=str(exc), attempt=presses)
                else:
                    self._event(
                        "PowerdownRepeated",
                        attempt=presses,
                        remaining=round(max(0.0, deadline - loop.time()), 1),
                    )
        finally:
            shutdown.cancel()
            gone.cancel()
            killed.cancel()
        return "kill" if self._kill_requested.is_set() else "powerdown"

    async def kill(self) -> None:
        """SIGKILL qemu now (the user asked for it: reported as Stopped, not Crashed).

        Never waits behind a graceful :meth:`stop` (which holds the lock for up to the
        powerdown timeout): that stop is aborted, and its caller is told ``kill``."""
        if self.state is VmState.STOPPING and self._lock.locked() and self._pid is not None:
            self._kill_requested.set()
            self._restart_on_exit = False
            self.status.stopped_by = "kill"
            self._event("StopAborted", by="kill", pid=self._pid)
            await self._kill_qemu()
            await self._finished.wait()
            return
        async with self._lock:
            if self.state in (VmState.STOPPED, VmState.CRASHED):
                return
            self._stopping = True
            self._restart_on_exit = False
            self.status.stopped_by = "kill"
            self._set_state(VmState.STOPPING)
            await self._kill_qemu()
        await self._finished.wait()

    async def reset(self) -> None:
        async with self._lock:
            await self._reset_locked()

    @require(VmState.RUNNING, action="reset")
    async def _reset_locked(self) -> None:
        if self._monitor is None:  # an orphan: qemu without QMP
            raise QemuError(f"VM {self.doc.name} has no QMP connection; cannot reset")
        await self._monitor.execute("system_reset")

    async def detach(self) -> None:
        """Stop supervising without touching qemu or swtpm (manager shutdown, upgrade)."""
        async with self._lock:
            await self._close_channels()
            if self._exited is not None and not self._exited.done():
                self._exited.cancel()
            reaper, self._reaper = self._reaper, None
            if reaper is not None and not reaper.done():  # qemu runs on, unreaped by us
                reaper.cancel()
                await asyncio.wait({reaper}, timeout=CANCEL_WAIT)
            if self._proc is not None and self._proc.returncode is None:
                # left running on purpose (a daemon restart adopts it): kept referenced, so
                # that no garbage collection "cleans up" a child we meant to leave
                _DETACHED.add(self._proc)
