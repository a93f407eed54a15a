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
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import secrets
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from corral.errors import Conflict, CorralError, HostError, QemuError, SpecError
from corral.host import (
    Swtpm,
    ensure_disk,
    ensure_overlay,
    ensure_seed,
    ensure_vars,
    find_qemu,
    open_bridge_tap,
    pid_alive,
    process_age,
    process_exe_name,
    read_pidfile,
)
from corral.host.chain import ChainError, open_file
from corral.host.consolelog import LogFollower, needs_rotation, rotate
from corral.host.ports import busy_ports
from corral.printable import printable
from corral.qemu.agent import AgentError, AgentReplyError, ExecResult, GuestAgent
from corral.qemu.fingerprint import find_emulator, find_firmware, resolve_accelerator
from corral.qemu.monitor import Monitor, QmpEvent
from corral.runner.changes import cdrom_media, pending_restart, read_display_secret
from corral.runner.config import RunnerPaths, check_host, machine_uuid, render_for_host
from corral.runner.status import (
    Condition,
    EventSink,
    VmState,
    VmStatus,
    make_event,
    now_iso,
    write_atomic,
)
from corral.spec import HostPolicy, VmDocument
from corral.spec.models import MachineType, default_uuid, is_remote_image

__all__ = ["ExecResult", "ExitInfo", "VmSupervisor"]

_QUIT_WAIT = 10.0
POWERDOWN_REPEAT = 10.0
"""Seconds between ACPI power-button presses while a stop waits for the guest: one that missed
the first (still booting, acpid not up yet, a desktop that asked and got no answer) gets
another, until ``powerdownTimeout``."""
_BOOT_FAILURES = re.compile(
    r"No bootable device|Boot failed|BdsDxe: (failed to load|No bootable option)"
    r"|UEFI Interactive Shell|^Shell> ?$|Can't find image information|X64 Exception Type"
    r"|Kernel panic - not syncing|EFI stub: ERROR|grub rescue>",
    re.MULTILINE,
)


def boot_failure(console_tail: str) -> str | None:
    """The line of a console's last lines that proves the guest is stuck before any OS that
    could answer ACPI (a firmware with nothing to boot, its shell, a crash, a kernel panic);
    None when there is no such proof (a login prompt, silence, anything else)."""
    last = None
    for line in console_tail.splitlines():
        if _BOOT_FAILURES.search(line.strip()):
            last = line.strip()[:200]
    return last


_KILL_WAIT = 5.0
_AGENT_POLL = 5.0
_AGENT_REPORT_EVERY = 60.0  # at most one GuestAgentReplyInvalid event a minute
_LOG_CHECK = 0.5  # how often console.log and qemu.log are checked against their cap
_TAIL_LINES, _TAIL_BYTES = 20, 4096  # qemu's last words in a start error and a crash's exit
_STARTING = re.compile(rb"^--- \S+ starting qemu\n", re.MULTILINE)  # _spawn's line in qemu.log
_ESCAPES = re.compile(r"\x1b(\[[0-?]*[ -/]*[@-~]|[()][0-9A-Za-z]|[=>])")  # a terminal's, not text
_LIFECYCLE = (Condition.BOOTED, Condition.AGENT_CONNECTED, Condition.DISPLAY_CONNECTED)
"""Conditions every VM has; TpmAvailable (useTpm) and QmpConnected (an orphan) only when
they say something."""


@dataclass(frozen=True)
class ExitInfo:
    code: int | None
    signal: int | None
    known: bool  # False when qemu was not our child (re-attached): no exit status to read

    def to_json(self) -> dict[str, object]:
        return {"code": self.code, "signal": self.signal, "known": self.known}


class _Files:
    """The runtime files of one VM (all under the runtime dir, mode 0700)."""

    def __init__(self, paths: RunnerPaths) -> None:
        rt = paths.runtime_dir
        self.pidfile = rt / "qemu.pid"
        self.qmp = rt / "qmp.sock"
        self.qga = rt / "qga.sock"
        self.console = rt / "console.sock"
        self.console_log = paths.log_file("console")
        self.stderr = paths.log_file("qemu")
        self.swtpm_sock = rt / "swtpm.sock"
        self.swtpm_pid = rt / "swtpm.pid"
        self.swtpm_log = rt / "swtpm.log"
        self.started = rt / "started.json"


class VmSupervisor:
    def __init__(
        self,
        doc: VmDocument,
        paths: RunnerPaths,
        policy: HostPolicy,
        *,
        accelerator: str | None = None,
        events: EventSink | None = None,
        boot_marker: str | None = None,
        on_status: Callable[[VmStatus], None] | None = None,
    ) -> None:
        self.doc = doc
        self.paths = paths
        self.policy = policy
        self.files = _Files(paths)
        self.status = VmStatus(name=doc.name)
        self._accel_override = accelerator
        self._sink = events
        self._boot_marker = boot_marker
        self._on_status = on_status
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
        data = json.dumps(self.status.to_json(), indent=2, default=str).encode()
        try:
            write_atomic(self.paths.status_file, data)
        except OSError as exc:
            self._event("StatusWriteFailed", error=str(exc))
        if self._on_status is not None:
            self._on_status(self.status)

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
        if self.state not in (VmState.STOPPED, VmState.CRASHED):
            raise CorralError(f"VM {doc.name!r} is {self.state.value}: retarget needs it stopped")
        self.doc = doc
        self.paths = paths
        self.policy = policy
        self.files = _Files(paths)

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

    # --- start -----------------------------------------------------------------------------

    async def start(self) -> None:
        async with self._lock:
            if self.state not in (VmState.STOPPED, VmState.CRASHED):
                raise QemuError(f"VM {self.doc.name} is {self.state.value}, not stopped")
            await self._start_locked()

    def _live_qemus(self) -> list[int]:
        """This VM's qemu processes, found by argv (pidfile path, or UUID and name)."""
        doc = self.doc
        uuid = machine_uuid(doc, self.paths) or default_uuid(doc.name)
        return find_qemu(self.files.pidfile, uuid=str(uuid), name=doc.name)

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
        for cond in _LIFECYCLE:  # reason and message too: no BootTimeout of the last run
            self.status.report_condition(cond, False, "Starting", None)
        for cond in (Condition.TPM_AVAILABLE, Condition.QMP_CONNECTED):
            self.status.conditions.pop(cond.value, None)
        self._set_state(VmState.STARTING)
        try:
            busy = busy_ports(doc)
            if busy:  # qemu would exit at once, and again on every retry
                raise Conflict(f"VM {doc.name}: a host port it listens on is taken", busy)
            await self._prepare(doc)
            emulator = find_emulator(self.paths.emulator)
            accel = self._accel_override or resolve_accelerator(doc.vm.accelerator.value, emulator)
            taps = await self._open_taps(doc)
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
            write_atomic(
                self.files.started,
                json.dumps(
                    {
                        "argv": argv,
                        "document": doc.model_dump(mode="json", by_alias=True),
                        "startedAt": self.status.started_at,
                        "accelerator": accel,
                    }
                ).encode(),
                0o600,
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

    async def _prepare(self, doc: VmDocument) -> None:
        """Create what the VM needs on disk; never recreate or overwrite what exists."""
        self.paths.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.paths.runtime_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.paths.runtime_dir, 0o700)
        uuid_file = self.paths.uuid_file
        if doc.vm.machine_uuid is None and not uuid_file.exists():
            import uuid as _uuid

            write_atomic(uuid_file, f"{_uuid.uuid4()}\n".encode())
        for i, disk in enumerate(doc.vm.disks):
            f = disk.file
            if f is None:
                continue
            name = disk.name or f"disk{i}"
            if f.image is not None:
                overlay = self.paths.data_dir / f"{name}.qcow2"
                await ensure_overlay(Path(f.image), overlay, size=f.size)
            elif f.path is not None and not Path(f.path).exists():
                if f.size is None:
                    raise SpecError.single(
                        f"spec.vm.disks[{i}].file.path",
                        f"{f.path} does not exist; give a size to create it",
                    )
                await ensure_disk(Path(f.path), f.size, f.format.value)
        if doc.vm.firmware.is_uefi and doc.vm.machine is not MachineType.MICROVM:
            found = find_firmware(doc.vm.firmware.value)
            if found is None:
                raise HostError(
                    f"no OVMF files for firmware {doc.vm.firmware.value} (apt-get install ovmf)"
                )
            ensure_vars(Path(found[1]), self.paths.efivars)
        if doc.spec.cloud_init is not None:
            await ensure_seed(self.paths.seed_image, doc.spec.cloud_init, doc.name)

    async def _start_swtpm(self, doc: VmDocument) -> None:
        if not doc.vm.use_tpm:
            return
        existing = Swtpm.attach(self.files.swtpm_pid, self.files.swtpm_sock)
        if existing is not None:
            await existing.stop()
        self._swtpm = Swtpm()
        self.status.swtpm_pid = await self._swtpm.start(
            self.paths.data_dir / "tpm",
            self.files.swtpm_sock,
            self.files.swtpm_pid,
            self.files.swtpm_log,
        )

    async def _open_taps(self, doc: VmDocument) -> dict[int, int]:
        """Taps on bridges for the VM's bridge NICs, made by the host's helper (never by
        qemu, which keeps its sandbox); {NIC index: fd}. Nothing is left open on failure."""
        taps: dict[int, int] = {}
        try:
            for i, net in enumerate(doc.vm.networks):
                if net.bridge is not None:
                    taps[i] = await open_bridge_tap(self.policy.bridge_helper, net.bridge.name)
                elif net.tap is not None and net.tap.ifname is None:
                    taps[i] = await open_bridge_tap(self.policy.bridge_helper, net.tap.bridge)
        except BaseException:
            for fd in taps.values():
                os.close(fd)
            raise
        return taps

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

    # --- attach ----------------------------------------------------------------------------

    async def attach(self) -> bool:
        """Re-attach to this VM's qemu if it is alive; False if it is not.

        The qemu is found by its pidfile, confirmed by its argv, and else by its argv alone
        (the runtime dir may be gone): see :func:`~corral.host.process.find_qemu`. One whose
        QMP socket is gone cannot be controlled, yet runs: it is reported (event
        ``OrphanedQemuFound``, condition ``QmpConnected`` False), Running, never started
        twice, and stop/kill end it by signal."""
        async with self._lock:
            if self.state not in (VmState.STOPPED, VmState.CRASHED):
                raise QemuError(f"VM {self.doc.name} is {self.state.value}; cannot attach")
            live = self._live_qemus()
            pid = read_pidfile(self.files.pidfile)
            if pid is None or pid not in live:
                pid = live[0] if live else None
            if pid is None or "qemu" not in (process_exe_name(pid) or ""):
                return False
            self._pid = self.status.pid = pid
            self._proc = None
            self._exited = _watch_pid(pid)
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
                    return False
                self._adopt_orphan(pid, exc)
                return True
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
        with contextlib.suppress(CorralError):  # a refused document is reported in status
            await self.apply(self.doc)
        return True

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
        for cond in _LIFECYCLE:
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
        from corral.spec import parse_document

        try:
            data = json.loads(self.files.started.read_text())
            doc = parse_document(data["document"])
        except (OSError, ValueError, KeyError, TypeError, CorralError):
            return None
        started_at, accel = data.get("startedAt"), data.get("accelerator")
        return (
            doc,
            started_at if isinstance(started_at, str) else None,
            accel if isinstance(accel, str) else None,
        )

    # --- watching --------------------------------------------------------------------------

    def _spawn_task(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            self._event("InternalError", error=repr(exc))

    def _watch(self) -> None:
        self._spawn_task(self._pump_events())
        self._spawn_task(self._watch_exit())
        if self.doc.vm.guest_agent:
            self._agent = GuestAgent(self.files.qga)
            self._spawn_task(self._agent_loop())
        if self.boot_marker:
            self._spawn_task(self._watch_console())
        if self.doc.vm.boot_timeout > 0 and (self.doc.vm.guest_agent or self.boot_marker):
            self._spawn_task(self._watch_boot(self.doc.vm.boot_timeout))
        self._spawn_task(self._rotate_logs())
        if self._swtpm is not None:
            self._spawn_task(self._watch_swtpm(self._swtpm))

    async def _watch_swtpm(self, swtpm: Swtpm) -> None:
        """swtpm's death while qemu runs: the guest's TPM fails (EIO) from then on.

        qemu's TPM emulator backend hands swtpm its data channel once, at start, and never
        reconnects (tried with qemu 7.2: a new swtpm on the same socket and state still gave
        the guest EIO), so restarting swtpm under a running qemu would only pretend. The TPM
        state is on disk (``<data dir>/tpm``): the VM needs a restart, which starts a new
        swtpm on it. Reported as event ``SwtpmDied``, condition ``TpmAvailable`` False and a
        pending restart."""
        pid = swtpm.pid
        if pid is None:
            return
        self._condition(Condition.TPM_AVAILABLE, True, "SwtpmRunning")
        await _watch_pid(pid)
        await asyncio.sleep(0.2)  # with --terminate, swtpm also ends when qemu does
        qemu = self._pid
        if self._stopping or qemu is None or not pid_alive(qemu) or self._swtpm is not swtpm:
            return
        self._swtpm_lost(pid)

    def _swtpm_lost(self, pid: int | None) -> None:
        self._swtpm = None
        self.status.swtpm_pid = None
        reason = "swtpm died: the guest's TPM fails until the VM is restarted"
        if reason not in self._needs_restart:
            self._needs_restart.append(reason)
        self.status.pending_restart = _merged(self.status.pending_restart, self._needs_restart)
        self._event(
            "SwtpmDied",
            pid=pid,
            log=str(self.files.swtpm_log),
            tpmState=str(self.paths.data_dir / "tpm"),
            hint="restart the VM: its TPM state is kept on disk",
        )
        self._condition(Condition.TPM_AVAILABLE, False, "SwtpmDied")

    async def _pump_events(self) -> None:
        monitor = self._monitor
        assert monitor is not None
        async for event in monitor.events():
            try:
                await self._on_event(event)
            except CorralError as exc:
                self._event("EventHandlingFailed", qmp=event.get("event"), error=str(exc))

    async def _on_event(self, event: QmpEvent) -> None:
        name = str(event.get("event"))
        data = cast(dict[str, object], event.get("data") or {})
        if name not in ("BALLOON_CHANGE", "RTC_CHANGE"):
            self._event("Qmp", qmp=name, data=data)
        if name == "SHUTDOWN":
            self._shutdown_seen.set()
            await self._on_shutdown(bool(data.get("guest")), str(data.get("reason")))
        elif name == "BALLOON_CHANGE":
            self.status.ram = cast(int, data.get("actual"))
            self._publish()
        elif name == "DEVICE_TRAY_MOVED":
            device = str(data.get("id") or data.get("device") or "")
            if data.get("tray-open") and device in self.status.cdrom_pending:
                await self._change_medium(device, self.status.cdrom_pending[device])
        elif name in ("DEVICE_DELETED", "ACPI_DEVICE_OST"):
            await self._refresh_live()
        elif name in ("SPICE_INITIALIZED", "VNC_INITIALIZED"):
            self._displays += 1
            self._condition(Condition.DISPLAY_CONNECTED, True, name)
        elif name in ("SPICE_DISCONNECTED", "VNC_DISCONNECTED"):
            self._displays = max(0, self._displays - 1)
            if self._displays == 0:
                self._condition(Condition.DISPLAY_CONNECTED, False, name)
        elif name == "RESET":
            self._condition(Condition.AGENT_CONNECTED, False, "GuestReset")

    async def _on_shutdown(self, guest: bool, reason: str) -> None:
        """With -no-shutdown qemu stays after the guest powers off; we decide what it means."""
        monitor = self._monitor
        if monitor is None:
            return
        if not guest:
            return  # the echo of our own quit (host-qmp-quit), or a signal to qemu
        if self._stopping:
            self.status.stopped_by = self.status.stopped_by or "powerdown"
        elif self.doc.spec.guest_shutdown_stops:
            self._stopping = True
            self.status.stopped_by = "guest"
            self._set_state(VmState.STOPPING, reason=reason)
        else:
            self._restart_on_exit = True
            self._event("GuestShutdownRestart", reason=reason)
        with contextlib.suppress(QemuError):
            await monitor.execute("quit")

    async def _watch_exit(self) -> None:
        exited = self._exited
        assert exited is not None
        info = await exited
        await self._teardown()
        self.status.exit = info.to_json()
        self.status.pid = None
        self.status.stopped_at = now_iso()
        for cond in Condition:
            if cond in _LIFECYCLE or cond.value in self.status.conditions:
                self.status.report_condition(cond, False, "Stopped", None)
        if self._restart_on_exit:
            self.status.restarts += 1
            self._set_state(VmState.STOPPED, exit=info.to_json())
            try:
                async with self._lock:
                    await self._start_locked()
            except CorralError as exc:
                self._event("RestartFailed", error=str(exc))
            return
        if self._stopping:
            self._set_state(VmState.STOPPED, stoppedBy=self.status.stopped_by)
        else:
            self.status.exit["stderr"] = self._stderr_tail()
            self._set_state(VmState.CRASHED, exit=self.status.exit)
        self._finished.set()

    async def _close_channels(self) -> None:
        """Cancel the watchers (but the calling task) and close QMP and the guest agent."""
        current = asyncio.current_task()
        for task in list(self._tasks):
            if task is not current:
                task.cancel()
        if self._monitor is not None:
            await self._monitor.close()
            self._monitor = None
        if self._agent is not None:
            await self._agent.close()
            self._agent = None

    async def _teardown(self) -> None:
        """After qemu is gone: close channels, stop swtpm, forget runtime sockets."""
        await self._close_channels()
        if self._swtpm is not None:
            with contextlib.suppress(CorralError):
                await self._swtpm.stop()
            self._swtpm = None
            self.status.swtpm_pid = None
        self._pid = None
        self._proc = None

    def _stderr_tail(self) -> str:
        """What qemu wrote last since it was last started (no line of an earlier run): at
        most the last 20 lines and 4 KiB of qemu.log, made printable (qemu repeats strings
        of the document and of the guest; :mod:`corral.printable`)."""
        try:
            with open(self.files.stderr, "rb") as f:
                end = f.seek(0, os.SEEK_END)
                f.seek(max(0, end - _TAIL_BYTES))
                data = f.read(_TAIL_BYTES)
        except OSError:
            return ""
        starts = list(_STARTING.finditer(data))
        cut = not starts and end > _TAIL_BYTES
        if starts:
            data = data[starts[-1].end() :]
        lines = printable(data.decode(errors="replace")).strip("\n").split("\n")
        if cut and len(lines) <= _TAIL_LINES:
            lines[0] = "…" + lines[0]  # the window began inside this line
        return "\n".join(lines[-_TAIL_LINES:]).strip("\n")

    async def _agent_loop(self) -> None:
        agent = self._agent
        assert agent is not None
        last_ips = 0.0
        last_report, suppressed = -_AGENT_REPORT_EVERY, 0
        while True:
            try:
                await agent.sync(timeout=3)
                if not self.status.condition(Condition.AGENT_CONNECTED):
                    self._condition(Condition.AGENT_CONNECTED, True, "GuestAgentAnswered")
                    self._condition(Condition.BOOTED, True, "GuestAgentAnswered")
                    self._want_cpus_online = True
                if self._want_cpus_online:
                    self._want_cpus_online = False
                    onlined = await agent.online_all_vcpus()
                    if onlined:
                        self._event("VcpusOnlined", count=onlined)
                if time.monotonic() - last_ips > _AGENT_POLL:
                    last_ips = time.monotonic()
                    ips = await agent.ips()
                    if ips != self.status.ips:
                        self.status.ips = ips
                        self._event("GuestAddresses", ips=ips)
                        self._publish()
                await asyncio.sleep(1.0)
            except AgentReplyError as exc:  # the guest's word, refused: keep the last good one
                if time.monotonic() - last_report >= _AGENT_REPORT_EVERY:
                    last_report = time.monotonic()
                    self._event("GuestAgentReplyInvalid", error=str(exc), suppressed=suppressed)
                    suppressed = 0
                else:
                    suppressed += 1
                await asyncio.sleep(1.0)
            except AgentError:
                self._condition(Condition.AGENT_CONNECTED, False, "GuestAgentSilent")
                await asyncio.sleep(1.0)

    async def _watch_console(self) -> None:
        """Booted when the boot marker shows on the serial console: console.log is read in
        bounded chunks from where qemu started, across rotations."""
        marker = (self.boot_marker or "").encode()
        log = LogFollower(self.files.console_log, self._console_offset)
        carry = b""  # the end of the last chunk: a marker may straddle two
        while not self.status.condition(Condition.BOOTED):
            chunk = log.read()
            if not chunk:
                await asyncio.sleep(0.1)
                continue
            window = carry + chunk
            if marker in window:
                self._condition(Condition.BOOTED, True, "SerialMarker")
                return
            carry = window[len(window) - len(marker) + 1 :] if len(marker) > 1 else b""
            await asyncio.sleep(0)

    async def _watch_boot(self, limit: float) -> None:
        """``Booted`` False with reason ``BootTimeout`` when the guest has not shown that it
        booted (its agent answered, the boot marker showed) ``bootTimeout`` seconds after its
        start, with the console's last lines as the condition's message and in event
        ``BootTimeout`` (a firmware's fault, a boot loader's prompt, "No bootable device").
        Only VMs with a way to know (an agent channel or a boot marker) are watched; one that
        boots later still becomes Booted."""
        await asyncio.sleep(limit)
        if self._stopping or self.status.condition(Condition.BOOTED):
            return
        tail = self._console_tail()
        way = "guest agent" if self.doc.vm.guest_agent else "boot marker"
        if self.doc.vm.guest_agent and self.boot_marker:
            way = "guest agent or boot marker"
        message = f"no sign of a booted guest ({way}) within {limit:g}s" + (
            f"; the console's last lines:\n{tail}" if tail else "; the console is empty"
        )
        self.status.report_condition(Condition.BOOTED, False, "BootTimeout", message)
        self._event(
            "ConditionChanged", condition=Condition.BOOTED.value, status=False,
            reason="BootTimeout",
        )  # fmt: skip
        self._event("BootTimeout", timeout=limit, consoleTail=tail)
        self._publish()

    async def _cannot_answer_acpi(self, monitor: Monitor | None) -> str | None:
        """Why nothing in the guest can answer ACPI (None: it may): only for a guest that gave
        no sign of booting within ``bootTimeout``, and only on evidence."""
        if self.status.condition(Condition.BOOTED):
            return None
        if self.status.condition_reason(Condition.BOOTED) != "BootTimeout":
            return None
        if monitor is not None:
            with contextlib.suppress(QemuError):
                run = await monitor.query_dict("query-status")
                if run.get("status") in ("guest-panicked", "internal-error"):
                    return f"qemu: {run.get('status')}"
        return boot_failure(self._console_tail())

    def _console_tail(self) -> str:
        """What the guest printed last on its serial console since it was started (for a VM
        re-attached to, whatever is in console.log): at most
        the last 20 non-empty lines and 4 KiB, terminal escape sequences dropped and the rest
        made printable (it is the guest's text; :mod:`corral.printable`)."""
        try:
            with open(self.files.console_log, "rb") as f:
                end = f.seek(0, os.SEEK_END)
                since = self._tail_from if end >= self._tail_from else 0
                f.seek(max(since, end - _TAIL_BYTES))
                data = f.read(_TAIL_BYTES)
        except OSError:
            return ""
        text = printable(_ESCAPES.sub("", data.decode(errors="replace")))
        lines = [line.rstrip() for line in text.split("\n") if line.strip()]
        return "\n".join(lines[-_TAIL_LINES:])

    async def _rotate_logs(self) -> None:
        """console.log (what the guest prints) and qemu.log, capped at the host policy's
        ``consoleLogMaxSize`` and rotated by copy-and-truncate, one old file kept
        (:mod:`corral.host.consolelog`): a guest cannot fill the host's disk."""
        cap = self.policy.console_log_max_size
        failed: set[Path] = set()
        while True:
            await asyncio.sleep(_LOG_CHECK)
            for log in (self.files.console_log, self.files.stderr):
                if not needs_rotation(log, cap):
                    continue
                try:
                    await asyncio.to_thread(rotate, log)
                    failed.discard(log)
                except OSError as exc:
                    if log not in failed:  # once per failure streak, not every half second
                        failed.add(log)
                        self._event("LogRotateFailed", file=str(log), error=str(exc))

    # --- live values -----------------------------------------------------------------------

    async def _refresh_live(self) -> None:
        monitor = self._monitor
        if monitor is None:
            return
        with contextlib.suppress(QemuError):
            self.status.cpus = len(await monitor.query_list("query-cpus-fast"))
        with contextlib.suppress(QemuError):
            balloon = await monitor.query_dict("query-balloon")
            self.status.ram = cast(int, balloon.get("actual"))
        self._publish()

    async def live_media(self) -> dict[str, str | None]:
        """{cd device id: image file or None} as qemu reports it."""
        monitor = self._monitor
        if monitor is None:
            return {}
        media: dict[str, str | None] = {}
        for dev in await monitor.query_list("query-block"):
            qdev = str(dev.get("qdev") or "")
            ident = qdev.rsplit("/", 1)[-1] if qdev.startswith("/") else qdev
            if not dev.get("removable"):
                continue
            inserted = cast(dict[str, object] | None, dev.get("inserted"))
            file = str(inserted.get("file")) if inserted else None
            media[ident] = self._fd_media.get(file, file) if file else None
        return media

    # --- declarative changes ---------------------------------------------------------------

    async def apply(self, doc: VmDocument) -> list[str]:
        """Make the running VM match ``doc`` where that can be done live; return what waits
        for a restart. A refused document leaves everything as it was (and says why)."""
        try:
            check_host(doc, self.policy, self.paths.emulator)
            pending = pending_restart(self._started_doc or self.doc, doc)
        except CorralError as exc:
            self.refuse_config(exc)
            raise
        async with self._lock:
            self.doc = doc
            self.status.config_error = None
            self.status.pending_restart = _merged(pending, self._needs_restart)
            if self.state is not VmState.RUNNING or self._monitor is None:
                self._publish()
                return pending
            failures: list[str] = []
            for step in (self._apply_cpus, self._apply_ram, self._apply_media):
                try:
                    await step(doc)
                except CorralError as exc:
                    failures.append(str(exc))
            try:
                await self._apply_display_secret()
            except CorralError as exc:
                failures.append(str(exc))
            if failures:
                self.status.config_error = "; ".join(failures)
                self._event("ApplyFailed", errors=failures)
            self._event("Applied", pendingRestart=pending)
            await self._refresh_live()
            return pending

    def refuse_config(self, exc: CorralError) -> None:
        """Report a document that could not be used (unreadable, invalid, refused by policy);
        the VM keeps running on the last good one."""
        self.status.config_error = _one_line(exc)
        self._event("ConfigRefused", error=self.status.config_error)
        self._publish()

    async def _apply_cpus(self, doc: VmDocument) -> None:
        monitor = self._monitor
        assert monitor is not None
        want = doc.vm.cur_cpus
        slots = await monitor.query_list("query-hotpluggable-cpus")
        plugged = [s for s in slots if s.get("qom-path")]
        if want == len(plugged):
            return
        if doc.vm.machine is MachineType.MICROVM:
            raise QemuError("currentCpus: the microvm machine has no CPU hot-plug")
        if want > len(slots):
            raise QemuError(f"currentCpus: {want} is more than the {len(slots)} CPU slots")
        if want > len(plugged):
            free = sorted((s for s in slots if not s.get("qom-path")), key=_slot_key)
            for slot in free[: want - len(plugged)]:
                props = cast(dict[str, object], slot.get("props") or {})
                dev_id = "cpu-" + "-".join(str(v) for _, v in sorted(props.items()))
                await monitor.execute("device_add", {"driver": slot["type"], "id": dev_id, **props})
            self._want_cpus_online = True
            self._event("CpusPlugged", count=want - len(plugged))
        else:
            removable = sorted(
                (s for s in plugged if str(s.get("qom-path")).startswith("/machine/peripheral/")),
                key=_slot_key,
                reverse=True,
            )
            surplus = len(plugged) - want
            if surplus > len(removable):
                raise QemuError(
                    "currentCpus: only hot-plugged CPUs can be removed; "
                    f"{len(plugged) - len(removable)} were there at start"
                )
            for slot in removable[:surplus]:
                dev_id = str(slot["qom-path"]).rsplit("/", 1)[-1]
                await monitor.execute("device_del", {"id": dev_id})
            self._event("CpusUnplugRequested", count=surplus)

    async def _apply_ram(self, doc: VmDocument) -> None:
        monitor = self._monitor
        assert monitor is not None
        started = self._started_doc or doc
        target = min(doc.vm.cur_ram, started.vm.maximum_ram)
        if self.status.ram == target:
            return
        await monitor.execute("balloon", {"value": target})
        self._event("BalloonTarget", bytes=target)

    async def _apply_media(self, doc: VmDocument) -> None:
        live = await self.live_media()
        for dev, image in cdrom_media(doc).items():
            if dev in live and live[dev] == image and dev not in self.status.cdrom_pending:
                continue
            await self._change_medium(dev, image)

    async def _change_medium(self, dev: str, image: str | None) -> None:
        monitor = self._monitor
        assert monitor is not None
        try:
            if image:
                filename = await self._media_filename(image)
                await monitor.execute(
                    "blockdev-change-medium",
                    {
                        "id": dev,
                        "filename": filename,
                        "format": "raw",
                        "read-only-mode": "read-only",
                    },
                )
            else:
                await monitor.execute("eject", {"id": dev})
        except QemuError as exc:
            text = str(exc)
            if "locked" in text or "not open" in text or "tray" in text.lower():
                self.status.cdrom_pending[dev] = image
                self._event("MediaChangePending", device=dev, image=image, reason=text)
                self._publish()
                return
            raise
        self.status.cdrom_pending.pop(dev, None)
        self.status.cdrom[dev] = image
        self._event("MediaChanged", device=dev, image=image)
        self._publish()

    async def _media_filename(self, image: str) -> str:
        """What qemu opens for a CD inserted live: a URL as it is; a host file opened here
        (qemu runs unprivileged and could not) and passed as ``/dev/fdset/N``."""
        monitor = self._monitor
        assert monitor is not None
        if is_remote_image(image):
            return image
        try:
            fd = open_file(image, block_devices=False)
        except ChainError as exc:
            raise QemuError(f"CD image: {exc}") from exc
        if fd is None:
            raise QemuError(f"CD image {image} does not exist")
        try:
            fdset = await monitor.add_fd(fd, opaque=image[-200:])
        finally:
            os.close(fd)
        name = f"/dev/fdset/{fdset}"
        self._fd_media[name] = image
        return name

    async def _apply_display_secret(self, *, force: bool = False) -> None:
        """The display password and its expiry, from the display secret (never the document).

        With no secret, as VM-Operator does: SPICE with ``generateSecret`` gets a random
        password that expires at once (the display is locked until the user sets one, and
        nobody can read it anywhere); VNC (``password=on``) is locked too. A ``DisplayLocked``
        event says how to get in."""
        monitor = self._monitor
        display = self.doc.vm.display
        if monitor is None or display is None:
            return
        secret = read_display_secret(self.paths.display_secret_file)
        password, expiry = secret.password, secret.expiry
        if password is None:
            expiry = "now"
            if display.spice is not None and display.spice.generate_secret:
                password = secrets.token_urlsafe(16)
        if not force and (secret.password, expiry) == self._secret_applied:
            return
        protocols = [p for p, on in (("spice", display.spice), ("vnc", display.vnc)) if on]
        for protocol in protocols:
            if password is not None:
                pw = password[:8] if protocol == "vnc" else password
                await monitor.execute("set_password", {"protocol": protocol, "password": pw})
            await monitor.execute(
                "expire_password", {"protocol": protocol, "time": expiry or "never"}
            )
        self._secret_applied = (secret.password, expiry)
        if secret.password is None:
            where = self.paths.display_secret_file
            self._event(
                "DisplayLocked",
                protocols=protocols,
                hint="no display password is set: write one to the display secret "
                + (f"({where})" if where else "(corral run --display-secret-file FILE)")
                + "; it applies live",
            )
        else:
            self._event("DisplayPasswordSet", protocols=protocols, expiry=expiry or "never")

    async def display_secret_changed(self) -> None:
        """The secret file changed (it is not part of the document): apply it live."""
        async with self._lock:
            if self.state is VmState.RUNNING:
                await self._apply_display_secret()

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

    async def _kill_qemu(self) -> None:
        pid = self._pid
        if pid is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        if self._exited is not None:
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(self._exited), _KILL_WAIT)

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
            if self._monitor is None or self.state is not VmState.RUNNING:
                raise QemuError(f"VM {self.doc.name} is {self.state.value}, not running")
            await self._monitor.execute("system_reset")

    async def detach(self) -> None:
        """Stop supervising without touching qemu or swtpm (manager shutdown, upgrade)."""
        async with self._lock:
            await self._close_channels()
            if self._exited is not None and not self._exited.done():
                self._exited.cancel()


def _slot_key(slot: dict[str, object]) -> tuple[int, ...]:
    props = cast(dict[str, int], slot.get("props") or {})
    return tuple(
        int(props.get(k, 0)) for k in ("node-id", "socket-id", "die-id", "core-id", "thread-id")
    )


def _merged(first: list[str], more: list[str]) -> list[str]:
    return [*first, *(m for m in more if m not in first)]


def _one_line(exc: CorralError) -> str:
    issues = "; ".join(str(i) for i in exc.issues)
    return f"{exc.message}: {issues}" if issues else exc.message


def _watch_pid(pid: int) -> asyncio.Future[ExitInfo]:
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
