"""``python -m bench compare``: corral side by side with raw qemu and libvirt, in one run.

The same tiny guest (busybox initramfs, 1 vCPU, 256 MiB, q35, direct kernel boot, serial to a
log file, a guest-agent channel, balloon, virtio-rng; TCG) every way:

* **raw**: bare qemu driven over QMP (bench.runner.raw_round);
* **corral run**: a new ``corral run`` process (bench.runner.corral_round), plus its RSS;
* **daemon API / CLI**: ``corral serve``; start/stop through the typed client with
  ``wait``, and as ``corral start|stop --wait`` subprocesses;
* **libvirt**: ``libvirtd`` and ``virtlogd`` from Debian's packages, started here on a
  private socket (``unix_sock_dir`` in a temp dir; TCG, no security driver, no cgroups),
  driven with ``virsh create|shutdown|define|list``.

Rounds are interleaved (the order rotates every round); every figure is a median, every ratio
against a baseline of the same run. Then, once each: a burst of 10 starts, a daemon
``kill -9`` with 10 running VMs (until every VM is re-attached with the same qemu pid), the
daemons' RSS with 10 running, listing ``--defined`` VMs as a whole process, and density
waves (``--density``, default 10, 50, 100 running VMs under the daemon with
``cpuOvercommit: 60``). Writes bench/results/compare.json, the goals table into
docs/benchmarks.md (between ``compare`` markers) and docs/benchmarks-compare.png.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import datetime
import os
import re
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from bench.api import _marker_after
from bench.common import REPO, guest_build, machine_summary, write_result
from bench.daemon import (
    Daemon,
    corral_argv,
    define_offline,
    kill_qemus,
    qemu_pids_under,
    rss,
    tiny_doc,
)
from bench.runner import _has_marker, _proc_cpu, _wait, corral_round, raw_round

DOC = REPO / "docs" / "benchmarks.md"
PLOT = REPO / "docs" / "benchmarks-compare.png"
BEGIN, END = "<!-- compare:begin -->", "<!-- compare:end -->"
DENSITY_OVERCOMMIT = 60
QEMU_CONF = Path("/etc/libvirt/qemu.conf")
QEMU_MARK = "written by corral's benchmark (bench/compare.py)"


def _t(argv: list[str], env: dict[str, str] | None = None, check: bool = True) -> float:
    t0 = time.monotonic()
    done = subprocess.run(argv, capture_output=True, env=env, check=False)
    took = time.monotonic() - t0
    if check and done.returncode != 0:
        raise RuntimeError(f"{argv[:4]} exited {done.returncode}: {done.stderr[-500:]!r}")
    return took


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _missing(database: str, key: str) -> bool:
    return (
        subprocess.run(["getent", database, key], capture_output=True, check=False).returncode != 0
    )


# --- libvirt -------------------------------------------------------------------------------


class Libvirt:
    """libvirtd + virtlogd for this benchmark only: config, socket and logs in ``root``."""

    def __init__(self, root: Path, guest: Any) -> None:
        self.root, self.guest = root, guest
        self.sock_dir = root / "sock"
        self.uri = f"qemu:///system?socket={self.sock_dir}/libvirt-sock"
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self) -> float:
        """Start both daemons; seconds until ``virsh list`` answers."""
        for tool in ("libvirtd", "virtlogd", "virsh"):
            if shutil.which(tool, path=f"{os.environ.get('PATH', '')}:/usr/sbin") is None:
                raise RuntimeError(f"{tool} is missing: apt-get install libvirt-daemon "
                                   "libvirt-daemon-driver-qemu libvirt-clients")  # fmt: skip
        self.sock_dir.mkdir(parents=True, exist_ok=True)
        conf = self.root / "libvirtd.conf"
        conf.write_text(f'unix_sock_dir = "{self.sock_dir}"\nauth_unix_rw = "none"\n'
                        'log_outputs = "3:stderr"\n')  # fmt: skip
        self._configure_qemu()
        log = (self.root / "libvirt.log").open("ab")
        self.procs.append(subprocess.Popen(["/usr/sbin/virtlogd"], stdout=log, stderr=log,
                                           start_new_session=True))  # fmt: skip
        took = self.wait_answering(self.start_libvirtd())
        # libvirt probes qemu's capabilities on the first domain (seconds): not a start
        _t(self.virsh("create", str(self.xml("warmup"))))
        _t(self.virsh("destroy", "warmup"))
        _wait(lambda: self.gone("warmup"), 30, "warm-up domain gone", poll=0.05)
        return took

    def _configure_qemu(self) -> None:
        """/etc/libvirt/qemu.conf (root's libvirtd reads no other) for the benchmark: qemu as
        root, no security driver, cgroups or namespaces (none work in this container); the
        system's file is put back by :meth:`stop`. libvirtd resolves its built-in user
        ``libvirt-qemu`` before it reads the file: made here if the package did not."""
        for group in ("kvm", "libvirt-qemu"):
            if _missing("group", group):
                subprocess.run(["groupadd", "-r", group], check=True)
        if _missing("passwd", "libvirt-qemu"):
            subprocess.run(["useradd", "-r", "-g", "kvm", "-d", "/var/lib/libvirt", "-s",
                            "/usr/sbin/nologin", "libvirt-qemu"], check=True)  # fmt: skip
        if not QEMU_CONF.exists():
            (self.root / "qemu.conf.none").touch()  # stop() removes ours
        elif QEMU_MARK not in QEMU_CONF.read_text():
            shutil.copy2(QEMU_CONF, self.root / "qemu.conf.system")
        QEMU_CONF.parent.mkdir(parents=True, exist_ok=True)
        QEMU_CONF.write_text(
            f"# {QEMU_MARK}\n"
            + "".join(
                f"{k} = {v}\n"
                for k, v in (
                    ("user", '"root"'),
                    ("group", '"root"'),
                    ("swtpm_user", '"root"'),
                    ("swtpm_group", '"root"'),
                    ("security_driver", '"none"'),
                    ("cgroup_controllers", "[ ]"),
                    ("namespaces", "[ ]"),
                    ("remember_owner", "0"),
                )
            )
        )

    def wait_answering(self, t0: float) -> float:
        def answers() -> bool:
            done = subprocess.run(self.virsh("list"), capture_output=True, check=False)
            return done.returncode == 0

        return _wait(answers, 60, "libvirtd answering", poll=0.01) - t0

    def virsh(self, *args: str) -> list[str]:
        return ["virsh", "-q", "-c", self.uri, *args]

    def xml(self, name: str) -> Path:
        g, run = self.guest, self.root / "vms" / name
        run.mkdir(parents=True, exist_ok=True)
        path = run / "domain.xml"
        path.write_text(f"""<domain type='qemu'>
  <name>{name}</name><memory unit='MiB'>256</memory><vcpu>1</vcpu>
  <os><type arch='x86_64' machine='q35'>hvm</type><kernel>{g.kernel}</kernel>
    <initrd>{g.initrd}</initrd><cmdline>{g.cmdline}</cmdline></os>
  <features><acpi/></features><cpu mode='maximum'/>
  <on_poweroff>destroy</on_poweroff>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <controller type='usb' model='none'/>
    <serial type='file'><source path='{run}/console.log'/></serial>
    <channel type='unix'><source mode='bind' path='{run}/qga.sock'/>
      <target type='virtio' name='org.qemu.guest_agent.0'/></channel>
    <memballoon model='virtio'/>
    <rng model='virtio'><backend model='random'>/dev/urandom</backend></rng>
  </devices>
</domain>
""")
        return path

    def console(self, name: str) -> Path:
        return self.root / "vms" / name / "console.log"

    def pid(self, name: str) -> int | None:
        with contextlib.suppress(OSError, ValueError):
            return int(Path(f"/run/libvirt/qemu/{name}.pid").read_text().strip())
        return None

    def gone(self, name: str) -> bool:
        done = subprocess.run(self.virsh("domstate", name), capture_output=True, check=False)
        return done.returncode != 0

    def rss(self) -> int:
        return sum(rss(p.pid) for p in self.procs if p.poll() is None)

    def kill9_libvirtd(self) -> None:
        daemon = self.procs.pop()
        daemon.kill()
        daemon.wait()

    def start_libvirtd(self) -> float:
        """Spawn libvirtd; when it was spawned (its clock starts there)."""
        log = (self.root / "libvirt.log").open("ab")
        t0 = time.monotonic()
        self.procs.append(subprocess.Popen(
            ["/usr/sbin/libvirtd", "--config", str(self.root / "libvirtd.conf")],
            stdout=log, stderr=log, start_new_session=True,
        ))  # fmt: skip
        return t0

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            names = subprocess.run(self.virsh("list", "--all", "--name"), capture_output=True,
                                   text=True, check=False).stdout.split()  # fmt: skip
            for name in names:
                subprocess.run(self.virsh("destroy", name), capture_output=True, check=False)
                subprocess.run(self.virsh("undefine", name), capture_output=True, check=False)
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        saved = self.root / "qemu.conf.system"
        if saved.exists():
            shutil.copy2(saved, QEMU_CONF)
        elif (self.root / "qemu.conf.none").exists():
            QEMU_CONF.unlink(missing_ok=True)


def virsh_round(lv: Libvirt, name: str) -> dict[str, float]:
    """``virsh create`` (returns once the domain runs) to the marker; ``virsh shutdown`` to
    qemu gone."""
    console = lv.console(name)
    xml = lv.xml(name)
    console.unlink(missing_ok=True)
    t0 = time.monotonic()
    _t(lv.virsh("create", str(xml)))
    running = time.monotonic() - t0
    marker = _wait(lambda: _has_marker(console), 120, "libvirt marker", poll=0.01) - t0
    pid = lv.pid(name)
    t_stop = time.monotonic()
    _t(lv.virsh("shutdown", name))
    gone = _wait(lambda: pid is None or not Path(f"/proc/{pid}").exists(), 90, "virsh stop")
    _wait(lambda: lv.gone(name), 30, "libvirt forgets the domain", poll=0.05)  # untimed
    return {"running": running, "marker": marker, "stop": gone - t_stop}


# --- corral daemon ---------------------------------------------------------------------------


@contextlib.contextmanager
def daemon(root: Path, guest: Any, names: list[str], policy: str = "{}") -> Iterator[Daemon]:
    """A daemon with ``names`` defined (Stopped), its API answering."""
    root.mkdir(parents=True, exist_ok=True)
    d = Daemon(root, {"cpuOvercommit": DENSITY_OVERCOMMIT})
    d.policy.write_text(policy + "\n")
    define_offline(d.state, [tiny_doc(guest, n) for n in names], DENSITY_OVERCOMMIT)
    d.start()
    try:
        d.wait(lambda: d.has_logged("DaemonReady"), 120, "daemon ready")
        yield d
    finally:
        d.kill9()
        kill_qemus(root)


def api_round(d: Daemon, name: str) -> dict[str, float]:
    from corral.client import Client

    console = d.state / "run" / name / "console.log"
    size = console.stat().st_size if console.exists() else 0
    with Client(socket=d.sock) as c:
        t0 = time.monotonic()
        c.action(name, "start", wait=60)
        running = time.monotonic() - t0
        marker = _wait(lambda: _marker_after(console, size), 120, "daemon marker", 0.01) - t0
        t_stop = time.monotonic()
        c.action(name, "stop", wait=90)
        return {"running": running, "marker": marker, "stop": time.monotonic() - t_stop}


def cli_round(d: Daemon, name: str) -> dict[str, float]:
    console = d.state / "run" / name / "console.log"
    size = console.stat().st_size if console.exists() else 0
    running = _t([*corral_cli(), "start", name, "--wait"], env=d.env())
    _wait(lambda: _marker_after(console, size), 120, "CLI VM marker", 0.01)  # booted: untimed
    stop = _t([*corral_cli(), "stop", name, "--wait"], env=d.env())
    return {"running": running, "stop": stop}


def corral_cli() -> list[str]:
    """The ``corral`` entry point a user runs (the venv's script), else ``python -m``."""
    venv = Path(os.environ.get("VIRTUAL_ENV", REPO / ".venv")) / "bin" / "corral"
    return [str(venv)] if venv.exists() else corral_argv()


def calls_round(d: Daemon, lv: Libvirt, name: str, lv_name: str) -> dict[str, float]:
    """Each command as a whole process, the median of 5 runs, corral and virsh alternating."""
    cli, env = corral_cli(), d.env()
    commands = {
        "corral show": ([*cli, "show", name], env),
        "virsh dominfo": (lv.virsh("dominfo", lv_name), None),
        "corral list": ([*cli, "list"], env), "virsh list": (lv.virsh("list", "--all"), None),
        "corral --help": ([*cli, "--help"], env), "virsh --help": (lv.virsh("--help"), None),
    }  # fmt: skip
    runs: dict[str, list[float]] = {k: [] for k in commands}
    for _ in range(5):
        for key, (argv, environ) in commands.items():
            runs[key].append(_t(argv, env=environ))
    return {k: _median(v) for k, v in runs.items()}


# --- phases --------------------------------------------------------------------------------


def rounds_phase(guest: Any, root: Path, lv: Libvirt, rounds: int) -> dict[str, Any]:
    samples: dict[str, list[dict[str, float]]] = {
        k: [] for k in ("raw", "run", "api", "cli", "virsh", "calls")
    }
    lv_name = "lvr"
    _t(lv.virsh("define", str(lv.xml(lv_name))))
    with daemon(root / "rounds", guest, ["api1", "cli1"]) as d:
        ways: list[tuple[str, Callable[[], dict[str, float]]]] = [
            ("raw", lambda: raw_round(guest)),
            ("run", lambda: corral_round(guest)),
            ("api", lambda: api_round(d, "api1")),
            ("cli", lambda: cli_round(d, "cli1")),
            ("virsh", lambda: virsh_round(lv, "lvc")),
            ("calls", lambda: calls_round(d, lv, "api1", lv_name)),
        ]
        for i in range(rounds):
            for key, way in ways[i % len(ways) :] + ways[: i % len(ways)]:
                samples[key].append(way())
            print(f"  round {i + 1}/{rounds} done")
    _t(lv.virsh("undefine", lv_name))
    return {k: {m: _median([s[m] for s in v]) for m in v[0]} for k, v in samples.items()}


def runner_rss(guest: Any) -> float:
    """MiB of a ``corral run`` process with its VM Running."""
    import yaml

    from bench.runner import _doc, _start_runner, _status

    with tempfile.TemporaryDirectory(prefix="cbm-", dir="/tmp") as tmp:
        root = Path(tmp)
        config = root / "vm.yaml"
        config.write_text(yaml.safe_dump(_doc(guest, root)))
        proc = _start_runner(config, root / "events.jsonl")
        try:
            status = root / "run" / "status.json"
            _wait(lambda: _status(status).get("state") == "Running", 60, "Running", 0.02)
            time.sleep(1)
            return rss(proc.pid) / 2**20
        finally:
            proc.kill()
            proc.wait()
            kill_qemus(root)


def burst_phase(guest: Any, root: Path, lv: Libvirt, count: int = 10) -> dict[str, float]:
    """``count`` starts at once: seconds until every VM is Running, three ways."""
    from corral.client import Client

    out: dict[str, float] = {}
    with concurrent.futures.ThreadPoolExecutor(count) as pool:
        t0 = time.monotonic()
        list(pool.map(lambda _: raw_round_running(guest), range(count)))
        out["raw"] = time.monotonic() - t0
        names = [f"b{i}" for i in range(count)]
        with daemon(root / "burst", guest, names) as d, Client(socket=d.sock) as c:
            t0 = time.monotonic()
            list(pool.map(lambda n: c.action(n, "start", wait=120), names))
            out["daemon"] = time.monotonic() - t0
        t0 = time.monotonic()
        list(pool.map(lambda n: _t(lv.virsh("create", str(lv.xml(n)))), names))
        out["libvirt"] = time.monotonic() - t0
        for n in names:
            subprocess.run(lv.virsh("destroy", n), capture_output=True, check=False)
    return out


def raw_round_running(guest: Any) -> None:
    """Raw qemu to QMP ready and ``cont`` (Running), then killed."""
    from qemu.qmp.legacy import QEMUMonitorProtocol

    from bench.runner import _render

    with tempfile.TemporaryDirectory(prefix="cbq-", dir="/tmp") as tmp:
        root = Path(tmp)
        argv = _render(guest, root)
        qmp_path = root / "run" / "qmp.sock"
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
        try:
            _wait(qmp_path.exists, 30, "QMP socket", 0.002)
            qmp = QEMUMonitorProtocol(str(qmp_path))
            qmp.connect(negotiate=True)
            qmp.cmd("cont")
            qmp.close()
        finally:
            proc.kill()
            proc.wait()


def restart_phase(guest: Any, root: Path, lv: Libvirt, count: int = 10) -> dict[str, float]:
    """kill -9 of the daemon with ``count`` VMs Running, a new daemon: seconds until it has
    re-attached them all (its log), and until the API says every VM is Running with the
    same qemu pid; libvirtd the same way (``virsh list`` shows them all running again)."""
    from corral.client import Client

    names = [f"r{i}" for i in range(count)]
    out: dict[str, float] = {}
    with daemon(root / "restart", guest, names) as d:
        with Client(socket=d.sock) as c:
            for n in names:
                c.action(n, "start", wait=120)
            pids = {n: c.get_vm(n).status.pid for n in names}
        _quiet(list(pids.values()))  # booted and idle: a daemon restart meets long-running VMs
        d.settle()
        out["daemon_rss_mib"] = rss(d.pid) / 2**20
        d.kill9()
        offset = d.log_path.stat().st_size
        t0 = time.monotonic()
        d.start()
        out["reattached"] = d.wait(lambda: _logged(d, offset, "DaemonStarted"), 60,
                                   "re-attach", poll=0.005) - t0  # fmt: skip

        def all_back() -> bool:
            try:
                with Client(socket=d.sock, timeout=5) as c:
                    vms = {vm.name: vm.status for vm in c.list_vms()}
            except Exception:  # not answering yet
                return False
            return all(vms[n].state == "Running" and vms[n].pid == pids[n] for n in names)

        out["api_running"] = d.wait(all_back, 60, "API: all Running", poll=0.01) - t0
    for n in names:
        _t(lv.virsh("create", str(lv.xml(n))))
    _quiet([p for p in (lv.pid(n) for n in names) if p is not None])  # same as corral's side
    out["libvirt_rss_mib"] = lv.rss() / 2**20
    lv.kill9_libvirtd()
    t0 = lv.start_libvirtd()

    def lv_back() -> bool:
        done = subprocess.run(lv.virsh("list", "--state-running", "--name"),
                              capture_output=True, text=True, check=False)  # fmt: skip
        return done.returncode == 0 and set(names) <= set(done.stdout.split())

    out["libvirt_running"] = _wait(lv_back, 60, "libvirtd back", 0.005) - t0
    for n in names:
        subprocess.run(lv.virsh("destroy", n), capture_output=True, check=False)
    return out


def _quiet(pids: list[int], share: float = 0.05, timeout: float = 180) -> None:
    """Wait until the guests ``pids`` are booted and idle: together they use less than
    ``share`` of a core per guest over a second (a booting TCG guest takes a whole core, and
    what a restart measures must not be which side waited longer for its guests)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        before = sum(_proc_cpu(p) for p in pids)
        time.sleep(1.0)
        if sum(_proc_cpu(p) for p in pids) - before < share * len(pids):
            return
    print(f"  warning: guests still busy after {timeout:.0f} s; measuring anyway", flush=True)


def _logged(d: Daemon, offset: int, event: str) -> bool:
    """The daemon logged ``event`` after ``offset`` (cheap: a byte search, no JSON parse,
    so that polling it does not take the CPU the daemon needs)."""
    with d.log_path.open("rb") as f:
        f.seek(offset)
        return f'"{event}"'.encode() in f.read()


def list_phase(guest: Any, root: Path, lv: Libvirt, defined: int) -> dict[str, float]:
    """``corral list`` and ``virsh list --all`` as whole processes, ``defined`` VMs each."""
    names = [f"l{i:04d}" for i in range(defined)]
    out: dict[str, float] = {}
    with daemon(root / "list", guest, names) as d:
        d.settle()
        cli = corral_cli()
        out["corral"] = _median([_t([*cli, "list"], env=d.env()) for _ in range(5)])
    batch = "; ".join(f"define {lv.xml(n)}" for n in names)
    t0 = time.monotonic()
    _t(lv.virsh(batch))
    out["libvirt_define_s"] = time.monotonic() - t0
    out["libvirt"] = _median([_t(lv.virsh("list", "--all")) for _ in range(5)])
    _t(lv.virsh("; ".join(f"undefine {n}" for n in names)))
    return out


def density_phase(guest: Any, root: Path, waves: list[int]) -> list[dict[str, float]]:
    """Waves of VMs started at once under one daemon (``cpuOvercommit: 60``, 128 MiB each,
    host policy ``tcgTbSize: 16``):
    seconds until the wave is Running, then daemon RSS and CPU (per VM, over 10 s idle) and
    qemu RSS per VM."""
    from corral.client import Client

    most = waves[-1]
    names = [f"d{i:03d}" for i in range(most)]
    rows = []
    small = "tcgTbSize: 16"  # MiB of translation cache per guest (qemu's default: up to 1 GiB)
    with (
        daemon(root / "density", guest, names, policy=small) as d,
        Client(socket=d.sock, timeout=300) as c,
    ):
        for n in names:
            c.patch_vm(n, {"spec": {"vm": {"maximumRam": "128Mi"}}})
        done = 0
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            for wave in waves:
                t0 = time.monotonic()
                list(pool.map(lambda n: c.action(n, "start", wait=600), names[done:wave]))
                took = time.monotonic() - t0
                done = wave
                time.sleep(5)
                cpu0 = _proc_cpu(d.pid)
                time.sleep(10)
                cpu = (_proc_cpu(d.pid) - cpu0) / 10
                qemus = qemu_pids_under(d.root)
                rows.append({
                    "vms": wave, "wave_s": took, "wave_size": len(names[:wave]) - (
                        rows[-1]["vms"] if rows else 0),
                    "daemon_rss_mib": rss(d.pid) / 2**20,
                    "daemon_rss_per_vm_mib": rss(d.pid) / 2**20 / wave,
                    "daemon_cpu_pct_per_vm": 100 * cpu / wave,
                    "qemu_rss_per_vm_mib": statistics.fmean(rss(p) for p in qemus) / 2**20,
                    "qemus": len(qemus),
                })  # fmt: skip
                print(f"  density {wave}: {rows[-1]}")
    return rows


# --- report --------------------------------------------------------------------------------


def goals(r: dict[str, Any]) -> list[tuple[str, str, str, str, bool]]:
    """(figure, corral, baseline, goal, met) rows of the issue's table."""
    rd, calls = r["rounds"], r["rounds"]["calls"]
    pairs = (("corral show", "virsh dominfo"), ("corral list", "virsh list"),
             ("corral --help", "virsh --help"))  # fmt: skip
    worst = max(pairs, key=lambda p: calls[p[0]] / max(calls[p[1]], 1e-9))
    call, virsh_call = calls[worst[0]], calls[worst[1]]
    burst, restart, listing = r["burst"], r["restart"], r["list"]
    dens = r["density"]
    run, raw, api, cli, virsh = rd["run"], rd["raw"], rd["api"], rd["cli"], rd["virsh"]
    # (figure, corral, baseline's name, baseline, seconds allowed over it, goal)
    over = [
        ("`corral run` -> Running", run["qmp"], "raw", raw["qmp"], 0.1, "<= raw + 100 ms"),
        ("`corral run` stop -> exit (raw: powerdown -> qemu gone)", run["stop"], "raw",
         raw["stop"], 0.02, "<= raw + 20 ms"),
        ("start through the API -> Running", api["running"], "raw", raw["qmp"], 0.03,
         "<= raw + 30 ms"),
        ("`start --wait` from the CLI", cli["running"], "API", api["running"], 0.05,
         "<= API + 50 ms"),
        ("`stop --wait` from the CLI", cli["stop"], "API", api["stop"], 0.05, "<= API + 50 ms"),
        ("start -> Running, vs `virsh create`", api["running"], "virsh", virsh["running"], 0.0,
         "<= libvirt"),
    ]  # fmt: skip
    rows = [
        *((f, f"{a:.3f} s", f"{n} {b:.3f} s", goal, a <= b + slack)
          for f, a, n, b, slack, goal in over),
        (f"one CLI call (`show`, `list`, `--help`; the worst ratio: `{worst[0]}`)",
         f"{call:.3f} s", f"virsh {virsh_call:.3f} s", "<= 3x virsh (<= 50 ms)",
         call <= max(3 * virsh_call, 0.05)),
        ("10 VMs at once: all Running", f"{burst['daemon']:.2f} s",
         f"raw {burst['raw']:.2f} s, libvirt {burst['libvirt']:.2f} s", "<= 2x raw",
         burst["daemon"] <= 2 * burst["raw"]),
        (f"list {r['defined']} defined VMs, whole process", f"{listing['corral']:.3f} s",
         f"`virsh list --all` {listing['libvirt']:.3f} s", "<= libvirt",
         listing["corral"] <= listing["libvirt"]),
        ("daemon kill -9 -> 10 VMs re-attached (log) / Running via API, same pids",
         f"{restart['reattached']:.3f} s / {restart['api_running']:.3f} s",
         f"libvirtd {restart['libvirt_running']:.3f} s", "<= 0.25 s",
         restart["reattached"] <= 0.25),
        ("daemon RSS, 10 running", f"{restart['daemon_rss_mib']:.1f} MiB",
         f"libvirtd + virtlogd {restart['libvirt_rss_mib']:.1f} MiB", "<= libvirt",
         restart["daemon_rss_mib"] <= restart["libvirt_rss_mib"]),
        ("`corral run` RSS per VM", f"{r['runner_rss_mib']:.1f} MiB", "-", "<= 25 MiB",
         r["runner_rss_mib"] <= 25),
    ]  # fmt: skip
    if dens:
        top = dens[-1]
        rows.append((
            f"density: {top['vms']} VMs under the daemon",
            f"{top['qemus']} running; daemon {top['daemon_rss_per_vm_mib']:.2f} MiB and "
            f"{top['daemon_cpu_pct_per_vm']:.2f}% CPU per VM; qemu {top['qemu_rss_per_vm_mib']:.0f}"
            " MiB per VM", "-", "100 VMs on 2 cores, per-VM overhead reported",
            top["qemus"] >= 100))  # fmt: skip
    return rows


def plot(r: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rd = r["rounds"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    labels = ["raw qemu", "corral run", "daemon API", "daemon CLI", "virsh create"]
    values = [rd["raw"]["qmp"], rd["run"]["qmp"], rd["api"]["running"], rd["cli"]["running"],
              rd["virsh"]["running"]]  # fmt: skip
    left.barh(labels, [v * 1000 for v in values], color=["#888", "#4a7", "#27a", "#59c", "#c63"])
    left.set_xlabel("start -> Running, median (ms)")
    calls = rd["calls"]
    names = list(calls)
    right.barh(names, [calls[n] * 1000 for n in names],
               color=["#27a" if n.startswith("corral") else "#c63" for n in names])  # fmt: skip
    right.set_xlabel("one command, whole process, median (ms)")
    fig.suptitle(f"corral vs raw qemu vs libvirt, TCG, {r['machine']['cores']} cores "
                 f"({r['date']})")  # fmt: skip
    fig.tight_layout()
    fig.savefig(PLOT, dpi=90)
    plt.close(fig)


def write_doc(r: dict[str, Any]) -> None:
    m = r["machine"]
    lines = [
        BEGIN,
        "",
        f"One `make bench` (`python -m bench compare`) run, {r['date']}, "
        f"{r['elapsed_s'] / 60:.0f} min: {m['cores']} cores ({m['cpu']}), {m['mem_gib']} GiB, "
        f"{m['qemu']}, Python {m['python']}, TCG. Load average at the start "
        f"{r['load'][0]:.1f} (other jobs shared the machine: read the ratios, not the absolute "
        f"figures). {r['rounds_n']} interleaved rounds, medians.",
        "",
        "![corral vs raw qemu vs libvirt](benchmarks-compare.png)",
        "",
        "| figure | corral | baseline | goal | met |",
        "|---|---|---|---|---|",
        *(
            f"| {a} | {b} | {c} | {d} | {'met' if ok else '**not met**'} |"
            for a, b, c, d, ok in goals(r)
        ),
        "",
        "Density (one daemon, `cpuOvercommit: 60`, 128 MiB guests, host policy `tcgTbSize: 16`,"
        " each wave started at once):",
        "",
        "| VMs | wave -> Running | daemon RSS | daemon RSS / VM | daemon CPU / VM (idle) "
        "| qemu RSS / VM |",
        "|---|---|---|---|---|---|",
        *(
            f"| {d['vms']} | {d['wave_s']:.1f} s | {d['daemon_rss_mib']:.0f} MiB | "
            f"{d['daemon_rss_per_vm_mib']:.2f} MiB | {d['daemon_cpu_pct_per_vm']:.2f}% | "
            f"{d['qemu_rss_per_vm_mib']:.0f} MiB |"
            for d in r["density"]
        ),
        "",
        END,
    ]
    text = DOC.read_text()
    block = "\n".join(lines)
    if BEGIN in text and END in text:
        text = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: block, text,
                      flags=re.S)  # fmt: skip
    else:
        text = text.rstrip("\n") + "\n\n## Side by side (`make bench`)\n\n" + block + "\n"
    DOC.write_text(text)
    print(f"wrote {DOC.relative_to(REPO)} and {PLOT.relative_to(REPO)}")


def main(rounds: int, defined: int, waves: list[int]) -> dict[str, Any]:
    started = time.monotonic()
    guest = guest_build.build_tiny()
    result: dict[str, Any] = {
        "machine": machine_summary(), "date": datetime.date.today().isoformat(),
        "load": os.getloadavg(), "rounds_n": rounds, "defined": defined,
    }  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="cbc-", dir="/tmp") as tmp:
        root = Path(tmp)
        lv = Libvirt(root / "libvirt", guest)
        try:
            result["libvirt_start_s"] = lv.start()
            print("== rounds")
            result["rounds"] = rounds_phase(guest, root, lv, rounds)
            result["runner_rss_mib"] = runner_rss(guest)
            print("== burst")
            result["burst"] = burst_phase(guest, root, lv)
            print("== restart")
            result["restart"] = restart_phase(guest, root, lv)
            print("== list")
            result["list"] = list_phase(guest, root, lv, defined)
        finally:
            lv.stop()
        print("== density")
        result["density"] = density_phase(guest, root, waves) if waves else []
    result["elapsed_s"] = time.monotonic() - started
    write_result("compare", result)
    plot(result)
    write_doc(result)
    for row in goals(result):
        print(" | ".join(str(x) for x in row))
    return result
