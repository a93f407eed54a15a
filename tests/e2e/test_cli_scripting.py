"""The CLI as scripts and shells use it, against a real ``corral serve`` started the way
systemd starts it (``$NOTIFY_SOCKET`` a datagram socket this test binds): the real ``corral``
program as a subprocess (stdout a pipe, so never a terminal) for ``-o name|yaml|json|wide``
and plain tables; VM names completed by asking the daemon; the aetherscale aliases hidden but
working; the daemon's stderr JSON lines with levels, uvicorn's lines included, no token in
them; READY=1 only once the API answers and running VMs are re-attached, STOPPING=1 at
SIGTERM."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.integration.test_manager import qemu_pids, tiny

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CORRAL = Path(sys.executable).with_name("corral")  # the installed console script
NAMES = ("d-out1", "d-out2", "w-out")
BOX = re.compile(r"[\u2500-\u257f]")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Daemon:
    """``corral serve`` with its stdout and stderr in separate files and a notify socket."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.sock = root / "api.sock"
        self.port = _free_port()
        self.notify_path = root / "notify"
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(str(self.notify_path))
        self.proc: subprocess.Popen[bytes] | None = None
        self.runs = 0
        (root / "host.yaml").write_text("{}\n")
        self.env = {
            k: v
            for k, v in os.environ.items()
            if k not in ("CORRAL_URL", "CORRAL_TOKEN", "NOTIFY_SOCKET")
        }
        self.env["CORRAL_SOCKET"] = str(self.sock)
        self.token = self.ok("token", "create", "ci", "--file", str(root / "tokens")).strip()

    def run(
        self, *args: str, env: dict[str, str] | None = None, timeout: float = 300
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(CORRAL), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            env=env or self.env,
        )

    def ok(self, *args: str) -> str:
        done = self.run(*args)
        assert done.returncode == 0, f"corral {' '.join(args)}: {done.stderr}{done.stdout}"
        assert done.stderr == "", done.stderr
        return done.stdout

    def start(self) -> None:
        self.runs += 1
        self.stderr = self.root / f"stderr.{self.runs}"
        with (self.root / "stdout").open("ab") as out, self.stderr.open("wb") as err:
            self.proc = subprocess.Popen(
                [
                    str(CORRAL),
                    "serve",
                    "--state-dir",
                    str(self.root / "state"),
                    "--accel",
                    "tcg",
                    "--resync",
                    "1",
                    "--policy",
                    str(self.root / "host.yaml"),
                    "--socket",
                    str(self.sock),
                    "--open-policy",
                    "--listen",
                    f"127.0.0.1:{self.port}",
                    "--tokens",
                    str(self.root / "tokens"),
                ],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                env={**self.env, "NOTIFY_SOCKET": str(self.notify_path)},
                start_new_session=True,
            )

    def log(self) -> str:
        return self.stderr.read_text(errors="replace")

    def notifications(self, until: str, timeout: float) -> list[str]:
        """The notify datagrams' lines up to and including the one that has ``until``."""
        got: list[str] = []
        deadline = time.monotonic() + timeout
        while until not in got:
            assert self.proc is not None
            assert self.proc.poll() is None or until == "STOPPING=1", f"exited:\n{self.log()}"
            left = deadline - time.monotonic()
            assert left > 0, f"no {until} within {timeout}s (got {got}):\n{self.log()}"
            self.notify.settimeout(min(left, 1.0))
            try:
                got += self.notify.recv(4096).decode().split("\n")
            except TimeoutError:
                continue
        return got

    def stop(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=60)


@pytest.fixture(scope="module")
def daemon(tiny_guest: Any) -> Iterator[Daemon]:
    root = Path(os.path.realpath("/tmp")) / f"cs-{os.getpid()}-{time.monotonic_ns() % 10**8}"
    root.mkdir()
    d = Daemon(root)
    try:
        d.start()
        got = d.notifications("READY=1", timeout=120)
        # the moment READY=1 arrives, the API answers
        assert d.run("list", "-o", "name").returncode == 0, d.log()
        assert got[0] == "STATUS=re-attaching running VMs", got
        assert "STATUS=serving 0 VM(s), 0 re-attached" in got
        for name in NAMES:
            doc = tiny(tiny_guest, name, state="Running" if name == "d-out1" else "Stopped")
            (root / f"{name}.yaml").write_text(yaml.safe_dump(doc))
            d.ok("apply", "-f", str(root / f"{name}.yaml"))
        d.ok("start", "d-out1", "--wait")
        yield d
    finally:
        if d.proc is not None and d.proc.poll() is None:
            d.proc.send_signal(signal.SIGTERM)
            try:
                d.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                d.proc.kill()
        d.notify.close()
        for name in NAMES:
            for pid in qemu_pids(name):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(root, ignore_errors=True)


def test_output_formats_for_scripts(daemon: Daemon) -> None:
    assert sorted(daemon.ok("list", "-o", "name").splitlines()) == sorted(NAMES)

    table = daemon.ok("list")
    assert not BOX.search(table) and "\x1b[" not in table, table
    lines = table.splitlines()
    assert lines[0].split() == ["NAME", "STATE", "CPUS", "RAM", "IPS", "UPTIME"]
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert set(rows) == set(NAMES) and all(len(r) == 6 for r in rows.values()), table
    assert rows["d-out1"][1] == "Running" and rows["w-out"][1] == "Stopped"

    wide = daemon.ok("list", "-o", "wide").splitlines()
    assert wide[0].split()[6:] == ["PID", "ACCEL", "RESTARTS", "AGE", "LABELS"]
    running = next(line.split() for line in wide[1:] if line.startswith("d-out1 "))
    assert running[6] == str(qemu_pids("d-out1")[0]) and running[7] == "tcg"
    assert running[10] == "suite=manager"

    shown = yaml.safe_load(daemon.ok("show", "d-out1", "-o", "yaml"))
    assert shown["metadata"]["name"] == "d-out1" and shown["status"]["state"] == "Running"
    assert daemon.ok("show", "d-out1", "-o", "name") == "d-out1\n"
    assert "UID:" in daemon.ok("show", "d-out1", "-o", "wide")
    assert json.loads(daemon.ok("ip", "d-out1", "-o", "json"))["name"] == "d-out1"

    events = daemon.ok("events", "d-out1", "-o", "name").splitlines()
    assert events[0] == "Created" and "StateChanged" in events, events
    assert json.loads(daemon.ok("image", "list", "-o", "json")) == {"items": []}
    assert daemon.ok("disk", "list").split() == [
        "ID",
        "VM",
        "UUID",
        "DISKS",
        "ON",
        "DISK",
        "DELETED",
    ]

    info = json.loads(daemon.ok("host", "info", "-o", "json"))
    assert re.fullmatch(r"\d+\.\d+\.\d+", info["qemu_version"]) and "policy" in info
    doc = str(daemon.root / "d-out2.yaml")
    policy = str(daemon.root / "host.yaml")
    argv = json.loads(daemon.ok("render", "-c", doc, "--policy", policy, "-o", "json"))
    assert argv == daemon.ok("render", "-c", doc, "--policy", policy).splitlines()
    assert "guest=d-out2" in " ".join(argv)


def complete(
    daemon: Daemon, words: str, env: dict[str, str] | None = None
) -> tuple[list[str], float]:
    cword = str(len(words.split()) - (0 if words.endswith(" ") else 1))
    started = time.monotonic()
    done = daemon.run(
        env={
            **(env or daemon.env),
            "_CORRAL_COMPLETE": "bash_complete",
            "COMP_WORDS": words,
            "COMP_CWORD": cword,
        }
    )
    took = time.monotonic() - started
    assert done.returncode == 0 and done.stderr == "", done.stderr
    return [line.removeprefix("plain,") for line in done.stdout.splitlines() if line], took


def test_vm_names_complete_in_the_shell(daemon: Daemon) -> None:
    names, took = complete(daemon, "corral show d")
    assert names == ["d-out1", "d-out2"]
    assert took < 10, f"completion took {took:.2f}s"
    assert complete(daemon, "corral start d-out1 d")[0] == ["d-out2"]  # not the one given
    assert complete(daemon, "corral --socket " + str(daemon.sock) + " exec w")[0] == ["w-out"]
    assert complete(daemon, "corral stop-vm --vm-id d-out")[0] == ["d-out1", "d-out2"]
    nowhere = {**daemon.env, "CORRAL_SOCKET": str(daemon.root / "no-daemon.sock")}
    names, took = complete(daemon, "corral show d", env=nowhere)
    assert names == [] and took < 10


def test_aetherscale_aliases_are_hidden_and_work(daemon: Daemon) -> None:
    helped = daemon.ok("--help")
    assert re.search(r"^\s+list\s", helped, re.M)
    for alias in ("create-vm", "start-vm", "stop-vm", "delete-vm", "list-vms"):
        assert alias not in helped
    assert "d-out1\tRunning" in daemon.ok("list-vms").splitlines()
    assert daemon.ok("delete-vm", "--vm-id", "w-out").strip() == "vm/w-out delete"
    assert "w-out" not in daemon.ok("list", "-o", "name").splitlines()


def test_daemon_logs_json_lines_and_notifies_systemd(daemon: Daemon) -> None:
    token = daemon.token
    base = f"http://127.0.0.1:{daemon.port}"
    with httpx.Client(headers={"Authorization": f"Bearer {token}"}) as http:
        assert http.get(f"{base}/v1/vms", params={"access_token": token}).status_code == 200
        assert http.get(f"{base}/v1/vms/nope").status_code == 404
    assert httpx.get(f"{base}/v1/vms").status_code == 401

    first = daemon.root / "stderr.1"
    deadline = time.monotonic() + 30
    while '"status": 401' not in first.read_text():  # the access line follows the response
        assert time.monotonic() < deadline, first.read_text()
        time.sleep(0.1)
    text = first.read_text()
    records = [json.loads(line) for line in text.splitlines()]  # every line is one object
    assert all({"time", "level", "logger", "message"} <= set(r) for r in records)
    assert all(r["level"] in ("debug", "info", "warning", "error", "critical") for r in records)
    loggers = {r["logger"] for r in records}
    assert {"corral.daemon", "corral.events", "uvicorn.error", "uvicorn.access"} <= loggers
    access = [r for r in records if r["logger"] == "uvicorn.access"]
    assert {(r["method"], r["status"]) for r in access} >= {
        ("GET", 200),
        ("GET", 404),
        ("GET", 401),
    }
    assert any(r["path"] == "/v1/vms?access_token=***" for r in access), access
    assert token not in text and token.removeprefix("crl_") not in text
    assert any(r["message"] == "DaemonReady" and r["pid"] == daemon.proc.pid for r in records)
    assert (daemon.root / "stdout").read_text() == ""

    # SIGTERM: STOPPING=1, the VM keeps running; the next daemon is READY only once it has
    # re-attached to it
    pid = qemu_pids("d-out1")
    count = len(daemon.ok("list", "-o", "name").splitlines())
    assert daemon.stop() == 0
    assert "STOPPING=1" in daemon.notifications("STOPPING=1", timeout=10)
    assert qemu_pids("d-out1") == pid
    assert json.loads(first.read_text().splitlines()[-1])["message"] == "DaemonStopped"
    daemon.start()
    got = daemon.notifications("READY=1", timeout=120)
    assert f"STATUS=serving {count} VM(s), 1 re-attached" in got, got
    assert len(daemon.ok("list", "-o", "name").splitlines()) == count
    assert qemu_pids("d-out1") == pid
