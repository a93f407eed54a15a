"""Starts that cannot succeed, against a real daemon, the ``corral`` CLI as a subprocess and
real guests under TCG (issue 11, items 1 and 2):

* ``corral start NAME --wait`` of a VM whose qemu refuses its argv returns at once (not after
  ``--timeout``) with qemu's own message and a non-zero exit; the VM is ``Failed`` and stays
  so (StartFailed counted over several resyncs) until it is stopped;
* ``corral start`` of a VM whose port forward's host port another program listens on is
  refused before qemu starts, naming the field;
* a VM with nothing to boot shows ``Booted`` false with reason ``BootTimeout`` and the
  console's last lines, a ``corral wait --for=condition=Booted`` then ends at once saying so,
  and ``corral stop --wait`` ends it at once (``quit-unbooted``), not after its
  ``powerdownTimeout``.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from corral.client import Client
from tests.e2e.test_api_cli import Stack, running_stack
from tests.integration.test_boot_failures import FORWARD_FIELD, forward, no_boot_device
from tests.integration.test_manager import qemu_pids, tiny

pytestmark = [pytest.mark.integration, pytest.mark.slow]

NAMES = ("sf-vga", "sf-port", "sf-noboot")


@pytest.fixture(scope="module")
def stack(tiny_guest: Any) -> Iterator[Stack]:
    """A daemon whose host policy lets documents pass ``-vga`` (a word qemu checks itself)."""
    yield from running_stack("sf", NAMES, "argsAllowlist: [-vga]\n")


def _apply(stack: Stack, doc: dict[str, Any]) -> None:
    name = doc["metadata"]["name"]
    path = stack.root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc))
    assert stack.ok("apply", "-f", str(path)).strip() == f"vm/{name} created"


def _count(stack: Stack, name: str, kind: str) -> int:
    with Client(socket=stack.sock) as c:
        return sum(1 for e in c.events(name) if e.get("event") == kind)


def test_start_wait_returns_qemus_error_at_once_and_the_vm_stays_failed(
    stack: Stack, tiny_guest: Any
) -> None:
    _apply(stack, tiny(tiny_guest, "sf-vga", state="Stopped", extraArgs=["-vga", "bogusvga"]))

    begun = time.monotonic()
    done = stack.corral("start", "sf-vga", "--wait", "--timeout", "240")
    took = time.monotonic() - begun

    assert done.returncode == 1, done
    assert took < 60, f"start --wait gave up after {took:.1f}s (its timeout is 240 s)"
    assert "unknown vga type: bogusvga" in done.stderr
    assert "failed to start, twice the same way" in done.stderr
    status = stack.vm("sf-vga")["status"]
    assert status["state"] == "Failed"
    assert "unknown vga type: bogusvga" in status["lastError"]

    time.sleep(6)  # six resyncs: no retry
    assert _count(stack, "sf-vga", "StartFailed") == 2
    assert stack.vm("sf-vga")["status"]["state"] == "Failed"
    assert qemu_pids("sf-vga") == []

    stack.ok("stop", "sf-vga", "--wait", "--timeout", "60")  # a Failed VM stops like any
    status = stack.vm("sf-vga")["status"]
    assert status["desiredState"] == "Stopped" and status["state"] in ("Stopped", "Crashed")


def test_start_of_a_vm_whose_host_port_is_taken_is_refused_before_qemu(
    stack: Stack, tiny_guest: Any
) -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = int(held.getsockname()[1])
        _apply(stack, tiny(tiny_guest, "sf-port", state="Stopped", networks=forward(port)))

        done = stack.corral("start", "sf-port", "--wait", "--timeout", "240")

    assert done.returncode == 1, done
    assert FORWARD_FIELD in done.stderr
    assert f"tcp 127.0.0.1:{port} is taken on this host" in done.stderr
    assert stack.vm("sf-port")["status"].get("desiredState") != "Running"
    assert _count(stack, "sf-port", "StartFailed") == 0  # refused before any start
    assert qemu_pids("sf-port") == []


def test_a_vm_that_never_boots_says_why_and_stops_at_once(stack: Stack) -> None:
    # 30 s: OVMF under TCG prints its first lines within ~3 s on an idle machine, but a loaded
    # one (10 guests booting beside it) left the console empty after 10 s
    _apply(stack, {**no_boot_device("sf-noboot", bootTimeout=30, state="Running")})

    def timed_out() -> bool:
        booted = stack.vm("sf-noboot")["status"].get("conditions", {}).get("Booted", {})
        return bool(booted.get("reason") == "BootTimeout")

    stack.wait(timed_out, 90, "BootTimeout")
    booted = stack.vm("sf-noboot")["status"]["conditions"]["Booted"]
    assert booted["status"] is False
    assert "BdsDxe" in booted["message"] or "Shell" in booted["message"]
    shown = stack.ok("show", "sf-noboot")  # the console's words, for a person
    assert "Not booted:" in shown and "no sign of a booted guest" in shown
    assert "BdsDxe" in shown or "Shell" in shown

    begun = time.monotonic()  # a wait for Booted ends now, saying why, not at its timeout
    waited = stack.corral("wait", "sf-noboot", "--for=condition=Booted", "--timeout", "240")
    assert waited.returncode == 1, waited
    assert time.monotonic() - begun < 30
    assert "VM 'sf-noboot' did not boot: no sign of a booted guest" in waited.stderr
    assert "BdsDxe" in waited.stderr or "Shell" in waited.stderr

    begun = time.monotonic()
    out = stack.ok("stop", "sf-noboot", "--wait", "--timeout", "240")
    took = time.monotonic() - begun

    assert out.strip() == "vm/sf-noboot stop (Stopped, by quit-unbooted)"
    assert took < 30, f"the stop took {took:.1f}s (powerdownTimeout 600)"
    assert _count(stack, "sf-noboot", "PowerdownSkipped") == 1
    assert qemu_pids("sf-noboot") == []
