"""Failures that explain themselves (issue 11, items 6 and 7), against a real daemon, the
``corral`` CLI as a subprocess and a real tiny guest: ``apply`` without ``metadata``, the
console of a missing or stopped VM, ``corral display`` and ``corral show``."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from corral.client import Client
from tests.e2e.test_api_cli import Stack, running_stack
from tests.integration.test_manager import tiny

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _free_vnc_port() -> int:
    for port in range(5990, 6100):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise AssertionError("no free port in 5990-6099 for VNC")


@pytest.fixture(scope="module")
def stack(tiny_guest: Any) -> Iterator[Stack]:
    yield from running_stack("cx", ("shown",))


def test_apply_without_metadata_names_it(stack: Stack, tiny_guest: Any) -> None:
    doc = tiny(tiny_guest, "nometa")
    del doc["metadata"]
    path = stack.root / "nometa.yaml"
    path.write_text(yaml.safe_dump(doc))
    done = stack.corral("apply", "-f", str(path))
    assert done.returncode == 1, done.stdout
    assert "Traceback" not in done.stderr
    assert "metadata: is required" in done.stderr
    with Client(socket=stack.sock) as client:
        http = client._http
        for method, url in (("POST", "/v1/vms"), ("PUT", "/v1/vms/nometa")):
            r = http.request(method, url, json=doc)
            assert r.status_code == 422, r.text
            assert {"loc": "metadata", "reason": r.json()["errors"][0]["reason"]} in r.json()[
                "errors"
            ]
            assert "required" in r.json()["errors"][0]["reason"]


def test_apply_refuses_ambiguous_sizes_and_suggests_fields(stack: Stack, tiny_guest: Any) -> None:
    path = stack.root / "sizes.yaml"
    path.write_text(yaml.safe_dump(tiny(tiny_guest, "sizes", maximumRam="4 GB", cpus=2)))
    done = stack.corral("apply", "-f", str(path))
    assert done.returncode == 1
    assert "write '4Gi' (binary" in done.stderr
    assert "spec.vm.cpus: unknown field (did you mean 'maximumCpus' or 'currentCpus'?)" in (
        done.stderr
    )


def test_console_of_a_missing_or_stopped_vm_says_so(stack: Stack, tiny_guest: Any) -> None:
    from websockets.exceptions import InvalidStatus
    from websockets.sync.client import unix_connect

    missing = stack.corral("console", "nope", stdin="")
    assert missing.returncode == 1
    assert missing.stderr.strip().splitlines()[0] == "error: VM 'nope' not found"
    path = stack.root / "idle.yaml"
    path.write_text(yaml.safe_dump(tiny(tiny_guest, "idle", state="Stopped")))
    stack.ok("apply", "-f", str(path))
    stopped = stack.corral("console", "idle", stdin="")
    assert stopped.returncode == 1
    assert "VM 'idle' is Stopped" in stopped.stderr, stopped.stderr
    assert "refused" not in stopped.stderr
    for name, status in (("nope", 404), ("idle", 409)):
        with pytest.raises(InvalidStatus) as info:
            unix_connect(str(stack.sock), f"ws://corral/v1/vms/{name}/console").close()
        assert info.value.response.status_code == status
        problem = json.loads(info.value.response.body or b"{}")
        assert problem["status"] == status and name in problem["detail"]


def test_display_issues_a_short_lived_password_and_show_lists_it(
    stack: Stack, tiny_guest: Any
) -> None:
    port = _free_vnc_port()
    doc = tiny(tiny_guest, "shown", display={"vnc": {"port": port}},
               networks=[{"user": {"portForwards": [{"hostPort": _free_vnc_port() + 200,
                                                     "guestPort": 22}]}}])  # fmt: skip
    path = stack.root / "shown.yaml"
    path.write_text(yaml.safe_dump(doc))
    stack.ok("apply", "-f", str(path))
    stack.ok("start", "shown", "--wait")
    shown = stack.ok("show", "shown")
    assert f"vnc://127.0.0.1:{port}" in shown
    assert "->22/tcp" in shown

    got = json.loads(stack.ok("display", "shown", "--expiry", "20", "-o", "json"))
    assert got["displays"] == [
        {"protocol": "vnc", "address": "127.0.0.1", "port": port,
         "url": f"vnc://127.0.0.1:{port}"}
    ]  # fmt: skip
    password = got["password"]
    assert len(password) == 8
    secret = stack.root / "state" / "vms" / "shown" / "display-secret"
    assert (secret / "display-password").read_text().strip() == password
    assert (secret / "password-expiry").read_text().strip() == "+20"
    assert oct((secret / "display-password").stat().st_mode & 0o777) == "0o600"

    def password_set() -> bool:
        events = [json.loads(e) for e in stack.ok("events", "shown", "-o", "json").splitlines()]
        return any(e["event"] == "DisplayPasswordSet" and e.get("expiry") == "+20" for e in events)

    stack.wait(password_set, 30, "DisplayPasswordSet with the short expiry")
    assert password not in stack.ok("events", "shown", "-o", "json")
    assert password not in stack.log()
    # a real VNC handshake: qemu speaks RFB on the URL's port and asks for VNC authentication
    with socket.create_connection(("127.0.0.1", port), timeout=10) as vnc:
        assert vnc.recv(12).startswith(b"RFB 003.")
        vnc.sendall(b"RFB 003.008\n")
        count = vnc.recv(1)[0]
        assert 2 in vnc.recv(count), "VNC authentication (type 2) is offered"
    # and the serial console detaches without a traceback in the daemon's log
    out = stack.corral("console", "shown", stdin="echo hi\n", timeout=60)
    assert out.returncode == 0, out.stderr
    time.sleep(1)
    assert "Traceback" not in stack.log(), stack.log()


def test_apply_reports_what_waits_for_a_restart(stack: Stack, tiny_guest: Any) -> None:
    path = stack.root / "shown.yaml"
    doc = yaml.safe_load(path.read_text())
    assert stack.vm("shown")["status"]["state"] == "Running"
    doc["spec"]["vm"]["maximumCpus"] = 3
    path.write_text(yaml.safe_dump(doc))
    out = stack.ok("apply", "-f", str(path)).strip()
    assert out == "vm/shown configured; waits for a restart: spec.vm.maximumCpus", out
