"""Failures that say what qemu said, and a VM's logs (issue 11, "Failures 3"), against a real
daemon, the ``corral`` CLI as a subprocess and real qemu with the tiny guest.

* a start that qemu itself refuses (``-device usb-tablet`` on a machine without a USB bus:
  a real mistake that the host policy lets through) shows qemu's own message in ``corral
  show``'s lastError, in the StartFailed and RestartScheduled events, and in ``logs --qemu``;
* ``corral logs`` shows the guest's serial console (its boot marker), ``--tail``, ``-f``
  follows new output across rotations of the console log, escape sequences the guest prints
  arrive shown (``^[``), not obeyed, unless ``--raw``;
* an unknown VM is a 404, one that never ran a clear 409; a crashed VM shows how qemu ended.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import yaml

from tests.e2e.test_api_cli import Stack, _env, running_stack
from tests.integration.harness import MARKER
from tests.integration.test_manager import qemu_pids, tiny

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CAP = 8192  # consoleLogMaxSize: small, so that a test sees the console log rotate
QEMU_SAID = "No 'usb-bus' bus found for device 'usb-tablet'"


@pytest.fixture(scope="module")
def stack(tiny_guest: Any) -> Iterator[Stack]:
    """A daemon whose policy lets extraArgs add a -device (usb-tablet is in the default
    device allowlist) and rotates console logs at 8 KiB."""
    policy = yaml.safe_dump({"argsAllowlist": ["-device"], "consoleLogMaxSize": CAP})
    yield from running_stack("lg", ("badusb", "chatty"), policy)


def _apply(stack: Stack, doc: dict[str, Any]) -> None:
    path = stack.root / f"{doc['metadata']['name']}.yaml"
    path.write_text(yaml.safe_dump(doc))
    stack.ok("apply", "-f", str(path))


def _events(stack: Stack, name: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stack.ok("events", name, "-o", "json").splitlines()]


def _value_block(shown: str, key: str) -> list[str]:
    """The lines of ``key``'s value in ``corral show``: its first, and those indented under
    it up to the next key (the indentation is asserted)."""
    lines = shown.splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith(f"{key}:"))
    column = len(lines[first]) - len(lines[first][len(key) + 1 :].lstrip())
    block = [lines[first][column:]]
    for line in lines[first + 1 :]:
        if not line.startswith(" "):
            break
        assert line.startswith(" " * column) and line[column] != " ", (line, column)
        block.append(line[column:])
    return block


def _corral_bytes(stack: Stack, *args: str) -> bytes:
    done = subprocess.run(
        [sys.executable, "-m", "corral.cli.main", *args], capture_output=True, timeout=120,
        check=False, env=_env(stack.sock),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_a_start_that_qemu_refuses_says_what_qemu_said(stack: Stack, tiny_guest: Any) -> None:
    _apply(stack, tiny(tiny_guest, "badusb", state="Stopped", extraArgs=["-device", "usb-tablet"]))
    stack.ok("start", "badusb")

    def said() -> bool:
        return QEMU_SAID in (stack.vm("badusb")["status"].get("lastError") or "")

    stack.wait(said, 120, "qemu's own words in lastError")
    error = stack.vm("badusb")["status"]["lastError"]
    assert error.startswith("qemu exited before its QMP socket"), error
    assert "(exit code 1); qemu said:\n" in error, error
    assert error.endswith(f"qemu-system-x86_64: -device usb-tablet: {QEMU_SAID}"), error
    assert "starting qemu" not in error  # corral's own line in qemu.log is not qemu's word

    block = _value_block(stack.ok("show", "badusb"), "Last error")
    assert block[0].startswith("qemu exited before its QMP socket")
    assert block[1:] == [f"qemu-system-x86_64: -device usb-tablet: {QEMU_SAID}"], block

    events = _events(stack, "badusb")
    failed = [e for e in events if e["event"] == "StartFailed"]
    assert failed, [e["event"] for e in events]
    assert failed[0]["stderr"] == f"qemu-system-x86_64: -device usb-tablet: {QEMU_SAID}"
    assert QEMU_SAID in failed[0]["error"] and failed[0]["type"] == "QemuError"
    scheduled = [e for e in events if e["event"] == "RestartScheduled"]
    assert scheduled and QEMU_SAID in scheduled[0]["detail"], scheduled

    qemu_log = stack.ok("logs", "badusb", "--qemu")
    assert QEMU_SAID in qemu_log and "starting qemu" in qemu_log, qemu_log
    stack.ok("stop", "badusb")


@pytest.fixture(scope="module")
def chatty(stack: Stack, tiny_guest: Any) -> str:
    doc = tiny(tiny_guest, "chatty")
    doc["spec"]["restartPolicy"] = "Never"  # the last test kills its qemu: it stays Crashed
    _apply(stack, doc)
    stack.wait(lambda: stack.corral("exec", "chatty", "--", "true").returncode == 0, 180, "agent")
    return "chatty"


def test_logs_show_the_guests_console_and_qemus_log(
    stack: Stack, chatty: str, tiny_guest: Any
) -> None:
    stack.wait(lambda: MARKER in stack.ok("logs", chatty), 120, "the boot marker in `logs`")
    # after a newline: the console's shell prompt (with its ^[[6n, a cursor-position query a
    # terminal would answer as if typed) has none
    stack.guest(chatty, r"printf '\nLAST-LINE-ONE\nLAST-LINE-TWO\n' >/dev/console")
    stack.wait(lambda: "LAST-LINE-TWO" in stack.ok("logs", chatty), 30, "the guest's echo")
    assert stack.ok("logs", chatty, "--tail", "2").splitlines() == [
        "LAST-LINE-ONE",
        "LAST-LINE-TWO",
    ]
    assert stack.ok("logs", chatty, "--tail", "0") == ""
    assert "starting qemu" in stack.ok("logs", chatty, "--qemu")

    missing = stack.corral("logs", "nope")
    assert missing.returncode == 1 and "VM 'nope' not found" in missing.stderr, missing.stderr
    _apply(stack, tiny(tiny_guest, "idle", state="Stopped"))
    never = stack.corral("logs", "idle")
    assert never.returncode == 1
    assert "VM 'idle' has no console log yet: it has not run" in never.stderr, never.stderr
    with httpx.Client(transport=httpx.HTTPTransport(uds=str(stack.sock))) as http:
        assert http.get("http://corral/v1/vms/nope/logs").status_code == 404
        refused = http.get("http://corral/v1/vms/idle/logs?source=qemu")
        assert refused.status_code == 409 and "no qemu log yet" in refused.json()["detail"]
        bad = http.get("http://corral/v1/vms/chatty/logs?source=disk")
        assert bad.status_code == 422 and bad.json()["errors"][0]["loc"] == "query.source"


def test_escape_sequences_are_shown_not_obeyed(stack: Stack, chatty: str) -> None:
    # clear screen, set the window title (OSC ... BEL), a one-byte C1 CSI in UTF-8, a lone
    # carriage return that would hide what came before it
    stack.guest(
        chatty,
        r"printf '\nESC-TEST hidden\r\033[2J\033]0;pwned\007 \302\2331m END\n' >/dev/console",
    )
    stack.wait(lambda: "ESC-TEST" in stack.ok("logs", chatty, "--tail", "3"), 30, "the printf")
    shown = _corral_bytes(stack, "logs", chatty, "--tail", "3")
    line = next(x for x in shown.decode().splitlines() if x.startswith("ESC-TEST"))
    assert line == "ESC-TEST hidden^[[2J^[]0;pwned^G \\x9b1m END", line
    assert not re.search(rb"[\x00-\x08\x0b-\x1f\x7f]|\xc2[\x80-\x9f]", shown), shown
    with httpx.Client(transport=httpx.HTTPTransport(uds=str(stack.sock))) as http:
        api = http.get("http://corral/v1/vms/chatty/logs", params={"tail": 3})
        assert api.headers["content-type"] == "text/plain; charset=utf-8"
        assert b"\x1b" not in api.content and b"^[[2J" in api.content
    raw = _corral_bytes(stack, "logs", chatty, "--tail", "3", "--raw")
    assert b"ESC-TEST hidden\r\x1b[2J\x1b]0;pwned\x07 \xc2\x9b1m END" in raw, raw


def test_follow_prints_new_output_across_rotations(stack: Stack, chatty: str) -> None:
    log = stack.root / "state" / "run" / chatty / "console.log"
    rotated = log.with_name("console.log.1")
    before = rotated.stat().st_mtime if rotated.exists() else 0.0
    seen = bytearray()
    with subprocess.Popen(
        [sys.executable, "-m", "corral.cli.main", "logs", chatty, "-f", "--tail", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env(stack.sock),
    ) as follower:  # fmt: skip
        out, err = follower.stdout, follower.stderr
        assert out is not None and err is not None

        def read() -> None:
            while chunk := out.read1(65536):
                seen.extend(chunk)

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        try:
            time.sleep(2)  # the follower is connected and at the end of the log
            # 600 numbered lines (~26 KiB, three times the cap) in bursts of 50 a second
            stack.ok("exec", chatty, "--timeout", "120", "--", "/bin/sh", "-c",
                     "i=0; while [ $i -lt 600 ]; do echo ROT-$i-abcdefghijklmnopqrstuvwxyz; "
                     "i=$((i+1)); [ $((i % 50)) = 0 ] && sleep 1; done >/dev/console")  # fmt: skip
            deadline = time.monotonic() + 60
            while b"ROT-599-" not in seen:
                assert follower.poll() is None, err.read()
                assert time.monotonic() < deadline, bytes(seen[-300:])
                time.sleep(0.2)
        finally:
            follower.send_signal(signal.SIGINT)  # Ctrl-C: the client goes away
            try:
                follower.wait(timeout=30)
            except subprocess.TimeoutExpired:
                follower.kill()
            reader.join(timeout=10)
    assert follower.returncode == 130
    assert rotated.exists() and rotated.stat().st_mtime > before, "no rotation happened"
    assert log.stat().st_size < 2 * CAP
    numbers = [int(n) for n in re.findall(rb"ROT-(\d+)-abcdefghijklmnopqrstuvwxyz\n", seen)]
    assert numbers == list(range(600)), numbers
    assert MARKER.encode() not in seen  # --tail 0: only what came after
    assert "Traceback" not in stack.log()


def test_a_crashed_vm_shows_how_qemu_ended(stack: Stack, chatty: str) -> None:
    (pid,) = qemu_pids(chatty)
    os.kill(pid, signal.SIGTERM)  # not corral's stop: qemu says so on stderr and exits 0
    stack.wait(lambda: stack.vm(chatty)["status"]["state"] == "Crashed", 60, "Crashed")
    shown = stack.ok("show", chatty)
    assert _value_block(shown, "Exit") == ["code 0"], shown
    said = _value_block(shown, "qemu stderr")
    assert said[-1].startswith("qemu-system-x86_64: terminating on signal 15 from pid"), shown
    assert len(said) <= 20
