"""Injected faults against real tiny guests (TCG), each survived with a true status (issue 11):
a lost runtime dir never leads to a second qemu, a killed swtpm is reported and mended by a
restart, and ``kill``/``delete --force`` abort a graceful stop in flight at once."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from corral.errors import Conflict
from corral.runner.status import Condition, VmState
from corral.runner.supervisor import VmSupervisor
from corral.spec import HostPolicy, parse_document
from tests.integration import test_manager, test_supervisor
from tests.integration.test_manager import Box, qemu_pids, tiny, until
from tests.integration.test_supervisor import Vm, tiny_doc, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]

box = test_manager.box
vm = test_supervisor.vm

# TPM2_GetRandom(8), written to the guest's /dev/tpm0; the reply starts 80 01 (TPM_ST_NO_SESSIONS)
TPM_GET_RANDOM = (
    r"printf '\200\001\000\000\000\014\000\000\001\173\000\010' > /tmp/tpmcmd; "
    r"exec 3<>/dev/tpm0; cat /tmp/tpmcmd >&3 && dd bs=64 count=1 <&3 2>/dev/null | od -An -tx1"
)


def _events(box: Box, name: str) -> list[tuple[str, dict[str, Any]]]:
    assert box.manager is not None
    return [(e.kind, e.data) for e in box.manager.events(name)]


async def test_lost_runtime_dir_finds_the_old_qemu_and_never_starts_a_second(
    box: Box, tiny_guest: Any
) -> None:
    m = await box.open()
    await m.create(tiny(tiny_guest, "orph"))
    first = await box.running("orph")
    pid = first["pid"]
    assert qemu_pids("orph") == [pid]

    await m.close()  # the daemon goes away; qemu runs on
    shutil.rmtree(box.config.run / "orph")
    t0 = time.monotonic()
    m = await box.open()
    adopted_in = time.monotonic() - t0
    print(f"orphan adopted in {adopted_in:.2f}s")
    assert adopted_in < 8, "a qemu without its QMP socket is found without waiting for it"
    await asyncio.sleep(4)  # several resyncs (1 s): any second start would have happened

    assert qemu_pids("orph") == [pid]
    status = box.status("orph")
    assert status["state"] == "Running" and status["pid"] == pid
    assert status["conditions"]["QmpConnected"]["status"] is False
    assert status["conditions"]["QmpConnected"]["reason"] == "QmpSocketGone"
    assert status["pendingRestart"]
    kinds = [k for k, _ in _events(box, "orph")]
    assert "OrphanedQemuFound" in kinds and "Adopted" in kinds

    sup = m.backend.supervisor("orph")  # type: ignore[attr-defined]
    again = VmSupervisor(parse_document(tiny(tiny_guest, "orph")), sup.paths, HostPolicy())
    with pytest.raises(Conflict, match=f"pid {pid}"):
        await again.start()
    assert qemu_pids("orph") == [pid]

    started = time.monotonic()
    await m.stop("orph", wait=30)
    elapsed = time.monotonic() - started
    print(f"orphan stopped by SIGTERM in {elapsed:.2f}s")
    assert box.status("orph")["state"] == "Stopped", box.status("orph")
    assert box.status("orph")["stoppedBy"] == "quit"
    assert qemu_pids("orph") == []
    assert elapsed < 10


async def test_kill_aborts_a_pending_stop_at_once(box: Box, tiny_guest: Any) -> None:
    m = await box.open()
    await m.create(tiny(tiny_guest, "deaf", powerdownTimeout=60))
    await m.create(tiny(tiny_guest, "deaf2", powerdownTimeout=60))
    for name in ("deaf", "deaf2"):
        await box.running(name)
        result = await m.exec(name, ["/bin/sh", "-c", "kill $(cat /run/acpid.pid)"])
        assert result.exit_code == 0  # the guest now ignores ACPI powerdown

    await m.stop("deaf")  # returns at once; the reconciler waits on the powerdown
    await until(lambda: box.status("deaf")["state"] == "Stopping", 10, "deaf Stopping")
    await asyncio.sleep(1)
    started = time.monotonic()
    await m.kill("deaf")
    elapsed = time.monotonic() - started
    print(f"kill during a pending stop took {elapsed:.2f}s (powerdownTimeout 60)")
    assert elapsed < 3
    assert box.status("deaf")["state"] == "Stopped"
    assert box.status("deaf")["stoppedBy"] == "kill"
    assert qemu_pids("deaf") == []
    await until(
        lambda: ("Stopped", {"how": "kill"}) in _events(box, "deaf"), 5, "the stop's caller told"
    )

    await m.stop("deaf2")
    await until(lambda: box.status("deaf2")["state"] == "Stopping", 10, "deaf2 Stopping")
    started = time.monotonic()
    await m.delete("deaf2", force=True)
    elapsed = time.monotonic() - started
    print(f"delete --force during a pending stop took {elapsed:.2f}s")
    assert elapsed < 3
    assert qemu_pids("deaf2") == []
    assert "deaf2" not in m.store.names()


async def test_supervisor_stop_caller_sees_kill(vm: Vm, tiny_guest: Any) -> None:
    sup = await vm.boot(tiny_doc(tiny_guest, powerdownTimeout=60))
    await vm.sh("kill $(cat /run/acpid.pid)")
    stopping = asyncio.ensure_future(sup.stop())
    await wait_until(lambda: "PowerdownRequested" in vm.event_names(), 10, "powerdown asked")
    started = time.monotonic()
    await sup.kill()
    how = await asyncio.wait_for(stopping, 5)
    elapsed = time.monotonic() - started
    print(f"supervisor kill during stop: {elapsed:.2f}s")
    assert how == "kill" and elapsed < 3
    assert sup.state is VmState.STOPPED and sup.status.stopped_by == "kill"
    assert "StopAborted" in vm.event_names() and "PowerdownTimeout" not in vm.event_names()


async def test_swtpm_killed_is_reported_and_a_restart_mends_the_tpm(
    vm: Vm, tiny_guest: Any
) -> None:
    sup = await vm.boot(tiny_doc(tiny_guest, useTpm=True))
    assert (await vm.sh(TPM_GET_RANDOM)).startswith("80 01")
    swtpm = sup.status.swtpm_pid
    assert swtpm is not None

    os.kill(swtpm, signal.SIGKILL)
    await wait_until(lambda: "SwtpmDied" in vm.event_names(), 5, "SwtpmDied", sup)

    assert sup.state is VmState.RUNNING  # the guest runs on, without its TPM
    assert sup.status.swtpm_pid is None
    cond = sup.status.conditions["TpmAvailable"]
    assert cond.status is False and cond.reason == "SwtpmDied"
    assert any("swtpm" in p for p in sup.status.pending_restart)
    assert '"SwtpmDied"' in sup.paths.status_file.read_text()
    broken = await sup.exec(["/bin/sh", "-c", TPM_GET_RANDOM])
    assert b"Input/output error" in broken.stderr  # what the status now says

    assert await sup.stop() == "powerdown"
    state = sup.paths.data_dir / "tpm" / "tpm2-00.permall"
    assert state.exists()  # the TPM's state outlived its swtpm
    await sup.start()
    await wait_until(lambda: sup.status.condition(Condition.AGENT_CONNECTED), 150, "boot", sup)
    assert sup.status.swtpm_pid not in (None, swtpm)
    assert sup.status.conditions["TpmAvailable"].status is True
    assert sup.status.pending_restart == []
    assert (await vm.sh(TPM_GET_RANDOM)).startswith("80 01")


def test_identity_lookup_ignores_other_processes(tmp_path: Path) -> None:
    from corral.host import find_qemu

    assert find_qemu(tmp_path / "qemu.pid", uuid="00000000-0000-0000-0000-000000000000",
                     name="nothing-here") == []  # fmt: skip
