"""The manager in-process against real tiny guests (TCG): store, admission, reconcile,
crash restarts with backoff, concurrency, live changes, images and disks."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import shutil
import signal
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from corral.errors import Conflict, NotFound, PolicyError, SpecError
from corral.manager import Manager, ManagerConfig
from corral.spec import HostPolicy

pytestmark = [pytest.mark.integration, pytest.mark.slow]

BOOT = 150.0


def tiny(guest: Any, name: str, *, state: str = "Running", **vm: Any) -> dict[str, Any]:
    spec_vm: dict[str, Any] = {
        "state": state,
        "machine": "q35",
        "firmware": "bios",
        "maximumCpus": 2,
        "currentCpus": 1,
        "maximumRam": "256Mi",
        "powerdownTimeout": 20,
        "kernel": str(guest.kernel),
        "initrd": str(guest.initrd),
        "cmdline": guest.cmdline,
    }
    spec_vm.update(vm)
    return {"metadata": {"name": name, "labels": {"suite": "manager"}}, "spec": {"vm": spec_vm}}


async def _chunks(data: bytes) -> AsyncIterator[bytes]:
    yield data


async def until(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout}s")
        await asyncio.sleep(0.1)


def qemu_pids(name: str, *, prefix: bool = False) -> list[int]:
    """Every live qemu on this host whose -name is ``guest=<name>`` (``prefix``: whose guest
    name begins with ``name``)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        wanted = f"guest={name}".encode()
        if (
            state != "Z"
            and argv
            and b"qemu-system" in argv[0]
            and any(
                a.startswith(wanted) if prefix else a == wanted or a.startswith(wanted + b",")
                for a in argv
            )
        ):
            found.append(int(entry.name))
    return found


@contextlib.asynccontextmanager
async def box_maker(prefix: str) -> AsyncIterator[Callable[..., Box]]:
    """Make :class:`Box` es in fresh state dirs; at the end their managers are closed, every
    qemu whose guest name begins with ``prefix`` is killed and the dirs are removed."""
    boxes: list[Box] = []

    def make(**config: Any) -> Box:
        unique = f"{os.getpid()}-{time.monotonic_ns() % 10**8}"
        root = Path(os.path.realpath("/tmp")) / f"{prefix}{unique}"
        root.mkdir()
        boxes.append(Box(root, **config))
        return boxes[-1]

    try:
        yield make
    finally:
        for b in boxes:
            if b.manager is not None:
                await b.manager.close()
        for pid in qemu_pids(prefix, prefix=True):
            os.kill(pid, signal.SIGKILL)
        for b in boxes:
            shutil.rmtree(b.root, ignore_errors=True)


class Box:
    def __init__(self, root: Path, **config: Any) -> None:
        self.root = root
        self.config = ManagerConfig(
            state_dir=root, accelerator="tcg", resync_seconds=1.0,
            backoff_initial_seconds=0.5, **config,
        )  # fmt: skip
        self.manager: Manager | None = None

    async def open(self, policy: HostPolicy | None = None) -> Manager:
        self.manager = Manager(self.config, policy=policy or HostPolicy())
        await self.manager.open()
        return self.manager

    def status(self, name: str) -> dict[str, Any]:
        assert self.manager is not None
        return self.manager.get(name).status

    async def running(self, name: str, timeout: float = BOOT) -> dict[str, Any]:
        await until(
            lambda: (
                self.status(name).get("state") == "Running"
                and self.status(name).get("conditions", {}).get("AgentConnected", {}).get("status")
                is True
            ),
            timeout,
            f"{name} Running with its agent",
        )
        return self.status(name)


@pytest.fixture
async def box() -> AsyncIterator[Box]:
    root = Path(os.path.realpath("/tmp")) / f"cm-{os.getpid()}-{time.monotonic_ns() % 10**8}"
    root.mkdir()
    b = Box(root)
    try:
        yield b
    finally:
        if b.manager is not None:
            names = b.manager.store.names() if b.manager.state.value == "Open" else []
            for name in names:
                for pid in qemu_pids(name):
                    os.kill(pid, signal.SIGKILL)
            await b.manager.close()
        shutil.rmtree(root, ignore_errors=True)


async def test_store_versions_admission_and_refusals_change_nothing(
    box: Box, tiny_guest: Any, tmp_path: Path
) -> None:
    allowed = tmp_path / "images"
    allowed.mkdir()
    policy = HostPolicy(image_paths=[str(Path(tiny_guest.kernel).parent), str(allowed)])
    m = await box.open(policy)
    rec = await m.create(tiny(tiny_guest, "a1", state="Stopped"))
    assert rec.generation == 1 and rec.status["state"] == "Stopped"

    same = await m.replace(tiny(tiny_guest, "a1", state="Stopped"), rec.resource_version)
    assert same.generation == 1 and same.resource_version == rec.resource_version

    patched = await m.patch("a1", {"spec": {"vm": {"currentCpus": 2}}})
    assert patched.generation == 2
    assert patched.document.vm.current_cpus == 2
    with pytest.raises(Conflict, match="resourceVersion"):
        await m.patch("a1", {"spec": {"vm": {"currentCpus": 1}}}, rec.resource_version)
    with pytest.raises(Conflict, match="already exists"):
        await m.create(tiny(tiny_guest, "a1"))

    refused = [
        (tiny(tiny_guest, "b1", kernel="/etc/passwd"), PolicyError, "spec.vm.kernel"),
        ({**tiny(tiny_guest, "b2"), "runner": {"dataDir": "/"}}, PolicyError, "runner.dataDir"),
        (
            tiny(tiny_guest, "b3", disks=[{"file": {"image": "no-such-image"}}]),
            PolicyError,
            "spec.vm.disks[0].file.image",
        ),
        (tiny(tiny_guest, "b4", maximumCpus=4096), SpecError, "spec.vm.maximumCpus"),
        (tiny(tiny_guest, "b5", maximumRam="100Ti"), PolicyError, "spec.vm.maximumRam"),
        (tiny(tiny_guest, "B_6"), SpecError, "metadata.name"),
    ]
    for doc, error, field in refused:
        with pytest.raises(error) as caught:
            await m.create(doc)
        assert field in {i.loc for i in caught.value.issues}, caught.value
    assert m.store.names() == ["a1"]
    with pytest.raises(PolicyError):
        await m.patch("a1", {"spec": {"vm": {"kernel": "/etc/passwd"}}})
    assert m.get("a1").generation == 2
    with pytest.raises(SpecError, match="renamed"):
        await m.patch("a1", {"metadata": {"name": "other"}})
    with pytest.raises(NotFound):
        m.get("nope")
    assert [r.name for r in m.list_vms(label="suite=manager")] == ["a1"]
    assert m.list_vms(label="suite=other") == []
    assert [e.kind for e in m.events("a1")][:1] == ["Created"]


async def test_lifecycle_live_change_and_delete_keeps_disks(
    box: Box, tiny_guest: Any, tmp_path: Path
) -> None:
    base = tmp_path / "base.raw"
    base.write_bytes(b"\0" * 2**20)
    m = await box.open()
    image = await m.upload_image("blank", _chunks(base.read_bytes()))  # no imagePaths: no paths
    doc = tiny(tiny_guest, "life", currentRam="256Mi",
               disks=[{"name": "root", "file": {"image": "blank", "size": "64Mi"}}])  # fmt: skip
    await m.create(doc)
    status = await box.running("life")
    pid = status["pid"]
    assert qemu_pids("life") == [pid]
    overlay = box.root / "vms" / "life" / "root.qcow2"
    assert overlay.exists()
    with pytest.raises(Conflict, match="life"):
        await m.delete_image("blank")
    assert [(img.name, users) for img, users in m.list_images()] == [("blank", ["life"])]

    await m.patch("life", {"spec": {"vm": {"currentRam": "192Mi"}}})
    await until(lambda: box.status("life").get("ram") == 192 * 2**20, 60, "balloon")
    await m.patch("life", {"spec": {"vm": {"maximumRam": "384Mi"}}})
    await until(
        lambda: box.status("life").get("pendingRestart") == ["spec.vm.maximumRam"], 30, "pending"
    )
    assert box.status("life")["pid"] == pid

    await m.stop("life", wait=60)
    assert box.status("life")["stoppedBy"] == "powerdown"
    assert qemu_pids("life") == []
    await m.start("life", wait=BOOT)
    assert box.status("life")["pendingRestart"] == []

    inode = overlay.stat().st_ino
    retained = await m.delete("life")
    assert qemu_pids("life") == []
    assert retained is not None, "a deleted VM keeps its disks unless asked"
    assert (retained.path / "root.qcow2").stat().st_ino == inode
    assert not overlay.exists(), "kept for the user, never for the next VM of that name"
    assert image.path.exists()
    with pytest.raises(Conflict, match=f"disk/{retained.id}"):
        await m.delete_image("blank")  # the retained overlay needs its base
    await m.create({**doc, "metadata": {"name": "life"}})
    await until(overlay.exists, 60, "the new VM's own overlay")
    assert overlay.stat().st_ino != inode
    await m.delete("life", delete_disks=True)
    assert not overlay.exists()
    assert [r.id for r in m.list_retained()] == [retained.id]
    await m.delete_retained(retained.id)
    assert m.list_retained() == []
    await m.delete_image("blank")
    assert m.list_images() == []


async def test_crash_restarts_with_backoff_and_never_leaves_it(box: Box, tiny_guest: Any) -> None:
    m = await box.open()
    await m.create(tiny(tiny_guest, "crashy"))
    await m.create({**tiny(tiny_guest, "stays"), "spec": {
        **tiny(tiny_guest, "stays")["spec"], "restartPolicy": "Never"}})  # fmt: skip
    first = (await box.running("crashy"))["pid"]
    never = (await box.running("stays"))["pid"]

    os.kill(first, signal.SIGKILL)
    os.kill(never, signal.SIGKILL)
    await until(lambda: box.status("crashy").get("pid") not in (None, first), 60, "restarted")
    await box.running("crashy")
    kinds = [e.kind for e in m.events("crashy")]
    assert "RestartScheduled" in kinds
    assert box.status("crashy")["restartCount"] == 1
    assert len(qemu_pids("crashy")) == 1

    await asyncio.sleep(3)  # several resyncs: Never stays Crashed
    assert box.status("stays")["state"] == "Crashed"
    assert box.status("stays")["exit"]["signal"] == signal.SIGKILL
    assert qemu_pids("stays") == []
    assert "NotRestarted" in [e.kind for e in m.events("stays")]

    # a crash loop backs off exponentially: 0.5 s, 1 s, 2 s ...
    for _ in range(2):
        pid = (await box.running("crashy"))["pid"]
        os.kill(pid, signal.SIGKILL)
        await until(lambda p=pid: box.status("crashy").get("pid") not in (None, p), 60, "again")
    delays = [e.data["delay"] for e in m.events("crashy") if e.kind == "RestartScheduled"]
    assert delays == [0.5, 1.0, 2.0]


async def test_guest_poweroff_with_guest_shutdown_stops_sets_desired_stopped(
    box: Box, tiny_guest: Any
) -> None:
    m = await box.open()
    doc = tiny(tiny_guest, "gs")
    doc["spec"]["guestShutdownStops"] = True
    await m.create(doc)
    await box.running("gs")
    sup = m.backend.supervisor("gs")  # type: ignore[attr-defined]
    await sup.agent.exec(["/bin/sh", "-c", "(sleep 0.3; poweroff -f) >/dev/null 2>&1 &"])
    await until(lambda: m.get("gs").desired == "Stopped", 60, "desired Stopped")
    await asyncio.sleep(2.5)  # resyncs do not start it again
    assert box.status("gs")["state"] == "Stopped"
    assert qemu_pids("gs") == []


@pytest.mark.timeout(600)
async def test_concurrent_calls_end_consistent_with_one_qemu_per_running_vm(
    box: Box, tiny_guest: Any
) -> None:
    m = await box.open()
    names = [f"c{i}" for i in range(5)]
    for name in names:
        await m.create(tiny(tiny_guest, name, state="Stopped"))
    rng = random.Random(7)  # noqa: S311 (a reproducible test schedule)

    async def call(i: int) -> None:
        name = rng.choice(names)
        op = rng.choice(["start", "stop", "patch"])
        await asyncio.sleep(rng.random() * 2)
        if op == "start":
            try:
                await m.start(name)
            except PolicyError as exc:  # 5 VMs x 2 CPUs > 8; VMs still stopping count
                assert "this host allows" in str(exc)
        elif op == "stop":
            await m.stop(name)
        else:
            await m.patch(name, {"metadata": {"labels": {"call": str(i)}}})

    await asyncio.gather(*(call(i) for i in range(50)))
    final = {n: m.get(n).desired for n in names}

    def settled() -> bool:
        return all(
            box.status(n).get("state") == ("Running" if final[n] == "Running" else "Stopped")
            for n in names
        )

    await until(settled, 300, f"settled to {final}")
    for name in names:
        pids = qemu_pids(name)
        if final[name] == "Running":
            assert pids == [box.status(name)["pid"]], (name, pids)
        else:
            assert pids == [], (name, pids)
    stale = m.get(names[0]).resource_version
    await m.patch(names[0], {"metadata": {"labels": {"x": "1"}}})
    with pytest.raises(Conflict):
        await m.patch(names[0], {"metadata": {"labels": {"x": "2"}}}, stale)
