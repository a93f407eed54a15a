"""The REST API in-process (httpx ``ASGITransport``, as httpx's own tests do) against a real
Manager on a temp state dir: CRUD, validation with field paths, problem+json built by
``CorralError.to_problem()``, server-side apply and CD media, bearer auth, and the daemon's
service registry. No VM is started: every request here only reads and writes documents."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from corral.api.app import create_app
from corral.api.auth import TokenFile, create_token
from corral.api.server import BearerAuth, service_from_config
from corral.errors import FieldIssue, NotFound, SpecError, StoreUnavailable
from corral.manager import Manager, ManagerConfig
from corral.services import SERVICES, build_services, service_factory
from corral.spec import HostPolicy
from corral.spec.views import VmEvent, VmView

PROBLEM = "application/problem+json"


def vm(name: str, **extra: Any) -> dict[str, Any]:
    return {"metadata": {"name": name},
            "spec": {"vm": {"maximumRam": "256Mi", "state": "Stopped", **extra}}}  # fmt: skip


@pytest.fixture
async def manager(tmp_path: Path) -> AsyncIterator[Manager]:
    async with Manager(ManagerConfig(state_dir=tmp_path / "state"), policy=HostPolicy()) as m:
        yield m


@pytest.fixture
async def http(manager: Manager) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=create_app(manager))
    async with httpx.AsyncClient(transport=transport, base_url="http://corral") as client:
        yield client


def is_problem(r: httpx.Response, status: int) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == PROBLEM
    body: dict[str, Any] = r.json()
    assert body["status"] == status and body["title"] and body["detail"]
    return body


async def test_crud_round_trip(http: httpx.AsyncClient) -> None:
    r = await http.post("/v1/vms", json=vm("a"))
    assert r.status_code == 201
    created = r.json()
    assert created["metadata"]["name"] == "a" and created["metadata"]["generation"] == 1
    assert [v["metadata"]["name"] for v in (await http.get("/v1/vms")).json()["items"]] == ["a"]
    got = (await http.get("/v1/vms/a")).json()
    assert (got["metadata"], got["spec"]) == (created["metadata"], created["spec"])

    replaced = {**vm("a", currentCpus=1), "metadata": {"name": "a",
                "resourceVersion": created["metadata"]["resourceVersion"]}}  # fmt: skip
    r = await http.put("/v1/vms/a", json=replaced)
    assert r.status_code == 200 and r.json()["metadata"]["generation"] == 2
    r = await http.put("/v1/vms/a", json=replaced)  # the version it was read at is gone
    assert is_problem(r, 409)["type"] == "urn:corral:conflict"

    r = await http.patch("/v1/vms/a", json={"spec": {"vm": {"powerdownTimeout": 7}}},
                         headers={"content-type": "application/merge-patch+json"})  # fmt: skip
    assert r.status_code == 200 and r.json()["spec"]["vm"]["powerdownTimeout"] == 7

    r = await http.delete("/v1/vms/a", params={"deleteDisks": "true"})
    assert r.json() == {"name": "a", "deleted": True, "disksDeleted": True, "retainedDisks": None}
    assert (await http.get("/v1/vms")).json() == {"items": []}


async def test_errors_are_problem_json_from_to_problem(http: httpx.AsyncClient) -> None:
    r = await http.get("/v1/vms/nope")
    body = is_problem(r, 404)
    assert body == NotFound(body["detail"]).to_problem()
    assert body["type"] == "urn:corral:not-found" and body["title"] == "Not Found"

    r = await http.post("/v1/vms", json=vm("b", maximumRam="lots"))
    body = is_problem(r, 422)
    assert body["type"] == "urn:corral:invalid-spec"
    assert [e["loc"] for e in body["errors"]] == ["spec.vm.maximumRam"]

    r = await http.put("/v1/vms/b", json=vm("c"))
    assert is_problem(r, 422)["errors"] == [
        {"loc": "metadata.name", "reason": "must be 'b' (the URL's name)"}
    ]
    r = await http.post("/v1/vms", content=b"{nope", headers={"content-type": "application/json"})
    assert is_problem(r, 422)["type"] == "urn:corral:invalid-request"
    r = await http.patch("/v1/vms/b", content=b"x", headers={"content-type": "text/plain"})
    assert is_problem(r, 415)["type"] == "about:blank"
    r = await http.post("/v1/vms/b/start", params={"for": "condition=Booted"})
    assert is_problem(r, 422)["errors"] == [{"loc": "for", "reason": "needs wait=SECONDS"}]


def test_to_problem_carries_field_paths_and_extra_members() -> None:
    err = SpecError("invalid VM document", [FieldIssue("spec.vm.disks[0].file.image", "gone")])
    assert err.to_problem() == {
        "type": "urn:corral:invalid-spec", "title": "Unprocessable Content", "status": 422,
        "detail": "invalid VM document",
        "errors": [{"loc": "spec.vm.disks[0].file.image", "reason": "gone"}],
    }  # fmt: skip
    locked = StoreUnavailable("the store is locked", reason="locked", retry_after=2)
    assert locked.to_problem()["reason"] == "locked" and "errors" not in locked.to_problem()


async def test_apply_creates_then_configures_on_the_server(http: httpx.AsyncClient) -> None:
    r = await http.post("/v1/apply", json=vm("web", currentCpus=1, maximumCpus=2))
    assert r.status_code == 201 and r.json()["action"] == "created"
    assert r.json()["vm"]["metadata"]["generation"] == 1

    r = await http.post("/v1/apply", json=vm("web", currentCpus=2, maximumCpus=2))
    assert r.status_code == 200 and r.json()["action"] == "configured"
    assert r.json()["vm"]["metadata"]["generation"] == 2
    assert (await http.get("/v1/vms/web")).json()["spec"]["vm"]["currentCpus"] == 2

    r = await http.post("/v1/apply", json=vm("web"), params={"adoptDisks": "old"})
    assert "only a new VM can adopt disks" in is_problem(r, 409)["detail"]
    r = await http.post("/v1/apply", json={"metadata": {}, "spec": {"vm": {}}})
    assert is_problem(r, 422)["errors"][0]["loc"] == "metadata.name"
    r = await http.post("/v1/apply", json=[1])
    assert is_problem(r, 422)["type"] == "urn:corral:invalid-request"


async def test_cd_media_insert_and_eject_change_one_drive(
    http: httpx.AsyncClient, tmp_path: Path
) -> None:
    iso = tmp_path / "tools.iso"
    iso.write_bytes(b"\0" * 2048)
    disks = [{"name": "root", "file": {"image": str(tmp_path / "root.qcow2")}},
             {"name": "cd", "cdrom": {"image": "", "interface": "ide"}}]  # fmt: skip
    assert (await http.post("/v1/vms", json=vm("m", disks=disks))).status_code == 201

    r = await http.post("/v1/vms/m/media", json={"image": str(iso)})
    assert r.status_code == 200, r.text
    got = r.json()
    assert (got["name"], got["drive"], got["image"]) == ("m", "cd", str(iso))
    saved = (await http.get("/v1/vms/m")).json()
    assert saved["spec"]["vm"]["disks"][1]["cdrom"] == {"image": str(iso), "interface": "ide"}
    assert saved["spec"]["vm"]["disks"][0]["file"]["image"] == str(tmp_path / "root.qcow2")
    assert saved["metadata"]["generation"] == 2

    r = await http.post("/v1/vms/m/media", json={"drive": "cd", "image": None})
    assert r.status_code == 200 and r.json()["image"] is None
    assert (await http.get("/v1/vms/m")).json()["spec"]["vm"]["disks"][1]["cdrom"]["image"] == ""

    assert (
        "no CD drive 'root'"
        in is_problem(
            await http.post("/v1/vms/m/media", json={"drive": "root", "image": str(iso)}), 404
        )["detail"]
    )
    is_problem(await http.post("/v1/vms/gone/media", json={"image": None}), 404)
    r = await http.post("/v1/vms/m/media", json={"image": None, "tray": "open"})
    assert is_problem(r, 422)["errors"][0]["loc"] == "tray"


async def test_bearer_auth_in_process(manager: Manager, tmp_path: Path) -> None:
    token = create_token(tmp_path / "tokens", "ci")
    app = BearerAuth(create_app(manager), TokenFile.load(tmp_path / "tokens"))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://corral") as http:
        assert (await http.get("/healthz")).status_code == 200
        body = is_problem(await http.get("/v1/vms"), 401)
        assert body["detail"] == "a bearer token is required"
        r = await http.get("/v1/vms", headers={"Authorization": "Bearer wrong"})
        assert is_problem(r, 401)["detail"] == "the token is not valid"
        r = await http.get("/v1/vms", headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 200 and r.json() == {"items": []}


def test_services_are_built_by_name_from_the_registry(tmp_path: Path) -> None:
    config = ManagerConfig(state_dir=tmp_path / "state")
    assert config.services == ("api",)
    assert service_factory("api") is service_from_config and set(SERVICES) >= {"api"}
    (service,) = build_services(["api", "api"], config, {"api": {"socket": None}})
    assert callable(service)
    with pytest.raises(SpecError) as caught:
        build_services(["api", "web2"], config)
    assert [str(i) for i in caught.value.issues] == [
        "services[1]: 'web2' is not a daemon service; choose from api, amqp, web"
    ]
    with pytest.raises(SpecError) as caught:
        build_services(["api"], config, {"api": {"listen": "127.0.0.1:0", "sokcet": "x"}})
    assert caught.value.issues[0].loc == "api.sokcet"
    with pytest.raises(SpecError) as caught:  # checked before anything starts
        build_services(["api"], config, {"api": {"listen": "127.0.0.1:8443"}})
    assert caught.value.issues[0].loc == "tokensFile"


async def test_vm_views_keep_the_json_byte_for_byte(
    http: httpx.AsyncClient, manager: Manager
) -> None:
    doc = vm("v")
    doc["metadata"]["labels"] = {"tier": "web"}
    assert (await http.post("/v1/apply", json=doc)).status_code in (200, 201)
    # the reconciler writes the new VM's status (updatedAt) once, at its own pace: read
    # until the response and the record agree, then byte for byte
    for _ in range(100):
        await manager._writeback.settle()
        r = await http.get("/v1/vms/v")
        sent = manager.get("v").to_json()
        if r.json() == sent:
            break
        await asyncio.sleep(0.05)
    # the response model changes nothing on the wire: the record's JSON, key for key
    assert r.content.decode() == json.dumps(
        sent, ensure_ascii=False, allow_nan=False, separators=(",", ":")
    )
    view = VmView.model_validate(r.json())
    assert (view.name, view.metadata.labels, view.status.state) == ("v", {"tier": "web"}, "Stopped")
    assert view.status.desired_state == "Stopped" and view.status.ips == []
    assert json.dumps(view.to_json()) == json.dumps(r.json())  # -o json stays as it was
    assert view["metadata"]["name"] == "v" and view.get("nope") is None  # the dict reading
    listed = (await http.get("/v1/vms")).json()["items"]
    assert [json.dumps(i) for i in listed] == [json.dumps(r.json())]
    event = VmEvent.model_validate({"id": 3, "vm": "v", "time": "t", "event": "Created", "x": 1})
    assert event.event == "Created" and event.to_json()["x"] == 1


async def test_one_vms_odd_status_never_fails_the_list(
    http: httpx.AsyncClient, manager: Manager
) -> None:
    """A status a runner of another version wrote (or a damaged status file) with members of
    the wrong type: the list of every VM and the VM itself still answer, with the JSON as it
    was stored; the typed fields leave out only what they cannot read."""
    for name in ("good", "odd"):
        assert (await http.post("/v1/vms", json=vm(name))).status_code == 201
    odd = {"state": "Running", "ips": "10.0.0.1", "conditions": [], "exit": "x", "cpus": 2,
           "pendingRestart": {"a": 1}}  # fmt: skip
    await manager.store.run(manager.store.write_back, [], {"odd": odd})
    r = await http.get("/v1/vms")
    assert r.status_code == 200, r.text
    items = {v["metadata"]["name"]: v for v in r.json()["items"]}
    assert {k: items["odd"]["status"][k] for k in odd} == odd
    r = await http.get("/v1/vms/odd")
    assert r.status_code == 200 and r.json()["status"]["ips"] == "10.0.0.1"
    view = VmView.model_validate(r.json())
    assert view.status.state == "Running" and view.status.cpus == 2
    assert view.status.ips == [] and view.status.conditions == {}  # not read, not invented
    assert view.to_json()["status"]["ips"] == "10.0.0.1"
    r = await http.patch("/v1/vms/odd", json={"metadata": {"labels": {"a": "b"}}},
                         headers={"content-type": "application/merge-patch+json"})  # fmt: skip
    assert r.status_code == 200, r.text  # a change answers with the view too
