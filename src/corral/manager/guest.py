"""Guest access through the manager: serial console stream, console and qemu logs, display
passwords, programs run by the guest agent.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

from corral.errors import Conflict, StoreUnavailable
from corral.host.consolelog import LogFollower, log_exists, read_spans, tail_spans
from corral.manager.backends import Capability, ConsoleStream, require_capability
from corral.manager.hub import EventHub, ManagerState
from corral.manager.store import VmRecord
from corral.qemu.agent import ExecResult
from corral.runner.config import LogSource
from corral.runner.status import VmState

__all__ = ["GuestAccess"]

_LOG_POLL = 0.25  # seconds between looks at a followed log that has nothing new


class GuestAccess(EventHub):
    """What reaches into a running VM, each asked of the backend's capabilities first."""

    def _running(self, name: str) -> VmRecord:
        record = self.store.get(name)
        state = self._observe(name).state
        if state is not VmState.RUNNING:
            raise Conflict(f"VM {name!r} is {state.value}, not Running")
        return record

    def open_console(self, name: str) -> AbstractAsyncContextManager[ConsoleStream]:
        """The serial console of a running VM as a byte stream (for the console proxy):
        checked now (:class:`NotFound`, :class:`Conflict`, :class:`Unsupported`), opened on
        entering it (qemu serves one client at a time: a second waits for the first)."""
        self._running(name)
        require_capability(self.backend, Capability.CONSOLE, "serve a VM's serial console")
        return self.backend.open_console(name)

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
        require_capability(self.backend, Capability.DISPLAY, "set a display password")
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
        require_capability(self.backend, Capability.EXEC, "run programs in a guest")
        result = await self.backend.exec(name, argv, stdin=stdin, timeout=timeout)
        self._record_event(name, "GuestExec", {"argv0": argv[0], "exitCode": result.exit_code})
        return result
