"""The daemon with its API on a temp unix socket and on TCP with tokens; the ``corral`` CLI as
a subprocess against it; a real tiny guest: lifecycle, exec, live CPU/RAM/CD changes seen in
the guest, the serial console over the websocket, the event stream, auth refusals, errors."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from corral.client import Client
from tests.integration.harness import tk
from tests.integration.test_manager import qemu_pids, tiny

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env(sock: Path) -> dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO / "src"), e.get("PYTHONPATH")) if p)
    e["CORRAL_SOCKET"] = str(sock)
    e.pop("CORRAL_URL", None)
    e.pop("CORRAL_TOKEN", None)
    return e


class Stack:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.sock = root / "corral.sock"
        self.port = _free_port()
        self.tokens = root / "tokens"
        self.proc: subprocess.Popen[bytes] | None = None
        (root / "host.yaml").write_text("{}\n")

    def corral(self, *args: str, timeout: float = 300, stdin: str | None = None,
               env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:  # fmt: skip
        return subprocess.run(
            [sys.executable, "-m", "corral.cli.main", *args], input=stdin,
            capture_output=True, text=True, timeout=timeout, check=False,
            env=env or _env(self.sock),
        )  # fmt: skip

    def ok(self, *args: str, **kw: Any) -> str:
        done = self.corral(*args, **kw)
        assert done.returncode == 0, f"corral {' '.join(args)}: {done.stderr}{done.stdout}"
        return done.stdout

    def start(self, *extra: str) -> None:
        """``extra``: more ``corral serve`` arguments (``--users FILE``)."""
        self.token = self.ok("token", "create", "ci", "--file", str(self.tokens)).strip()
        with (self.root / "daemon.log").open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "corral.cli.main", "serve", "--state-dir",
                 str(self.root / "state"), "--accel", "tcg", "--resync", "1",
                 "--policy", str(self.root / "host.yaml"), "--socket", str(self.sock),
                 "--open-policy",  # the suite's guests and disks live all over /tmp
                 "--listen", f"127.0.0.1:{self.port}", "--tokens", str(self.tokens), *extra],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=_env(self.sock),
                start_new_session=True,
            )  # fmt: skip
        deadline = time.monotonic() + 60
        while "DaemonReady" not in self.log():
            assert self.proc.poll() is None, f"daemon exited:\n{self.log()}"
            assert time.monotonic() < deadline, f"daemon not ready:\n{self.log()}"
            time.sleep(0.1)

    def log(self) -> str:
        try:
            return (self.root / "daemon.log").read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def vm(self, name: str) -> dict[str, Any]:
        return dict(json.loads(self.ok("show", name, "-o", "json")))

    def wait(self, check: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not check():
            assert time.monotonic() < deadline, f"{what}: not within {timeout}s\n{self.log()}"
            time.sleep(0.3)

    def guest(self, name: str, command: str) -> str:
        return self.ok("exec", name, "--", "/bin/sh", "-c", command).strip()


def running_stack(
    prefix: str,
    vm_names: Sequence[str],
    policy: str | None = None,
    before: Callable[[Stack], Sequence[str]] | None = None,
) -> Iterator[Stack]:
    """A daemon in a fresh /tmp root for a module's tests (``policy``: the host policy's YAML;
    ``before``: run on the stack before the daemon starts, returns more ``serve`` arguments);
    afterwards the daemon is stopped, the named VMs' qemus killed and the root removed."""
    root = Path(os.path.realpath("/tmp")) / f"{prefix}-{os.getpid()}-{time.monotonic_ns() % 10**8}"
    root.mkdir()
    s = Stack(root)
    if policy is not None:
        (root / "host.yaml").write_text(policy)
    try:
        s.start(*(before(s) if before is not None else ()))
        yield s
    finally:
        if s.proc is not None and s.proc.poll() is None:
            s.proc.send_signal(signal.SIGTERM)
            try:
                s.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                s.proc.kill()
        for name in vm_names:
            for pid in qemu_pids(name):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def stack(tiny_guest: Any) -> Iterator[Stack]:
    yield from running_stack("ca", ("web1", "web2", "cli-alias", "disk-a", "disk-b"))


@pytest.fixture(scope="module")
def web1(stack: Stack, tiny_guest: Any) -> str:
    doc = tiny(tiny_guest, "web1", state="Stopped", maximumCpus=3, maximumRam="384Mi",
               disks=[{"name": "cd0", "cdrom": {"image": ""}}])  # fmt: skip
    (stack.root / "web1.yaml").write_text(yaml.safe_dump(doc))
    assert stack.ok("apply", "-f", str(stack.root / "web1.yaml")).strip() == "vm/web1 created"
    assert stack.ok("apply", "-f", str(stack.root / "web1.yaml")).strip() == "vm/web1 configured"
    assert stack.ok("start", "web1", "--wait").strip() == "vm/web1 start (Running)"
    stack.wait(lambda: stack.corral("exec", "web1", "--", "true").returncode == 0, 150, "agent")
    return "web1"


def test_list_show_exec_and_exit_codes(stack: Stack, web1: str) -> None:
    items = json.loads(stack.ok("list", "-o", "json"))["items"]
    assert [i["metadata"]["name"] for i in items] == ["web1"]
    status = items[0]["status"]
    assert status["state"] == "Running" and status["pid"] == qemu_pids("web1")[0]
    assert status["cpus"] == 1 and status["conditions"]["AgentConnected"]["status"] is True
    table = stack.ok("list")
    assert "web1" in table and "Running" in table
    assert yaml.safe_load(stack.ok("show", "web1", "-o", "yaml"))["metadata"]["name"] == "web1"

    assert stack.guest("web1", "echo $((6*7))") == "42"
    failed = stack.corral("exec", "web1", "--", "/bin/sh", "-c", "echo oops >&2; exit 3")
    assert failed.returncode == 3 and failed.stderr == "oops\n"

    missing = stack.corral("show", "nope")
    assert missing.returncode == 1
    assert missing.stderr.strip().splitlines()[0] == "error: VM 'nope' not found"
    assert "Traceback" not in missing.stderr
    usage = stack.corral("set", "web1")
    assert usage.returncode == 2
    bad = stack.root / "bad.yaml"
    bad.write_text("metadata: {name: Bad_Name}\nspec: {vm: {maximumCpus: 0}}\n")
    refused = stack.corral("create", "-f", str(bad))
    assert refused.returncode == 1
    assert "metadata.name" in refused.stderr and "spec.vm.maximumCpus" in refused.stderr
    assert "--debug" not in refused.stderr and "Traceback" not in refused.stderr


def test_reads_over_the_unix_socket_answer_as_httpx_does(stack: Stack, web1: str) -> None:
    """Over the unix socket a client sends JSON requests in stdlib HTTP/1.1 (no httpx client
    made; the CLI's calls) and gets what the httpx path gives, and the same errors."""
    from corral.errors import NotFound, SpecError

    with Client(socket=stack.sock) as fast, Client(socket=stack.sock) as slow:
        assert slow._http is not None  # made: this one sends everything through httpx
        got = fast.read(f"/v1/vms/{web1}")
        assert "_http" not in fast.__dict__, "read made an httpx client"
        same = slow.request("GET", f"/v1/vms/{web1}")
        assert got["metadata"] == same["metadata"] and got["spec"] == same["spec"]
        assert got["status"]["state"] == "Running"
        running = fast.read("/v1/vms", {"state": "Running", "label": None})["items"]
        assert web1 in [vm["metadata"]["name"] for vm in running]
        assert fast.read("/v1/vms", {"state": "Crashed"})["items"] == []
        assert fast.get_vm(web1).status.state == "Running"  # the typed view, on the fast path
        with pytest.raises(NotFound, match="'nope' not found"):
            fast.read("/v1/vms/nope")
        with pytest.raises(SpecError) as refused:
            fast.read("/v1/vms", {"state": "x" * 40})  # past its max_length
        with pytest.raises(SpecError) as also:
            slow.request("GET", "/v1/vms", params={"state": "x" * 40})
        assert str(refused.value) == str(also.value)
        started = fast.act(web1, "start", wait=60)  # a POST (a no-op here), on the same path
        assert started["status"]["state"] == "Running"
        assert fast.action(web1, "start", wait=60).status.pid == got["status"]["pid"]
        assert "_http" not in fast.__dict__


def test_live_cpu_ram_and_cd_changes_are_seen_in_the_guest(stack: Stack, web1: str) -> None:
    pid = qemu_pids("web1")
    stack.ok("set", "web1", "--cpus", "3")
    stack.wait(lambda: stack.guest("web1", "cat /sys/devices/system/cpu/online") == "0-2", 120,
               "3 CPUs online in the guest")  # fmt: skip
    stack.ok("set", "web1", "--cpus", "2")
    stack.wait(lambda: stack.vm("web1")["status"]["cpus"] == 2, 120, "back to 2 CPUs")

    memtotal = "sed -n 's/^MemTotal: *\\([0-9]*\\).*/\\1/p' /proc/meminfo"
    before_kb = int(stack.guest("web1", memtotal))
    stack.ok("set", "web1", "--ram", "192Mi")
    stack.wait(lambda: stack.vm("web1")["status"]["ram"] == 192 * 2**20, 60, "balloon")
    stack.wait(lambda: before_kb - int(stack.guest("web1", memtotal)) >= 150 * 1024, 60,
               "the guest's MemTotal shrinks by the 192Mi the balloon took")  # fmt: skip

    iso = tk.make_iso(stack.root / "disc one.iso", {"hello.txt": "from the cd\n"})
    stack.ok("cd", "insert", "web1", str(iso))
    read = "mount -t iso9660 -o ro /dev/sr0 /mnt 2>/dev/null && cat /mnt/hello.txt; umount /mnt"
    stack.wait(lambda: stack.guest("web1", read + " || true") == "from the cd", 60, "cd seen")
    assert stack.vm("web1")["status"]["cdrom"] == {"cd0": str(iso)}
    stack.ok("cd", "eject", "web1")
    stack.wait(lambda: stack.vm("web1")["status"]["cdrom"] == {"cd0": None}, 60, "ejected")
    assert qemu_pids("web1") == pid, "live changes never restart qemu"


def test_console_websocket_round_trip(stack: Stack, web1: str) -> None:
    from corral.cli.terminal import open_console

    with Client(socket=stack.sock) as client, open_console(client, "web1") as ws:
        ws.send(b"\necho console-$((40+2))\n")
        seen = b""
        deadline = time.monotonic() + 60
        while b"console-42" not in seen:
            assert time.monotonic() < deadline, seen[-500:]
            try:
                seen += ws.recv(timeout=5)  # type: ignore[operator]
            except TimeoutError:
                ws.send(b"\n")
    # through the CLI too, as a user types: a pipe on stdin
    out = stack.corral("console", "web1", stdin="echo piped-$((7*6))\n", timeout=60)
    assert out.returncode == 0, out.stderr


def test_events_stream_follows_live(stack: Stack, web1: str) -> None:
    got: list[dict[str, Any]] = []

    def follow() -> None:
        with Client(socket=stack.sock) as client:
            for event in client.events("web1", follow=True, after=2**62):
                got.append(event)
                if event.get("event") == "SpecChanged":
                    return

    reader = threading.Thread(target=follow, daemon=True)
    reader.start()
    time.sleep(1)
    stack.ok("set", "web1", "--powerdown-timeout", "25")
    reader.join(timeout=30)
    assert any(e["event"] == "SpecChanged" for e in got), got
    history = [json.loads(line) for line in stack.ok("events", "web1", "-o", "json").splitlines()]
    kinds = [e["event"] for e in history]
    assert kinds[0] == "Created" and "StateChanged" in kinds and "SpecChanged" in kinds


def test_tcp_needs_a_valid_token_and_refusals_change_nothing(stack: Stack, web1: str) -> None:
    base = f"http://127.0.0.1:{stack.port}"
    doc = {"metadata": {"name": "sneaky"}, "spec": {"vm": {"maximumRam": "128Mi"}}}
    with httpx.Client(base_url=base) as http:
        for headers in ({}, {"Authorization": "Bearer crl_wrong"}, {"Authorization": "Basic x"}):
            r = http.post("/v1/vms", json=doc, headers=headers)
            assert r.status_code == 401, r.text
            assert r.headers["content-type"] == "application/problem+json"
            assert r.json()["status"] == 401
            assert http.get("/v1/vms", headers=headers).status_code == 401
        assert http.get("/healthz").status_code == 200
        ok = http.get("/v1/vms", headers={"Authorization": f"Bearer {stack.token}"})
        assert ok.status_code == 200
        assert [i["metadata"]["name"] for i in ok.json()["items"]] == ["web1"]
    env = {**_env(stack.sock), "CORRAL_URL": base, "CORRAL_TOKEN": stack.token}
    env.pop("CORRAL_SOCKET")
    assert "web1" in stack.ok("list", env=env)
    env["CORRAL_TOKEN"] = "crl_nope"  # noqa: S105 (a wrong token on purpose)
    denied = stack.corral("list", env=env)
    assert denied.returncode == 1 and "not valid" in denied.stderr

    from websockets.exceptions import InvalidStatus, WebSocketException
    from websockets.sync.client import connect

    with (
        pytest.raises((InvalidStatus, WebSocketException)),
        connect(f"ws://127.0.0.1:{stack.port}/v1/vms/web1/console") as ws,
    ):
        ws.recv(timeout=5)


def test_problem_json_for_bad_input(stack: Stack, web1: str) -> None:
    with Client(socket=stack.sock) as client:
        http = client._http
        r = http.post("/v1/vms", content=b"{not json", headers={"Content-Type": "application/json"})
        assert r.status_code in (400, 422) and r.headers["content-type"].startswith(
            "application/problem+json"
        )
        r = http.post("/v1/vms", json={"metadata": {"name": "x"}, "spec": {"vm": {"disks": [
            {"file": {"path": "/tmp/a", "image": "/tmp/b"}}]}}})  # fmt: skip
        body = r.json()
        assert r.status_code == 422 and body["type"] == "urn:corral:invalid-spec"
        assert body["errors"][0]["loc"].startswith("spec.vm.disks[0].file")
        stale = client.get_vm("web1")["metadata"]["resourceVersion"]
        client.patch_vm("web1", {"metadata": {"labels": {"touched": "yes"}}})
        r = http.patch("/v1/vms/web1", json={"metadata": {"resourceVersion": stale,
                       "labels": {"touched": "again"}}})  # fmt: skip
        assert r.status_code == 409 and r.json()["type"] == "urn:corral:conflict"
        assert http.get("/v1/vms/none").status_code == 404
        assert http.get("/v1/nothing").json()["status"] == 404


def test_a_deleted_vms_disks_are_retained_never_inherited_and_adoptable(
    stack: Stack, tiny_guest: Any, tmp_path: Path
) -> None:
    """Issue 9, item 6: a new VM of a deleted VM's name read the old guest's disk and got its
    UUID. Now the old data dir is retained (listed, deletable), and only a VM that adopts it
    explicitly (--adopt-disks) sees the old data and UUID again."""
    base = tmp_path / "scratch.raw"
    base.write_bytes(b"\0" * 2**20)
    stack.ok("image", "import", "scratch", str(base), "--no-progress")
    disks = [{"name": "data", "file": {"image": "scratch", "size": "16Mi"}}]
    for name, state in (("disk-a", "Running"), ("disk-b", "Running"), ("disk-c", "Stopped")):
        doc = tiny(tiny_guest, name, state=state, maximumCpus=1, disks=disks)
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(doc))
    marker = "CORRAL-OLD-GUEST-DATA"
    read_disk = f"head -c {len(marker)} /dev/vda | tr -d '\\000'"
    read_uuid = "cat /sys/class/dmi/id/product_uuid"

    def booted(*names: str) -> None:
        for name in names:

            def agent(vm: str = name) -> bool:
                return stack.corral("exec", vm, "--", "true").returncode == 0

            stack.wait(agent, 150, f"{name}'s agent")

    def retained() -> dict[str, dict[str, Any]]:
        items = json.loads(stack.ok("disk", "list", "-o", "json"))["items"]
        return {item["id"]: item for item in items}

    assert stack.ok("create", "-f", str(tmp_path / "disk-a.yaml")).strip() == "vm/disk-a created"
    booted("disk-a")
    old_uuid = stack.guest("disk-a", read_uuid)
    assert stack.guest("disk-a", read_disk) == ""
    stack.guest("disk-a", f"printf {marker} > /dev/vda && sync")
    assert stack.guest("disk-a", read_disk) == marker
    stack.ok("stop", "disk-a", "--wait")
    out = stack.ok("delete", "disk-a").strip()
    assert out.startswith("vm/disk-a deleted; disks retained as disk-a."), out
    set_id = out.rsplit(" ", 1)[1]

    listed = retained()[set_id]
    assert listed["vm"] == "disk-a" and listed["uuid"] == old_uuid
    assert [(d["name"], d["virtualSize"]) for d in listed["disks"]] == [("data.qcow2", 16 * 2**20)]
    assert marker.encode() in (Path(listed["path"]) / "data.qcow2").read_bytes()
    assert set_id in stack.ok("disk", "list")
    assert not (stack.root / "state" / "vms" / "disk-a").exists()
    refused = stack.corral("image", "delete", "scratch")
    assert refused.returncode == 1 and f"disk/{set_id}" in refused.stderr

    # the same name again: a new VM with its own empty disk and a new UUID; and one that adopts
    assert stack.ok("create", "-f", str(tmp_path / "disk-a.yaml")).strip() == "vm/disk-a created"
    out = stack.ok("create", "-f", str(tmp_path / "disk-b.yaml"), "--adopt-disks", set_id)
    assert out.strip() == f"vm/disk-b created with disks {set_id}"
    booted("disk-a", "disk-b")
    assert stack.guest("disk-a", read_disk) == "", "the new disk-a reads the old guest's data"
    assert stack.guest("disk-a", read_uuid) != old_uuid
    assert stack.guest("disk-b", read_disk) == marker
    assert stack.guest("disk-b", read_uuid) == old_uuid
    assert set_id not in retained()

    done = stack.corral("create", "-f", str(tmp_path / "disk-c.yaml"), "--adopt-disks", set_id)
    assert done.returncode == 1 and f"no retained disks '{set_id}'" in done.stderr
    done = stack.corral("apply", "-f", str(tmp_path / "disk-a.yaml"), "--adopt-disks", "x")
    assert done.returncode == 1 and "only a new VM can adopt disks" in done.stderr
    assert stack.corral("show", "disk-c").returncode == 1

    # a retained set is deleted only when asked; delete-vm (aetherscale) takes the disks along
    second = stack.ok("delete", "disk-a").strip().rsplit(" ", 1)[1]
    path = Path(retained()[second]["path"])
    assert stack.ok("disk", "delete", second).strip() == f"disk/{second} deleted"
    assert second not in retained() and not path.exists()
    assert stack.corral("disk", "delete", second).returncode == 1
    stack.ok("delete-vm", "--vm-id", "disk-b")
    assert retained() == {}
    assert not (stack.root / "state" / "vms" / "disk-b").exists()
    stack.ok("image", "delete", "scratch")


def test_stop_delete_and_aetherscale_aliases(stack: Stack, web1: str, tmp_path: Path) -> None:
    base = tmp_path / "base.raw"
    base.write_bytes(b"\0" * 2**20)
    out = stack.ok("image", "import", "blank", str(base), "--no-progress")
    assert out.startswith("image/blank imported: raw")
    assert stack.corral("create-vm", "--image", "blank", "--name", "cli-alias",
                        "--no-start").stdout.strip() == "cli-alias"  # fmt: skip
    assert "cli-alias\tStopped" in stack.ok("list-vms")
    assert "blank" in stack.ok("image", "list") and "cli-alias" in stack.ok("image", "list")
    assert stack.corral("image", "delete", "blank").returncode == 1  # in use
    stack.ok("delete-vm", "--vm-id", "cli-alias")
    stack.ok("image", "delete", "blank")

    stack.ok("stop", "web1", "--wait")
    assert stack.vm("web1")["status"]["stoppedBy"] == "powerdown"
    assert qemu_pids("web1") == []
    stack.ok("delete", "web1")
    assert json.loads(stack.ok("list", "-o", "json"))["items"] == []


def test_tls_listener_with_token(tmp_path: Path) -> None:
    """--tls-cert/--tls-key: HTTPS on TCP, the token still required (a separate daemon with no
    VMs and no unix socket)."""
    root = Path(os.path.realpath("/tmp")) / f"ct-{os.getpid()}-{time.monotonic_ns() % 10**8}"
    root.mkdir()
    cert, key = root / "tls.crt", root / "tls.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
         "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key),
         "-out", str(cert)], check=True, capture_output=True,
    )  # fmt: skip
    stack = Stack(root)
    token = stack.ok("token", "create", "tls", "--file", str(stack.tokens)).strip()
    log = (root / "daemon.log").open("ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "corral.cli.main", "serve", "--state-dir", str(root / "state"),
         "--no-socket", "--open-policy",
         "--listen", f"127.0.0.1:{stack.port}", "--tokens", str(stack.tokens),
         "--tls-cert", str(cert), "--tls-key", str(key)],
        stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=_env(stack.sock),
        start_new_session=True,
    )  # fmt: skip
    try:
        stack.proc = proc
        stack.wait(lambda: "DaemonReady" in stack.log(), 60, "TLS daemon ready")
        base = f"https://127.0.0.1:{stack.port}"
        trust = ssl.create_default_context(cafile=str(cert))
        with httpx.Client(base_url=base, verify=trust) as https:
            assert https.get("/v1/vms").status_code == 401
            r = https.get("/v1/vms", headers={"Authorization": f"Bearer {token}"})
            assert r.status_code == 200 and r.json() == {"items": []}
        with pytest.raises(httpx.TransportError):
            httpx.get(f"http://127.0.0.1:{stack.port}/healthz", timeout=5)
        assert not stack.sock.exists()
        env = {**_env(stack.sock), "CORRAL_URL": base, "CORRAL_TOKEN": token,
               "CORRAL_CA_CERT": str(cert)}  # fmt: skip
        env.pop("CORRAL_SOCKET")
        assert stack.corral("list", "-o", "json", env=env).returncode == 0
    finally:
        log.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        shutil.rmtree(root, ignore_errors=True)


def test_tcp_needs_a_policy_with_image_paths(tmp_path: Path) -> None:
    """Security (review): without imagePaths any token holder could give a VM any host file,
    so `serve --listen` refuses unless the host says --open-policy on purpose."""
    (tmp_path / "host.yaml").write_text("{}\n")
    done = subprocess.run(
        [sys.executable, "-m", "corral.cli.main", "serve", "--state-dir", str(tmp_path / "s"),
         "--policy", str(tmp_path / "host.yaml"), "--no-socket", "--listen", "127.0.0.1:1",
         "--tokens", str(tmp_path / "tokens")],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 2
    assert "imagePaths" in done.stderr and "--open-policy" in done.stderr
    assert not (tmp_path / "s" / "corral.db").exists()
