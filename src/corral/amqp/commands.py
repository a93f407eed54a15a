"""What each aetherscale command does to corral's manager, and its answer in aetherscale's
response fields (``status``, ``vm-id``, ``hint``).

Every command returns once the manager has taken it: the desired state (or the new VM, or the
deletion) is in the store, so the message may be acknowledged. Like aetherscale it answers
``starting`` for a start and ``stopped``/``killed`` for a stop without waiting for the guest;
what the VM then does is in ``list-vms`` (and corral's own status and events).

The meaning of each verb (which lifecycle call, whether a delete takes the disks) is
:mod:`corral.spec.aetherscale`'s, shared with the CLI's aliases.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Awaitable, Callable
from typing import Any

from corral.amqp.protocol import Request
from corral.errors import Conflict, FieldIssue, SpecError
from corral.manager import Manager
from corral.manager.media import set_cd_media
from corral.manager.store import VmRecord
from corral.spec.aetherscale import VERBS, create_document, new_vm_name

__all__ = ["ACTIVE_STATES", "REQUEST_ANNOTATION", "Claim", "Commands", "create_name", "vm_name_for"]

ACTIVE_STATES = frozenset({"Starting", "Running", "Stopping"})
REQUEST_ANNOTATION = "corral.amqp/request"
"""On a VM made by ``create-vm``: the digest of the request's id, so a redelivered create that
finds it (after a crash between the store write and the request log) answers as the first did."""


def request_digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:32]


def vm_name_for(key: str | None) -> str:
    """The name of the VM a ``create-vm`` makes: derived from the request's id when it has one
    (the same request names the same VM, however often it is delivered), else aetherscale's
    random ``vm-<6 hex>``."""
    return f"vm-{request_digest(key)[:8]}" if key else new_vm_name()


def create_name(request: Request, key: str | None) -> str | None:
    """The name of the VM a create will make, when it is known before: a ``create``'s
    ``metadata.name``, a ``create-vm``'s name from its request id (None without an id: a
    random name, made by :meth:`Commands.create_vm`)."""
    if request.command == "create-vm":
        return vm_name_for(key) if key else None
    if request.command == "create":
        meta = request.object("document").get("metadata")
        name = meta.get("name") if isinstance(meta, dict) else None
        return name if isinstance(name, str) and name else None
    return None


Claim = Callable[[str], Awaitable[None]]
"""Claims (or releases) a VM name on the bus for this host (:class:`corral.amqp.service`)."""


async def _no_claim(name: str) -> None:
    return None


class Commands:
    """aetherscale's commands on ``manager``; ``claim`` is called with a VM's name before it is
    created (so no other host creates it too), ``release`` when it is gone or its create
    failed."""

    def __init__(self, manager: Manager, claim: Claim = _no_claim,
                 release: Claim = _no_claim) -> None:  # fmt: skip
        self.manager = manager
        self.claim = claim
        self.release = release

    async def _create(self, document: dict[str, Any]) -> VmRecord:
        """``manager.create(document)`` with its name claimed first and released again
        when no VM of that name is left in this host's store."""
        meta = document.get("metadata")
        name = meta.get("name") if isinstance(meta, dict) else None
        if not isinstance(name, str) or not name:
            return await self.manager.create(document)
        await self.claim(name)
        try:
            return await self.manager.create(document)
        except BaseException:
            if self.manager.store.find(name) is None:
                await self.release(name)
            raise

    async def run(self, request: Request, key: str | None = None) -> Any:
        """Carry ``request`` out (``key``: its message or correlation id, if any); its
        ``response``, or a :class:`~corral.errors.CorralError`."""
        if request.command == "list-vms":
            return self.list_vms()
        if request.command == "create-vm":
            return await self.create_vm(request, key)
        if request.command == "create":
            return await self.create(request.object("document"), key)
        name = request.text("vm-id")
        if request.command == "start-vm":
            return await self.start_vm(name)
        if request.command == "stop-vm":
            return await self.stop_vm(name, kill=request.flag("kill"))
        if request.command == "get":
            return self.manager.get(name).to_json()
        if request.command == "patch":
            return (await self.manager.patch(name, request.object("patch"))).to_json()
        if request.command == "set-cd":
            image, drive = request.media()
            # REST's POST /v1/vms/{name}/media: the same call, the same answer
            used, record = await set_cd_media(self.manager, name, image, drive=drive)
            return {"name": name, "drive": used, "image": image, "vm": record.to_json()}
        return await self.delete_vm(name)

    async def create(self, document: dict[str, Any], key: str | None) -> dict[str, Any]:
        """corral's ``create``: a whole VM document, validated and admitted as REST's
        ``POST /v1/vms``; the response is the VM as REST shows it."""
        doc = copy.deepcopy(document)
        if key is not None:
            meta = doc.get("metadata")
            if isinstance(meta, dict):
                notes = meta.get("annotations")
                meta["annotations"] = {**(notes if isinstance(notes, dict) else {}),
                                       REQUEST_ANNOTATION: request_digest(key)}  # fmt: skip
        try:
            return (await self._create(doc)).to_json()
        except Conflict:
            meta = doc.get("metadata")
            name = meta.get("name") if isinstance(meta, dict) else None
            existing = self.manager.store.find(name) if isinstance(name, str) else None
            if (
                key is None
                or existing is None
                or (
                    existing.document.metadata.annotations.get(REQUEST_ANNOTATION)
                    != request_digest(key)
                )
            ):
                raise
            return existing.to_json()

    def list_vms(self) -> list[dict[str, Any]]:
        """Every VM: aetherscale's ``vm-id`` and ``ip-addresses``, and corral's ``state``."""
        return [
            {"vm-id": r.name, "ip-addresses": list(r.status.get("ips") or []),
             "state": r.status.get("state", "Stopped")}
            for r in self.manager.list_vms()
        ]  # fmt: skip

    async def create_vm(self, request: Request, key: str | None) -> dict[str, Any]:
        image = request.text("image")
        if "/" in image or image in (".", ".."):
            raise SpecError(
                "invalid create-vm request",
                [FieldIssue("options.image", "must name an image in the image store")],
            )
        name = create_name(request, key) or vm_name_for(None)
        document = create_document(image, name)
        if key is not None:
            document["metadata"]["annotations"] = {REQUEST_ANNOTATION: request_digest(key)}
        try:
            await self._create(document)
        except Conflict:
            existing = self.manager.store.find(name)
            mark = existing.document.metadata.annotations if existing is not None else {}
            if key is None or mark.get(REQUEST_ANNOTATION) != request_digest(key):
                raise
        return {"status": "starting", "vm-id": name}

    async def start_vm(self, name: str) -> dict[str, Any]:
        record = self.manager.get(name)
        response: dict[str, Any] = {"status": "starting", "vm-id": name}
        if record.desired == "Running" and record.status.get("state") in ACTIVE_STATES:
            response["hint"] = f'VM "{name}" was already started'
            return response
        await self.manager.start(name)
        return response

    async def stop_vm(self, name: str, *, kill: bool) -> dict[str, Any]:
        record = self.manager.get(name)
        verb = VERBS["stop-vm"]
        response: dict[str, Any] = {"status": "killed" if kill else "stopped", "vm-id": name}
        if record.desired != "Running" and record.status.get("state") not in ACTIVE_STATES:
            response["hint"] = f'VM "{name}" was not running'
            return response
        if kill and verb.hard_action == "kill":
            await self.manager.kill(name)
        else:
            await self.manager.stop(name)
        return response

    async def delete_vm(self, name: str) -> dict[str, Any]:
        verb = VERBS["delete-vm"]
        await self.manager.delete(name, delete_disks=verb.delete_disks, force=True)
        if self.manager.store.find(name) is None:
            await self.release(name)  # its commands are 404 at once, not after the event
        return {"status": "deleted", "vm-id": name}
