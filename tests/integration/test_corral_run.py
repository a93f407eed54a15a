"""``corral run`` as a real process: signals, re-attach after the runner dies, config watch,
crash reporting, and cloud-init on the Debian guest."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MARKER = "CORRAL-GUEST-READY"


class Runner:
    """One ``corral run`` process for a VM document in a short temp dir."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.config = root / "vm.yaml"
        self.status_file = root / "run" / "status.json"
        self.events = root / "events.jsonl"
        self.proc: subprocess.Popen[bytes] | None = None

    def write(self, doc: dict[str, Any]) -> None:
        doc = dict(doc)
        doc["runner"] = {
            "dataDir": str(self.root / "data"),
            "runtimeDir": str(self.root / "run"),
            "bootMarker": MARKER,
        }
        tmp = self.config.with_suffix(".tmp")
        tmp.write_text(yaml.safe_dump(doc))
        tmp.replace(self.config)

    def start(self) -> subprocess.Popen[bytes]:
        with (self.root / "runner.err").open("ab") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "corral.cli.main", "run", "-c", str(self.config),
                 "--accel", "tcg", "--events", str(self.events), "--poll", "0.2"],
                stdin=subprocess.DEVNULL,
                stderr=err,
                start_new_session=True,
            )  # fmt: skip
        return self.proc

    def status(self) -> dict[str, Any]:
        try:
            return dict(json.loads(self.status_file.read_text()))
        except (OSError, ValueError):
            return {}

    def wait(self, check: Callable[[dict[str, Any]], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while True:
            status = self.status()
            if status and check(status):
                return
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"{what}: runner exited {self.proc.returncode}; "
                                     f"{self.stderr()}\nstatus: {status}")  # fmt: skip
            if time.monotonic() > deadline:
                raise AssertionError(f"{what}: not within {timeout}s; status: {status}\n"
                                     f"{self.stderr()}")  # fmt: skip
            time.sleep(0.1)

    def wait_booted(self, timeout: float = 150) -> dict[str, Any]:
        self.wait(
            lambda s: (
                s.get("state") == "Running"
                and s["conditions"].get("AgentConnected", {}).get("status") is True
            ),
            timeout,
            "booted",
        )
        return self.status()

    def stderr(self) -> str:
        try:
            return (self.root / "runner.err").read_text()[-3000:]
        except OSError:
            return ""

    def event_names(self) -> list[str]:
        try:
            lines = self.events.read_text().splitlines()
        except OSError:
            return []
        return [json.loads(line)["event"] for line in lines if line.strip()]

    def console(self) -> str:
        try:
            return (self.root / "run" / "console.log").read_text(errors="replace")
        except OSError:
            return ""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.fixture
def runner() -> Iterator[Runner]:
    root = Path("/tmp") / f"cr-{os.getpid()}-{time.monotonic_ns() % 10**8}"
    root.mkdir()
    box = Runner(root)
    try:
        yield box
    finally:
        if box.proc is not None and box.proc.poll() is None:
            box.proc.kill()
            box.proc.wait()
        pid_file = root / "run" / "qemu.pid"
        if pid_file.exists():
            pid = int(pid_file.read_text().strip() or 0)
            if pid and _alive(pid):
                os.kill(pid, signal.SIGKILL)
        for pid_path in (root / "run").glob("swtpm.pid"):
            pid = int(pid_path.read_text().strip() or 0)
            if pid and _alive(pid):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(root, ignore_errors=True)


def tiny(guest: Any, **vm: Any) -> dict[str, Any]:
    spec_vm: dict[str, Any] = {
        "machine": "q35",
        "firmware": "bios",
        "maximumCpus": 2,
        "currentCpus": 1,
        "maximumRam": "512Mi",
        "powerdownTimeout": 30,
        "kernel": str(guest.kernel),
        "initrd": str(guest.initrd),
        "cmdline": guest.cmdline,
    }
    spec_vm.update(vm)
    return {"metadata": {"name": "run1"}, "spec": {"guestShutdownStops": True, "vm": spec_vm}}


def test_sigterm_powers_down_and_exits_zero(runner: Runner, tiny_guest: Any) -> None:
    runner.write(tiny(tiny_guest))
    proc = runner.start()
    status = runner.wait_booted()
    qemu_pid = status["pid"]

    proc.send_signal(signal.SIGTERM)

    assert proc.wait(timeout=60) == 0
    final = runner.status()
    assert final["state"] == "Stopped"
    assert final["stoppedBy"] == "powerdown"
    assert "CORRAL-POWERDOWN" in runner.console()
    assert not _alive(qemu_pid)


def test_runner_killed_then_new_runner_reattaches(runner: Runner, tiny_guest: Any) -> None:
    runner.write(tiny(tiny_guest))
    first = runner.start()
    status = runner.wait_booted()
    qemu_pid = status["pid"]
    booted_at = status["bootedAt"]

    first.kill()  # SIGKILL: no chance to clean up
    first.wait()
    time.sleep(1)
    assert _alive(qemu_pid), "qemu must survive its runner"

    second = runner.start()
    runner.wait(lambda s: "Attached" in runner.event_names(), 60, "attached")
    status = runner.wait_booted()
    assert status["pid"] == qemu_pid
    assert status["restarts"] == 0
    # the guest kept running: its console never printed a second boot
    assert runner.console().count(MARKER) == 1
    assert status["startedAt"] is not None and booted_at is not None

    second.send_signal(signal.SIGTERM)
    assert second.wait(timeout=60) == 0
    assert not _alive(qemu_pid)


def test_config_changes_apply_live_and_bad_config_is_refused(
    runner: Runner, tiny_guest: Any
) -> None:
    doc = tiny(tiny_guest)
    runner.write(doc)
    proc = runner.start()
    status = runner.wait_booted()
    qemu_pid = status["pid"]

    doc["spec"]["vm"]["currentRam"] = "256Mi"
    runner.write(doc)
    runner.wait(lambda s: s.get("ram") == 256 * 1024**2, 60, "balloon applied")

    runner.config.write_text(
        "metadata: {name: run1}\nspec:\n  vm:\n    currentCpus: [not a number\n"
    )
    runner.wait(lambda s: bool(s.get("configError")), 30, "bad config reported")
    assert runner.status()["state"] == "Running"
    assert runner.status()["pid"] == qemu_pid

    doc["spec"]["vm"]["maximumRam"] = "1Gi"
    runner.write(doc)
    runner.wait(lambda s: s.get("pendingRestart") == ["spec.vm.maximumRam"], 30, "pending")
    assert runner.status()["configError"] is None

    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0


def test_qemu_killed_runner_reports_crash_and_exits_one(runner: Runner, tiny_guest: Any) -> None:
    runner.write(tiny(tiny_guest))
    proc = runner.start()
    runner.wait(lambda s: s.get("state") == "Running", 60, "running")
    os.kill(runner.status()["pid"], signal.SIGKILL)

    assert proc.wait(timeout=30) == 1
    final = runner.status()
    assert final["state"] == "Crashed"
    assert final["exit"]["signal"] == signal.SIGKILL


def test_debian_cloud_init_hostname_and_user_data(runner: Runner, debian_guest: Any) -> None:
    doc = {
        "metadata": {"name": "ci-debian"},
        "spec": {
            "guestShutdownStops": True,
            "cloudInit": {
                "userData": {
                    "runcmd": [["sh", "-c", "echo corral-userdata host=$(hostname) >/dev/ttyS0"]]
                },
            },
            "vm": {
                "machine": "q35",
                "firmware": "bios",
                "maximumCpus": 2,
                "currentCpus": 2,
                "maximumRam": "1Gi",
                "powerdownTimeout": 60,
                "kernel": str(debian_guest.kernel),
                "initrd": str(debian_guest.initrd),
                "cmdline": debian_guest.cmdline,
                "disks": [{"name": "root", "file": {"image": str(debian_guest.disk)}}],
            },
        },
    }
    base_stat = os.stat(debian_guest.disk)
    runner.write(doc)
    proc = runner.start()
    runner.wait_booted(timeout=400)
    runner.wait(lambda s: MARKER in runner.console(), 400, "cloud-final marker")

    # the runner holds the guest agent's only connection: user-data reports over the console
    runner.wait(
        lambda s: "corral-userdata host=ci-debian" in runner.console(), 60, "user-data output"
    )
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 0
    assert runner.status()["stoppedBy"] == "powerdown"
    assert os.stat(debian_guest.disk).st_mtime == base_stat.st_mtime, "base image was written"
    assert (runner.root / "data" / "root.qcow2").exists()


def test_runner_exits_at_once_after_flushing_its_events(runner: Runner, tiny_guest: Any) -> None:
    """A stopped ``corral run`` leaves with ``os._exit`` (no interpreter teardown: an atexit
    hook never runs) only after qemu is gone and its last events and status are written."""
    runner.write(tiny(tiny_guest))
    marker = runner.root / "teardown-ran"
    probe = (f"import atexit, pathlib; atexit.register(pathlib.Path({str(marker)!r}).touch); "
             "from corral.cli.main import main; main()")  # fmt: skip
    with (runner.root / "runner.err").open("ab") as err:
        proc = runner.proc = subprocess.Popen(
            [sys.executable, "-c", probe, "run", "-c", str(runner.config), "--accel", "tcg",
             "--poll", "0.2"],  # events as JSON lines on stderr: flushed before the exit
            stdin=subprocess.DEVNULL, stderr=err, start_new_session=True,
        )  # fmt: skip
    qemu_pid = runner.wait_booted()["pid"]

    proc.send_signal(signal.SIGTERM)

    assert proc.wait(timeout=60) == 0
    assert not _alive(qemu_pid) and runner.status()["state"] == "Stopped"
    events = [json.loads(line) for line in runner.stderr().splitlines() if line.startswith("{")]
    last = events[-1] if events else {}
    assert last.get("event") == "StateChanged" and last.get("state") == "Stopped", events[-3:]
    assert not marker.exists(), "corral run waited for the interpreter's teardown"
