"""``/v1/vms``: the VM documents (list, create, read, replace, merge-patch, delete) and their
lifecycle (start, stop, restart, reset, kill, wait)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Body, Query, Request, Response
from pydantic import BaseModel, ConfigDict, Field

from corral.api.permissions import Action, may, may_apply, visible
from corral.api.problems import json_body, vm_document
from corral.api.session import principal_of
from corral.api.users import Principal
from corral.errors import FieldIssue, SpecError
from corral.manager import Manager, VmRecord, WaitTarget
from corral.manager.apply import apply_document, replacement
from corral.manager.media import set_cd_media
from corral.spec.views import VmView

__all__ = [
    "Applied", "MediaChanged", "MediaRequest", "VmDoc", "VmList", "replacement", "vm_routes",
]  # fmt: skip

VmDoc = dict[str, Any]
Wait = Annotated[float | None, Query(gt=0, le=86400, description="seconds to wait")]
_FOR = "what to wait for: state=STATE or condition=CONDITION[=false]"
Until = Annotated[str | None, Query(alias="for", max_length=64, description=_FOR)]
WaitTimeout = Annotated[float, Query(gt=0, le=86400, description="seconds to wait")]


class VmList(BaseModel):
    items: list[VmView]


class Applied(BaseModel):
    action: Literal["created", "configured"]
    vm: VmView


class MediaChanged(BaseModel):
    name: str
    drive: str
    image: str | None
    vm: VmView


class MediaRequest(BaseModel):
    """``POST /v1/vms/{name}/media``: ``image`` (a host path or an image name; null or "":
    eject) into the CD drive ``drive`` (its disk name; null: the first CD drive)."""

    model_config = ConfigDict(extra="forbid")

    drive: str | None = Field(default=None, min_length=1, max_length=63)
    image: str | None = Field(default=None, max_length=4096)


def _vm(record: VmRecord, who: Principal | None = None) -> VmDoc:
    """The VM as ``who`` may read it: its cloud-init data (passwords, keys) only for whom may
    author the document (``"*"``), not for whom may only start it or see its console."""
    doc = record.to_json()
    if who is not None and not may(who, record, Action.ALL):
        doc.get("spec", {}).pop("cloudInit", None)
    return doc


def _until(until: str | None, wait: float | None) -> WaitTarget | None:
    """``?for=`` of start/restart, checked before anything is done."""
    if until is None:
        return None
    if wait is None:
        raise SpecError("invalid wait", [FieldIssue("for", "needs wait=SECONDS")])
    return WaitTarget.parse(until)


def vm_routes(manager: Manager) -> APIRouter:
    router = APIRouter()

    @router.get("/v1/vms", tags=["vms"])
    async def list_vms(
        request: Request,
        state: Annotated[str | None, Query(max_length=32)] = None,
        label: Annotated[str | None, Query(max_length=317)] = None,
    ) -> VmList:
        """The VMs the caller may see (anything granted on them: spec.permissions)."""
        who = principal_of(request)
        records = manager.list_vms(state=state, label=label)
        return VmList(items=[_vm(r, who) for r in records if visible(who, r)])

    @router.post("/v1/vms", status_code=201, tags=["vms"], response_model=VmView)
    async def create_vm(
        document: Annotated[VmDoc, Body()],
        adopt_disks: Annotated[str | None, Query(alias="adoptDisks", max_length=80)] = None,
    ) -> VmDoc:
        """``adoptDisks``: a retained set (``GET /v1/disks``) becomes the new VM's data dir."""
        return _vm(await manager.create(vm_document(document), adopt_disks=adopt_disks))

    @router.get("/v1/vms/{name}", tags=["vms"], response_model=VmView)
    async def get_vm(name: str, request: Request) -> VmDoc:
        return _vm(manager.get(name), principal_of(request))

    @router.put("/v1/vms/{name}", tags=["vms"], response_model=VmView)
    async def replace_vm(name: str, document: Annotated[VmDoc, Body()]) -> VmDoc:
        doc, version = replacement(name, vm_document(document))
        return _vm(await manager.replace(doc, version))

    @router.patch(
        "/v1/vms/{name}",
        tags=["vms"],
        response_model=VmView,
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "application/merge-patch+json": {"schema": {"type": "object"}},
                    "application/json": {"schema": {"type": "object"}},
                },
            }
        },
    )
    async def patch_vm(name: str, request: Request) -> VmDoc:
        """A JSON merge patch (RFC 7386); ``metadata.resourceVersion`` makes it conditional."""
        patch = vm_document(await json_body(request))
        meta = patch.get("metadata")
        version = None
        if isinstance(meta, dict):
            meta = dict(meta)
            version = meta.pop("resourceVersion", None)
            patch = {**patch, "metadata": meta}
        return _vm(await manager.patch(name, patch, None if version is None else str(version)))

    @router.delete("/v1/vms/{name}", tags=["vms"])
    async def delete_vm(
        name: str,
        delete_disks: Annotated[bool, Query(alias="deleteDisks")] = False,
        force: bool = False,
    ) -> dict[str, Any]:
        retained = await manager.delete(name, delete_disks=delete_disks, force=force)
        return {
            "name": name,
            "deleted": True,
            "disksDeleted": delete_disks,
            "retainedDisks": retained.id if retained is not None else None,
        }

    @router.post("/v1/apply", tags=["vms"], response_model=Applied, responses={201: {}})
    async def apply_vm(
        document: Annotated[VmDoc, Body()],
        request: Request,
        response: Response,
        adopt_disks: Annotated[str | None, Query(alias="adoptDisks", max_length=80)] = None,
    ) -> dict[str, Any]:
        """Create the VM ``metadata.name`` names (201), or replace its document (200; at
        ``metadata.resourceVersion`` when given), like ``kubectl apply``: ``{"action":
        "created"|"configured", "vm": ...}``. ``adoptDisks`` only for a VM it creates.
        Replacing needs ``"*"`` on the VM, creating one role admin."""
        may_apply(principal_of(request), manager, vm_document(document))
        action, record = await apply_document(
            manager, vm_document(document), adopt_disks=adopt_disks
        )
        if action == "created":
            response.status_code = 201
        return {"action": action, "vm": _vm(record)}

    @router.post("/v1/vms/{name}/media", tags=["vms"], response_model=MediaChanged)
    async def set_media(name: str, body: MediaRequest) -> dict[str, Any]:
        """Insert (``image``) or eject (``image: null``) CD media: the server changes that
        one drive of the document (a running VM swaps it live) and answers ``{"name",
        "drive", "image", "vm"}``; 404 for a VM without such a CD drive."""
        drive, record = await set_cd_media(manager, name, body.image, drive=body.drive)
        return {"name": name, "drive": drive, "image": body.image or None, "vm": _vm(record)}

    @router.post("/v1/vms/{name}/start", tags=["lifecycle"], response_model=VmView)
    async def start_vm(
        name: str, request: Request, wait: Wait = None, until: Until = None
    ) -> VmDoc:
        """``?wait=SECONDS`` waits until Running, or until ``for`` holds
        (``for=condition=Booted``)."""
        target = _until(until, wait)
        await manager.start(name, wait=None if target else wait)
        if target is not None and wait is not None:
            return _vm(await manager.wait(name, target, wait), principal_of(request))
        return _vm(manager.get(name), principal_of(request))

    @router.get("/v1/vms/{name}/wait", tags=["lifecycle"], response_model=VmView)
    async def wait_vm(
        name: str, request: Request, until: Until, timeout: WaitTimeout = 30
    ) -> VmDoc:
        """The VM once ``for`` holds (``kubectl wait``): event-driven, answered as soon as the
        status that meets it is written; 504 saying where the VM is after ``timeout``."""
        if until is None:
            raise SpecError("invalid wait", [FieldIssue("for", "is required")])
        return _vm(
            await manager.wait(name, WaitTarget.parse(until), timeout), principal_of(request)
        )

    @router.post("/v1/vms/{name}/stop", tags=["lifecycle"], response_model=VmView)
    async def stop_vm(name: str, request: Request, wait: Wait = None) -> VmDoc:
        await manager.stop(name, wait=wait)
        return _vm(manager.get(name), principal_of(request))

    @router.post("/v1/vms/{name}/restart", tags=["lifecycle"], response_model=VmView)
    async def restart_vm(
        name: str, request: Request, wait: Wait = None, until: Until = None
    ) -> VmDoc:
        target = _until(until, wait)
        await manager.restart(name, wait=None if target else wait)
        if target is not None and wait is not None:
            return _vm(await manager.wait(name, target, wait), principal_of(request))
        return _vm(manager.get(name), principal_of(request))

    @router.post("/v1/vms/{name}/reset", tags=["lifecycle"], response_model=VmView)
    async def reset_vm(name: str, request: Request) -> VmDoc:
        await manager.reset(name)
        return _vm(manager.get(name), principal_of(request))

    @router.post("/v1/vms/{name}/kill", tags=["lifecycle"], response_model=VmView)
    async def kill_vm(name: str, request: Request) -> VmDoc:
        await manager.kill(name)
        return _vm(manager.get(name), principal_of(request))

    return router
