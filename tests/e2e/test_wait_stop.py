"""Waiting for VMs and stopping many (issue 11, items 4 and 5) against a real daemon, the
``corral`` CLI as a subprocess and real tiny guests (TCG):

* ``corral wait NAME --for=condition=Booted|state=...`` returns once it holds, and times out
  with a message that says where the VM is; ``start --wait=booted``; ``--wait`` alone is
  still Running;
* ``corral stop a b c --wait`` stops in parallel and carries on past a VM that does not exist;
* the ACPI request is pressed again while a stop waits (a guest told to ignore the first
  press powers off on the second);
* ``stoppedBy`` is ``quit`` after a powerdown timeout, in the status and in the Stopped event,
  every time (the race between the exit watcher and ``stop()``, by repetition);
* on a terminal a spinner shows the phases and a stop shows its countdown; on a pipe nothing
  animated is printed.
"""

from __future__ import annotations

import asyncio
import json
import os
import select
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from corral.client import Client
from tests.e2e.test_api_cli import Stack, _env, running_stack
from tests.integration import test_supervisor
from tests.integration.test_manager import qemu_pids, tiny
from tests.integration.test_supervisor import Vm, tiny_doc

pytestmark = [pytest.mark.integration, pytest.mark.slow]

vm = test_supervisor.vm
NAMES = ("ws-wait", "ws-boot", "ws-a", "ws-c", "ws-quit", "ws-tty")

# The guest's ACPI power-button handler, replaced: the first press is ignored (as by a guest
# still booting, or a desktop that asks first); a press 3 s or more later powers off.
IGNORE_FIRST_PRESS = r"""cat > /etc/acpi/PWRF/00000080 <<'EOF'
#!/bin/sh
now=$(cut -d. -f1 /proc/uptime)
if [ -f /run/first-press ]; then
    [ $((now - $(cat /run/first-press))) -ge 3 ] || exit 0
    echo CORRAL-POWERDOWN >/dev/console; sync; poweroff -f
fi
echo "$now" >/run/first-press
echo CORRAL-PRESS-IGNORED >/dev/console
EOF
cp /etc/acpi/PWRF/00000080 /etc/acpi/PWRB/00000080"""
DEAF = "kill $(cat /run/acpid.pid)"  # the guest ignores ACPI altogether


@pytest.fixture(scope="module")
def stack(tiny_guest: Any) -> Iterator[Stack]:
    yield from running_stack("ws", NAMES)


def _apply(stack: Stack, guest: Any, name: str, **vm: Any) -> None:
    path = stack.root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(tiny(guest, name, state="Stopped", **vm)))
    assert stack.ok("apply", "-f", str(path)).strip() == f"vm/{name} created"


def _events(stack: Stack, name: str) -> list[dict[str, Any]]:
    with Client(socket=stack.sock) as c:
        return list(c.events(name))


def _plain(text: str) -> None:
    """Nothing animated on a pipe: no carriage return, no escape sequence, no spinner."""
    assert "\r" not in text and "\x1b" not in text and "⠋" not in text, repr(text)


def _on_terminal(stack: Stack, *args: str, timeout: float = 300) -> tuple[int, str]:
    """Run the CLI with stdout and stderr on a pseudo-terminal; (exit code, all it wrote)."""
    import pty

    master, slave = pty.openpty()
    env = {**_env(stack.sock), "TERM": "xterm-256color", "COLUMNS": "120"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "corral.cli.main", *args],
        stdin=subprocess.DEVNULL, stdout=slave, stderr=slave, env=env,
    )  # fmt: skip
    os.close(slave)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 1)
            if not ready:
                continue
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        code = proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)
    return code, b"".join(chunks).decode(errors="replace")


def test_wait_returns_once_booted_and_times_out_saying_where_the_vm_is(
    stack: Stack, tiny_guest: Any
) -> None:
    _apply(stack, tiny_guest, "ws-wait")

    started = time.monotonic()
    late = stack.corral("wait", "ws-wait", "--for=condition=Booted", "--timeout", "2")
    elapsed = time.monotonic() - started
    assert late.returncode == 1, late
    assert late.stderr.startswith(
        "error: VM 'ws-wait': timed out after 2s waiting for condition=Booted; it is Stopped"
    ), late.stderr
    assert "Traceback" not in late.stderr and late.stdout == ""
    assert 2 <= elapsed < 30, elapsed

    stack.ok("start", "ws-wait")
    started = time.monotonic()
    out = stack.ok("wait", "ws-wait", "--for=condition=Booted", "--timeout", "240")
    print(f"corral wait --for=condition=Booted after start: {time.monotonic() - started:.1f}s")
    assert out == "vm/ws-wait condition=Booted met\n"
    _plain(out)
    status = stack.vm("ws-wait")["status"]
    assert status["state"] == "Running" and status["conditions"]["Booted"]["status"] is True

    # what already holds returns at once; several VMs at once; state= and case-insensitive
    started = time.monotonic()
    out = stack.ok("wait", "ws-wait", "--for=state=running")
    assert out == "vm/ws-wait state=running met\n" and time.monotonic() - started < 10

    missing = stack.corral("wait", "ws-wait", "nope", "--for=state=Running", "--timeout", "5")
    assert missing.returncode == 1
    assert missing.stdout == "vm/ws-wait state=Running met\n"
    assert missing.stderr.strip() == "error: VM 'nope' not found"
    bad = stack.corral("wait", "ws-wait", "--for=condition=Bogus", "--timeout", "5")
    assert bad.returncode == 1 and "for: 'condition=Bogus' is not state=STATE" in bad.stderr
    usage = stack.corral("wait", "ws-wait", "--for=Booted")
    assert usage.returncode == 2 and "--for" in usage.stderr

    stack.ok("stop", "ws-wait")
    out = stack.ok("wait", "ws-wait", "--for=state=Stopped", "--timeout", "120")
    assert out == "vm/ws-wait state=Stopped met\n"
    assert stack.vm("ws-wait")["status"]["state"] == "Stopped"


def test_start_wait_booted_and_bare_wait_still_means_running(stack: Stack, tiny_guest: Any) -> None:
    _apply(stack, tiny_guest, "ws-boot")
    out = stack.ok("start", "ws-boot", "--wait=booted", "--timeout", "240")
    assert out == "vm/ws-boot start (Booted)\n"
    _plain(out)
    assert stack.vm("ws-boot")["status"]["conditions"]["Booted"]["status"] is True

    # --wait before the name, as it always worked: the flag, then a VM name (Running)
    out = stack.ok("restart", "--wait", "ws-boot")
    assert out == "vm/ws-boot restart (Running)\n"
    assert stack.vm("ws-boot")["status"]["state"] == "Running"
    out = stack.ok("stop", "ws-boot", "--wait")
    assert out == "vm/ws-boot stop (Stopped, by powerdown)\n"
    bad = stack.corral("start", "ws-boot", "--wait=forever")
    assert bad.returncode == 2 and "'forever' is not one of" in bad.stderr


def test_stop_many_in_parallel_past_a_missing_vm_pressing_acpi_again(
    stack: Stack, tiny_guest: Any
) -> None:
    for name in ("ws-a", "ws-c"):
        _apply(stack, tiny_guest, name, powerdownTimeout=90)
    stack.ok("start", "ws-a", "ws-c", "--wait=booted", "--timeout", "240")
    for name in ("ws-a", "ws-c"):
        stack.guest(name, IGNORE_FIRST_PRESS)

    started = time.monotonic()
    done = stack.corral("stop", "ws-a", "ws-b", "ws-c", "--wait", "--timeout", "200")
    elapsed = time.monotonic() - started
    print(f"corral stop a b c --wait (first ACPI press ignored): {elapsed:.1f}s")

    assert done.returncode == 1, done
    assert done.stderr.strip() == "error: VM 'ws-b' not found"
    assert sorted(done.stdout.splitlines()) == [
        "vm/ws-a stop (Stopped, by powerdown)",
        "vm/ws-c stop (Stopped, by powerdown)",
    ]
    _plain(done.stdout)
    assert qemu_pids("ws-a") == [] and qemu_pids("ws-c") == []
    assert elapsed < 80, "a powerdownTimeout (90 s) ran out: the second press did not come"

    seen = {name: _events(stack, name) for name in ("ws-a", "ws-c")}
    for name, events in seen.items():
        kinds = [e["event"] for e in events]
        asked = kinds.index("PowerdownRequested")
        assert "PowerdownRepeated" in kinds[asked:], (name, kinds[asked:])
        assert "PowerdownTimeout" not in kinds[asked:], (name, kinds[asked:])
        repeat = next(e for e in events[asked:] if e["event"] == "PowerdownRepeated")
        assert repeat["attempt"] == 2
        stopped = [e for e in events if e["event"] == "StateChanged" and e["state"] == "Stopped"]
        assert stopped[-1]["stoppedBy"] == "powerdown"
        assert stack.vm(name)["status"]["stoppedBy"] == "powerdown"

    def at(name: str, kind: str, **match: Any) -> float:
        return max(e["t"] for e in seen[name] if e["event"] == kind
                   and all(e.get(k) == v for k, v in match.items()))  # fmt: skip

    # in parallel: each VM was asked to power off before the other one had stopped
    assert at("ws-c", "PowerdownRequested") < at("ws-a", "StateChanged", state="Stopped")
    assert at("ws-a", "PowerdownRequested") < at("ws-c", "StateChanged", state="Stopped")


def test_stopped_by_is_quit_after_a_powerdown_timeout_every_time(
    stack: Stack, tiny_guest: Any
) -> None:
    """Through the daemon: a stop that times out on the guest and quits qemu says so, in the
    Stopped event, the status and the CLI's line, each time; once on a booted guest that
    ignores ACPI, then stops sent while the guest still boots (it hears no ACPI yet)."""
    _apply(stack, tiny_guest, "ws-quit", powerdownTimeout=2)
    stack.ok("start", "ws-quit", "--wait=booted", "--timeout", "240")
    stack.guest("ws-quit", DEAF)
    for attempt in range(5):
        if attempt:
            stack.ok("start", "ws-quit")
        out = stack.ok("stop", "ws-quit", "--wait", "--timeout", "120")
        assert out == "vm/ws-quit stop (Stopped, by quit)\n", (attempt, out)
        assert stack.vm("ws-quit")["status"]["stoppedBy"] == "quit", attempt
        stopped = [e for e in _events(stack, "ws-quit")
                   if e["event"] == "StateChanged" and e["state"] == "Stopped"]  # fmt: skip
        assert len(stopped) == attempt + 1
        assert stopped[-1]["stoppedBy"] == "quit", (attempt, stopped[-1])
    assert qemu_pids("ws-quit") == []


async def test_runner_status_says_quit_when_the_exit_watcher_reports_first(
    vm: Vm, tiny_guest: Any
) -> None:
    """The runner alone (the status file is all ``corral run`` leaves): a stop right after the
    start quits qemu (the booting guest hears no ACPI); the exit watcher reports Stopped as
    soon as qemu is gone, before ``stop()`` resumes, and must find ``stoppedBy`` written.
    Before the fix it was null here every time; repeated to leave no luck involved."""
    for attempt in range(5):
        vm.events.clear()
        sup = vm.make(tiny_doc(tiny_guest, powerdownTimeout=1))
        await sup.start()
        how = await asyncio.wait_for(sup.stop(), 60)
        stopped = [e for e in vm.events if e["event"] == "StateChanged" and e["state"] == "Stopped"]
        status = json.loads(sup.paths.status_file.read_text())
        assert (how, status["state"], status["stoppedBy"]) == ("quit", "Stopped", "quit"), attempt
        assert [e["stoppedBy"] for e in stopped] == ["quit"], (attempt, stopped)
        assert sup.status.stopped_by == "quit" and sup.pid is None


def test_a_terminal_shows_the_phases_and_the_stop_countdown(stack: Stack, tiny_guest: Any) -> None:
    _apply(stack, tiny_guest, "ws-tty", powerdownTimeout=6)
    code, shown = _on_terminal(stack, "start", "ws-tty", "--wait=booted", "--timeout", "240")
    assert code == 0, shown
    assert "vm/ws-tty start (Booted)" in shown
    assert "\x1b[" in shown and "Running" in shown, repr(shown)  # a spinner line, redrawn
    assert any(frame in shown for frame in "⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏"), repr(shown)

    stack.guest("ws-tty", DEAF)
    code, shown = _on_terminal(stack, "stop", "ws-tty", "--wait", "--timeout", "120")
    assert code == 0, shown
    assert "Stopping: ACPI powerdown, quit in " in shown, repr(shown)
    assert "vm/ws-tty stop (Stopped, by quit)" in shown
