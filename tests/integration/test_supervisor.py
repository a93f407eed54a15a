"""VmSupervisor against real tiny guests under TCG (KVM is never assumed).

Each test boots its own VM in-process, as the manager will, and checks what the guest sees
through the guest agent (the supervisor's own channel) and what qemu reports over QMP.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from corral.errors import PolicyError
from corral.runner.config import resolve_paths
from corral.runner.status import Condition, VmState
from corral.runner.supervisor import VmSupervisor
from corral.spec import HostPolicy, parse_document

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MARKER = "CORRAL-GUEST-READY"
BOOT_TIMEOUT = 150.0


def tiny_doc(guest: Any, name: str = "t1", *, stops: bool = True, **vm: Any) -> dict[str, Any]:
    spec_vm: dict[str, Any] = {
        "machine": "q35",
        "firmware": "bios",
        "maximumCpus": 4,
        "currentCpus": 1,
        "maximumRam": "512Mi",
        "powerdownTimeout": 30,
        "kernel": str(guest.kernel),
        "initrd": str(guest.initrd),
        "cmdline": guest.cmdline,
    }
    spec_vm.update(vm)
    return {"metadata": {"name": name}, "spec": {"guestShutdownStops": stops, "vm": spec_vm}}


async def wait_until(
    check: Callable[[], bool], timeout: float, what: str, sup: VmSupervisor | None = None
) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            detail = f"; status: {sup.status.to_json()}" if sup else ""
            raise AssertionError(f"{what}: not within {timeout}s{detail}")
        await asyncio.sleep(0.1)


class Vm:
    """A supervised tiny VM in a short temp dir (unix socket paths are limited to 107 bytes)."""

    def __init__(self, root: Path, policy: HostPolicy | None = None) -> None:
        self.root = root
        self.policy = policy or HostPolicy()
        self.events: list[dict[str, object]] = []
        self.sup: VmSupervisor | None = None

    def make(self, doc: dict[str, Any]) -> VmSupervisor:
        parsed = parse_document(doc)
        paths = resolve_paths(
            parsed,
            data_dir=str(self.root / "data"),
            runtime_dir=str(self.root / "run"),
        )
        self.sup = VmSupervisor(
            parsed,
            paths,
            self.policy,
            accelerator="tcg",
            events=self.events.append,
            boot_marker=MARKER,
        )
        return self.sup

    async def boot(self, doc: dict[str, Any], *, agent: bool = True) -> VmSupervisor:
        sup = self.make(doc)
        await sup.start()
        assert sup.state is VmState.RUNNING
        cond = Condition.AGENT_CONNECTED if agent else Condition.BOOTED
        await wait_until(lambda: sup.status.condition(cond), BOOT_TIMEOUT, "boot", sup)
        return sup

    async def sh(self, command: str, timeout: float = 60) -> str:
        assert self.sup is not None and self.sup.agent is not None, "guest agent not connected"
        result = await self.sup.agent.exec(["/bin/sh", "-c", command], timeout=timeout)
        assert result.exit_code == 0, (command, result)
        return result.stdout.decode().strip()

    def event_names(self) -> list[str]:
        return [str(e["event"]) for e in self.events]


@pytest.fixture
async def vm() -> AsyncIterator[Vm]:
    root = Path(os.path.realpath("/tmp")) / f"cs-{os.getpid()}-{time.monotonic_ns() % 10**8}"
    root.mkdir()
    box = Vm(root)
    try:
        yield box
    finally:
        sup = box.sup
        if sup is not None and sup.state not in (VmState.STOPPED, VmState.CRASHED):
            try:
                await asyncio.wait_for(sup.stop(timeout=0), 30)
            except Exception:
                if sup.pid:
                    os.kill(sup.pid, signal.SIGKILL)
        shutil.rmtree(root, ignore_errors=True)


async def test_boot_status_and_graceful_stop(vm: Vm, tiny_guest: Any) -> None:
    sup = await vm.boot(tiny_doc(tiny_guest))
    assert sup.status.condition(Condition.BOOTED)
    assert sup.status.cpus == 1
    pid = sup.pid
    assert pid is not None and Path(f"/proc/{pid}").exists()
    status = sup.paths.status_file.read_text()
    assert '"state": "Running"' in status and f'"pid": {pid}' in status
    assert await vm.sh("echo hello") == "hello"

    how = await sup.stop()

    assert how == "powerdown"
    assert sup.state is VmState.STOPPED
    assert "CORRAL-POWERDOWN" in (sup.files.console_log.read_text(errors="replace"))
    assert not Path(f"/proc/{pid}").exists() or "Z" in _proc_state(pid)
    assert '"stoppedBy": "powerdown"' in sup.paths.status_file.read_text()


def _proc_state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


async def test_guest_ignoring_acpi_is_quit_after_timeout(vm: Vm, tiny_guest: Any) -> None:
    sup = await vm.boot(tiny_doc(tiny_guest, powerdownTimeout=3))
    await vm.sh("kill $(cat /run/acpid.pid)")
    started = time.monotonic()

    how = await sup.stop()

    elapsed = time.monotonic() - started
    assert how == "quit"
    assert elapsed >= 3, elapsed
    assert sup.state is VmState.STOPPED
    assert "PowerdownTimeout" in vm.event_names()
    assert "CORRAL-POWERDOWN" not in sup.files.console_log.read_text(errors="replace")


async def test_cpu_hotplug_and_unplug_seen_in_guest(vm: Vm, tiny_guest: Any) -> None:
    doc = tiny_doc(tiny_guest)
    sup = await vm.boot(doc)
    assert await vm.sh("nproc") == "1"

    doc["spec"]["vm"]["currentCpus"] = 3
    pending = await sup.apply(parse_document(doc))
    assert pending == []
    # hot-plugged CPUs arrive offline (no udev rule in the guest): the runner onlines them
    await _wait_guest(vm, "cat /sys/devices/system/cpu/online", "0-2", 120)
    assert sup.status.cpus == 3
    assert "VcpusOnlined" in vm.event_names()

    doc["spec"]["vm"]["currentCpus"] = 2
    await sup.apply(parse_document(doc))
    await _wait_guest(vm, "nproc", "2", 120)
    await wait_until(lambda: sup.status.cpus == 2, 60, "unplug reported", sup)


async def _wait_guest(vm: Vm, command: str, expected: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        try:
            last = await vm.sh(command, timeout=20)
        except Exception as exc:  # the agent may stall while CPUs come and go under TCG
            last = repr(exc)
        if last == expected:
            return
        await asyncio.sleep(0.5)
    raise AssertionError(f"guest: {command!r} gave {last!r}, expected {expected!r}")


async def test_balloon_to_half(vm: Vm, tiny_guest: Any) -> None:
    doc = tiny_doc(tiny_guest)
    sup = await vm.boot(doc)
    before_kb = int(await vm.sh("sed -n 's/^MemTotal: *\\([0-9]*\\).*/\\1/p' /proc/meminfo"))
    assert sup.status.ram == 512 * 1024**2

    doc["spec"]["vm"]["currentRam"] = "256Mi"
    await sup.apply(parse_document(doc))

    await wait_until(lambda: sup.status.ram == 256 * 1024**2, 60, "balloon actual", sup)
    assert sup.monitor is not None
    balloon = await sup.monitor.query_dict("query-balloon")
    assert balloon["actual"] == 256 * 1024**2
    after_kb = int(await vm.sh("sed -n 's/^MemTotal: *\\([0-9]*\\).*/\\1/p' /proc/meminfo"))
    assert before_kb - after_kb >= 250 * 1024, (before_kb, after_kb)


def _iso(path: Path, text: str) -> Path:
    staging = path.with_suffix(".d")
    staging.mkdir()
    (staging / "hello.txt").write_text(text)
    subprocess.run(
        ["genisoimage", "-quiet", "-r", "-V", "CORRALCD", "-o", str(path), str(staging)],
        check=True,
    )
    return path


async def test_cdrom_insert_change_eject(vm: Vm, tiny_guest: Any) -> None:
    iso1 = _iso(vm.root / "one.iso", "first disc")
    iso2 = _iso(vm.root / "two,2 x.iso", "second disc")
    doc = tiny_doc(tiny_guest, disks=[{"name": "cd0", "cdrom": {"image": ""}}])
    sup = await vm.boot(doc)
    assert (await sup.live_media()) == {"cd0": None}
    read = "mount -t iso9660 -o ro /dev/sr0 /mnt && cat /mnt/hello.txt; umount /mnt"

    for image, text in ((iso1, "first disc"), (iso2, "second disc")):
        doc["spec"]["vm"]["disks"][0]["cdrom"]["image"] = str(image)
        assert await sup.apply(parse_document(doc)) == []
        assert (await sup.live_media()) == {"cd0": str(image)}
        assert sup.status.cdrom == {"cd0": str(image)}
        await _wait_guest(vm, read, text, 60)

    doc["spec"]["vm"]["disks"][0]["cdrom"]["image"] = ""
    await sup.apply(parse_document(doc))
    assert (await sup.live_media()) == {"cd0": None}
    assert sup.agent is not None
    gone = await sup.agent.exec(["/bin/sh", "-c", "mount -t iso9660 -o ro /dev/sr0 /mnt"])
    assert gone.exit_code != 0


async def test_tpm_device_in_guest(vm: Vm, tiny_guest: Any) -> None:
    sup = await vm.boot(tiny_doc(tiny_guest, useTpm=True))
    swtpm = sup.status.swtpm_pid
    assert swtpm is not None
    assert await vm.sh("test -e /dev/tpm0 && echo yes") == "yes"
    await sup.stop()
    await wait_until(lambda: not Path(f"/proc/{swtpm}").exists() or "Z" in _proc_state(swtpm),
                     10, "swtpm stopped after qemu")  # fmt: skip
    assert (sup.paths.data_dir / "tpm").is_dir()


async def test_refused_change_keeps_running_and_restart_fields_are_pending(
    vm: Vm, tiny_guest: Any
) -> None:
    doc = tiny_doc(tiny_guest)
    sup = await vm.boot(doc)
    pid = sup.pid

    bad = tiny_doc(tiny_guest, extraArgs=["-monitor", "stdio"])
    with pytest.raises(PolicyError):
        await sup.apply(parse_document(bad))
    assert sup.state is VmState.RUNNING and sup.pid == pid
    assert sup.status.config_error and "argsAllowlist" in sup.status.config_error
    assert "ConfigRefused" in vm.event_names()

    doc["spec"]["vm"]["maximumRam"] = "1Gi"
    doc["spec"]["vm"]["powerdownTimeout"] = 5
    pending = await sup.apply(parse_document(doc))
    assert pending == ["spec.vm.maximumRam"]
    assert sup.status.config_error is None
    assert sup.status.pending_restart == ["spec.vm.maximumRam"]
    assert sup.pid == pid
    assert await vm.sh("echo still-here") == "still-here"


async def test_guest_shutdown_with_guest_shutdown_stops(vm: Vm, tiny_guest: Any) -> None:
    sup = await vm.boot(tiny_doc(tiny_guest, stops=True))
    assert sup.agent is not None
    await sup.agent.exec(["/bin/sh", "-c", "(sleep 0.5; poweroff -f) >/dev/null 2>&1 &"])

    state = await asyncio.wait_for(sup.wait_finished(), 60)

    assert state is VmState.STOPPED
    assert sup.status.stopped_by == "guest"
    assert sup.status.restarts == 0


async def test_guest_shutdown_without_stops_restarts(vm: Vm, tiny_guest: Any) -> None:
    sup = await vm.boot(tiny_doc(tiny_guest, stops=False))
    first_pid = sup.pid
    assert sup.agent is not None
    await sup.agent.exec(["/bin/sh", "-c", "(sleep 0.5; poweroff -f) >/dev/null 2>&1 &"])

    await wait_until(lambda: sup.status.restarts == 1, 60, "restart", sup)
    await wait_until(
        lambda: sup.state is VmState.RUNNING and sup.status.condition(Condition.AGENT_CONNECTED),
        BOOT_TIMEOUT,
        "running again",
        sup,
    )
    assert sup.pid != first_pid
    assert "GuestShutdownRestart" in vm.event_names()


async def test_guest_reset_keeps_running(vm: Vm, tiny_guest: Any) -> None:
    sup = await vm.boot(tiny_doc(tiny_guest))
    pid = sup.pid
    await sup.reset()
    await wait_until(lambda: not sup.status.condition(Condition.AGENT_CONNECTED), 30, "reset")
    await wait_until(lambda: sup.status.condition(Condition.AGENT_CONNECTED), BOOT_TIMEOUT, "up")
    assert sup.pid == pid and sup.state is VmState.RUNNING
    assert sup.status.restarts == 0


async def test_qemu_killed_is_crashed(vm: Vm, tiny_guest: Any) -> None:
    sup = await vm.boot(tiny_doc(tiny_guest), agent=False)
    assert sup.pid is not None
    os.kill(sup.pid, signal.SIGKILL)

    state = await asyncio.wait_for(sup.wait_finished(), 30)

    assert state is VmState.CRASHED
    assert sup.status.exit is not None and sup.status.exit["signal"] == signal.SIGKILL
    assert '"state": "Crashed"' in sup.paths.status_file.read_text()


async def test_comma_and_space_in_every_path(vm: Vm, tiny_guest: Any) -> None:
    odd = vm.root / "a,b c"
    odd.mkdir()
    kernel = shutil.copy(tiny_guest.kernel, odd / "vmlinuz,1 x")
    initrd = shutil.copy(tiny_guest.initrd, odd / "initrd,1 x")
    iso = _iso(odd / "cd,1 x.iso", "odd disc")
    vm.root = odd
    doc = tiny_doc(
        tiny_guest,
        kernel=str(kernel),
        initrd=str(initrd),
        useTpm=True,
        disks=[
            {"name": "data", "file": {"path": str(odd / "disk,1 x.qcow2"), "size": "16Mi"}},
            {"name": "cd0", "cdrom": {"image": str(iso)}},
        ],
    )
    sup = await vm.boot(doc)
    assert "," in str(sup.paths.runtime_dir) and " " in str(sup.paths.runtime_dir)
    assert await vm.sh("cat /sys/block/vda/size") == str(16 * 1024**2 // 512)
    assert await vm.sh("test -e /dev/tpm0 && echo yes") == "yes"
    assert (await sup.live_media()) == {"cd0": str(iso)}
    assert await sup.stop() == "powerdown"
