"""Security boundaries (issue 9) against real qemu, real qemu-img images and the manager.

Each test names the item it covers and would have passed the attack on 42745e5:
1 the bridge helper, 2 backing chains and data files, 3 writable base images, 5 runner paths
from a document, 7 the display password, 8 lifecycle verbs under a tightened policy, 13 remote
CD images; plus the defence in depth (seccomp sandbox, qemu as an unprivileged user).
"""

from __future__ import annotations

import asyncio
import hashlib
import http.server
import os
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from corral.errors import PolicyError, SpecError
from corral.spec import HostPolicy
from tests.integration import test_manager
from tests.integration.test_manager import Box, tiny, until

pytestmark = [pytest.mark.integration, pytest.mark.slow]

BOOT = 150.0
box = test_manager.box  # the manager-in-a-temp-dir fixture


def qemu_img(*args: str) -> None:
    subprocess.run(["qemu-img", *args], check=True, capture_output=True)


def proc_status(pid: int) -> dict[str, str]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields


# --- 1: the bridge helper --------------------------------------------------------------------


async def test_bridge_helper_from_a_document_never_runs(
    box: Box, tiny_guest: Any, tmp_path: Path
) -> None:
    owned = tmp_path / "owned"
    m = await box.open()
    doc = tiny(tiny_guest, "br1")
    doc["spec"]["vm"]["networks"] = [
        {"bridge": {"name": "br0", "helper": f"/bin/sh -c 'id > {owned}' #"}}
    ]
    with pytest.raises(SpecError) as err:
        await m.create(doc)
    assert "spec.vm.networks[0].bridge.helper" in str(err.value)
    assert m.store.find("br1") is None
    await asyncio.sleep(0.5)
    assert not owned.exists()
    with pytest.raises(ValueError, match="no spaces or shell"):
        HostPolicy.model_validate({"bridgeHelper": "/bin/sh -c id"})


# --- 2 and 3: files behind disks -------------------------------------------------------------


@pytest.fixture
def zones(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    allowed.mkdir()
    outside.mkdir()
    yield allowed, outside


async def test_backing_file_and_data_file_outside_image_paths_are_refused(
    box: Box, tiny_guest: Any, zones: tuple[Path, Path]
) -> None:
    allowed, outside = zones
    secret = outside / "secret.raw"
    secret.write_bytes(b"host secret\n" + bytes(1024 * 1024))
    qemu_img(
        "create", "-q", "-f", "qcow2", "-b", str(secret), "-F", "raw", str(allowed / "a.qcow2")
    )
    qemu_img("create", "-q", "-f", "qcow2", "-o", f"data_file={outside / 'data.raw'}",
             str(allowed / "d.qcow2"), "16M")  # fmt: skip
    # a chain: allowed overlay -> allowed middle -> outside secret
    qemu_img(
        "create", "-q", "-f", "qcow2", "-b", str(secret), "-F", "raw", str(allowed / "m.qcow2")
    )
    qemu_img(
        "create", "-q", "-f", "qcow2", "-b", "m.qcow2", "-F", "qcow2", str(allowed / "c.qcow2")
    )
    (allowed / "evil.qcow2").symlink_to(secret)
    policy = HostPolicy(image_paths=[str(Path(tiny_guest.kernel).parent), str(allowed)])
    m = await box.open(policy)
    cases = {
        "a": ({"file": {"path": str(allowed / "a.qcow2")}}, "backing file"),
        "d": ({"file": {"path": str(allowed / "d.qcow2")}}, "external data file"),
        "c": ({"file": {"path": str(allowed / "c.qcow2")}}, "secret.raw"),
        "i": ({"file": {"image": str(allowed / "a.qcow2")}}, "backing file"),
        "s": ({"file": {"path": str(allowed / "evil.qcow2"), "format": "raw"}}, "outside"),
    }
    for name, (disk, reason) in cases.items():
        with pytest.raises(PolicyError) as err:
            await m.create(tiny(tiny_guest, name, state="Stopped", disks=[disk]))
        text = str(err.value)
        assert "spec.vm.disks[0]" in text and reason in text, text
        assert m.store.find(name) is None


async def test_chain_is_checked_again_at_start(
    box: Box, tiny_guest: Any, zones: tuple[Path, Path]
) -> None:
    """Admitted while harmless, swapped for an image with an outside backing file before the
    start: the start is refused and no qemu ever opens it."""
    allowed, outside = zones
    disk = allowed / "late.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(disk), "16M")
    policy = HostPolicy(image_paths=[str(Path(tiny_guest.kernel).parent), str(allowed)])
    m = await box.open(policy)
    await m.create(tiny(tiny_guest, "late", state="Stopped", disks=[{"file": {"path": str(disk)}}]))
    secret = outside / "secret.raw"
    secret.write_bytes(bytes(1024 * 1024))
    disk.unlink()
    qemu_img("create", "-q", "-f", "qcow2", "-b", str(secret), "-F", "raw", str(disk))
    with pytest.raises(PolicyError, match="backing file"):
        await m.start("late")
    # desired state written by someone else (an older daemon, a hand edit) is refused at start
    await m.stop("late")
    await until(lambda: box.status("late").get("desiredState") == "Stopped", 10, "stopped")


async def test_store_images_only_through_file_image_and_never_written(
    box: Box, tiny_guest: Any, tmp_path: Path
) -> None:
    base = tmp_path / "base.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(base), "32M")
    # a careless admin allows the whole state dir: the manager's own files stay off limits
    policy = HostPolicy(image_paths=[str(Path(tiny_guest.kernel).parent), str(box.root)])
    m = await box.open(policy)
    await m.images.import_image("base", str(base))
    stored = m.images.path("base")
    before = hashlib.sha256(stored.read_bytes()).hexdigest()
    for kind in ({"file": {"path": str(stored)}}, {"device": {"path": str(stored)}}):
        with pytest.raises(PolicyError, match="manager's own files"):
            await m.create(tiny(tiny_guest, "w", state="Stopped", disks=[kind]))
    # another VM's disk is off limits too, as a disk or as a CD
    other = box.config.vms / "victim" / "root.qcow2"
    other.parent.mkdir(parents=True)
    qemu_img("create", "-q", "-f", "qcow2", str(other), "16M")
    for kind in ({"file": {"path": str(other)}}, {"cdrom": {"image": str(other)}}):
        with pytest.raises(PolicyError, match="manager's own files"):
            await m.create(tiny(tiny_guest, "w", state="Stopped", disks=[kind]))
    # a store image as a CD by its name (qemu opens CD media read-only)
    await m.create(tiny(tiny_guest, "cd", state="Stopped", disks=[{"cdrom": {"image": "base"}}]))
    await m.delete("cd")
    # the way in: an overlay on the store image, and the base is never written
    await m.create(tiny(tiny_guest, "ok", disks=[{"name": "root", "file": {"image": "base"}}]))
    await box.running("ok")
    result = await m.exec("ok", ["/bin/sh", "-c", "echo data > /dev/vda; sync"])
    assert result.exit_code == 0
    await m.stop("ok", wait=60)
    assert hashlib.sha256(stored.read_bytes()).hexdigest() == before


# --- 5: runner paths belong to the manager ---------------------------------------------------


async def test_runner_paths_in_a_managed_document_are_refused(
    box: Box, tiny_guest: Any, tmp_path: Path
) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    m = await box.open()
    for field, value in (("displaySecretFile", str(fifo)), ("statusFile", "/dev/zero")):
        doc = tiny(tiny_guest, "rp", state="Stopped")
        doc["runner"] = {field: value}
        with pytest.raises(PolicyError, match=f"runner.{field}"):
            await m.create(doc)


async def test_a_fifo_display_secret_never_blocks_the_runner(tmp_path: Path) -> None:
    from corral.runner.changes import read_display_secret

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for path in (fifo, Path("/dev/zero")):
        with pytest.raises(SpecError, match="not a regular file"):
            await asyncio.wait_for(asyncio.to_thread(read_display_secret, path), 5)
    big = tmp_path / "big"
    big.write_bytes(b"x" * 100_000)
    with pytest.raises(SpecError, match="larger than"):
        read_display_secret(big)


# --- 7: a generated display password is locked --------------------------------------------


async def test_generated_display_password_is_locked_and_written_nowhere(
    box: Box, tiny_guest: Any
) -> None:
    m = await box.open()
    await m.create(tiny(tiny_guest, "disp", display={"vnc": {"port": 5977}}))
    await until(lambda: box.status("disp").get("state") == "Running", BOOT, "Running")
    events = [e for e in m.events("disp") if e.kind == "DisplayLocked"]
    assert events and "display secret" in events[0].data["hint"]
    run_dir = box.config.run / "disp"
    assert not (run_dir / "display-password").exists()
    # a password from the manager's display secret opens it, live
    secret = box.config.vms / "disp" / "display-secret"
    secret.write_text("s3cret\n")
    sup = m.backend.supervisor("disp")  # type: ignore[attr-defined]
    await sup.display_secret_changed()
    # the runner's event reaches the store through the manager's write-back, in a moment
    await until(lambda: any(e.kind == "DisplayPasswordSet" for e in m.events("disp")), 5, "set")
    assert all("s3cret" not in str(e.data) for e in m.events("disp"))
    await m.stop("disp", wait=60)


# --- 8: lifecycle verbs never go through admission -------------------------------------------


async def test_stop_and_kill_work_after_the_policy_was_tightened(box: Box, tiny_guest: Any) -> None:
    m = await box.open(HostPolicy())
    await m.create(tiny(tiny_guest, "t1"))
    await m.create(tiny(tiny_guest, "t2"))
    await until(
        lambda: all(box.status(n).get("state") == "Running" for n in ("t1", "t2")),
        BOOT,
        "both Running",
    )
    m.policy = HostPolicy(image_paths=["/nonexistent"])  # the host tightened its policy
    await m.stop("t1", wait=60)
    await m.kill("t2")
    assert box.status("t1")["state"] == "Stopped"
    await until(lambda: box.status("t2").get("state") == "Stopped", 20, "t2 killed")
    with pytest.raises(PolicyError, match="outside the allowed image paths"):
        await m.start("t1")
    await m.delete("t1")


# --- 13: remote CD images --------------------------------------------------------------------


class _RangeHandler(http.server.SimpleHTTPRequestHandler):
    """A static file server with Range support (qemu's curl driver reads with ranges)."""

    def log_message(self, *args: object) -> None:
        pass

    def do_HEAD(self) -> None:
        self._serve(body=False)

    def do_GET(self) -> None:
        self._serve(body=True)

    def _serve(self, *, body: bool) -> None:
        path = Path(self.directory) / self.path.lstrip("/")
        if not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        start, end = 0, len(data) - 1
        rng = self.headers.get("Range")
        if rng and rng.startswith("bytes="):
            first, _, last = rng[6:].partition("-")
            start, end = int(first), min(int(last or end), end)
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
        else:
            self.send_response(200)
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(end - start + 1))
        self.end_headers()
        if body:
            self.wfile.write(data[start : end + 1])


async def test_remote_cdrom_is_refused_by_default_and_served_by_qemu_when_allowed(
    box: Box, tiny_guest: Any, tmp_path: Path
) -> None:
    iso = tmp_path / "disc.iso"
    iso.write_bytes(b"CD001" * 100_000)
    handler = lambda *a, **k: _RangeHandler(*a, directory=str(tmp_path), **k)  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/disc.iso"
    try:
        m = await box.open(HostPolicy())
        doc = tiny(tiny_guest, "rcd", disks=[{"name": "cd0", "cdrom": {"image": url}}])
        with pytest.raises(PolicyError, match="remoteImages"):
            await m.create(doc)
        m.policy = HostPolicy(remote_images=True)
        m.backend.policy = m.policy  # type: ignore[attr-defined]
        await m.create(doc)
        await until(lambda: box.status("rcd").get("state") == "Running", BOOT, "Running")
        sup = m.backend.supervisor("rcd")  # type: ignore[attr-defined]
        assert (await sup.live_media()) == {"cd0": url}  # qemu's curl driver opened it
        await m.stop("rcd", wait=60)
    finally:
        server.shutdown()
        server.server_close()


# --- defence in depth ------------------------------------------------------------------------


async def test_qemu_runs_sandboxed_and_unprivileged_by_default(box: Box, tiny_guest: Any) -> None:
    m = await box.open(HostPolicy())
    await m.create(tiny(tiny_guest, "dd"))
    await until(lambda: box.status("dd").get("state") == "Running", BOOT, "Running")
    pid = box.status("dd")["pid"]
    status = proc_status(pid)
    assert status["Seccomp"] == "2", "qemu's seccomp sandbox is on"
    assert status["NoNewPrivs"] == "1"
    uid = int(status["Uid"].split()[0])
    assert uid != 0, "qemu dropped root (-runas)"
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    assert b"-sandbox" in argv and b"-runas" in argv
    await m.stop("dd", wait=60)
    # and a host turns both off in its policy
    m.policy = HostPolicy(sandbox=False, run_as=None)
    m.backend.policy = m.policy  # type: ignore[attr-defined]
    await m.start("dd")
    await until(lambda: box.status("dd").get("state") == "Running", BOOT, "Running")
    status = proc_status(box.status("dd")["pid"])
    assert status["Seccomp"] == "0" and status["Uid"].split()[0] == "0"
    await m.stop("dd", wait=60)


# --- bridge NICs keep the sandbox: corral runs the helper, qemu gets the tap ---------------

_BRIDGE_SCRIPT = r"""
import asyncio, json, os, subprocess, sys, tempfile
from pathlib import Path
from corral.runner.config import resolve_paths
from corral.runner.supervisor import VmSupervisor
from corral.spec import HostPolicy, parse_document

kernel, initrd, cmdline = sys.argv[1:4]
subprocess.run(["mount", "-t", "tmpfs", "tmpfs", "/etc/qemu"], check=True)
Path("/etc/qemu/bridge.conf").write_text("allow crtbr0\n")
for cmd in (["ip", "link", "set", "lo", "up"], ["ip", "link", "add", "crtbr0", "type", "bridge"],
            ["ip", "link", "set", "crtbr0", "up"]):
    subprocess.run(cmd, check=True)

async def main():
    root = Path(tempfile.mkdtemp(prefix="cbr-", dir="/tmp"))
    doc = parse_document({"metadata": {"name": "brvm"}, "spec": {"vm": {
        "machine": "q35", "firmware": "bios", "maximumCpus": 1, "maximumRam": "256Mi",
        "kernel": kernel, "initrd": initrd, "cmdline": cmdline, "powerdownTimeout": 10,
        "networks": [{"bridge": {"name": "crtbr0"}}, {"tap": {"bridge": "crtbr0"}}]}}})
    paths = resolve_paths(doc, data_dir=str(root / "d"), runtime_dir=str(root / "r"))
    sup = VmSupervisor(doc, paths, HostPolicy(), accelerator="tcg")
    await sup.start()
    pid = sup.pid
    status = dict(l.split(":", 1) for l in Path(f"/proc/{pid}/status").read_text().splitlines())
    ports = subprocess.run(["ip", "-o", "link", "show", "master", "crtbr0"],
                           capture_output=True, text=True, check=True).stdout
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    await sup.stop(timeout=5)
    import shutil
    shutil.rmtree(root, ignore_errors=True)
    print(json.dumps({"seccomp": status["Seccomp"].strip(), "uid": status["Uid"].split()[0],
                      "ports": ports.count("master crtbr0"),
                      "helper_in_argv": any(b"helper=" in a for a in argv)}))

asyncio.run(main())
"""


def test_bridge_nics_are_made_by_corral_and_qemu_keeps_its_sandbox(
    tiny_guest: Any, tmp_path: Path
) -> None:
    """A real bridge in a private network (and mount) namespace: the host's helper makes two
    taps on it, qemu gets them as fds and runs sandboxed, unprivileged, with no helper."""
    Path("/etc/qemu").mkdir(exist_ok=True)  # the helper's ACL dir; a tmpfs is mounted on it
    script = tmp_path / "bridge_vm.py"
    script.write_text(_BRIDGE_SCRIPT)
    import json
    import sys

    done = subprocess.run(
        ["unshare", "--mount", "--net", "--propagation", "private", sys.executable,
         str(script), str(tiny_guest.kernel), str(tiny_guest.initrd), tiny_guest.cmdline],
        capture_output=True, text=True, timeout=300, check=False,
        cwd=Path(__file__).resolve().parents[2],
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result == {"seccomp": "2", "uid": result["uid"], "ports": 2, "helper_in_argv": False}
    assert result["uid"] != "0"


# --- review findings: formats are corral's decision, never qemu-img's guess ----------------

_VMDK_DESCRIPTOR = 'version=1\nCID=fffffffe\nparentCID=ffffffff\ncreateType="monolithicFlat"\n\n'


async def test_a_base_image_is_never_format_probed_into_a_vmdk(tmp_path: Path) -> None:
    """A raw base whose bytes are a vmdk descriptor naming a host file: qemu-img used to guess
    vmdk and record it as the overlay's backing format, so the guest read the extent."""
    from corral.host import ensure_overlay

    secret = tmp_path / "secret"
    secret.write_bytes(b"host secret".ljust(4096, b"\0"))
    base = tmp_path / "base.raw"
    base.write_bytes(
        (_VMDK_DESCRIPTOR + f'RW 8 FLAT "{secret}" 0\n').encode().ljust(1024 * 1024, b"\0")
    )
    overlay = tmp_path / "vm" / "root.qcow2"
    await ensure_overlay(base, overlay)
    info = subprocess.run(
        ["qemu-img", "info", "--output=json", "-U", str(overlay)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert '"backing-filename-format": "raw"' in info.stdout


async def test_an_imported_vmdk_descriptor_never_makes_qemu_img_open_its_extent(
    tmp_path: Path,
) -> None:
    """Import (upload or URL) runs qemu-img as root on untrusted bytes: an extent on a FIFO
    would have blocked it (and one on a device opened it); now the bytes are raw data."""
    from corral.host import ImageStore

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    source = tmp_path / "evil.img"
    source.write_bytes((_VMDK_DESCRIPTOR + f'RW 8 FLAT "{fifo}" 0\n').encode().ljust(65536, b"\0"))
    store = ImageStore(tmp_path / "store")
    record = await asyncio.wait_for(store.import_image("evil", str(source)), 30)
    assert record.format == "raw"
    sparse = tmp_path / "sparse.vmdk"
    subprocess.run(["qemu-img", "create", "-q", "-f", "vmdk", str(sparse), "1M"], check=True)
    with pytest.raises(SpecError, match="vmdk"):
        await store.import_image("sparse", str(sparse))
