"""Retained disks (corral.manager.retained) and what the manager, the REST API and the CLI do
with them, without a guest: a deleted VM's data dir is moved aside whole, never inherited by a
new VM of its name, listed, adoptable by a new VM, and deleted only on request. The guest
side (a new VM cannot read the old disk; an adopting VM can) is tests/e2e/test_api_cli.py."""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner

from corral.errors import Conflict, NotFound
from corral.manager import Manager, ManagerConfig
from corral.manager.retained import RECORD_FILE, RetainedDisks
from corral.spec import HostPolicy

UUID = "2b6c0a0e-7f51-4bd4-9d1a-6e0f6b9f4c11"


def qcow2(path: Path, virtual_size: int, payload: bytes = b"", backing: str = "") -> None:
    """A file with a qcow2 v2 header (magic, version, backing file offset and length, cluster bits,
    size at byte 24, no header extensions), its backing file name at 512 and some guest data."""
    name = backing.encode()
    offset = (512 if name else 0).to_bytes(8, "big")
    header = b"QFI\xfb" + (2).to_bytes(4, "big") + offset + len(name).to_bytes(4, "big")
    header += (16).to_bytes(4, "big") + virtual_size.to_bytes(8, "big")  # 64 KiB clusters
    path.write_bytes(header.ljust(512, b"\0") + name + payload)


def plant(data_dir: Path, marker: bytes, uuid: str = UUID) -> None:
    """What a runner leaves in a VM's data dir: overlay, UUID, firmware vars, TPM state."""
    data_dir.mkdir(parents=True, exist_ok=True)
    qcow2(data_dir / "root.qcow2", 64 * 2**20, marker)
    (data_dir / "uuid").write_text(uuid + "\n")
    (data_dir / "efivars.fd").write_bytes(b"vars")
    (data_dir / "tpm").mkdir(exist_ok=True)
    (data_dir / "tpm" / "tpm2-00.permall").write_bytes(b"tpm")


@pytest.fixture
def area(tmp_path: Path) -> RetainedDisks:
    return RetainedDisks(tmp_path / "vms")


# --- the module --------------------------------------------------------------------------


def test_retain_moves_the_whole_data_dir_aside_with_a_record(area: RetainedDisks) -> None:
    plant(area.data_dir("web1"), b"OLD-DATA")
    inode = (area.data_dir("web1") / "root.qcow2").stat().st_ino
    found = area.retain("web1")
    assert found is not None
    assert not area.data_dir("web1").exists(), "a new VM web1 starts with nothing"
    assert found.path.parent == area.root and found.id == found.path.name
    assert found.id.startswith("web1.") and len(found.id) == len("web1.") + 8
    assert (found.path / "root.qcow2").stat().st_ino == inode, "moved by rename, not copied"
    assert (found.path / "tpm" / "tpm2-00.permall").read_bytes() == b"tpm"
    assert (found.vm, found.uuid) == ("web1", UUID)
    assert [(d.name, d.virtual_size) for d in found.disks] == [("root.qcow2", 64 * 2**20)]
    assert found.bytes > 0
    record = json.loads((found.path / RECORD_FILE).read_text())
    assert record["vm"] == "web1" and record["uuid"] == UUID and record["id"] == found.id
    assert record["deletedAt"] == found.deleted_at
    assert record["disks"] == [{"name": "root.qcow2", "bytes": found.disks[0].bytes,
                                "virtualSize": 64 * 2**20, "backingFile": None}]  # fmt: skip
    assert os.stat(area.root).st_mode & 0o777 == 0o700
    assert area.all() == [found]


def test_retain_of_nothing_retains_nothing(area: RetainedDisks) -> None:
    assert area.retain("never-started") is None
    area.data_dir("empty").mkdir(parents=True)
    assert area.retain("empty") is None
    assert not area.data_dir("empty").exists()
    assert area.all() == []


def test_get_by_id_or_by_the_vm_name_that_left_one(area: RetainedDisks) -> None:
    plant(area.data_dir("a"), b"1")
    first = area.retain("a")
    plant(area.data_dir("b"), b"2")
    only_b = area.retain("b")
    assert first is not None and only_b is not None
    assert area.get(first.id) == first
    assert area.get("a") == first and area.get("b") == only_b
    plant(area.data_dir("a"), b"3")
    second = area.retain("a")
    assert second is not None
    assert [r.id for r in area.all()] == [first.id, only_b.id, second.id]
    with pytest.raises(Conflict, match=rf"left 2 retained disk sets \({first.id}, {second.id}\)"):
        area.get("a")
    for bad in ("c", "a.0000000g", "../vms/a", "a.12345678/..", "", ".retained", "A.12345678"):
        with pytest.raises(NotFound, match="no retained disks"):
            area.get(bad)


def test_a_set_without_its_record_is_still_listed(area: RetainedDisks) -> None:
    plant(area.data_dir("web1"), b"x")
    found = area.retain("web1")
    assert found is not None
    (found.path / RECORD_FILE).unlink()
    (found.path / "stray").mkdir()  # not a set: no id
    (area.root / "notes.txt").write_text("not a set")
    (listed,) = area.all()
    assert (listed.id, listed.vm, listed.uuid, listed.disks) == (
        found.id, "web1", UUID, found.disks,
    )  # fmt: skip
    assert listed.deleted_at.endswith("Z")


def test_adopt_makes_the_set_the_new_vms_data_dir(area: RetainedDisks) -> None:
    plant(area.data_dir("old"), b"OLD-DATA")
    found = area.retain("old")
    assert found is not None
    adopted = area.adopt(found.id, "new")
    assert adopted == found
    data = area.data_dir("new")
    assert (data / "root.qcow2").read_bytes().endswith(b"OLD-DATA")
    assert (data / "uuid").read_text().strip() == UUID
    assert not (data / RECORD_FILE).exists() and not found.path.exists()
    assert area.all() == []
    with pytest.raises(NotFound):
        area.adopt(found.id, "other")

    area.unadopt(adopted, "new")  # the VM could not be created: it is retained again
    assert not data.exists() and area.all() == [found]


def test_adopt_into_a_data_dir_that_holds_anything_is_refused(area: RetainedDisks) -> None:
    plant(area.data_dir("old"), b"OLD")
    found = area.retain("old")
    assert found is not None
    plant(area.data_dir("busy"), b"BUSY")
    with pytest.raises(Conflict, match="data dir of VM 'busy'"):
        area.adopt(found.id, "busy")
    assert area.all() == [found]
    assert (area.data_dir("busy") / "root.qcow2").read_bytes().endswith(b"BUSY")
    area.data_dir("empty").mkdir()
    area.adopt(found.id, "empty")  # an empty dir is no data
    assert (area.data_dir("empty") / "uuid").exists()


async def test_delete_and_release(area: RetainedDisks) -> None:
    plant(area.data_dir("a"), b"A")
    found = area.retain("a")
    assert found is not None
    assert await area.delete("a") == found
    assert area.all() == [] and not found.path.exists()
    assert os.listdir(area.root) == [], "nothing left behind, not even hidden"
    with pytest.raises(NotFound):
        await area.delete(found.id)

    plant(area.data_dir("b"), b"B")
    kept = await area.release("b", delete=False)
    assert kept is not None and area.all() == [kept]
    plant(area.data_dir("c"), b"C")
    assert await area.release("c", delete=True) is None
    assert not area.data_dir("c").exists() and area.all() == [kept]
    assert await area.release("never-started", delete=True) is None


def test_retain_orphans_skips_known_vms_and_what_is_no_vm(area: RetainedDisks) -> None:
    plant(area.data_dir("live"), b"L")
    plant(area.data_dir("gone"), b"G")
    (area.data_root / "Not_A_Name").mkdir()
    (area.data_root / "file").write_text("x")
    found = area.retain_orphans({"live"})
    assert [r.vm for r in found] == ["gone"]
    assert area.data_dir("live").exists() and not area.data_dir("gone").exists()
    assert (area.data_root / "Not_A_Name").exists()
    assert area.retain_orphans({"live"}) == []


# --- the manager, the REST API and the CLI -----------------------------------------------


def vm(name: str) -> dict[str, Any]:
    return {"metadata": {"name": name}, "spec": {"vm": {"maximumRam": "256Mi", "state": "Stopped"}}}


@pytest.fixture
async def manager(tmp_path: Path) -> AsyncIterator[Manager]:
    async with Manager(ManagerConfig(state_dir=tmp_path / "state"), policy=HostPolicy()) as m:
        yield m


async def test_manager_delete_retains_create_starts_empty_adopt_brings_back(
    manager: Manager,
) -> None:
    m = manager
    data = m.retained.data_dir("a")
    await m.create(vm("a"))
    plant(data, b"OLD-DATA")  # as the runner leaves it
    retained = await m.delete("a")
    assert retained is not None and retained.vm == "a" and retained.uuid == UUID
    deleted = [e for e in m.store.events("a") if e.kind == "Deleted"][-1]
    assert deleted.data == {"deleteDisks": False, "retainedDisks": retained.id}
    assert not data.exists()

    await m.create(vm("a"))
    assert not data.exists(), "the new VM a has nothing of the old one"
    assert [r.id for r in m.list_retained()] == [retained.id]

    with pytest.raises(Conflict, match="already exists"):
        await m.create(vm("a"), adopt_disks=retained.id)
    with pytest.raises(Conflict, match="only a new VM"):
        await m.apply(vm("a"), adopt_disks=retained.id)
    with pytest.raises(NotFound, match="no retained disks 'nope'"):
        await m.create(vm("b"), adopt_disks="nope")
    assert m.store.find("b") is None and [r.id for r in m.list_retained()] == [retained.id]

    await m.apply(vm("b"), adopt_disks="a")
    assert (m.retained.data_dir("b") / "root.qcow2").read_bytes().endswith(b"OLD-DATA")
    assert (m.retained.data_dir("b") / "uuid").read_text().strip() == UUID
    created = [e for e in m.store.events("b") if e.kind == "Created"][-1]
    assert created.data["adoptedDisks"] == retained.id
    assert m.list_retained() == []

    await m.delete("b", delete_disks=True)
    assert not m.retained.data_dir("b").exists() and m.list_retained() == []


async def test_manager_refused_adoption_changes_nothing(manager: Manager) -> None:
    m = manager
    await m.create(vm("a"))
    plant(m.retained.data_dir("a"), b"A")
    retained = await m.delete("a")
    assert retained is not None
    plant(m.retained.data_dir("b"), b"LEFTOVER")  # a data dir no VM owns (older corral)
    with pytest.raises(Conflict, match="not empty"):
        await m.create(vm("b"), adopt_disks=retained.id)
    assert m.store.find("b") is None
    assert [r.id for r in m.list_retained()] == [retained.id]

    await m.create(vm("b"))  # without adopting, the leftover is retained, not inherited
    assert not m.retained.data_dir("b").exists()
    leftover = [r for r in m.list_retained() if r.vm == "b"]
    assert len(leftover) == 1
    created = [e for e in m.store.events("b") if e.kind == "Created"][-1]
    assert created.data["retainedDisks"] == leftover[0].id

    await m.delete_retained(retained.id)
    assert [r.vm for r in m.list_retained()] == ["b"] and not retained.path.exists()
    with pytest.raises(NotFound):
        await m.delete_retained(retained.id)


async def test_an_image_under_retained_disks_is_in_use(manager: Manager) -> None:
    m = manager
    await m.create(vm("a"))
    plant(m.retained.data_dir("a"), b"A")
    base = str(m.config.images / "debian.qcow2")
    qcow2(m.retained.data_dir("a") / "root.qcow2", 2**30, b"A", backing=base)
    retained = await m.delete("a")
    assert retained is not None and retained.disks[0].backing_file == base
    assert retained.disks[0].virtual_size == 2**30
    assert m.image_users() == {base: [f"disk/{retained.id}"]}
    await m.delete_retained(retained.id)
    assert m.image_users() == {}


async def test_manager_open_retains_data_dirs_no_vm_owns(tmp_path: Path) -> None:
    config = ManagerConfig(state_dir=tmp_path / "state")
    plant(config.vms / "old-vm", b"OLD")
    async with Manager(config, policy=HostPolicy()) as m:
        (found,) = m.list_retained()
        assert found.vm == "old-vm" and not (config.vms / "old-vm").exists()
        assert [e.kind for e in m.store.events("old-vm")] == ["DisksRetained"]


async def test_rest_api_lists_deletes_and_adopts_with_problem_json(manager: Manager) -> None:
    from corral.api.app import create_app

    m = manager
    await m.create(vm("a"))
    plant(m.retained.data_dir("a"), b"A")
    transport = httpx.ASGITransport(app=create_app(m))
    async with httpx.AsyncClient(transport=transport, base_url="http://corral") as http:
        r = await http.delete("/v1/vms/a")
        assert r.status_code == 200
        set_id = r.json()["retainedDisks"]
        assert r.json() == {"name": "a", "deleted": True, "disksDeleted": False,
                            "retainedDisks": set_id}  # fmt: skip
        (item,) = (await http.get("/v1/disks")).json()["items"]
        assert item["id"] == set_id and item["vm"] == "a" and item["uuid"] == UUID
        assert item["disks"][0]["name"] == "root.qcow2"
        assert item["disks"][0]["virtualSize"] == 64 * 2**20
        assert set(item) == {"id", "vm", "uuid", "deletedAt", "disks", "bytes", "path"}

        for path in ("/v1/disks/nope", "/v1/disks/a.00000000", "/v1/disks/..%2Fa"):
            r = await http.delete(path)
            assert r.status_code == 404, path
            assert r.headers["content-type"].startswith("application/problem+json")
        r = await http.post("/v1/vms", params={"adoptDisks": "nope"}, json=vm("b"))
        assert r.status_code == 404 and r.json()["type"] == "urn:corral:not-found"
        r = await http.post("/v1/vms", params={"adoptDisks": "x" * 81}, json=vm("b"))
        assert r.status_code == 422
        assert (await http.get("/v1/vms/b")).status_code == 404

        r = await http.post("/v1/vms", params={"adoptDisks": set_id}, json=vm("b"))
        assert r.status_code == 201
        assert (m.retained.data_dir("b") / "uuid").read_text().strip() == UUID
        assert (await http.get("/v1/disks")).json() == {"items": []}

        r = await http.delete("/v1/vms/b", params={"deleteDisks": "true"})
        assert r.json()["retainedDisks"] is None
        await m.create(vm("c"))
        plant(m.retained.data_dir("c"), b"C")
        await http.delete("/v1/vms/c")
        r = await http.delete("/v1/disks/c")
        assert r.status_code == 200 and r.json()["deleted"] is True
        assert (await http.get("/v1/disks")).json() == {"items": []}


def test_cli_delete_vm_alias_deletes_the_disks_as_aetherscale_does(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from corral.cli.main import cli
    from corral.client import Client

    calls: list[tuple[str, bool]] = []

    def delete_vm(
        self: Client, name: str, *, delete_disks: bool = False, force: bool = False
    ) -> dict[str, Any]:
        assert not force
        calls.append((name, delete_disks))
        return {"name": name, "retainedDisks": None if delete_disks else f"{name}.0123abcd"}

    monkeypatch.setattr(Client, "delete_vm", delete_vm)
    runner = CliRunner()
    done = runner.invoke(cli, ["--socket", "/nonexistent", "delete-vm", "--vm-id", "x1"])
    assert done.exit_code == 0, done.output
    done = runner.invoke(cli, ["--socket", "/nonexistent", "delete", "x2"])
    assert done.exit_code == 0, done.output
    assert done.output.strip() == "vm/x2 deleted; disks retained as x2.0123abcd"
    assert calls == [("x1", True), ("x2", False)]


def test_cli_adopt_disks_needs_exactly_one_document(tmp_path: Path) -> None:
    from corral.cli.main import cli

    two = tmp_path / "two.yaml"
    two.write_text("metadata: {name: a}\n---\nmetadata: {name: b}\n")
    done = CliRunner().invoke(
        cli, ["--socket", "/nonexistent", "create", "-f", str(two), "--adopt-disks", "a.0123abcd"]
    )
    assert done.exit_code == 2 and "exactly one VM document, not 2" in done.output
