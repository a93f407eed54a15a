"""``GET /metrics``: the daemon and its VMs for Prometheus (text format, prometheus_client).

Per VM (label ``vm``, a DNS-1123 name; the values are read where they are real and cheap):

* from the manager's store: ``corral_vm_state{state}`` (1 for the state it is in),
  ``corral_vm_up``, ``corral_vm_vcpus`` and ``corral_vm_memory_bytes`` (what the runner
  applied: the CPUs online, ``query-balloon``'s ``actual``; absent while stopped), their maxima,
  ``corral_vm_restarts`` (crash restarts the manager counted);
* from qemu's process (``/proc/PID``, while running): ``corral_vm_cpu_seconds_total`` (qemu's
  user+system time, all vCPUs and I/O threads), ``corral_vm_resident_memory_bytes``,
  ``corral_vm_disk_read_bytes_total`` / ``..._written_bytes_total`` (qemu's block I/O as the
  host kernel counted it: every disk of the VM together),
  ``corral_vm_network_receive_bytes_total`` / ``..._transmit_bytes_total`` (label
  ``interface``: each tap qemu holds, from the guest's side; slirp NICs have none);
* from qemu over QMP (``query-blockstats``, where the backend holds the QMP connection: the
  embedded one): ``corral_vm_block_{read,written}_bytes_total`` and
  ``corral_vm_block_{read,write}_operations_total`` per ``drive``;
* the daemon: ``corral_up``, ``corral_manager_open``, ``corral_store_writable``,
  ``corral_reconciling``, ``corral_vms`` and the histogram ``corral_reconcile_seconds`` (one
  VM's reconcile pass).

The per-process and QMP reads are cached ``cache_seconds`` (2 s), so a scrape costs one read
of the store plus, at most every 2 s, a few small files and one QMP query per running VM. Who
may scrape: an admin (a bearer token), a user with role ``metrics``, or, with
``metricsOnLoopback: true`` in the API's options (``corral serve --metrics-on-loopback``),
anyone connecting from 127.0.0.1/::1.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import APIRouter
from fastapi.responses import Response
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from corral.errors import CorralError
from corral.manager import Manager, ManagerState
from corral.manager.backends import Capability

__all__ = ["METRICS_ROLE", "VmCollector", "metrics_registry", "metrics_routes"]

METRICS_ROLE = "metrics"
TEXT_FORMAT = "text/plain; version=0.0.4; charset=utf-8"  # what every Prometheus reads
STATES = ("Stopped", "Starting", "Running", "Stopping", "Crashed", "Failed")
_TICK = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True)
class ProcessSample:
    cpu_seconds: float
    resident_bytes: int
    read_bytes: int | None
    written_bytes: int | None
    nics: dict[str, tuple[int, int]]  # tap name -> (bytes the guest received, sent)


def read_nics(pid: int, proc: Path = Path("/proc"), sys_net: Path = Path("/sys/class/net")
              ) -> dict[str, tuple[int, int]]:  # fmt: skip
    """The tap devices process ``pid`` holds open (the tun driver names each in the fd's
    ``fdinfo``: ``iff:``), with the bytes its guest received and sent: the tap's transmit and
    receive counters (what the host sends into a tap, the guest receives). qemu holds the taps
    of ``tap`` and ``bridge`` NICs; user-mode (slirp) NICs have no host-side counters."""
    found: dict[str, tuple[int, int]] = {}
    base = proc / str(pid)
    try:
        fds = list((base / "fd").iterdir())
    except OSError:
        return found
    for fd in fds:
        try:
            if os.readlink(fd) != "/dev/net/tun":
                continue
            info = (base / "fdinfo" / fd.name).read_text()
        except OSError:
            continue
        for line in info.splitlines():
            key, _, name = line.partition(":")
            name = name.strip()
            if key == "iff" and name and "/" not in name and not name.startswith("."):
                stats = sys_net / name / "statistics"
                try:
                    received = int((stats / "tx_bytes").read_text())
                    sent = int((stats / "rx_bytes").read_text())
                except (OSError, ValueError):
                    continue
                found[name] = (received, sent)
    return found


def read_process(pid: int, proc: Path = Path("/proc")) -> ProcessSample | None:
    """qemu's counters from ``/proc/PID``; None when the process is gone or is not a qemu
    (a pid reused since the status was written)."""
    base = proc / str(pid)
    try:
        if b"qemu" not in (base / "cmdline").read_bytes().split(b"\0", 1)[0]:
            return None
        stat = (base / "stat").read_text()
        statm = (base / "statm").read_text().split()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "
    cpu = (int(fields[11]) + int(fields[12])) / _TICK  # utime, stime
    read = written = None
    try:
        io = dict(line.split(": ", 1) for line in (base / "io").read_text().splitlines())
        read, written = int(io["read_bytes"]), int(io["write_bytes"])
    except (OSError, KeyError, ValueError):
        pass  # /proc/PID/io needs the same user or CAP_SYS_PTRACE
    return ProcessSample(cpu, int(statm[1]) * _PAGE, read, written, read_nics(pid, proc))


@dataclass(frozen=True)
class DriveSample:
    drive: str
    read_bytes: int
    written_bytes: int
    read_operations: int
    write_operations: int

    @classmethod
    def parse(cls, entry: dict[str, Any]) -> DriveSample | None:
        stats = entry.get("stats")
        name = str(entry.get("device") or entry.get("qdev") or "").rsplit("/", 1)[-1]
        if not isinstance(stats, dict) or not name:
            return None
        try:
            return cls(name[:64], *(int(stats.get(k) or 0) for k in (
                "rd_bytes", "wr_bytes", "rd_operations", "wr_operations")))  # fmt: skip
        except (TypeError, ValueError):
            return None


class VmCollector(Collector):
    def __init__(self, manager: Manager, cache_seconds: float = 2.0) -> None:
        self.manager = manager
        self.cache_seconds = cache_seconds
        self._cache: dict[int, tuple[float, ProcessSample | None]] = {}
        self._drives: dict[str, tuple[float, list[DriveSample]]] = {}

    async def refresh(self) -> None:
        """Ask each running VM's qemu for ``query-blockstats`` (when the backend can; at most
        every ``cache_seconds``, 2 s per VM at most): :meth:`collect` cannot wait."""
        backend = self.manager.backend
        if Capability.BLOCK_STATS not in backend.capabilities:
            return
        now = time.monotonic()
        running = [r.name for r in self.manager.store.all()
                   if r.status.get("state") == "Running"]  # fmt: skip

        async def one(name: str) -> None:
            hit = self._drives.get(name)
            if hit is not None and now - hit[0] < self.cache_seconds:
                return
            try:
                entries = await asyncio.wait_for(backend.block_stats(name), 2)
            except (CorralError, TimeoutError):
                entries = []
            parsed = [DriveSample.parse(e) for e in entries]
            self._drives[name] = (now, [d for d in parsed if d is not None])

        await asyncio.gather(*(one(n) for n in running))
        for gone in set(self._drives) - set(running):
            del self._drives[gone]

    def _process(self, pid: int) -> ProcessSample | None:
        now = time.monotonic()
        hit = self._cache.get(pid)
        if hit is not None and now - hit[0] < self.cache_seconds:
            return hit[1]
        sample = read_process(pid)
        self._cache[pid] = (now, sample)
        return sample

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        manager = self.manager
        yield GaugeMetricFamily("corral_up", "the daemon answers", value=1)
        yield GaugeMetricFamily(
            "corral_manager_open", "the manager is open (reconciling or passive)",
            value=1 if manager.state is ManagerState.OPEN else 0,
        )  # fmt: skip
        yield GaugeMetricFamily(
            "corral_store_writable", "the manager can write its store",
            value=1 if manager.store_unavailable is None else 0,
        )  # fmt: skip
        yield GaugeMetricFamily(
            "corral_reconciling", "the manager reconciles VMs",
            value=1 if manager.reconciling else 0,
        )  # fmt: skip
        records = manager.store.all()
        yield GaugeMetricFamily("corral_vms", "VMs defined", value=len(records))
        state = GaugeMetricFamily("corral_vm_state", "1 for the VM's state", labels=["vm", "state"])
        up = GaugeMetricFamily("corral_vm_up", "the VM is Running", labels=["vm"])
        vcpus = GaugeMetricFamily("corral_vm_vcpus", "vCPUs online", labels=["vm"])
        vcpus_max = GaugeMetricFamily("corral_vm_vcpus_max", "maximumCpus", labels=["vm"])
        ram = GaugeMetricFamily("corral_vm_memory_bytes", "RAM (balloon size)", labels=["vm"])
        ram_max = GaugeMetricFamily("corral_vm_memory_max_bytes", "maximumRam", labels=["vm"])
        restarts = GaugeMetricFamily(
            "corral_vm_restarts", "crash restarts counted since it last ran well", labels=["vm"]
        )
        cpu = CounterMetricFamily(
            "corral_vm_cpu_seconds", "qemu's CPU time (user+system)", labels=["vm"]
        )
        rss = GaugeMetricFamily(
            "corral_vm_resident_memory_bytes", "qemu's resident memory", labels=["vm"]
        )
        disk_read = CounterMetricFamily(
            "corral_vm_disk_read_bytes", "bytes qemu read from storage", labels=["vm"]
        )
        disk_written = CounterMetricFamily(
            "corral_vm_disk_written_bytes", "bytes qemu wrote to storage", labels=["vm"]
        )
        net_in = CounterMetricFamily(
            "corral_vm_network_receive_bytes", "bytes the guest received on a tap NIC",
            labels=["vm", "interface"],
        )  # fmt: skip
        net_out = CounterMetricFamily(
            "corral_vm_network_transmit_bytes", "bytes the guest sent on a tap NIC",
            labels=["vm", "interface"],
        )  # fmt: skip
        drive_metrics = [
            CounterMetricFamily(f"corral_vm_block_{what}", help_, labels=["vm", "drive"])
            for what, help_ in (
                ("read_bytes", "bytes the guest read from a drive (query-blockstats)"),
                ("written_bytes", "bytes the guest wrote to a drive"),
                ("read_operations", "read requests the guest made of a drive"),
                ("write_operations", "write requests the guest made of a drive"),
            )
        ]
        for vm_name, (_, drives) in sorted(self._drives.items()):
            for d in drives:
                values = (d.read_bytes, d.written_bytes, d.read_operations, d.write_operations)
                for family, count in zip(drive_metrics, values, strict=True):
                    family.add_metric([vm_name, d.drive], count)
        yield from drive_metrics
        live: set[int] = set()
        for record in records:
            name, status, vm = record.name, record.status, record.document.vm
            current = str(status.get("state") or "Stopped")
            for known in (*STATES, *(() if current in STATES else (current,))):
                state.add_metric([name, known], 1 if known == current else 0)
            up.add_metric([name], 1 if current == "Running" else 0)
            vcpus_max.add_metric([name], vm.max_cpus)
            ram_max.add_metric([name], vm.maximum_ram)
            restarts.add_metric([name], int(status.get("restartCount") or 0))
            if current != "Running":
                continue
            if isinstance(status.get("cpus"), int):
                vcpus.add_metric([name], status["cpus"])
            if isinstance(status.get("ram"), int):
                ram.add_metric([name], status["ram"])
            pid = status.get("pid")
            sample = self._process(pid) if isinstance(pid, int) else None
            if sample is None:
                continue
            live.add(pid)  # type: ignore[arg-type]
            cpu.add_metric([name], sample.cpu_seconds)
            rss.add_metric([name], sample.resident_bytes)
            if sample.read_bytes is not None and sample.written_bytes is not None:
                disk_read.add_metric([name], sample.read_bytes)
                disk_written.add_metric([name], sample.written_bytes)
            for nic, (received, sent) in sorted(sample.nics.items()):
                net_in.add_metric([name, nic], received)
                net_out.add_metric([name, nic], sent)
        for pid in set(self._cache) - live:
            del self._cache[pid]
        yield from (state, up, vcpus, vcpus_max, ram, ram_max, restarts, cpu, rss,
                    disk_read, disk_written, net_in, net_out)  # fmt: skip


def metrics_registry(manager: Manager) -> tuple[CollectorRegistry, VmCollector]:
    """A registry of its own per app (not the process-global one): the VMs, and the reconcile
    latency the manager reports to ``reconcile_observers``."""
    registry = CollectorRegistry(auto_describe=False)
    collector = VmCollector(manager)
    registry.register(collector)
    latency = Histogram(
        "corral_reconcile_seconds", "one VM's reconcile pass", registry=registry,
        buckets=(0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 15, 60, 300),
    )  # fmt: skip
    manager.reconcile_observers.append(latency.observe)
    return registry, collector


def metrics_routes(manager: Manager) -> APIRouter:
    router = APIRouter(tags=["metrics"])
    registry, collector = metrics_registry(manager)

    @router.get("/metrics", response_class=Response)
    async def metrics() -> Response:
        await collector.refresh()
        return Response(generate_latest(registry), media_type=TEXT_FORMAT)

    return router
