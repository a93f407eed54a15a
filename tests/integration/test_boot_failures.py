"""Guests that never boot, and starts that fail the same way every time (issue 11, items 1 and
2), with real qemu and real guests under TCG:

* a VM with no boot device (OVMF finds nothing and sits in its shell) is reported
  ``Booted`` false with reason ``BootTimeout`` and the console's last lines once
  ``bootTimeout`` has passed, and a stop quits it at once instead of waiting
  ``powerdownTimeout`` for an ACPI answer that cannot come; a guest that boots in time is
  never timed out, and is still powered down by ACPI;
* a port forward to a host port another socket listens on is refused before qemu starts, by
  the runner and at the manager's admission (and two VMs cannot both ask for one port);
* a start that fails the same way twice (qemu refuses its argv) is ``Failed``, not retried
  with backoff forever (StartFailed counted over several resyncs), ``start --wait`` ends with
  qemu's own message at once, and a spec change clears it.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest

from corral.errors import Conflict, QemuError
from corral.runner.status import Condition, VmState
from tests.integration import test_manager, test_supervisor
from tests.integration.test_manager import Box, qemu_pids, tiny, until
from tests.integration.test_supervisor import Vm, tiny_doc, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]

vm = test_supervisor.vm
box = test_manager.box


def no_boot_device(name: str, **vm: Any) -> dict[str, Any]:
    """OVMF with nothing to boot: no kernel, no disk (it ends in its UEFI shell)."""
    spec_vm: dict[str, Any] = {
        "firmware": "uefi",
        "maximumCpus": 1,
        "maximumRam": "256Mi",
        "powerdownTimeout": 600,
        "bootTimeout": 15,
    }
    spec_vm.update(vm)
    return {"metadata": {"name": name}, "spec": {"vm": spec_vm}}


@pytest.fixture
def held_port() -> Iterator[int]:
    """A TCP port on 127.0.0.1 that another program listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield int(sock.getsockname()[1])


def forward(port: int) -> list[dict[str, Any]]:
    return [{"user": {"portForwards": [{"hostPort": port, "guestPort": 22}]}}]


FORWARD_FIELD = "spec.vm.networks[0].user.portForwards[0].hostPort"


# --- BootTimeout and the stop of a guest that never booted ----------------------------------


async def test_no_boot_device_times_out_with_the_console_tail_and_stops_at_once(vm: Vm) -> None:
    sup = vm.make(no_boot_device("bf-noboot"))
    started = time.monotonic()
    await sup.start()
    assert sup.state is VmState.RUNNING

    await wait_until(
        lambda: sup.status.condition_reason(Condition.BOOTED) == "BootTimeout",
        15 + 60,
        "BootTimeout",
        sup,
    )
    waited = time.monotonic() - started
    assert 14 <= waited < 15 + 60
    booted = sup.status.to_json()["conditions"]["Booted"]  # type: ignore[index]
    assert booted["status"] is False and booted["reason"] == "BootTimeout"
    message = booted["message"]
    # Vm.make gives the runner a boot marker too
    assert message.startswith("no sign of a booted guest (guest agent or boot marker) within 15s")
    assert "BdsDxe" in message or "Shell" in message, message  # OVMF's own words
    assert "\x1b" not in message and "\r" not in message  # its screen codes are not replayed
    (event,) = [e for e in vm.events if e["event"] == "BootTimeout"]
    assert event["timeout"] == 15 and event["consoleTail"] in message

    begun = time.monotonic()
    how = await sup.stop()
    took = time.monotonic() - begun

    assert how == "quit-unbooted"
    assert took < 30, f"a stop of a guest that never booted took {took:.1f}s"  # not 600
    assert sup.state is VmState.STOPPED
    assert sup.status.stopped_by == "quit-unbooted"
    names = vm.event_names()
    assert "PowerdownSkipped" in names and "PowerdownRequested" not in names
    (skipped,) = [e for e in vm.events if e["event"] == "PowerdownSkipped"]
    assert skipped["evidence"], skipped  # the firmware's own line that proves it
    assert qemu_pids("bf-noboot") == []


async def test_a_guest_that_boots_in_time_is_not_timed_out(vm: Vm, tiny_guest: Any) -> None:
    limit = 45
    started = time.monotonic()
    sup = await vm.boot(tiny_doc(tiny_guest, "bf-intime", bootTimeout=limit))
    booted_after = time.monotonic() - started
    assert booted_after < limit, "the guest booted too slowly for this test's bound"

    await asyncio.sleep(limit + 3 - booted_after)  # past the bound

    assert sup.status.condition(Condition.BOOTED)
    assert "BootTimeout" not in vm.event_names()
    assert await sup.stop() == "powerdown"  # a booted guest still gets its ACPI request


async def test_a_booted_guest_without_a_sign_is_still_powered_down_and_restarts_clean(
    vm: Vm, tiny_guest: Any
) -> None:
    """A guest that boots but gives no sign corral knows (no agent, a marker it never prints:
    a desktop image without qemu-guest-agent) is reported BootTimeout, yet a stop must not
    quit it: nothing proves it cannot answer ACPI, and quitting a running OS loses data. A
    restart then starts with a clean Booted condition (no BootTimeout of the last run)."""
    sup = vm.make(tiny_doc(tiny_guest, "bf-silent", guestAgent=False, bootTimeout=8))
    sup._boot_marker = "A-MARKER-THIS-GUEST-NEVER-PRINTS"
    await sup.start()
    await wait_until(
        lambda: sup.status.condition_reason(Condition.BOOTED) == "BootTimeout", 60, "BootTimeout",
        sup,
    )  # fmt: skip
    console = sup.files.console_log
    await wait_until(lambda: b"CORRAL-GUEST-READY" in console.read_bytes(), 120, "booted", sup)

    assert await sup.stop() == "powerdown"
    assert sup.status.stopped_by == "powerdown"
    assert "PowerdownSkipped" not in vm.event_names()

    await sup.start()
    booted = sup.status.to_json()["conditions"]["Booted"]  # type: ignore[index]
    assert booted["reason"] == "Starting" and "message" not in booted, booted
    await sup.stop(timeout=0)


# --- a host port already taken --------------------------------------------------------------


async def test_the_runner_refuses_a_taken_port_before_qemu_starts(
    vm: Vm, tiny_guest: Any, held_port: int
) -> None:
    sup = vm.make(tiny_doc(tiny_guest, "bf-port", networks=forward(held_port)))

    with pytest.raises(Conflict) as info:
        await sup.start()

    (issue,) = info.value.issues
    assert issue.loc == FORWARD_FIELD
    assert issue.reason == (
        f"tcp 127.0.0.1:{held_port} is taken on this host (Address already in use)"
    )
    assert sup.state is VmState.STOPPED and sup.pid is None
    assert qemu_pids("bf-port") == []
    assert not sup.files.stderr.exists()  # qemu never ran
    (failed,) = [e for e in vm.events if e["event"] == "StartFailed"]
    assert FORWARD_FIELD in str(failed["error"])


async def test_admission_refuses_a_taken_port_and_a_port_another_vm_asks_for(
    box: Box, tiny_guest: Any, held_port: int
) -> None:
    m = await box.open()
    with pytest.raises(Conflict) as info:
        await m.create(tiny(tiny_guest, "bf-adm", networks=forward(held_port)))
    assert [(i.loc, i.reason) for i in info.value.issues] == [
        (FORWARD_FIELD, f"tcp 127.0.0.1:{held_port} is taken on this host (Address already in use)")
    ]
    assert m.store.find("bf-adm") is None  # a refusal changes nothing

    await m.create(tiny(tiny_guest, "bf-adm", state="Stopped", networks=forward(held_port)))
    with pytest.raises(Conflict) as info:
        await m.start("bf-adm")
    assert info.value.issues[0].loc == FORWARD_FIELD
    assert m.get("bf-adm").desired == "Stopped"
    assert qemu_pids("bf-adm") == []

    with socket.socket() as probe:  # a free port, asked for by two VMs
        probe.bind(("127.0.0.1", 0))
        free = int(probe.getsockname()[1])
    await m.create(tiny(tiny_guest, "bf-one", networks=forward(free), guestAgent=False))
    with pytest.raises(Conflict) as info:
        await m.create(
            tiny(tiny_guest, "bf-two", networks=[{"user": {"portForwards": [
                {"hostPort": free, "guestPort": 80, "hostAddress": "0.0.0.0"}]}}])  # noqa: S104
        )  # fmt: skip
    assert [(i.loc, i.reason) for i in info.value.issues] == [
        (
            FORWARD_FIELD,
            f"tcp 0.0.0.0:{free}: VM 'bf-one' (running or desired Running) listens on it too",
        )
    ]


# --- a start that fails the same way twice --------------------------------------------------


def _kinds(box: Box, name: str, kind: str) -> int:
    assert box.manager is not None
    return sum(1 for e in box.manager.events(name) if e.kind == kind)


async def test_a_start_failing_the_same_way_twice_is_failed_not_retried(
    box: Box, tiny_guest: Any
) -> None:
    from corral.spec import HostPolicy

    m = await box.open(HostPolicy(args_allowlist=["-vga"]))
    bad = tiny(tiny_guest, "bf-fail", extraArgs=["-vga", "bogusvga"])  # qemu refuses it
    await m.create(bad)

    await until(lambda: box.status("bf-fail").get("state") == "Failed", 60, "Failed")
    await asyncio.sleep(6)  # six resyncs (1 s) and far past the backoff: nothing retries it
    status = box.status("bf-fail")
    assert status["state"] == "Failed" and status["desiredState"] == "Running"
    assert "unknown vga type: bogusvga" in status["lastError"]
    assert _kinds(box, "bf-fail", "StartFailed") == 2
    assert _kinds(box, "bf-fail", "RestartScheduled") == 1
    assert _kinds(box, "bf-fail", "Failed") == 1
    assert qemu_pids("bf-fail") == []

    # a user's start tries again (twice), and a wait for Running ends with qemu's words
    begun = time.monotonic()
    with pytest.raises(QemuError) as info:
        await m.start("bf-fail", wait=120)
    took = time.monotonic() - begun
    assert took < 30, f"start --wait took {took:.1f}s to give up"
    assert "failed to start, twice the same way" in str(info.value)
    assert "unknown vga type: bogusvga" in str(info.value)
    await until(lambda: _kinds(box, "bf-fail", "StartFailed") == 4, 10, "4 StartFailed")
    await asyncio.sleep(3)
    assert _kinds(box, "bf-fail", "StartFailed") == 4

    # a spec change clears it: the fixed document starts and boots
    await m.replace(tiny(tiny_guest, "bf-fail"))
    await box.running("bf-fail")
    assert box.status("bf-fail")["lastError"] is None
    await m.stop("bf-fail", wait=60)
