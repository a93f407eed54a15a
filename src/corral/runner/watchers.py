"""Watchers: what runs beside a started VM until its qemu exits. QMP events (shutdown, balloon,
tray, displays, reset), qemu's exit (Stopped, Crashed, or a restart), the guest agent (booted,
vCPUs online, addresses), the serial console (boot marker, boot timeout), swtpm's death, and
console.log/qemu.log rotation; plus the tails of both logs that errors and conditions quote.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import time
from pathlib import Path
from typing import cast

from corral.errors import CorralError, QemuError
from corral.host import (
    Swtpm,
    pid_alive,
)
from corral.host.consolelog import LogFollower, needs_rotation, rotate
from corral.printable import printable
from corral.qemu.agent import AgentError, AgentReplyError, GuestAgent
from corral.qemu.monitor import Monitor, QmpEvent
from corral.runner.core import CANCEL_WAIT, LIFECYCLE, merged, watch_pid
from corral.runner.live import LiveSettings
from corral.runner.status import (
    Condition,
    VmState,
    now_iso,
)

__all__ = ["Watchers", "boot_failure"]

_AGENT_POLL = 5.0
_AGENT_REPORT_EVERY = 60.0  # at most one GuestAgentReplyInvalid event a minute
_LOG_CHECK = 0.5  # how often console.log and qemu.log are checked against their cap
_TAIL_LINES, _TAIL_BYTES = 20, 4096  # qemu's last words in a start error and a crash's exit
_STARTING = re.compile(rb"^--- \S+ starting qemu\n", re.MULTILINE)  # _spawn's line in qemu.log
_ESCAPES = re.compile(r"\x1b(\[[0-?]*[ -/]*[@-~]|[()][0-9A-Za-z]|[=>])")  # a terminal's, not text
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


class Watchers(LiveSettings):
    """The watching half of the supervisor (see the module docstring)."""

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
        await watch_pid(pid)
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
        self.status.pending_restart = merged(self.status.pending_restart, self._needs_restart)
        self._event(
            "SwtpmDied",
            pid=pid,
            log=str(self.files.swtpm_log),
            tpmState=str(self.paths.tpm_state),
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
            if cond in LIFECYCLE or cond.value in self.status.conditions:
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
        cancelled = [task for task in list(self._tasks) if task is not current]
        for task in cancelled:
            task.cancel()
        if cancelled:  # ended, not left pending: nothing of this VM outlives its supervisor
            await asyncio.wait(cancelled, timeout=CANCEL_WAIT)
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
                    # a guest lists a hot-plugged CPU only once it has handled the ACPI
                    # notification (a second or more under TCG): until it lists them all,
                    # ask again next round, or the late ones would stay offline
                    if len(await agent.vcpus()) < (self.status.cpus or 0):
                        self._want_cpus_online = True
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
