"""``corral delete --force`` (REST ``DELETE /v1/vms/{name}?force=true``) against a real daemon
and a real tiny guest that ignores ACPI: it kills at once, aborting the graceful stop in
flight, instead of waiting out ``powerdownTimeout`` (issue 11, fault 4)."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from tests.e2e import test_api_cli
from tests.e2e.test_api_cli import Stack
from tests.integration.test_manager import qemu_pids, tiny

pytestmark = [pytest.mark.integration, pytest.mark.slow]

stack = test_api_cli.stack


@pytest.fixture
def deaf(stack: Stack, tiny_guest: Any) -> Iterator[str]:
    doc = tiny(tiny_guest, "deaf-cli", state="Stopped", powerdownTimeout=60)
    (stack.root / "deaf.yaml").write_text(yaml.safe_dump(doc))
    stack.ok("apply", "-f", str(stack.root / "deaf.yaml"))
    stack.ok("start", "deaf-cli", "--wait")
    stack.wait(lambda: stack.corral("exec", "deaf-cli", "--", "true").returncode == 0, 150,
               "agent")  # fmt: skip
    stack.guest("deaf-cli", "kill $(cat /run/acpid.pid)")  # ACPI powerdown is ignored now
    try:
        yield "deaf-cli"
    finally:
        for pid in qemu_pids("deaf-cli"):
            os.kill(pid, signal.SIGKILL)


def test_delete_force_aborts_a_pending_stop(stack: Stack, deaf: str) -> None:
    stack.ok("stop", deaf)
    stack.wait(lambda: stack.vm(deaf)["status"]["state"] == "Stopping", 10, "Stopping")
    started = time.monotonic()
    out = stack.ok("delete", deaf, "--force")
    elapsed = time.monotonic() - started
    print(f"corral delete --force during a pending stop: {elapsed:.2f}s (powerdownTimeout 60)")
    assert out.startswith(f"vm/{deaf} deleted")
    assert elapsed < 10
    assert qemu_pids(deaf) == []
    assert all(
        i["metadata"]["name"] != deaf for i in json.loads(stack.ok("list", "-o", "json"))["items"]
    )
