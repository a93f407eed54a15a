"""A guest cannot fill the host's disk through its serial console (issue 9, item 11a): a real
tiny guest under TCG floods ttyS0 and the runner keeps console.log within its cap, rotating
it like virtlogd (one old file). (Item 11b, the guest agent's replies, is tested against a
fake guest agent in ``tests/unit/test_guest_agent_replies.py``.)"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from corral.host.consolelog import rotated_path
from corral.runner.status import Condition
from corral.spec import HostPolicy
from tests.integration import test_supervisor
from tests.integration.test_supervisor import Vm, tiny_doc

vm = test_supervisor.vm  # the supervisor fixture, shared

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CAP = 128 * 1024
MARGIN = 512 * 1024  # what a flood writes between two checks (0.5 s), with TCG's jitter


def _size(path: Any) -> int:
    try:
        return int(path.stat().st_size)
    except FileNotFoundError:
        return 0


def _tail(path: Any) -> bytes:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, _size(path) - 4096))
            return f.read()
    except FileNotFoundError:
        return b""


def _numbers(data: bytes) -> list[int]:
    return [int(line) for line in data.split(b"\n")[1:-1] if line.strip().isdigit()]


async def test_a_flooding_guest_keeps_console_log_within_its_cap(vm: Vm, tiny_guest: Any) -> None:
    vm.policy = HostPolicy(console_log_max_size=CAP)
    sup = await vm.boot(tiny_doc(tiny_guest))
    log, old = sup.files.console_log, rotated_path(sup.files.console_log)
    # ~1.5 MiB of numbered lines, straight to the serial port, in the background
    await vm.sh("(seq 1 200000 >/dev/ttyS0; echo CORRAL-FLOOD-DONE >/dev/ttyS0) >/dev/null 2>&1 &")
    worst = 0
    started = time.monotonic()
    while not any(b"CORRAL-FLOOD-DONE" in _tail(p) for p in (log, old)):
        assert time.monotonic() < started + 120, f"flood not done: console.log {_size(log)} B"
        worst = max(worst, _size(log))
        await asyncio.sleep(0.05)

    assert worst > CAP // 2, "the guest wrote fast enough to need rotating"
    assert worst <= CAP + MARGIN, f"console.log reached {worst} bytes (cap {CAP})"
    assert old.exists() and _size(old) <= CAP + MARGIN
    assert sorted(p.name for p in log.parent.glob("console.log*")) == [
        "console.log",
        "console.log.1",
    ]
    # the newest lines are in console.log, older ones in console.log.1, in order
    newest, older = _numbers(log.read_bytes()), _numbers(old.read_bytes())
    assert older == sorted(older) and newest == sorted(newest)
    assert not newest or max(older) < min(newest)
    assert max(older + newest) == 200000
    # the runner is still well: status, agent, and a clean stop
    assert sup.status.condition(Condition.AGENT_CONNECTED)
    assert await vm.sh("echo still here") == "still here"
    assert await sup.stop() == "powerdown"
    assert "LogRotateFailed" not in vm.event_names()
