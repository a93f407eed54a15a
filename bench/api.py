"""The REST API and the CLI against the daemon, each against a baseline in the same run.

A ``corral serve`` subprocess (API on a unix socket in a temp dir) with 1000 defined,
stopped VMs (``--vms``; defined offline through the Manager API before it starts):

* **Reads**: ``GET /v1/vms/{name}`` (``--calls``, default 200, random names) and ``GET
  /v1/vms`` listing every VM (``--list-calls``, default 30), with corral's httpx client over
  the socket (the response decoded, as a caller would). Baseline, interleaved call by call:
  the same Manager calls in this process on the same store (``get(name).to_json()``,
  ``[r.to_json() for r in list_vms()]``), so the ratio is the cost of HTTP + JSON + the
  daemon's event loop. The daemon runs with its default 30 s resync, which reconciles every
  VM: a resync landing in a measurement shows in p99, as it would for a real caller.
* **Start to Running**, the same tiny guest three ways, interleaved (``--rounds``, default 5;
  the order rotates every round):
  (a) ``corral start NAME --wait`` as a CLI subprocess against the daemon: to the command's
      exit (the VM is Running) and to the guest's ready marker in its console log;
  (b) ``corral run -c vm.yaml`` (bench.runner.corral_round): to status Running, to the marker;
  (c) bare qemu driven over QMP (bench.runner.raw_round): to QMP ready, to the marker.
  Medians, and ratios against (c). The (a) VM is stopped (API, ``wait``) between rounds,
  untimed; (a) includes a Python start-up for the CLI and the daemon's admission check,
  which reads every stored VM.
* **CLI start-up**: ``corral --help`` (the venv's entry point), median of ``--help-runs``
  (default 10), against ``python -c pass`` with the same interpreter; target < 300 ms.
"""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import guest_build, machine_summary, write_result
from bench.daemon import Daemon, corral_argv, define_offline, kill_qemus, latency, rss, tiny_doc
from bench.runner import MARKER, _corral_env, corral_round, raw_round

HELP_TARGET_S = 0.300
SEED = 20240602


def _name(i: int) -> str:
    return f"api{i:04d}"


def reads(daemon: Daemon, count: int, calls: int, list_calls: int) -> dict[str, Any]:
    from corral.client import Client
    from corral.manager import Manager, ManagerConfig
    from corral.spec import HostPolicy

    rng = random.Random(SEED)  # noqa: S311 (repeatable picks, not secrets)
    picks = [_name(rng.randrange(count)) for _ in range(calls)]
    manager = Manager(ManagerConfig(state_dir=daemon.state, accelerator="tcg"), policy=HostPolicy())
    http: dict[str, list[int]] = {"get": [], "list": []}
    local: dict[str, list[int]] = {"get": [], "list": []}
    try:
        with Client(socket=daemon.sock, timeout=120) as client:
            for _ in range(3):  # warm-up: connection, caches, lazy imports
                client.get_vm(picks[0])
                client.list_vms()
                manager.get(picks[0]).to_json()
                [r.to_json() for r in manager.list_vms()]
            for name in picks:
                t = time.perf_counter_ns()
                remote = client.get_vm(name)
                http["get"].append(time.perf_counter_ns() - t)
                t = time.perf_counter_ns()
                mine = manager.get(name).to_json()
                local["get"].append(time.perf_counter_ns() - t)
                assert remote["metadata"]["uid"] == mine["metadata"]["uid"]
            for _ in range(list_calls):
                t = time.perf_counter_ns()
                items = client.list_vms()
                http["list"].append(time.perf_counter_ns() - t)
                t = time.perf_counter_ns()
                mine_all = [r.to_json() for r in manager.list_vms()]
                local["list"].append(time.perf_counter_ns() - t)
                assert len(items) == len(mine_all) == count
    finally:
        asyncio.run(manager.close())
    table = {}
    for kind in ("get", "list"):
        h, m = latency(http[kind]), latency(local[kind])
        table[kind] = {
            "http": h,
            "in_process": m,
            "ratio_p50": h["p50_ms"] / m["p50_ms"],
            "ratio_p99": h["p99_ms"] / m["p99_ms"],
        }
    return table


def _marker_after(console: Path, offset: int) -> bool:
    try:
        with console.open("rb") as f:
            f.seek(offset)
            return MARKER.encode() in f.read()
    except OSError:
        return False


def daemon_round(daemon: Daemon, name: str) -> dict[str, float]:
    from corral.client import Client

    console = daemon.state / "run" / name / "console.log"
    try:
        offset = console.stat().st_size  # the log is appended to across starts
    except OSError:
        offset = 0
    t0 = time.monotonic()
    done = subprocess.run(
        corral_argv("start", name, "--wait"), env=daemon.env(), capture_output=True,
        text=True, timeout=300, check=False,
    )  # fmt: skip
    exited = time.monotonic()
    if done.returncode != 0:
        raise RuntimeError(f"corral start {name} --wait: exit {done.returncode}: {done.stderr}")
    marker = daemon.wait(lambda: _marker_after(console, offset), 120, "marker", poll=0.002)
    with Client(socket=daemon.sock, timeout=180) as client:
        client.action(name, "stop", wait=120)
    return {"running": exited - t0, "marker": marker - t0}


def starts(guest: Any, daemon: Daemon, rounds: int) -> dict[str, Any]:
    name = _name(0)
    raw_round(guest)  # warm-up (page cache), not counted
    samples: dict[str, list[dict[str, float]]] = {"daemon": [], "run": [], "raw": []}
    sides = ["daemon", "run", "raw"]
    for i in range(rounds):
        order = sides[i % 3 :] + sides[: i % 3]
        for side in order:
            if side == "daemon":
                samples[side].append(daemon_round(daemon, name))
            else:
                s = corral_round(guest) if side == "run" else raw_round(guest)
                samples[side].append({"running": s["qmp"], "marker": s["marker"]})
        last = ", ".join(
            f"{k} {v[-1]['running']:.2f}/{v[-1]['marker']:.2f}s" for k, v in samples.items()
        )
        print(f"  round {i + 1}/{rounds} (to Running/marker): {last}")
    medians: dict[str, dict[str, float]] = {}
    for metric in ("running", "marker"):
        raw = statistics.median(s[metric] for s in samples["raw"])
        row = {f"{side}_s": statistics.median(s[metric] for s in samples[side]) for side in sides}
        row["daemon_ratio"] = row["daemon_s"] / raw
        row["run_ratio"] = row["run_s"] / raw
        row["daemon_overhead_ms"] = 1000 * (row["daemon_s"] - raw)
        row["run_overhead_ms"] = 1000 * (row["run_s"] - raw)
        medians[metric] = row
    return {"rounds": rounds, "medians": medians, "samples": samples}


def _time(argv: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_corral_env(),
                   check=True)  # fmt: skip
    return time.perf_counter() - t0


def cli_startup(runs: int) -> dict[str, Any]:
    entry = Path(sys.executable).parent / "corral"
    corral = [str(entry), "--help"] if entry.exists() else corral_argv("--help")
    python = [sys.executable, "-c", "pass"]
    _time(corral), _time(python)  # warm-up
    help_s: list[float] = []
    pass_s: list[float] = []
    for i in range(runs):
        for which in ("help", "pass") if i % 2 == 0 else ("pass", "help"):
            (help_s if which == "help" else pass_s).append(
                _time(corral if which == "help" else python)
            )
    h, p = statistics.median(help_s), statistics.median(pass_s)
    return {
        "command": " ".join(corral),
        "runs": runs,
        "help_s": h,
        "python_pass_s": p,
        "ratio": h / p,
        "overhead_ms": 1000 * (h - p),
        "target_s": HELP_TARGET_S,
        "within_target": h < HELP_TARGET_S,
        "samples": {"help": help_s, "pass": pass_s},
    }


def main(count: int, calls: int, list_calls: int, rounds: int, help_runs: int) -> dict[str, Any]:
    guest = guest_build.build_tiny()
    root = Path(tempfile.mkdtemp(prefix="cba-", dir="/tmp"))
    daemon = Daemon(root)
    result: dict[str, Any] = {
        "benchmark": "api",
        "machine": machine_summary(),
        "accelerator": "tcg",
        "vms": count,
        "calls": {"get": calls, "list": list_calls},
        "resync_seconds": 30.0,  # the daemon's default
        "loadavg_1min": {"start": os.getloadavg()[0]},
    }
    try:
        docs = [tiny_doc(guest, _name(i)) for i in range(count)]
        result["define_offline_s"] = define_offline(daemon.state, docs, 8.0)
        t0 = time.monotonic()
        daemon.start()
        ready = daemon.wait(lambda: daemon.has_logged("DaemonReady"), 300, "DaemonReady")
        daemon.settle()
        result["daemon"] = {"ready_s": ready - t0, "rss_mib": rss(daemon.pid) / 2**20}
        print(f"  daemon with {count} VMs: ready in {ready - t0:.2f}s")
        result["reads"] = reads(daemon, count, calls, list_calls)
        result["daemon"]["rss_after_reads_mib"] = rss(daemon.pid) / 2**20
        result["start"] = starts(guest, daemon, rounds) if rounds > 0 else None
        result["daemon"]["exit_code"] = daemon.terminate()
    finally:
        daemon.kill9()
        killed = kill_qemus(root)
        if killed:
            print(f"  cleaned up: SIGKILL to {killed} qemu")
        shutil.rmtree(root, ignore_errors=True)
    result["cli_startup"] = cli_startup(help_runs)
    result["loadavg_1min"]["end"] = os.getloadavg()[0]  # others' load skews every figure
    write_result("api", result)
    _print(result)
    return result


def _print(result: dict[str, Any]) -> None:
    load = result["loadavg_1min"]
    print(f"load average (1 min): {load['start']:.2f} at start, {load['end']:.2f} at end")
    count = result["vms"]
    print(f"{'request':<24} {'HTTP p50':>9} {'p99':>8} {'in-proc p50':>11} {'p99':>8} "
          f"{'ratio p50':>9} {'p99':>6}")  # fmt: skip
    for kind, label in (("get", "GET /v1/vms/{name}"), ("list", f"GET /v1/vms ({count})")):
        r = result["reads"][kind]
        h, m = r["http"], r["in_process"]
        print(
            f"{label:<24} {h['p50_ms']:>7.2f}ms {h['p99_ms']:>6.2f}ms {m['p50_ms']:>9.2f}ms "
            f"{m['p99_ms']:>6.2f}ms {r['ratio_p50']:>9.2f} {r['ratio_p99']:>6.2f}"
        )
    if result["start"] is not None:
        print(f"start (median of {result['start']['rounds']})  {'corral start':>12} "
              f"{'corral run':>10} {'raw qemu':>9} {'start/raw':>9} {'run/raw':>8}")  # fmt: skip
        for metric, row in result["start"]["medians"].items():
            label = "to Running" if metric == "running" else "to ready marker"
            print(
                f"{label:<24} {row['daemon_s']:>11.3f}s {row['run_s']:>9.3f}s "
                f"{row['raw_s']:>8.3f}s {row['daemon_ratio']:>9.2f} {row['run_ratio']:>8.2f}"
            )
    c = result["cli_startup"]
    print(
        f"corral --help {1000 * c['help_s']:.0f} ms vs python -c pass "
        f"{1000 * c['python_pass_s']:.0f} ms (ratio {c['ratio']:.2f}, "
        f"+{c['overhead_ms']:.0f} ms): target < "
        f"{1000 * c['target_s']:.0f} ms {'ok' if c['within_target'] else 'MISSED'}"
    )
    d = result["daemon"]
    print(
        f"daemon with {count} defined VMs: ready in {d['ready_s']:.2f}s, RSS "
        f"{d['rss_mib']:.1f} MiB ({d['rss_after_reads_mib']:.1f} MiB after the reads)"
    )
