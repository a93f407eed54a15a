"""``kubectl apply`` for VM documents, on the server: create the VM a document names, or
replace its document. Shared by every interface (REST ``POST /v1/apply`` and ``PUT``; message
replies next), so that each creates, replaces, checks versions and strips what the server owns
the same way."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from corral.errors import Conflict, SpecError
from corral.manager.manager import Manager
from corral.manager.store import VmRecord

__all__ = ["apply_document", "replacement"]

_SERVER_OWNED = ("uid", "generation", "creationTimestamp")


def replacement(name: str, doc: Mapping[str, Any]) -> tuple[dict[str, Any], str | None]:
    """A whole document for the VM ``name``: its name, checked, and the ``resourceVersion``
    it was read at; what the server owns (uid, generation, status...) dropped."""
    meta = doc.get("metadata")
    if not isinstance(meta, dict):
        raise SpecError.single("metadata", f"is required (a mapping with name: {name})")
    if meta.get("name", name) != name:
        raise SpecError.single("metadata.name", f"must be {name!r} (the URL's name)")
    meta = {k: v for k, v in meta.items() if k not in _SERVER_OWNED}
    version = meta.pop("resourceVersion", None)
    body = {k: v for k, v in doc.items() if k != "status"}
    body["metadata"] = {**meta, "name": name}
    return body, str(version) if version is not None else None


async def apply_document(
    manager: Manager, doc: Mapping[str, Any], *, adopt_disks: str | None = None
) -> tuple[Literal["created", "configured"], VmRecord]:
    """Create the VM ``metadata.name`` names, or replace its document (at
    ``metadata.resourceVersion`` when given). ``adopt_disks`` only for a VM it creates."""
    meta = doc.get("metadata")
    name = meta.get("name") if isinstance(meta, dict) else None
    if not isinstance(name, str) or not name:
        where = "metadata.name" if isinstance(meta, dict) else "metadata"
        raise SpecError.single(where, "is required: apply finds the VM by metadata.name")
    if manager.store.find(name) is None:
        return "created", await manager.create(doc, adopt_disks=adopt_disks)
    if adopt_disks is not None:
        raise Conflict(f"VM {name!r} exists: only a new VM can adopt disks")
    body, version = replacement(name, doc)
    return "configured", await manager.replace(body, version)
