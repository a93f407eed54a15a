"""``/metrics`` against a real daemon with a running tiny guest and 99 more defined VMs, parsed
with prometheus_client's own text parser: the values match the guest (vCPUs, state, RAM, a
qemu that uses CPU), the daemon's health and reconcile latency are there, a scrape of 100 VMs
is cheap, and who may scrape is enforced (a token; not an ordinary user)."""

from __future__ import annotations

import fcntl
import json
import os
import re
import struct
import subprocess
import time
from collections.abc import Iterator, Sequence
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from corral.api.metrics import read_nics
from tests.e2e.test_api_cli import REPO, Stack, running_stack
from tests.integration.test_manager import tiny

pytestmark = [pytest.mark.integration, pytest.mark.slow]

DEFINED = 99


def _users(stack: Stack) -> Sequence[str]:
    users = stack.root / "users.yaml"
    stack.ok("user", "add", "dora", "--file", str(users), stdin="Dora-pass-3377\n")
    return ("--users", str(users))


@pytest.fixture(scope="module")
def stack(tiny_guest: Any) -> Iterator[Stack]:
    yield from running_stack("mt", ("mt-run",), before=_users)


@pytest.fixture(scope="module")
def guest(stack: Stack, tiny_guest: Any) -> str:
    data = {"name": "data", "file": {"path": str(stack.root / "mt-data.qcow2"), "size": "16Mi"}}
    doc = tiny(tiny_guest, "mt-run", maximumCpus=2, currentCpus=2, disks=[data])
    doc["spec"]["permissions"] = [{"user": "dora", "may": ["*"]}]
    path = stack.root / "mt-run.yaml"
    path.write_text(yaml.safe_dump(doc))
    stack.ok("apply", "-f", str(path))
    transport = httpx.HTTPTransport(uds=str(stack.sock))
    with httpx.Client(transport=transport, base_url="http://corral", timeout=60) as http:
        for i in range(DEFINED):
            r = http.post("/v1/vms", json=tiny(tiny_guest, f"mt-def-{i:03}", state="Stopped"))
            assert r.status_code == 201, r.text
    stack.ok("wait", "mt-run", "--for=condition=Booted", "--timeout", "240")
    return "mt-run"


def scrape(stack: Stack) -> tuple[dict[str, Any], float]:
    with httpx.Client(timeout=60) as http:
        began = time.perf_counter()
        r = http.get(f"http://127.0.0.1:{stack.port}/metrics",
                     headers={"Authorization": f"Bearer {stack.token}"})  # fmt: skip
        took = time.perf_counter() - began
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    families = {f.name: f for f in text_string_to_metric_families(r.text)}
    return families, took


def value(families: dict[str, Any], name: str, **labels: str) -> float:
    family = families[name]
    found = [s.value for s in family.samples
             if s.name in (name, f"{name}_total") and all(s.labels.get(k) == v
                                                           for k, v in labels.items())]  # fmt: skip
    assert len(found) == 1, (name, labels, family.samples[:5])
    return float(found[0])


def test_metrics_match_the_running_guest(stack: Stack, guest: str) -> None:
    shown = stack.vm(guest)
    families, _ = scrape(stack)
    assert value(families, "corral_up") == 1 and value(families, "corral_manager_open") == 1
    assert value(families, "corral_store_writable") == 1
    assert value(families, "corral_vms") == DEFINED + 1
    assert value(families, "corral_vm_state", vm=guest, state="Running") == 1
    assert value(families, "corral_vm_state", vm=guest, state="Stopped") == 0
    assert value(families, "corral_vm_up", vm=guest) == 1
    assert value(families, "corral_vm_vcpus", vm=guest) == shown["status"]["cpus"] == 2
    assert value(families, "corral_vm_vcpus_max", vm=guest) == 2
    assert value(families, "corral_vm_memory_bytes", vm=guest) == shown["status"]["ram"]
    assert value(families, "corral_vm_memory_max_bytes", vm=guest) == 256 * 1024 * 1024
    assert value(families, "corral_vm_restarts", vm=guest) == 0
    cpu = value(families, "corral_vm_cpu_seconds", vm=guest)
    assert cpu > 0  # the guest booted under TCG: qemu used CPU
    assert value(families, "corral_vm_resident_memory_bytes", vm=guest) > 10 * 1024 * 1024
    assert value(families, "corral_vm_disk_read_bytes", vm=guest) >= 0
    stopped = "mt-def-007"
    assert value(families, "corral_vm_state", vm=stopped, state="Stopped") == 1
    assert value(families, "corral_vm_up", vm=stopped) == 0
    assert not [s for s in families["corral_vm_vcpus"].samples if s.labels["vm"] == stopped]
    latency = [s for s in families["corral_reconcile_seconds"].samples
               if s.name == "corral_reconcile_seconds_count"]  # fmt: skip
    assert latency and latency[0].value >= 1
    read = sum(s.value for s in families["corral_vm_block_read_bytes"].samples
               if s.labels["vm"] == guest)  # fmt: skip
    assert [s.labels["drive"] for s in families["corral_vm_block_read_bytes"].samples
            if s.labels["vm"] == guest]  # fmt: skip
    stack.guest(guest, "i=0; while [ $i -lt 200000 ]; do i=$((i+1)); done")
    stack.guest(guest, "dd if=/dev/vda of=/dev/null bs=65536 count=64 iflag=direct 2>&1 || "
                       "dd if=/dev/vda of=/dev/null bs=65536 count=64")  # fmt: skip
    time.sleep(2.5)  # past the 2 s cache of /proc and QMP reads
    again, _ = scrape(stack)
    assert value(again, "corral_vm_cpu_seconds", vm=guest) > cpu
    read_again = sum(s.value for s in again["corral_vm_block_read_bytes"].samples
                     if s.labels["vm"] == guest)  # fmt: skip
    assert read_again >= read + 4 * 1024**2  # the guest's dd, as qemu counted it


def test_a_scrape_of_100_vms_is_cheap(stack: Stack, guest: str) -> None:
    times = sorted(scrape(stack)[1] for _ in range(5))
    print(f"/metrics with {DEFINED + 1} VMs: median {times[2] * 1000:.1f} ms, "
          f"max {times[-1] * 1000:.1f} ms")  # fmt: skip
    assert times[2] < 2.0  # generous: a loaded 2-core machine


def test_who_may_scrape(stack: Stack, guest: str) -> None:
    url = f"http://127.0.0.1:{stack.port}"
    with httpx.Client(base_url=url, timeout=60) as http:
        assert http.get("/metrics").status_code == 401
        r = http.post("/v1/session", json={"username": "dora", "password": "Dora-pass-3377"})
        assert r.status_code == 200
        r = http.get("/metrics")
        assert r.status_code == 403 and "'metrics'" in r.json()["detail"]


def test_odd_names_never_reach_a_label(stack: Stack, guest: str, tiny_guest: Any) -> None:
    transport = httpx.HTTPTransport(uds=str(stack.sock))
    with httpx.Client(transport=transport, base_url="http://corral", timeout=60) as http:
        for name in ('a"b', "x\ny", "back\\slash", "a}b{", "Z" * 64):
            r = http.post("/v1/vms", json=tiny(tiny_guest, name, state="Stopped"))
            assert r.status_code == 422, (name, r.text)
        r = http.get("/metrics")  # the unix socket: an admin
    assert r.status_code == 200
    names = {s.labels["vm"] for f in text_string_to_metric_families(r.text)
             for s in f.samples if "vm" in s.labels}  # fmt: skip
    assert len(names) == DEFINED + 1 and all(n.startswith("mt-") for n in names)


def test_the_grafana_dashboard_asks_only_for_metrics_that_exist(stack: Stack, guest: str) -> None:
    dashboard = json.loads((REPO / "deploy/grafana/corral.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    exprs += [v["query"] for v in dashboard["templating"]["list"] if v["type"] == "query"]
    asked = {name for e in exprs for name in re.findall(r"\bcorral_[a-z_]+", e)}
    families, _ = scrape(stack)
    served = {s.name for f in families.values() for s in f.samples}
    served |= {f"{f.name}_total" for f in families.values() if f.type == "counter"}  # no taps
    assert asked and asked <= served, asked - served


def test_tap_counters_come_from_the_taps_the_process_holds() -> None:
    """What ``corral_vm_network_*`` reads for a tap or bridge NIC, on a real tap this test
    holds as qemu does (a process with an fd on /dev/net/tun): the frames written to the fd
    are what the guest sent."""
    tunsetiff, iff_tap, iff_no_pi = 0x400454CA, 0x0002, 0x1000
    try:
        fd = os.open("/dev/net/tun", os.O_RDWR)
    except OSError as exc:
        raise AssertionError(f"/dev/net/tun: {exc} (modprobe tun; run as root)") from exc
    try:
        ifr = fcntl.ioctl(fd, tunsetiff, struct.pack("16sH", b"crlmt%d", iff_tap | iff_no_pi))
        name = ifr[:16].rstrip(b"\0").decode()
        subprocess.run(["ip", "link", "set", name, "up"], check=True, timeout=30)
        frame = b"\xff" * 6 + b"\x02\x00\x00\x00\x00\x01" + b"\x88\xb5" + b"corral" * 20
        for _ in range(3):
            os.write(fd, frame)
        nics = read_nics(os.getpid())
        assert name in nics, nics
        received, sent = nics[name]
        assert sent >= 3 * len(frame) and received >= 0
    finally:
        os.close(fd)
    assert name not in read_nics(os.getpid())
