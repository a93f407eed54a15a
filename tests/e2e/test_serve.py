"""``corral serve`` as a real daemon process: a host reboot (VMs desired Running, no qemu)
starts them; ``kill -9`` of the daemon leaves every VM running and a new daemon re-attaches
to all of them without restarting one; one daemon per state dir; ``corral host shutdown``
stops them all gracefully and reports how."""

from __future__ import annotations

import asyncio
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

from corral.manager import Manager, ManagerConfig, Store
from corral.spec import HostPolicy
from tests.integration.test_manager import qemu_pids, tiny

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
COUNT = 10


def corral(*args: str) -> list[str]:
    return [sys.executable, "-m", "corral.cli.main", *args]


def env() -> dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO / "src"), e.get("PYTHONPATH")) if p)
    return e


class Daemon:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.proc: subprocess.Popen[bytes] | None = None
        (root / "host.yaml").write_text("{}\n")
        # 10 one-CPU VMs on a 2-core CI machine: more than the default 4x CPU overcommit
        (root / "corral.yaml").write_text("cpuOvercommit: 8\nautostartParallel: 4\n")
        self.config = str(root / "corral.yaml")

    def start(self) -> subprocess.Popen[bytes]:
        with (self.root / "daemon.log").open("ab") as log:
            self.proc = subprocess.Popen(
                corral("serve", "--state-dir", str(self.root), "--accel", "tcg", "--resync", "1",
                       "--policy", str(self.root / "host.yaml"), "--config", self.config,
                       "--socket", str(self.root / "api.sock")),
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env(),
                start_new_session=True,
            )  # fmt: skip
        return self.proc

    def log(self) -> str:
        return (self.root / "daemon.log").read_text(errors="replace")[-4000:]

    def statuses(self) -> dict[str, dict[str, Any]]:
        store = Store(self.root / "corral.db")
        try:
            return {r.name: r.status for r in store.all()}
        finally:
            store.close()

    def wait(self, check: Callable[[dict[str, dict[str, Any]]], bool], timeout: float,
             what: str) -> dict[str, dict[str, Any]]:  # fmt: skip
        deadline = time.monotonic() + timeout
        while True:
            statuses = self.statuses()
            if check(statuses):
                return statuses
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"{what}: daemon exited {self.proc.returncode}\n{self.log()}")
            if time.monotonic() > deadline:
                states = {n: s.get("state") for n, s in statuses.items()}
                raise AssertionError(f"{what}: not within {timeout}s: {states}\n{self.log()}")
            time.sleep(0.2)


def all_booted(statuses: dict[str, dict[str, Any]]) -> bool:
    return len(statuses) == COUNT and all(
        s.get("state") == "Running"
        and s.get("conditions", {}).get("AgentConnected", {}).get("status") is True
        for s in statuses.values()
    )


@pytest.fixture
def daemon() -> Iterator[Daemon]:
    root = Path(os.path.realpath("/tmp")) / f"cd-{os.getpid()}-{time.monotonic_ns() % 10**8}"
    root.mkdir()
    d = Daemon(root)
    try:
        yield d
    finally:
        if d.proc is not None and d.proc.poll() is None:
            d.proc.kill()
            d.proc.wait()
        for i in range(COUNT):
            for pid in qemu_pids(f"e2e{i}"):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(root, ignore_errors=True)


def define_offline(root: Path, docs: list[dict[str, Any]]) -> None:
    """Write desired state with no daemon running (like ``virsh define`` while libvirtd is
    down): the Python API on a manager that is never opened changes only the store."""

    async def go() -> None:
        config = ManagerConfig(state_dir=root, accelerator="tcg", cpu_overcommit=8)
        manager = Manager(config, policy=HostPolicy())
        try:
            for doc in docs:
                await manager.create(doc)
        finally:
            await manager.close()

    asyncio.run(go())


@pytest.mark.timeout(900)
def test_reboot_autostart_daemon_kill9_reattach_and_host_shutdown(
    daemon: Daemon, tiny_guest: Any
) -> None:
    define_offline(daemon.root, [tiny(tiny_guest, f"e2e{i}", maximumCpus=1) for i in range(COUNT)])
    assert all(s["state"] == "Stopped" for s in daemon.statuses().values())

    first = daemon.start()
    t0 = time.monotonic()
    booted = daemon.wait(all_booted, 600, "10 VMs Running after a 'reboot'")
    autostart_s = time.monotonic() - t0
    pids = {n: s["pid"] for n, s in booted.items()}
    started = {n: s["startedAt"] for n, s in booted.items()}

    second = subprocess.run(
        corral("serve", "--state-dir", str(daemon.root), "--socket", str(daemon.root / "b.sock")),
        capture_output=True, text=True,
        env=env(), timeout=60, check=False,
    )  # fmt: skip
    assert second.returncode == 1
    assert f"pid {first.pid}" in second.stderr

    first.kill()  # SIGKILL: no chance to clean up
    first.wait()
    time.sleep(1)
    for name, pid in pids.items():
        assert qemu_pids(name) == [pid], f"{name} must survive the daemon"

    new = daemon.start()
    t1 = time.monotonic()
    # the store still shows the old daemon's observations: wait for the new one to be up
    daemon.wait(lambda _: f'"pid": {new.pid},' in daemon.log(), 60, "new daemon started")
    reattach_s = time.monotonic() - t1
    again = daemon.wait(all_booted, 60, "re-attached")
    assert {n: s["pid"] for n, s in again.items()} == pids, "no VM may be restarted"
    assert {n: s["startedAt"] for n, s in again.items()} == started
    for name in pids:
        console = (daemon.root / "run" / name / "console.log").read_text(errors="replace")
        assert console.count("CORRAL-GUEST-READY") == 1, f"{name} booted twice"
    assert '"reattached": [' in daemon.log()
    print(f"autostart of {COUNT} VMs: {autostart_s:.1f}s; re-attach: {reattach_s:.1f}s")

    assert daemon.proc is not None
    daemon.proc.send_signal(signal.SIGTERM)
    assert daemon.proc.wait(timeout=60) == 0
    assert all(qemu_pids(n) == [p] for n, p in pids.items()), "SIGTERM leaves VMs running"

    shutdown = subprocess.run(
        corral("host", "shutdown", "--state-dir", str(daemon.root), "--json",
               "--config", daemon.config),
        capture_output=True, text=True, env=env(), timeout=300, check=False,
    )  # fmt: skip
    assert shutdown.returncode == 0, shutdown.stderr
    assert json.loads(shutdown.stdout) == {n: "powerdown" for n in pids}
    assert all(qemu_pids(n) == [] for n in pids)
    assert all(s["desiredState"] == "Running" for s in daemon.statuses().values())
