"""The host overview's last hour: CPU and RAM in use, sampled in the daemon (so a page opened
now shows the hour before it) and kept in memory only (a restart starts a new hour)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["HostSample", "HostSampler"]

_PROC = Path("/proc")


@dataclass(frozen=True)
class HostSample:
    time: float  # unix seconds
    cpu_percent: float  # of all the host's CPUs, 0..100
    ram_used: int  # bytes: MemTotal - MemAvailable
    ram_total: int
    vm_cpus: int  # vCPUs of the running VMs
    vm_ram: int  # bytes: RAM of the running VMs (balloon target)
    running: int

    def to_json(self) -> dict[str, Any]:
        return {
            "time": round(self.time, 3), "cpuPercent": round(self.cpu_percent, 1),
            "ramUsed": self.ram_used, "ramTotal": self.ram_total, "vmCpus": self.vm_cpus,
            "vmRam": self.vm_ram, "running": self.running,
        }  # fmt: skip


def _cpu_times(proc: Path) -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs from /proc/stat."""
    fields = [int(v) for v in (proc / "stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    total = sum(fields[:8])  # guest time is counted in user already
    return total - idle, total


def _meminfo(proc: Path) -> tuple[int, int]:
    """(used, total) bytes from /proc/meminfo."""
    values: dict[str, int] = {}
    for line in (proc / "meminfo").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("MemTotal", "MemAvailable"):
            values[key] = int(rest.split()[0]) * 1024
    total = values.get("MemTotal", 0)
    return total - values.get("MemAvailable", total), total


VmUsage = Callable[[], tuple[int, int, int]]
"""(vCPUs, RAM bytes, count) of the running VMs."""


class HostSampler:
    """A ring of :class:`HostSample`, one every ``interval`` seconds over ``window`` seconds."""

    def __init__(
        self, vm_usage: VmUsage, *, interval: float = 10.0, window: float = 3600.0,
        proc: Path = _PROC,
    ) -> None:  # fmt: skip
        self.interval = interval
        self.samples: deque[HostSample] = deque(maxlen=max(1, int(window / interval)))
        self._vm_usage = vm_usage
        self._proc = proc
        self._last = _cpu_times(proc)

    def sample(self) -> HostSample:
        busy, total = _cpu_times(self._proc)
        d_busy, d_total = busy - self._last[0], total - self._last[1]
        self._last = (busy, total)
        used, ram_total = _meminfo(self._proc)
        cpus, ram, running = self._vm_usage()
        sample = HostSample(
            time.time(), 100.0 * d_busy / d_total if d_total > 0 else 0.0, used, ram_total,
            cpus, ram, running,
        )  # fmt: skip
        self.samples.append(sample)
        return sample

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[HostSampler]:
        """Sample every ``interval`` seconds while the context is open."""

        async def loop() -> None:
            while True:
                with contextlib.suppress(OSError, ValueError, IndexError):
                    self.sample()
                await asyncio.sleep(self.interval)

        task = asyncio.ensure_future(loop())
        try:
            yield self
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
