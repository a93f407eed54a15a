"""``corral serve`` when its store cannot be written (issue 11, faults 3): the SQLite file
write-locked by another process, and the state dir on a full filesystem. The daemon keeps
answering (its event loop never waits on the store), a request it cannot make durable is a
503 naming the cause (problem+json, ``Retry-After``), and nothing it accepted is lost: a start
accepted before the disk filled up still runs the VM, and the events the daemon recorded while
it could not write are in the store afterwards."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.test_serve import corral, env
from tests.integration.test_manager import qemu_pids, tiny

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# another process holding a write transaction on the store (what `sqlite3 corral.db` with a
# `BEGIN EXCLUSIVE` left open does), until it reads a line
LOCKER = """
import sqlite3, sys
db = sqlite3.connect(sys.argv[1], isolation_level=None)
db.execute("BEGIN EXCLUSIVE")
db.execute("INSERT INTO meta (key, value) VALUES ('locker', '1') "
           "ON CONFLICT (key) DO UPDATE SET value = excluded.value")
print("locked", flush=True)
sys.stdin.readline()
db.execute("ROLLBACK")
db.close()
"""

VMS = ("stlock-a", "stlock-b", "stfull-a", "stfull-b", "stfull-c")


def stamp() -> str:
    """Now, formatted like the daemon's event times (so they compare as strings)."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class Serve:
    """``corral serve`` with its state dir at ``root/state`` (a tmpfs mount, if asked), its
    log and API socket beside it on the test's own disk (a full state dir must not take the
    daemon's stderr down with it: that is journald's, in real life)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.state = root / "state"
        self.state.mkdir(mode=0o700)
        self.socket = root / "api.sock"
        self.proc: subprocess.Popen[bytes] | None = None
        self.mounted = False
        (root / "host.yaml").write_text("{}\n")
        (root / "corral.yaml").write_text(
            "cpuOvercommit: 8\nbackoffInitialSeconds: 1\nbackoffMaxSeconds: 4\n"
        )

    def mount_tmpfs(self, size: str) -> None:
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(self.state)],
            check=True,
        )  # fmt: skip
        self.mounted = True

    def start(self) -> None:
        with (self.root / "daemon.log").open("ab") as log:
            self.proc = subprocess.Popen(
                corral("serve", "--state-dir", str(self.state), "--accel", "tcg", "--resync", "1",
                       "--policy", str(self.root / "host.yaml"),
                       "--config", str(self.root / "corral.yaml"), "--socket", str(self.socket)),
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env(),
                start_new_session=True,
            )  # fmt: skip
        until(lambda: '"DaemonReady"' in self.log(), 60, "daemon ready", self)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        return (self.root / "daemon.log").read_text(errors="replace")[-6000:]

    def http(self) -> httpx.Client:
        return httpx.Client(
            transport=httpx.HTTPTransport(uds=str(self.socket)),
            base_url="http://corral",
            timeout=60,
        )

    def close(self) -> None:
        if self.alive():
            assert self.proc is not None
            self.proc.kill()
            self.proc.wait()
        for name in VMS:
            for pid in qemu_pids(name):
                os.kill(pid, signal.SIGKILL)
        if self.mounted:
            time.sleep(0.5)  # the killed qemus let go of their files on the mount
            subprocess.run(["umount", "-l", str(self.state)], check=False)
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture
def serve() -> Iterator[Serve]:
    root = Path(os.path.realpath("/tmp")) / f"csf-{os.getpid()}-{time.monotonic_ns() % 10**8}"
    root.mkdir(mode=0o700)
    s = Serve(root)
    try:
        yield s
    finally:
        s.close()


def until(check: Any, timeout: float, what: str, serve: Serve | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if serve is not None and serve.proc is not None and serve.proc.poll() is not None:
            raise AssertionError(f"{what}: daemon exited {serve.proc.returncode}\n{serve.log()}")
        if time.monotonic() > deadline:
            log = serve.log() if serve is not None else ""
            raise AssertionError(f"{what}: not within {timeout}s\n{log}")
        time.sleep(0.1)


class Probe(threading.Thread):
    """Reads the daemon (``/healthz``, ``GET /v1/vms``) every 50 ms on its own connection and
    keeps the slowest answer: a daemon whose event loop waits on the store answers nothing."""

    def __init__(self, serve: Serve) -> None:
        super().__init__(daemon=True)
        self.serve = serve
        self.worst = 0.0
        self.count = 0
        self.errors: list[str] = []
        self._done = threading.Event()

    def run(self) -> None:
        with self.serve.http() as api:
            while not self._done.is_set():
                for path in ("/healthz", "/v1/vms"):
                    t0 = time.monotonic()
                    try:
                        r = api.get(path)
                        if r.status_code != 200:
                            self.errors.append(f"{path}: {r.status_code} {r.text[:200]}")
                    except httpx.HTTPError as exc:
                        self.errors.append(f"{path}: {exc!r}")
                    self.worst = max(self.worst, time.monotonic() - t0)
                    self.count += 1
                self._done.wait(0.05)

    def finish(self) -> None:
        self._done.set()
        self.join(60)


def unavailable(r: httpx.Response, cause: str) -> None:
    """``r`` is the store's 503: problem+json naming ``cause``, with a Retry-After."""
    assert r.status_code == 503, f"{r.status_code} {r.text}"
    assert r.headers["content-type"].startswith("application/problem+json")
    body = r.json()
    assert body["type"] == "urn:corral:store-unavailable", body
    assert cause in body["detail"], body
    assert int(r.headers["retry-after"]) >= 1


def events(api: httpx.Client, name: str) -> list[dict[str, Any]]:
    r = api.get(f"/v1/vms/{name}/events")
    assert r.status_code == 200, r.text
    return [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: ")]


def state(api: httpx.Client, name: str) -> str | None:
    r = api.get(f"/v1/vms/{name}")
    return r.json().get("status", {}).get("state") if r.status_code == 200 else None


@pytest.mark.timeout(300)
def test_locked_store_answers_503_fast_and_the_daemon_stays_responsive(
    serve: Serve, tiny_guest: Any
) -> None:
    serve.start()
    with serve.http() as api:
        r = api.post("/v1/vms", json=tiny(tiny_guest, "stlock-a", state="Stopped"))
        assert r.status_code == 201, r.text
        probe = Probe(serve)
        locker = subprocess.Popen(
            [sys.executable, "-c", LOCKER, str(serve.state / "corral.db")],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            assert locker.stdout is not None and locker.stdin is not None
            assert locker.stdout.readline().strip() == "locked"
            locked_at, locked_from = time.monotonic(), stamp()
            probe.start()
            took = {}
            t0 = time.monotonic()
            created = api.post("/v1/vms", json=tiny(tiny_guest, "stlock-b", state="Stopped"))
            took["create"] = time.monotonic() - t0
            t0 = time.monotonic()
            started = api.post("/v1/vms/stlock-a/start")
            took["start"] = time.monotonic() - t0
            t0 = time.monotonic()
            patched = api.patch("/v1/vms/stlock-a", json={"metadata": {"labels": {"x": "1"}}})
            took["patch"] = time.monotonic() - t0
            for r in (created, started, patched):
                unavailable(r, "locked")
            # nothing half-made: no VM b, a still desired Stopped without the label
            assert api.get("/v1/vms/stlock-b").status_code == 404
            a = api.get("/v1/vms/stlock-a").json()
            assert a["spec"]["vm"]["state"] == "Stopped" and "x" not in a["metadata"]["labels"]
            # the daemon's own status writes (resync every 1 s) fail too: it says so
            until(lambda: api.get("/readyz").status_code == 503, 30, "readyz names the store")
            ready = api.get("/readyz").json()
            assert "store" in ready["detail"] and "locked" in ready["detail"], ready
            while time.monotonic() - locked_at < 8:  # several resyncs while locked
                time.sleep(0.2)
            assert serve.alive()
        finally:
            if locker.stdin is not None:
                locker.stdin.write("\n")
                locker.stdin.flush()
            locker.wait(30)
            locker.stdin.close()
            locker.stdout.close()
            probe.finish()
        answers = ", ".join(f"{k} {v:.2f}s" for k, v in took.items())
        print(f"locked store: slowest of {probe.count} reads {probe.worst * 1000:.0f} ms; "
              f"503 after {answers}")  # fmt: skip
        assert probe.errors == []
        assert probe.count > 20
        assert probe.worst < 2.0, f"a read waited {probe.worst:.1f}s: the event loop blocked"
        assert all(v < 10 for v in took.values()), took

        # released: the daemon's kept writes land, and the same requests succeed
        until(lambda: api.get("/readyz").status_code == 200, 30, "readyz after release")
        assert api.get("/v1/vms/stlock-a").json()["status"]["observedAt"] > locked_from
        r = api.post("/v1/vms", json=tiny(tiny_guest, "stlock-b", state="Stopped"))
        assert r.status_code == 201, r.text
        r = api.patch("/v1/vms/stlock-a", json={"metadata": {"labels": {"x": "1"}}})
        assert r.status_code == 200 and r.json()["metadata"]["labels"]["x"] == "1", r.text
        assert api.post("/v1/vms/stlock-a/start").status_code == 200
        until(lambda: state(api, "stlock-a") == "Running", 120, "stlock-a Running", serve)
        assert [v["metadata"]["name"] for v in api.get("/v1/vms").json()["items"]] == [
            "stlock-a",
            "stlock-b",
        ]


def fill_up(path: Path) -> None:
    """Append to ``path`` until its filesystem has not one byte left."""
    with path.open("ab", buffering=0) as f:
        for chunk in (2**20, 4096, 1):
            try:
                while True:
                    f.write(b"\0" * chunk)
            except OSError as exc:
                assert exc.errno == 28, exc  # ENOSPC
    assert os.statvfs(path).f_bavail == 0


@pytest.mark.timeout(420)
def test_full_state_dir_answers_503_and_loses_no_accepted_start(
    serve: Serve, tiny_guest: Any
) -> None:
    serve.mount_tmpfs("32m")
    serve.start()
    fill = serve.state / "fill"
    with serve.http() as api:
        for name in ("stfull-a", "stfull-b"):
            r = api.post("/v1/vms", json=tiny(tiny_guest, name, state="Stopped", maximumCpus=1))
            assert r.status_code == 201, r.text

        fill_up(fill)
        t0 = time.monotonic()
        label = {"metadata": {"labels": {"x": "1"}}}
        unavailable(api.post("/v1/vms", json=tiny(tiny_guest, "stfull-c", state="Stopped")), "full")
        unavailable(api.post("/v1/vms/stfull-b/start"), "full")
        unavailable(api.patch("/v1/vms/stfull-a", json=label), "full")
        assert time.monotonic() - t0 < 30
        assert api.get("/v1/vms/stfull-c").status_code == 404
        assert api.get("/v1/vms/stfull-b").json()["spec"]["vm"]["state"] == "Stopped"

        # room for one request: the start is accepted (durable), then the disk is full again
        # while the daemon starts the VM and records what happens
        os.truncate(fill, fill.stat().st_size - 2**20)
        r = api.post("/v1/vms/stfull-a/start")
        assert r.status_code == 200, r.text
        fill_up(fill)
        full_from = stamp()
        until(lambda: api.get("/readyz").status_code == 503, 30, "readyz names the store", serve)
        assert "full" in api.get("/readyz").json()["detail"]
        time.sleep(6)
        assert serve.alive() and api.get("/healthz").status_code == 200
        full_until = stamp()
        fill.unlink()

        until(lambda: state(api, "stfull-a") == "Running", 180, "accepted start runs", serve)
        assert len(qemu_pids("stfull-a")) == 1
        until(lambda: api.get("/readyz").status_code == 200, 30, "readyz after freeing", serve)
        kept = [e for e in events(api, "stfull-a") if full_from <= e["time"] <= full_until]
        print("recorded while full, written after:", [e["event"] for e in kept])
        assert kept, "events the daemon recorded while the disk was full are in the store"
        ids = [e["id"] for e in events(api, "stfull-a")]
        assert ids == sorted(ids)

        r = api.post("/v1/vms", json=tiny(tiny_guest, "stfull-c", state="Stopped"))
        assert r.status_code == 201, r.text
        r = api.patch("/v1/vms/stfull-b", json=label)
        assert r.status_code == 200, r.text
        assert serve.alive()
