"""``corral serve`` as a real daemon process under faults (issue 11, faults 7 and 8): host
shutdown through the daemon keeps the VMs down, SIGTERM with a graceful stop in flight ends
the daemon at once, and a daemon killed mid-import leaves no temporary file behind."""

from __future__ import annotations

import asyncio
import http.server
import socketserver
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from corral.client import Client
from corral.errors import CorralError
from corral.host.images import ImageStore
from tests.e2e import test_serve
from tests.e2e.test_serve import Daemon
from tests.integration.test_manager import qemu_pids, tiny

pytestmark = [pytest.mark.integration, pytest.mark.slow]

daemon = test_serve.daemon

SLOW_SIZE = 64 * 2**20


class _Trickle(http.server.BaseHTTPRequestHandler):
    """An image server that announces 64 MiB and sends 64 KiB every 0.1 s (a slow mirror)."""

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(SLOW_SIZE))
        self.end_headers()
        try:
            for _ in range(SLOW_SIZE // 65536):
                self.wfile.write(b"\1" * 65536)
                self.wfile.flush()
                time.sleep(0.1)
        except OSError:
            pass

    def log_message(self, *args: Any) -> None:
        pass


class _Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True


@pytest.fixture
def slow_url() -> Iterator[str]:
    server = _Server(("127.0.0.1", 0), _Trickle)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/slow.img"
    finally:
        server.shutdown()
        server.server_close()


def ready(d: Daemon, pid: int, timeout: float = 60) -> None:
    d.wait(lambda _: f'"DaemonReady", "pid": {pid}' in d.log(), timeout, "daemon ready")


def client(d: Daemon) -> Client:
    return Client(socket=d.root / "api.sock")


def until(check: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout}s")
        time.sleep(0.1)


def booted(d: Daemon, name: str) -> bool:
    s = d.statuses().get(name, {})
    return bool(
        s.get("state") == "Running"
        and s.get("conditions", {}).get("AgentConnected", {}).get("status") is True
    )


@pytest.mark.timeout(180)
def test_daemon_killed_mid_import_leaves_no_temp_file(daemon: Daemon, slow_url: str) -> None:
    first = daemon.start()
    ready(daemon, first.pid)
    images = daemon.root / "images"

    def importing() -> None:
        try:
            with client(daemon) as c:
                c.import_image("slow", slow_url)
        except CorralError:
            pass  # the daemon dies under it

    thread = threading.Thread(target=importing, daemon=True)
    thread.start()

    def temps() -> list[Path]:
        return sorted(images.glob(".slow.*.tmp")) if images.is_dir() else []

    until(lambda: bool(temps()) and temps()[0].stat().st_size > 0, 30, "import under way")
    live = temps()
    # another process opening the store removes nothing a live import holds
    assert asyncio.run(ImageStore(images).remove_leftovers()) == []
    assert temps() == live

    first.kill()  # SIGKILL: no chance to clean up
    first.wait()
    thread.join(30)
    assert temps() == live, "the killed daemon's temporary file is still there"

    second = daemon.start()
    ready(daemon, second.pid)
    assert temps() == [], f"leftover import files after a restart: {temps()}"
    with client(daemon) as c:
        events = list(c.events())
        assert any(
            e["event"] == "ImageLeftoversRemoved" and e["files"] == [p.name for p in live]
            for e in events
        ), events
        assert c.list_images() == []


@pytest.mark.timeout(400)
def test_host_shutdown_through_the_daemon_keeps_vms_down(daemon: Daemon, tiny_guest: Any) -> None:
    proc = daemon.start()
    ready(daemon, proc.pid)
    with client(daemon) as c:
        for i in range(2):
            c.create_vm(tiny(tiny_guest, f"e2e{i}", maximumCpus=1, powerdownTimeout=60))
        until(lambda: all(booted(daemon, f"e2e{i}") for i in range(2)), 300, "both booted")
        # e2e1 ignores ACPI powerdown: host shutdown waits its timeout, then forces it
        c.patch_vm("e2e1", {"spec": {"vm": {"powerdownTimeout": 3}}})
        c.exec("e2e1", ["/bin/sh", "-c", "kill $(cat /run/acpid.pid)"])
        t0 = time.monotonic()
        result = c.host_shutdown()
        took = time.monotonic() - t0
        assert result == {"e2e0": "powerdown", "e2e1": "quit"}, result
        assert took < 3 + 15, f"host shutdown took {took:.1f}s"
        # the reconciler (resync every 1 s) must not bring them back
        deadline = time.monotonic() + 6
        while time.monotonic() < deadline:
            live = {n: qemu_pids(n) for n in ("e2e0", "e2e1")}
            assert all(p == [] for p in live.values()), f"restarted after host shutdown: {live}"
            time.sleep(0.2)
        assert c.host()["reconciling"] is False
        assert all(s["desiredState"] == "Running" for s in daemon.statuses().values())
    print(f"host shutdown through the daemon: {took:.1f}s (one VM deaf to ACPI, timeout 3 s)")


@pytest.mark.timeout(300)
@pytest.mark.parametrize("verb", ["stop", "restart"])
def test_sigterm_with_a_graceful_stop_in_flight_ends_the_daemon(
    daemon: Daemon, tiny_guest: Any, verb: str
) -> None:
    proc = daemon.start()
    ready(daemon, proc.pid)
    with client(daemon) as c:
        c.create_vm(tiny(tiny_guest, "e2e0", maximumCpus=1, powerdownTimeout=120))
        until(lambda: booted(daemon, "e2e0"), 200, "booted")
        pid = qemu_pids("e2e0")
        c.exec("e2e0", ["/bin/sh", "-c", "kill $(cat /run/acpid.pid)"])  # deaf to ACPI

        def stop() -> None:  # a request waiting for a graceful stop (reconciler's, or its own)
            try:
                with client(daemon) as c2:
                    c2.action("e2e0", verb, wait=120)
            except CorralError:
                pass

        threading.Thread(target=stop, daemon=True).start()
        until(lambda: daemon.statuses()["e2e0"].get("state") == "Stopping", 30, "stopping")
    t0 = time.monotonic()
    proc.terminate()
    code = proc.wait(timeout=60)
    took = time.monotonic() - t0
    assert code == 0
    assert took < 10, f"SIGTERM took {took:.1f}s with a stop in flight"
    assert qemu_pids("e2e0") == pid, "SIGTERM leaves the VM as it is"
    print(f"SIGTERM with a {verb} in flight (powerdownTimeout 120 s): {took:.1f}s")
