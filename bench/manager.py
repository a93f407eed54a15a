"""The manager at scale: many defined VMs in one store, and many running ones under a daemon.

**Defined (stopped) VMs**, 10 -> 100 -> 1000 by default (``--defined``), one store growing:
for each size a fresh process opens a Manager (accelerator tcg, temp state dir under /tmp)
on the store, creates the VMs that bring it to that size and measures

* create rate (VMs/s), including the reconcile each create triggers (its status written);
* ``list_vms()`` latency p50/p99 (``--list-calls``, default 200) and ``get()`` p50/p99 over
  random names (``--calls``, default 200);
* the process's RSS, and then the RSS of a real ``corral serve`` (with its API) started on
  that store, after start-up and one ``GET /v1/vms``.

Baseline, same run, same sizes, interleaved: plain ``sqlite3`` in its own fresh process, one
table ``(name PRIMARY KEY, doc TEXT)``, WAL + synchronous=NORMAL like the store, one
transaction per insert; the same documents ``json.dumps``-ed in, ``json.loads``-ed out. The
ratio ("cost x": manager time or memory / sqlite's, for the create rate too) is what the
manager's validation (pydantic), bookkeeping (uid, generation, resourceVersion, status,
events) and reconcile cost on top of the storage.

**Running VMs**, 1 -> 10 -> N (``--running N``, default 20, at most 50; 0 skips): the tiny
guest (1 CPU, 256 MiB, TCG), defined offline as Running while no daemon runs, then
``corral serve`` (a subprocess, ``cpuOvercommit`` raised in its ``--config``) boots them. Once
every VM is Running with AgentConnected, an idle window (``--idle``, default 30 s) measures
the daemon's RSS and CPU, against the qemu processes' own RSS and CPU in the same window.
Then the daemon is ``kill -9``-ed and a new one started: time to its DaemonStarted line
(adoption done), to every VM Running again with the same qemu pid, and to every agent
reconnected. SIGTERM then leaves the VMs running for the next size, which adds VMs. Every
qemu is SIGKILLed by pid at the end, also on failure.

50 TCG guests on a 2-core machine is heavy: booting them takes many minutes (they boot
``autostartParallel`` = 4 at a time and each TCG boot competes for the 2 cores), each idle
tiny guest's qemu holds about 230 MiB RSS (so about 11 GiB for 50; the host needs that much
free) and uses about 1% of a core when idle. The default resync interval (30 s) is used, so
an idle window of 30 s contains about one full resync. Other work on the machine skews every
figure: the result records the load average at start and end.
"""

from __future__ import annotations

import asyncio
import copy
import json
import math
import multiprocessing
import os
import random
import shutil
import sqlite3
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from bench.common import guest_build, machine_summary, write_result
from bench.daemon import (
    Daemon,
    cpu_s,
    define_offline,
    kill_qemus,
    latency,
    qemu_pids_under,
    rss,
    tiny_doc,
)

MAX_RUNNING = 50
SEED = 20240601


def _name(i: int) -> str:
    return f"vm{i:04d}"


def _docs(template: dict[str, Any], start: int, stop: int) -> list[dict[str, Any]]:
    docs = []
    for i in range(start, stop):
        doc = copy.deepcopy(template)
        doc["metadata"]["name"] = _name(i)
        docs.append(doc)
    return docs


def _picks(stop: int, calls: int) -> list[str]:
    rng = random.Random(SEED + stop)  # noqa: S311 (repeatable picks, not secrets)
    return [_name(rng.randrange(stop)) for _ in range(calls)]


# --- the two sides of the defined-VM measurement, each in a fresh process ---------------------


def _manager_step(
    state_dir: str, template: dict[str, Any], start: int, stop: int, calls: int, list_calls: int
) -> dict[str, Any]:
    from corral.manager import Manager, ManagerConfig
    from corral.spec import HostPolicy

    docs = _docs(template, start, stop)
    picks = _picks(stop, calls)

    async def drain(manager: Manager) -> None:
        # create() kicks a reconcile per VM; it runs once the loop gets control
        while manager._workers or manager._dirty:
            await asyncio.sleep(0.001)

    async def go() -> dict[str, Any]:
        config = ManagerConfig(state_dir=Path(state_dir), accelerator="tcg")
        manager = Manager(config, policy=HostPolicy())
        t0 = time.perf_counter()
        await manager.open()
        await drain(manager)
        opened = time.perf_counter() - t0
        try:
            t0 = time.perf_counter()
            for doc in docs:
                await manager.create(doc)
            t_calls = time.perf_counter() - t0
            await drain(manager)
            t_all = time.perf_counter() - t0
            assert len(manager.store.names()) == stop
            for _ in range(3):
                manager.list_vms()
                manager.get(picks[0])
            list_ns = []
            for _ in range(list_calls):
                t = time.perf_counter_ns()
                records = manager.list_vms()
                list_ns.append(time.perf_counter_ns() - t)
            assert len(records) == stop
            get_ns = []
            for name in picks:
                t = time.perf_counter_ns()
                manager.get(name)
                get_ns.append(time.perf_counter_ns() - t)
            return {
                "open_s": opened,
                "created": len(docs),
                "create_s": t_all,
                "create_calls_s": t_calls,
                "create_per_s": len(docs) / t_all,
                "list": latency(list_ns),
                "get": latency(get_ns),
                "rss_mib": rss(os.getpid()) / 2**20,
            }
        finally:
            await manager.close()

    return asyncio.run(go())


def _sqlite_step(
    path: str, template: dict[str, Any], start: int, stop: int, calls: int, list_calls: int
) -> dict[str, Any]:
    docs = _docs(template, start, stop)
    picks = _picks(stop, calls)
    db = sqlite3.connect(path, isolation_level=None)  # autocommit: one transaction per insert
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute("CREATE TABLE IF NOT EXISTS vms (name TEXT PRIMARY KEY, doc TEXT NOT NULL)")
        t0 = time.perf_counter()
        for doc in docs:
            db.execute(
                "INSERT INTO vms (name, doc) VALUES (?, ?)",
                (doc["metadata"]["name"], json.dumps(doc, sort_keys=True)),
            )
        t_all = time.perf_counter() - t0

        def list_all() -> list[Any]:
            return [json.loads(d) for (d,) in db.execute("SELECT doc FROM vms ORDER BY name")]

        def get(name: str) -> Any:
            row = db.execute("SELECT doc FROM vms WHERE name = ?", (name,)).fetchone()
            return json.loads(row[0])

        for _ in range(3):
            list_all()
            get(picks[0])
        list_ns = []
        for _ in range(list_calls):
            t = time.perf_counter_ns()
            rows = list_all()
            list_ns.append(time.perf_counter_ns() - t)
        assert len(rows) == stop
        get_ns = []
        for name in picks:
            t = time.perf_counter_ns()
            get(name)
            get_ns.append(time.perf_counter_ns() - t)
        return {
            "created": len(docs),
            "create_s": t_all,
            "create_per_s": len(docs) / t_all,
            "list": latency(list_ns),
            "get": latency(get_ns),
            "rss_mib": rss(os.getpid()) / 2**20,
        }
    finally:
        db.close()


def _in_fresh_process(fn: Any, *args: Any) -> dict[str, Any]:
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return dict(pool.submit(fn, *args).result())


def _daemon_rss(root: Path) -> dict[str, float]:
    """A real ``corral serve`` on the store: start-up time, RSS after one full list."""
    from corral.client import Client

    daemon = Daemon(root)
    t0 = time.monotonic()
    daemon.start()
    try:
        ready = daemon.wait(lambda: daemon.has_logged("DaemonReady"), 300, "DaemonReady")
        daemon.settle()
        with Client(socket=daemon.sock, timeout=120) as client:
            client.list_vms()
        return {"ready_s": ready - t0, "rss_mib": rss(daemon.pid) / 2**20}
    finally:
        daemon.terminate()


def defined(guest: Any, sizes: list[int], calls: int, list_calls: int) -> list[dict[str, Any]]:
    template = tiny_doc(guest, "template")
    rows = []
    root = Path(tempfile.mkdtemp(prefix="cbm-", dir="/tmp"))
    try:
        state, baseline_db = root / "state", root / "baseline.db"
        previous = 0
        for i, size in enumerate(sizes):
            args = (template, previous, size, calls, list_calls)
            sides = ("manager", "sqlite") if i % 2 == 0 else ("sqlite", "manager")
            got: dict[str, dict[str, Any]] = {}
            for side in sides:
                if side == "manager":
                    got[side] = _in_fresh_process(_manager_step, str(state), *args)
                else:
                    got[side] = _in_fresh_process(_sqlite_step, str(baseline_db), *args)
            daemon = _daemon_rss(root)
            m, s = got["manager"], got["sqlite"]
            row = {
                "vms": size,
                "manager": m,
                "sqlite": s,
                "daemon": daemon,
                "ratios": {  # cost: manager time (or memory) / sqlite's; > 1 is slower
                    "create": s["create_per_s"] / m["create_per_s"],
                    "list_p50": m["list"]["p50_ms"] / s["list"]["p50_ms"],
                    "list_p99": m["list"]["p99_ms"] / s["list"]["p99_ms"],
                    "get_p50": m["get"]["p50_ms"] / s["get"]["p50_ms"],
                    "get_p99": m["get"]["p99_ms"] / s["get"]["p99_ms"],
                    "rss": m["rss_mib"] / s["rss_mib"],
                    "daemon_rss": daemon["rss_mib"] / s["rss_mib"],
                },
            }
            rows.append(row)
            print(
                f"  {size} defined: create {m['create_per_s']:.0f}/s (sqlite "
                f"{s['create_per_s']:.0f}/s), list p50 {m['list']['p50_ms']:.2f} ms (sqlite "
                f"{s['list']['p50_ms']:.2f}), daemon RSS {daemon['rss_mib']:.1f} MiB"
            )
            previous = size
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return rows


# --- running VMs under a daemon -----------------------------------------------------------------


def _all_booted(statuses: dict[str, dict[str, Any]], count: int) -> bool:
    return len(statuses) == count and all(
        s.get("state") == "Running"
        and s.get("conditions", {}).get("AgentConnected", {}).get("status") is True
        for s in statuses.values()
    )


def _markers(daemon: Daemon, names: list[str]) -> dict[str, int]:
    counts = {}
    for name in names:
        try:
            text = (daemon.state / "run" / name / "console.log").read_bytes()
        except OSError:
            text = b""
        counts[name] = text.count(b"CORRAL-GUEST-READY")
    return counts


def _running_step(daemon: Daemon, names: list[str], idle_s: float) -> dict[str, Any]:
    count = len(names)
    t0 = time.monotonic()
    daemon.start()
    daemon.wait(lambda: daemon.has_logged("DaemonStarted"), 300, "DaemonStarted")
    booted = daemon.wait(
        lambda: _all_booted(daemon.statuses(), count), 180 + 30 * count, f"{count} VMs booted", 0.25
    )
    statuses = daemon.statuses()
    pids = {n: int(s["pid"]) for n, s in statuses.items()}
    time.sleep(3)  # boot-time work (agent sync, IP polls) settles

    qemu = list(pids.values())
    d0, q0, w0 = cpu_s(daemon.pid), {p: cpu_s(p) for p in qemu}, time.monotonic()
    time.sleep(idle_s)
    d1, q1, w1 = cpu_s(daemon.pid), {p: cpu_s(p) for p in qemu}, time.monotonic()
    window = w1 - w0
    daemon_rss = rss(daemon.pid) / 2**20
    qemu_rss = sum(rss(p) for p in qemu) / 2**20
    daemon_cpu = d1 - d0
    qemu_cpu = sum(q1[p] - q0[p] for p in qemu)

    daemon.kill9()  # no chance to clean up
    time.sleep(0.5)
    alive = set(qemu_pids_under(daemon.root))
    lost = [n for n, p in pids.items() if p not in alive]
    if lost:
        raise RuntimeError(f"qemu of {lost} did not survive the daemon's kill -9")
    t1 = time.monotonic()
    daemon.start()
    started = daemon.wait(lambda: daemon.has_logged("DaemonStarted"), 300, "new DaemonStarted")

    def same(agent: bool) -> bool:
        now = daemon.statuses()
        return (
            {n: s.get("pid") for n, s in now.items()} == pids
            and all(s.get("state") == "Running" for s in now.values())
            and (not agent or _all_booted(now, count))
        )

    running = daemon.wait(lambda: same(False), 120, "all Running again with the same pids")
    agents = daemon.wait(lambda: same(True), 120, "all agents reconnected")
    reboots = [n for n, c in _markers(daemon, names).items() if c != 1]
    if reboots:
        raise RuntimeError(f"{reboots} booted more than once: re-attach restarted them")
    code = daemon.terminate()
    if code != 0:
        raise RuntimeError(f"daemon exited {code} on SIGTERM\n{daemon.tail()}")
    return {
        "vms": count,
        "boot_s": booted - t0,
        "idle_window_s": window,
        "daemon_rss_mib": daemon_rss,
        "qemu_rss_mib": qemu_rss,
        "daemon_cpu_s": daemon_cpu,
        "qemu_cpu_s": qemu_cpu,
        "daemon_cpu_pct": 100 * daemon_cpu / window,
        "daemon_cpu_pct_per_vm": 100 * daemon_cpu / window / count,
        "qemu_cpu_pct": 100 * qemu_cpu / window,
        "qemu_cpu_pct_per_vm": 100 * qemu_cpu / window / count,
        "daemon_over_qemu_cpu": daemon_cpu / qemu_cpu if qemu_cpu else math.inf,
        "daemon_over_qemu_rss": daemon_rss / qemu_rss,
        "reattach_started_s": started - t1,
        "reattach_running_s": running - t1,
        "reattach_agents_s": agents - t1,
    }


def running(guest: Any, most: int, idle_s: float) -> list[dict[str, Any]]:
    sizes = sorted({s for s in (1, 10, most) if 0 < s <= most})
    cpus = os.cpu_count() or 1
    overcommit = float(max(8, math.ceil(most / cpus) + 1))
    root = Path(tempfile.mkdtemp(prefix="cbn-", dir="/tmp"))
    daemon = Daemon(root, {"cpuOvercommit": overcommit})
    rows = []
    try:
        previous = 0
        for size in sizes:
            names = [f"run{i:02d}" for i in range(size)]
            docs = [tiny_doc(guest, n, state="Running") for n in names[previous:]]
            define_offline(daemon.state, docs, overcommit)
            row = _running_step(daemon, names, idle_s)
            row["added"] = size - previous
            rows.append(row)
            print(
                f"  {size} running: boot of {size - previous} {row['boot_s']:.1f}s, daemon "
                f"{row['daemon_cpu_pct']:.2f}% CPU {row['daemon_rss_mib']:.1f} MiB, qemu "
                f"{row['qemu_cpu_pct']:.1f}% CPU {row['qemu_rss_mib']:.0f} MiB, re-attach "
                f"{row['reattach_running_s']:.2f}s"
            )
            previous = size
    finally:
        daemon.kill9()
        killed = kill_qemus(root)
        if killed:
            print(f"  cleaned up: SIGKILL to {killed} qemu")
        shutil.rmtree(root, ignore_errors=True)
    return rows


# --- report -----------------------------------------------------------------------------------


def _print(result: dict[str, Any]) -> None:
    load = result["loadavg_1min"]
    print(f"load average (1 min): {load['start']:.2f} at start, {load['end']:.2f} at end")
    print(f"{'VMs':>5} {'metric':<18} {'manager':>11} {'sqlite':>11} {'cost x':>8}")
    for row in result["defined"]:
        m, s, r = row["manager"], row["sqlite"], row["ratios"]
        lines = [
            ("create VMs/s", m["create_per_s"], s["create_per_s"], r["create"]),
            ("list_vms p50 ms", m["list"]["p50_ms"], s["list"]["p50_ms"], r["list_p50"]),
            ("list_vms p99 ms", m["list"]["p99_ms"], s["list"]["p99_ms"], r["list_p99"]),
            ("get p50 ms", m["get"]["p50_ms"], s["get"]["p50_ms"], r["get_p50"]),
            ("get p99 ms", m["get"]["p99_ms"], s["get"]["p99_ms"], r["get_p99"]),
            ("process RSS MiB", m["rss_mib"], s["rss_mib"], r["rss"]),
            ("daemon RSS MiB", row["daemon"]["rss_mib"], s["rss_mib"], r["daemon_rss"]),
        ]
        for label, a, b, ratio in lines:
            print(f"{row['vms']:>5} {label:<18} {a:>11.3f} {b:>11.3f} {ratio:>8.2f}")
    if result["running"]:
        print(
            f"{'VMs':>5} {'boot s':>7} {'daemon MiB':>10} {'qemu MiB':>9} {'RSS ratio':>9} "
            f"{'daemon CPU%':>11} {'per VM':>7} {'qemu CPU%':>9} {'CPU ratio':>9} "
            f"{'re-attach: started':>18} {'Running':>7} {'agents':>6}"
        )
        for row in result["running"]:
            print(
                f"{row['vms']:>5} {row['boot_s']:>7.1f} {row['daemon_rss_mib']:>10.1f} "
                f"{row['qemu_rss_mib']:>9.0f} {row['daemon_over_qemu_rss']:>9.3f} "
                f"{row['daemon_cpu_pct']:>11.2f} {row['daemon_cpu_pct_per_vm']:>7.3f} "
                f"{row['qemu_cpu_pct']:>9.1f} {row['daemon_over_qemu_cpu']:>9.3f} "
                f"{row['reattach_started_s']:>17.2f}s {row['reattach_running_s']:>6.2f}s "
                f"{row['reattach_agents_s']:>5.2f}s"
            )


def main(
    sizes: list[int], calls: int, list_calls: int, most_running: int, idle_s: float
) -> dict[str, Any]:
    if most_running > MAX_RUNNING:
        raise SystemExit(f"--running is at most {MAX_RUNNING}")
    guest = guest_build.build_tiny()
    load_start = os.getloadavg()
    result: dict[str, Any] = {
        "benchmark": "manager",
        "machine": machine_summary(),
        "accelerator": "tcg",
        "sizes": {"defined": sizes, "running_max": most_running},
        "calls": {"get": calls, "list": list_calls},
        "idle_s": idle_s,
        "defined": defined(guest, sizes, calls, list_calls),
        "running": running(guest, most_running, idle_s) if most_running > 0 else [],
    }
    # others' load skews every figure here: the 1-min load average around the run says how much
    result["loadavg_1min"] = {"start": load_start[0], "end": os.getloadavg()[0]}
    write_result("manager", result)
    _print(result)
    return result
