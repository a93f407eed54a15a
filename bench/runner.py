"""``corral run`` against qemu started directly: same guest, same argv, interleaved rounds.

Each round starts the tiny test guest three times: under ``corral run`` (a new process, so
Python's start-up and imports count), under a ``VmSupervisor`` in this already-warm process
(what the manager daemon pays per start), and as a bare qemu driven by the smallest
controller that can do the same job (qemu.qmp's synchronous client: connect QMP, ``cont``,
``system_powerdown``, ``quit`` after the guest's SHUTDOWN since the argv carries
``-no-shutdown``). The order rotates every round so that warm caches favour no side. Three
times are taken from the moment the process is spawned (or ``start()`` is called):

* ``qmp``    bare: QMP negotiated; corral: status file says Running (QMP connected, live
             settings applied, ``cont`` sent: strictly more work than the bare side);
* ``marker`` the guest's ready marker appears in the serial console log;
* ``stop``   from the stop request (SIGTERM to ``corral run``; ``system_powerdown`` for the
             bare side) to the process having exited.

Then one ``corral run`` idles with its booted VM for ``--idle`` seconds: the runner's own
RSS and CPU time over that window, with qemu's CPU time in the same window as the baseline.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from qemu.qmp.legacy import QEMUMonitorProtocol

from bench.common import REPO, guest_build, machine_summary, write_result

MARKER = "CORRAL-GUEST-READY"
POLL = 0.002


def _doc(guest: Any, root: Path) -> dict[str, Any]:
    return {
        "metadata": {"name": "bench"},
        "spec": {
            "guestShutdownStops": True,
            "vm": {
                "machine": "q35",
                "firmware": "bios",
                "maximumCpus": 1,
                "maximumRam": "256Mi",
                "powerdownTimeout": 60,
                "kernel": str(guest.kernel),
                "initrd": str(guest.initrd),
                "cmdline": guest.cmdline,
            },
        },
        "runner": {"dataDir": str(root / "data"), "runtimeDir": str(root / "run")},
    }


def _wait(check: Callable[[], bool], timeout: float, what: str, poll: float = POLL) -> float:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not within {timeout}s")
        time.sleep(poll)
    return time.monotonic()


def _has_marker(console: Path) -> bool:
    try:
        return MARKER.encode() in console.read_bytes()
    except OSError:
        return False


def _status(path: Path) -> dict[str, Any]:
    try:
        return dict(json.loads(path.read_text()))
    except (OSError, ValueError):
        return {}


def _corral_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(REPO / "src"), env.get("PYTHONPATH", "")) if p
    )
    return env


def _start_runner(config: Path, events: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "corral.cli.main", "run", "-c", str(config),
         "--accel", "tcg", "--events", str(events)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env=_corral_env(), start_new_session=True,
    )  # fmt: skip


def corral_round(guest: Any) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="cbr-", dir="/tmp") as tmp:
        root = Path(tmp)
        config = root / "vm.yaml"
        config.write_text(yaml.safe_dump(_doc(guest, root)))
        status_file, console = root / "run" / "status.json", root / "run" / "console.log"
        t0 = time.monotonic()
        proc = _start_runner(config, root / "events.jsonl")
        try:
            ready = _wait(lambda: _status(status_file).get("state") == "Running", 60, "Running")
            marker = _wait(lambda: _has_marker(console), 120, "marker")
            t_stop = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(timeout=120)
            gone = time.monotonic()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        if code != 0 or _status(status_file).get("stoppedBy") != "powerdown":
            raise RuntimeError(f"corral run ended badly: exit {code}, {_status(status_file)}")
        return {"qmp": ready - t0, "marker": marker - t0, "stop": gone - t_stop}


def _render(guest: Any, root: Path) -> list[str]:
    from corral.runner.config import render_for_host, resolve_paths
    from corral.spec import HostPolicy, parse_document

    doc = parse_document(_doc(guest, root))
    paths = resolve_paths(doc)
    paths.data_dir.mkdir(mode=0o700)
    paths.runtime_dir.mkdir(mode=0o700)
    return render_for_host(doc, paths, HostPolicy(), accelerator="tcg", paused=True)


def raw_round(guest: Any) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="cbq-", dir="/tmp") as tmp:
        root = Path(tmp)
        argv = _render(guest, root)
        console, qmp_path = root / "run" / "console.log", root / "run" / "qmp.sock"
        t0 = time.monotonic()
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        qmp = QEMUMonitorProtocol(str(qmp_path))
        try:
            _wait(qmp_path.exists, 30, "QMP socket")
            qmp.connect(negotiate=True)
            ready = time.monotonic()
            qmp.cmd("cont")
            marker = _wait(lambda: _has_marker(console), 120, "marker")
            t_stop = time.monotonic()
            qmp.cmd("system_powerdown")
            while True:
                event = qmp.pull_event(wait=60.0)
                if event is None:
                    raise RuntimeError("no SHUTDOWN event within 60 s")
                if event.get("event") == "SHUTDOWN":
                    break
            qmp.cmd("quit")
            proc.wait(timeout=60)
            gone = time.monotonic()
        finally:
            with contextlib.suppress(EOFError):  # qemu already gone after 'quit': expected
                qmp.close()
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        return {"qmp": ready - t0, "marker": marker - t0, "stop": gone - t_stop}


def supervisor_round(guest: Any) -> dict[str, float]:
    """The same VM under a VmSupervisor in this (already warm) process: what the manager
    daemon pays per start and stop, without a Python start-up."""
    import asyncio

    from corral.runner.supervisor import VmSupervisor
    from corral.spec import HostPolicy, parse_document

    async def run(root: Path) -> dict[str, float]:
        doc = parse_document(_doc(guest, root))
        from corral.runner.config import resolve_paths

        sup = VmSupervisor(doc, resolve_paths(doc), HostPolicy(), accelerator="tcg")
        console = root / "run" / "console.log"
        t0 = time.monotonic()
        await sup.start()
        ready = time.monotonic()
        while not _has_marker(console):
            if time.monotonic() - t0 > 120:
                raise RuntimeError("marker: not within 120s")
            await asyncio.sleep(POLL)
        marker = time.monotonic()
        how = await sup.stop()
        gone = time.monotonic()
        if how != "powerdown":
            raise RuntimeError(f"supervisor stop ended by {how}")
        return {"qmp": ready - t0, "marker": marker - t0, "stop": gone - marker}

    with tempfile.TemporaryDirectory(prefix="cbs-", dir="/tmp") as tmp:
        return asyncio.run(run(Path(tmp)))


def _proc_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _proc_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def idle(guest: Any, seconds: float) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="cbi-", dir="/tmp") as tmp:
        root = Path(tmp)
        config = root / "vm.yaml"
        config.write_text(yaml.safe_dump(_doc(guest, root)))
        status_file, console = root / "run" / "status.json", root / "run" / "console.log"
        proc = _start_runner(config, root / "events.jsonl")
        try:
            _wait(lambda: _has_marker(console), 120, "marker")
            _wait(lambda: bool(_status(status_file).get("bootedAt")), 60, "booted")
            time.sleep(2)  # let boot-time work (agent sync, IP poll) settle
            qemu_pid = int(_status(status_file)["pid"])
            r0, q0 = _proc_cpu(proc.pid), _proc_cpu(qemu_pid)
            time.sleep(seconds)
            r1, q1 = _proc_cpu(proc.pid), _proc_cpu(qemu_pid)
            rss = _proc_rss(proc.pid)
            qemu_rss = _proc_rss(qemu_pid)
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return {
        "seconds": seconds,
        "runner_cpu_s": r1 - r0,
        "runner_cpu_pct": 100 * (r1 - r0) / seconds,
        "qemu_cpu_s": q1 - q0,
        "runner_rss_mib": rss / 2**20,
        "qemu_rss_mib": qemu_rss / 2**20,
    }


def main(rounds: int, idle_seconds: float) -> dict[str, Any]:
    guest = guest_build.build_tiny()
    raw_round(guest)  # warm-up (page cache, KVM probe cache), not counted
    sides: dict[str, Callable[[Any], dict[str, float]]] = {
        "corral": corral_round,  # `corral run` as a new process: Python start-up included
        "supervisor": supervisor_round,  # the same supervisor in a warm process (the daemon)
        "raw": raw_round,
    }
    samples: dict[str, list[dict[str, float]]] = {side: [] for side in sides}
    names = list(sides)
    for i in range(rounds):
        order = names[i % 3 :] + names[: i % 3]  # rotate: warm caches favour no side
        for side in order:
            samples[side].append(sides[side](guest))
        print(f"  round {i + 1}/{rounds}: " + "; ".join(
            f"{side} " + " ".join(f"{k}={v:.3f}" for k, v in samples[side][-1].items())
            for side in names))  # fmt: skip
    table: dict[str, dict[str, float]] = {}
    for side in ("corral", "supervisor"):
        for metric in ("qmp", "marker", "stop"):
            c = statistics.median(s[metric] for s in samples[side])
            r = statistics.median(s[metric] for s in samples["raw"])
            allowed = max(0.05 * r, 0.030)
            table[f"{side} {metric}"] = {
                "corral_s": c,
                "raw_s": r,
                "ratio": c / r,
                "overhead_ms": 1000 * (c - r),
                "within_target": (c - r) <= allowed,
            }
    result = {
        "benchmark": "runner",
        "machine": machine_summary(),
        "accelerator": "tcg",
        "rounds": rounds,
        "medians": table,
        "idle": idle(guest, idle_seconds),
        "samples": samples,
    }
    write_result("runner", result)
    print(f"{'metric':18} {'corral':>9} {'raw':>9} {'ratio':>7} {'overhead':>10}  target")
    for metric, row in table.items():
        print(
            f"{metric:18} {row['corral_s']:8.3f}s {row['raw_s']:8.3f}s {row['ratio']:7.3f} "
            f"{row['overhead_ms']:8.1f}ms  {'ok' if row['within_target'] else 'MISSED'}"
        )
    i = result["idle"]
    print(
        f"idle {i['seconds']:.0f}s: runner CPU {i['runner_cpu_s']:.2f}s "
        f"({i['runner_cpu_pct']:.2f}%), RSS {i['runner_rss_mib']:.1f} MiB; "
        f"qemu CPU {i['qemu_cpu_s']:.2f}s, RSS {i['qemu_rss_mib']:.1f} MiB"
    )
    return result
