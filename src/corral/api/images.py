"""``/v1/images`` (import by URL or host path, upload, delete) and ``/v1/disks`` (the data
dirs deleted VMs left behind)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel
from starlette.requests import ClientDisconnect

from corral.api.permissions import visible_name
from corral.api.problems import ProblemError
from corral.api.session import principal_of
from corral.manager import Manager

__all__ = ["ImageImportRequest", "image_routes"]


class ImageImportRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", alias_generator=to_camel, populate_by_name=True)

    name: str = Field(min_length=1, max_length=128)
    source: str = Field(min_length=1, max_length=8192)
    checksum: str | None = Field(default=None, max_length=200)
    replace: bool = False


def image_routes(manager: Manager) -> APIRouter:
    router = APIRouter()

    @router.get("/v1/images", tags=["images"])
    async def list_images(request: Request) -> dict[str, list[dict[str, Any]]]:
        """Every image; ``users``: the VMs using it that the caller may see."""
        who = principal_of(request)
        return {
            "items": [
                {**img.to_json(), "users": [u for u in users if visible_name(who, manager, u)]}
                for img, users in manager.list_images()
            ]
        }

    @router.post("/v1/images", status_code=201, tags=["images"])
    async def import_image(body: ImageImportRequest) -> dict[str, Any]:
        """Import (download, or copy a host path inside the policy's ``imagePaths``: 403
        otherwise) and verify an image; progress is published as ``ImageImportProgress``
        events on ``/v1/events?follow=true``."""
        record = await manager.import_image(
            body.name, body.source, checksum=body.checksum, replace=body.replace
        )
        return record.to_json()

    @router.put(
        "/v1/images/{name}",
        status_code=201,
        tags=["images"],
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}
                },
            }
        },
    )
    async def upload_image(
        name: str,
        request: Request,
        checksum: Annotated[str | None, Query(max_length=200)] = None,
        replace: bool = False,
        filename: Annotated[
            str | None, Query(max_length=255, pattern=r"^[^\x00-\x1f\x7f/]+$")
        ] = None,
    ) -> dict[str, Any]:
        """Upload an image's bytes (``application/octet-stream``, streamed to the store, no
        size cap): verified and published like an import; the client's own file, never a
        path the daemon opens."""
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind != "application/octet-stream":
            raise ProblemError(415, f"send application/octet-stream, not {kind or 'nothing'}")
        length = request.headers.get("content-length", "").strip()
        total = int(length) if length.isdigit() and len(length) <= 18 else None
        try:
            record = await manager.upload_image(
                name, request.stream(), total=total, filename=filename, checksum=checksum,
                replace=replace,
            )  # fmt: skip
        except ClientDisconnect:
            raise ProblemError(400, "the client left before the upload was complete") from None
        return record.to_json()

    @router.delete("/v1/images/{name}", tags=["images"])
    async def delete_image(name: str) -> dict[str, Any]:
        await manager.delete_image(name)
        return {"name": name, "deleted": True}

    @router.get("/v1/disks", tags=["disks"])
    async def list_disks() -> dict[str, list[dict[str, object]]]:
        """Data dirs of deleted VMs (disks, UUID, TPM, firmware vars), kept until deleted or
        adopted (``POST /v1/vms?adoptDisks=ID``)."""
        return {"items": [r.to_json() for r in manager.list_retained()]}

    @router.delete("/v1/disks/{id}", tags=["disks"])
    async def delete_disks(id: str) -> dict[str, Any]:
        removed = await manager.delete_retained(id)
        return {"id": removed.id, "deleted": True}

    return router
