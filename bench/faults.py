"""Faults injected into a real ``corral serve`` and its VMs: when each is detected, when the
VM is back, and what is lost (issue 11's table).

A daemon (``bench.daemon.Daemon``, TCG, the tiny guest, 1 s restart backoff) runs ``--vms``
VMs (default 3; one with a TPM). Every round injects each fault once, in this order, and
waits for the system to come back before the next one:

* **qemu SIGKILL**: detected = the VM's status says Crashed; recovered = Running again
  (restart with backoff) and the guest's ready marker on its console.
* **daemon kill -9**, VMs running: recovered = a new daemon reports every VM Running with
  the *same* qemu pids (re-adopted, nothing restarted).
* **runtime dir deleted + daemon kill -9**: the pidfile and sockets are gone; recovered = the
  new daemon finds the old qemu by its argv (same pid, no second qemu).
* **swtpm SIGKILL**: detected = the ``SwtpmDied`` event; recovered = after ``corral restart``,
  Running with a new swtpm (the TPM state is on disk).
* **store write-locked** for ``--lock`` seconds by another process: the latency of a read
  (``GET /v1/vms``) and of a write (``POST start``) while locked, and how long after the lock
  is released a write succeeds.
* **host shutdown** through the API: every VM powered down; the reconciler starts none again.

Times are from the injection (the bench process's monotonic clock), polled every 20 ms from
the store file, medians over rounds. Baseline for the restart path: a plain ``corral start``
of a stopped VM to its ready marker, measured in the same round.
"""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench.common import guest_build, machine_summary, write_result
from bench.daemon import Daemon, qemu_pids_under, tiny_doc
from bench.runner import MARKER

POLL = 0.02


def _client(d: Daemon) -> Any:
    from corral.client import Client

    return Client(socket=d.sock, timeout=120)


def _events(d: Daemon, vm: str, after: int) -> list[tuple[int, str]]:
    db = sqlite3.connect(d.state / "corral.db", timeout=5)
    try:
        return list(db.execute("SELECT id, kind FROM events WHERE vm=? AND id>?", (vm, after)))
    finally:
        db.close()


def _last_event(d: Daemon) -> int:
    db = sqlite3.connect(d.state / "corral.db", timeout=5)
    try:
        return int(db.execute("SELECT COALESCE(MAX(id), 0) FROM events").fetchone()[0])
    finally:
        db.close()


def _marker_count(d: Daemon, name: str) -> int:
    try:
        return (d.state / "run" / name / "console.log").read_bytes().count(MARKER.encode())
    except OSError:
        return 0


def _state(d: Daemon, name: str) -> str | None:
    return d.statuses().get(name, {}).get("state")


def _pid(d: Daemon, name: str) -> int | None:
    pid = d.statuses().get(name, {}).get("pid")
    return int(pid) if pid else None


def _swtpm_pid(d: Daemon, name: str) -> int | None:
    pid = d.statuses().get(name, {}).get("swtpmPid")
    return int(pid) if pid else None


def _booted(d: Daemon, name: str, markers_before: int) -> bool:
    return _state(d, name) == "Running" and _marker_count(d, name) > markers_before


def _since(t0: float, when: float) -> float:
    return round(when - t0, 3)


def qemu_kill(d: Daemon, name: str) -> dict[str, Any]:
    pid = _pid(d, name)
    assert pid is not None, f"{name} has no pid"
    markers = _marker_count(d, name)
    t0 = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    detected = d.wait(lambda: _state(d, name) == "Crashed", 60, "Crashed", POLL)
    running = d.wait(lambda: _pid(d, name) not in (None, pid) and _state(d, name) == "Running",
                     120, "Running again", POLL)  # fmt: skip
    booted = d.wait(lambda: _booted(d, name, markers), 300, "booted again", POLL)
    return {
        "detected_s": _since(t0, detected),
        "running_s": _since(t0, running),
        "booted_s": _since(t0, booted),
        "lost": "guest memory (a crash); disks keep what the guest had flushed",
    }


def daemon_kill(d: Daemon, names: list[str], *, lose_runtime: str | None = None) -> dict[str, Any]:
    pids = {n: _pid(d, n) for n in names}
    qemus_before = sorted(qemu_pids_under(d.root))
    t0 = time.monotonic()
    d.kill9()
    if lose_runtime is not None:  # pidfile, sockets, status: all gone (qemu keeps running)
        shutil.rmtree(d.state / "run" / lose_runtime)
    d.start()

    def back() -> bool:
        s = d.statuses()
        return all(s.get(n, {}).get("state") == "Running" and s[n].get("pid") == pids[n]
                   and d.has_logged("DaemonReady") for n in names)  # fmt: skip

    recovered = d.wait(back, 120, "VMs re-adopted with the same pids", POLL)
    qemus_after = sorted(qemu_pids_under(d.root))
    result: dict[str, Any] = {
        "recovered_s": _since(t0, recovered),
        "same_pids": qemus_after == qemus_before,
        "qemus": len(qemus_after),
        "lost": "nothing" if qemus_after == qemus_before else f"{qemus_before} -> {qemus_after}",
    }
    if lose_runtime is not None:  # an adopted orphan has no QMP/agent: a restart mends it
        markers = _marker_count(d, lose_runtime)
        t1 = time.monotonic()
        with _client(d) as c:
            c.action(lose_runtime, "restart", wait=120)
        booted = d.wait(lambda: _booted(d, lose_runtime, markers), 300, "mended", POLL)
        result["mended_s"] = _since(t1, booted)
    return result


def swtpm_kill(d: Daemon, name: str) -> dict[str, Any]:
    swtpm = _swtpm_pid(d, name)
    assert swtpm is not None, f"{name} has no swtpm"
    after = _last_event(d)
    markers = _marker_count(d, name)
    t0 = time.monotonic()
    os.kill(swtpm, signal.SIGKILL)
    detected = d.wait(lambda: any(k == "SwtpmDied" for _, k in _events(d, name, after)),
                      60, "SwtpmDied", POLL)  # fmt: skip
    with _client(d) as c:
        t1 = time.monotonic()
        c.action(name, "restart", wait=120)
    booted = d.wait(lambda: _booted(d, name, markers) and _swtpm_pid(d, name) not in (None, swtpm),
                    300, "restarted with a new swtpm", POLL)  # fmt: skip
    return {
        "detected_s": _since(t0, detected),
        "restart_to_booted_s": _since(t1, booted),
        "lost": "TPM commands between the kill and the restart fail (EIO); TPM state on disk kept",
    }


def store_lock(d: Daemon, name: str, hold: float) -> dict[str, Any]:
    from corral.errors import CorralError

    locked = threading.Event()
    release = threading.Event()

    def holder() -> None:
        db = sqlite3.connect(d.state / "corral.db", timeout=30, isolation_level=None)
        db.execute("BEGIN EXCLUSIVE")
        locked.set()
        release.wait(hold)
        db.execute("ROLLBACK")
        db.close()

    thread = threading.Thread(target=holder)
    thread.start()
    locked.wait(10)
    result: dict[str, Any] = {}
    with _client(d) as c:
        t = time.monotonic()
        c.list_vms()
        result["read_while_locked_s"] = round(time.monotonic() - t, 3)
        t = time.monotonic()
        try:
            c.action(name, "stop")
            result["write_while_locked"] = "accepted"
        except CorralError as exc:
            result["write_while_locked"] = f"{getattr(exc, 'status', '?')}: {exc}"[:160]
        result["write_while_locked_s"] = round(time.monotonic() - t, 3)
        release.set()
        thread.join()
        t0 = time.monotonic()
        while True:
            try:
                c.action(name, "start")
                break
            except CorralError:
                if time.monotonic() - t0 > 30:
                    raise
                time.sleep(POLL)
        result["write_after_release_s"] = round(time.monotonic() - t0, 3)
    d.wait(lambda: _state(d, name) == "Running", 300, "Running after the lock", POLL)
    return result


def _agent(d: Daemon, name: str) -> bool:
    s = d.statuses().get(name, {})
    return bool(s.get("conditions", {}).get("AgentConnected", {}).get("status"))


def host_shutdown(d: Daemon, names: list[str]) -> dict[str, Any]:
    d.wait(lambda: all(_agent(d, n) for n in names), 300, "every guest booted", POLL)
    with _client(d) as c:
        t0 = time.monotonic()
        result = c.host_shutdown()
        took = time.monotonic() - t0
    time.sleep(3)  # the resync (1 s here) must not start any again
    live = qemu_pids_under(d.root)
    return {
        "all_stopped_s": round(took, 3),
        "how": sorted(set(result.values())),
        "restarted_after": len(live),
        "lost": "nothing (guests powered down by ACPI)",
    }


def baseline_start(d: Daemon, name: str) -> float:
    """``corral stop`` then ``start`` of the same VM: a plain restart's time to booted."""
    with _client(d) as c:
        c.action(name, "stop", wait=120)
        markers = _marker_count(d, name)
        t0 = time.monotonic()
        c.action(name, "start")
    return _since(t0, d.wait(lambda: _booted(d, name, markers), 300, "booted", POLL))


def one_round(guest: Any, vms: int, hold: float) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="corral-faults-", dir="/tmp"))
    d = Daemon(root, {"resyncSeconds": 1.0, "backoffInitialSeconds": 1.0})
    names = [f"f{i}" for i in range(vms)]
    result: dict[str, Any] = {}
    try:
        d.start()
        d.wait(d.sock.exists, 60, "daemon socket")
        with _client(d) as c:
            for i, n in enumerate(names):
                doc = tiny_doc(guest, n, state="Running")
                if i == 0:
                    doc["spec"]["vm"]["useTpm"] = True
                c.create_vm(doc)
        d.wait(lambda: all(_booted(d, n, 0) for n in names), 600, "all booted", POLL)
        result["baseline_restart_booted_s"] = baseline_start(d, names[-1])
        result["qemu_kill"] = qemu_kill(d, names[-1])
        result["daemon_kill9"] = daemon_kill(d, names)
        result["runtime_dir_lost"] = daemon_kill(d, names, lose_runtime=names[-1])
        result["swtpm_kill"] = swtpm_kill(d, names[0])
        result["store_locked"] = store_lock(d, names[-1], hold)
        result["host_shutdown"] = host_shutdown(d, names)
    finally:
        d.kill9()
        for pid in qemu_pids_under(root):
            os.kill(pid, signal.SIGKILL)
        time.sleep(0.5)
        shutil.rmtree(root, ignore_errors=True)
    return result


def _median(rounds: list[dict[str, Any]], fault: str, key: str) -> float | None:
    values = [r[fault][key] for r in rounds if isinstance(r.get(fault), dict) and key in r[fault]]
    return round(statistics.median(values), 3) if values else None


def main(rounds: int, vms: int, hold: float) -> dict[str, Any]:
    guest = guest_build.build_tiny()
    samples = [one_round(guest, vms, hold) for _ in range(rounds)]
    base = statistics.median(r["baseline_restart_booted_s"] for r in samples)
    summary = {
        "baseline_restart_booted_s": round(base, 3),
        "qemu_kill": {k: _median(samples, "qemu_kill", k)
                      for k in ("detected_s", "running_s", "booted_s")},
        "qemu_kill_booted_vs_plain_restart": round(
            (_median(samples, "qemu_kill", "booted_s") or 0) / base, 2),
        "daemon_kill9_recovered_s": _median(samples, "daemon_kill9", "recovered_s"),
        "runtime_dir_lost_recovered_s": _median(samples, "runtime_dir_lost", "recovered_s"),
        "runtime_dir_lost_mended_s": _median(samples, "runtime_dir_lost", "mended_s"),
        "swtpm": {k: _median(samples, "swtpm_kill", k)
                  for k in ("detected_s", "restart_to_booted_s")},
        "store_locked": {k: _median(samples, "store_locked", k)
                         for k in ("read_while_locked_s", "write_while_locked_s",
                                   "write_after_release_s")},
        "host_shutdown_s": _median(samples, "host_shutdown", "all_stopped_s"),
    }  # fmt: skip
    result = {"machine": machine_summary(), "rounds": samples, "summary": summary}
    write_result("faults", result)
    _print(summary, samples)
    return result


def _print(summary: dict[str, Any], samples: list[dict[str, Any]]) -> None:
    last = samples[-1]
    print("fault | detected in | recovered in | lost")
    q = summary["qemu_kill"]
    print(
        f"qemu SIGKILL | {q['detected_s']} s | Running {q['running_s']} s, booted "
        f"{q['booted_s']} s ({summary['qemu_kill_booted_vs_plain_restart']}x a plain "
        f"restart, {summary['baseline_restart_booted_s']} s) | {last['qemu_kill']['lost']}"
    )
    print(
        f"daemon kill -9 | - | {summary['daemon_kill9_recovered_s']} s, same pids "
        f"{last['daemon_kill9']['same_pids']} | {last['daemon_kill9']['lost']}"
    )
    print(
        f"runtime dir lost + kill -9 | - | adopted {summary['runtime_dir_lost_recovered_s']} s,"
        f" qemus {last['runtime_dir_lost']['qemus']}; restart to booted "
        f"{summary['runtime_dir_lost_mended_s']} s | {last['runtime_dir_lost']['lost']}"
    )
    s = summary["swtpm"]
    print(
        f"swtpm SIGKILL | {s['detected_s']} s | restart to booted {s['restart_to_booted_s']} s"
        f" | {last['swtpm_kill']['lost']}"
    )
    lk = summary["store_locked"]
    print(
        f"store locked | read {lk['read_while_locked_s']} s, write "
        f"{lk['write_while_locked_s']} s ({last['store_locked']['write_while_locked']}) | "
        f"write ok {lk['write_after_release_s']} s after release | none accepted is lost"
    )
    h = last["host_shutdown"]
    print(f"host shutdown | - | all stopped in {summary['host_shutdown_s']} s ({h['how']}), "
          f"restarted after: {h['restarted_after']} | {h['lost']}")  # fmt: skip
