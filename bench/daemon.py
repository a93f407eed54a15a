"""What the manager and api benchmarks share: ``corral serve`` as a subprocess in a temp
state dir, VMs defined offline, the store read without the daemon, qemu processes found (and
killed) by their state dir, and latency percentiles.

Not a benchmark itself (it is not in ``bench.__main__.BENCHMARKS``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import signal
import sqlite3
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

from bench.runner import _corral_env, _doc, _proc_cpu, _proc_rss

__all__ = [
    "Daemon",
    "corral_argv",
    "cpu_s",
    "define_offline",
    "kill_qemus",
    "latency",
    "qemu_pids_under",
    "rss",
    "tiny_doc",
]

cpu_s = _proc_cpu
rss = _proc_rss


def corral_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "corral.cli.main", *args]


def tiny_doc(guest: Any, name: str, *, state: str = "Stopped") -> dict[str, Any]:
    """The runner benchmark's guest (same spec: 1 CPU, 256 MiB, q35, BIOS, direct kernel) as
    a manager document: the manager owns the runner section, so it has none."""
    doc = _doc(guest, Path("/nonexistent"))
    spec = doc["spec"]
    spec["vm"]["state"] = state
    return {"metadata": {"name": name, "labels": {"suite": "bench"}}, "spec": spec}


def latency(samples_ns: Sequence[int]) -> dict[str, float]:
    """p50/p99 (nearest rank) and mean in milliseconds."""
    ordered = sorted(samples_ns)

    def rank(q: float) -> float:
        return ordered[max(0, math.ceil(q * len(ordered)) - 1)] / 1e6

    return {
        "n": len(ordered),
        "p50_ms": rank(0.50),
        "p99_ms": rank(0.99),
        "mean_ms": statistics.fmean(ordered) / 1e6,
    }


def define_offline(state_dir: Path, docs: Sequence[dict[str, Any]], cpu_overcommit: float) -> float:
    """Write desired state with no daemon running (a Manager that is never opened changes
    only the store), as tests/e2e/test_serve.py does. Returns the seconds it took."""
    from corral.manager import Manager, ManagerConfig
    from corral.spec import HostPolicy

    async def go() -> None:
        config = ManagerConfig(
            state_dir=state_dir, accelerator="tcg", cpu_overcommit=cpu_overcommit
        )
        manager = Manager(config, policy=HostPolicy())
        try:
            for doc in docs:
                await manager.create(doc)
        finally:
            await manager.close()

    t0 = time.monotonic()
    asyncio.run(go())
    return time.monotonic() - t0


def qemu_pids_under(root: Path) -> list[int]:
    """Every live qemu whose argv mentions ``root`` (its sockets and pidfile live there):
    only this benchmark's VMs, whatever else runs on the machine."""
    wanted = str(root).encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state != "Z" and argv and b"qemu-system" in argv[0] and any(wanted in a for a in argv):
            found.append(int(entry.name))
    return found


def kill_qemus(root: Path) -> int:
    """SIGKILL (by pid) every qemu of this benchmark; how many there were."""
    pids = qemu_pids_under(root)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return len(pids)


class Daemon:
    """``corral serve`` in ``root/state`` with its API on ``root/corral.sock``, logging to
    ``root/daemon.log`` (appended to by every daemon started, like a journal)."""

    def __init__(self, root: Path, config: dict[str, Any] | None = None) -> None:
        self.root = root
        self.state = root / "state"
        self.sock = root / "corral.sock"
        self.log_path = root / "daemon.log"
        self.policy = root / "host.yaml"
        self.policy.write_text("{}\n")
        self.config_file = root / "corral.yaml"
        self.config_file.write_text(yaml.safe_dump(config or {}))
        self.proc: subprocess.Popen[bytes] | None = None

    def env(self) -> dict[str, str]:
        env = _corral_env()
        env["CORRAL_SOCKET"] = str(self.sock)
        env.pop("CORRAL_URL", None)
        env.pop("CORRAL_TOKEN", None)
        return env

    def start(self) -> subprocess.Popen[bytes]:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                corral_argv("serve", "--state-dir", str(self.state), "--accel", "tcg",
                            "--policy", str(self.policy), "--config", str(self.config_file),
                            "--socket", str(self.sock)),
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=self.env(),
                start_new_session=True,
            )  # fmt: skip
        return self.proc

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def log_events(self) -> list[dict[str, Any]]:
        events = []
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return []
        for line in text.splitlines():
            if line.startswith("{"):
                try:
                    events.append(dict(json.loads(line)))
                except ValueError:
                    continue
        return events

    def tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-3000:]
        except OSError:
            return ""

    def has_logged(self, event: str) -> bool:
        """This daemon (not an earlier one in the same log) logged ``event``."""
        # JSON log lines name the event in "message" (corral serve --log-format json)
        return any(
            event in (e.get("event"), e.get("message")) and e.get("pid") == self.pid
            for e in self.log_events()
        )

    def statuses(self) -> dict[str, dict[str, Any]]:
        """{name: status} straight from the SQLite file (no document parsing, no daemon)."""
        db = sqlite3.connect(self.state / "corral.db", timeout=5)
        try:
            return {n: json.loads(s) for n, s in db.execute("SELECT name, status FROM vms")}
        finally:
            db.close()

    def wait(
        self, check: Callable[[], bool], timeout: float, what: str, poll: float = 0.05
    ) -> float:
        deadline = time.monotonic() + timeout
        while not check():
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"{what}: daemon exited {self.proc.returncode}\n{self.tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what}: not within {timeout}s\n{self.tail()}")
            time.sleep(poll)
        return time.monotonic()

    def settle(self, quiet_cpu_s: float = 0.02, window: float = 1.0, timeout: float = 300) -> None:
        """Wait until the daemon's CPU time grows by less than ``quiet_cpu_s`` in ``window``
        seconds (its start-up reconcile of every VM is over)."""
        deadline = time.monotonic() + timeout
        last = cpu_s(self.pid)
        while True:
            time.sleep(window)
            now = cpu_s(self.pid)
            if now - last < quiet_cpu_s or time.monotonic() > deadline:
                return
            last = now

    def kill9(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def terminate(self, timeout: float = 120) -> int:
        """SIGTERM: the daemon exits and leaves every VM running."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise
        return int(self.proc.returncode)
