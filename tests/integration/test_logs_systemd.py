"""The systemd backend serves a VM's logs and says what qemu said (issue 11, "Failures 3").

With the systemd backend the manager never sees qemu: a unit runs ``corral run``, and all the
manager has is the runner's files (status, events, logs) in ``<run>/<name>/``. This host has
no systemd as PID 1, so ``systemctl`` is the recording double of ``test_systemd_backend.py``,
and its ``enable --now`` plays systemd's part by starting the unit's own ``ExecStart`` (the
real ``corral run`` with the real qemu and tiny guest); ``stop`` sends it SIGTERM, as
``KillMode=mixed`` does.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from corral.errors import Conflict
from corral.manager import Manager, ManagerConfig, SystemdBackend
from corral.manager.systemd import unit_name
from corral.spec import HostPolicy
from tests.integration.harness import MARKER
from tests.integration.test_manager import qemu_pids, tiny
from tests.integration.test_systemd_backend import RecordingSystemctl

pytestmark = [pytest.mark.integration, pytest.mark.slow]

QEMU_SAID = "No 'usb-bus' bus found for device 'usb-tablet'"


class Units:
    """systemd's part: ``enable --now`` runs the unit's ExecStart, ``stop`` SIGTERMs it."""

    def __init__(self, systemctl: RecordingSystemctl, root: Path) -> None:
        self.backend: SystemdBackend | None = None
        self.root = root
        self.procs: dict[str, asyncio.subprocess.Process] = {}
        systemctl.hooks["enable"] = self.enable
        systemctl.hooks["stop"] = self.stop
        systemctl.hooks["kill"] = self.stop

    def _vm(self, unit: str) -> str:
        assert self.backend is not None
        name = unit.removeprefix("corral-vm-").removesuffix(".service")
        assert unit_name(name) == unit
        return name

    async def enable(self, args: list[str]) -> None:
        if "--now" not in args:
            return
        assert self.backend is not None
        name = self._vm(args[-1])
        old = self.procs.get(name)
        if old is not None and old.returncode is None:
            return
        with (self.root / f"{name}.runner.log").open("ab") as log:
            self.procs[name] = await asyncio.create_subprocess_exec(
                *self.backend.runner_argv(name), stdin=asyncio.subprocess.DEVNULL,
                stdout=log, stderr=log, start_new_session=True,
            )  # fmt: skip

    async def stop(self, args: list[str]) -> None:
        proc = self.procs.get(self._vm(args[-1]))
        if proc is not None and proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 60)
            except TimeoutError:
                proc.kill()
                await proc.wait()

    async def close(self) -> None:
        """A runner killed leaves its qemu (its own session): as the unit's cgroup would,
        both go."""
        for name, proc in self.procs.items():
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            for pid in qemu_pids(name):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture
async def placed(short_dir: Path) -> AsyncIterator[tuple[Manager, SystemdBackend]]:
    policy_file = short_dir / "host.yaml"
    policy_file.write_text(yaml.safe_dump({"argsAllowlist": ["-device"]}))
    policy = HostPolicy(args_allowlist=["-device"])
    config = ManagerConfig(state_dir=short_dir / "st", backend="systemd", resync_seconds=1)
    systemctl = RecordingSystemctl()
    units = Units(systemctl, short_dir)
    holder: dict[str, Manager] = {}

    def on_event(name: str, event: dict[str, Any]) -> None:
        holder["manager"]._on_event(name, event)

    backend = SystemdBackend(
        config.vms, config.run, on_event, unit_dir=short_dir / "units", runner=systemctl,
        systemd_version=252, policy_file=policy_file, accelerator="tcg", event_poll=0.2,
    )  # fmt: skip
    units.backend = backend
    manager = Manager(config, policy=policy, backend=backend)
    holder["manager"] = manager
    try:
        await manager.open()
        yield manager, backend
    finally:
        await units.close()
        await manager.close()


async def _read(manager: Manager, name: str, source: Any = "console", **kw: Any) -> bytes:
    got = b""
    async for chunk in manager.logs(name, source, **kw):
        got += chunk
    return got


async def _until(check: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, f"{what}: not within {timeout}s"
        await asyncio.sleep(0.2)


async def test_systemd_placed_vms_serve_logs_and_qemus_words(
    placed: tuple[Manager, SystemdBackend], tiny_guest: Any
) -> None:
    manager, backend = placed
    doc = tiny(tiny_guest, "refused", extraArgs=["-device", "usb-tablet"])
    doc["spec"]["restartPolicy"] = "Never"
    await manager.create(doc)

    async def said() -> bool:
        return QEMU_SAID in (manager.get("refused").status.get("lastError") or "")

    await _until(said, 120, "the runner's StartFailed in lastError")
    error = manager.get("refused").status["lastError"]
    assert error.startswith("qemu exited before its QMP socket") and "qemu said:\n" in error
    qemu_log = await _read(manager, "refused", "qemu")
    assert QEMU_SAID.encode() in qemu_log and b"starting qemu" in qemu_log
    assert backend.log_file("refused", "qemu") == backend.run_root / "refused" / "qemu.log"

    with pytest.raises(Conflict, match="has no console log yet"):
        await manager.create(tiny(tiny_guest, "never", state="Stopped"))
        manager.logs("never")

    await manager.create(tiny(tiny_guest, "booted"))

    async def marker() -> bool:
        with contextlib.suppress(Conflict):
            return MARKER.encode() in await _read(manager, "booted")
        return False

    await _until(marker, 180, "the boot marker in the systemd runner's console log")
    assert (await _read(manager, "booted", tail=1)).strip() != b""
    await manager.stop("booted", wait=90)
