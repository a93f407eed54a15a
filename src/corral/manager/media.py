"""CD media, changed on the server: the one read-modify-write of a VM document that used to
live in every client (the CLI read the whole document, changed one drive, wrote it all back).

Shared by every interface (REST, the message API's `set-cd`): find the CD drive, set its
image, replace the document at the version it was read at, and read again if another writer
came in between. A running VM's supervisor then swaps the medium live (the declarative way:
the spec changes, the runner applies it)."""

from __future__ import annotations

from typing import Any

from corral.errors import NotFound, VersionConflict
from corral.manager.manager import Manager
from corral.manager.store import VmRecord

__all__ = ["set_cd_media"]

_ATTEMPTS = 20


def _with_media(body: dict[str, Any], name: str, drive: str | None, image: str) -> str:
    disks = ((body.get("spec") or {}).get("vm") or {}).get("disks") or []
    cdroms = [(i, d) for i, d in enumerate(disks) if isinstance(d, dict) and "cdrom" in d]
    if drive is not None:
        cdroms = [(i, d) for i, d in cdroms if (d.get("name") or f"disk{i}") == drive]
    if not cdroms:
        raise NotFound(f"VM {name!r} has no CD drive" + (f" {drive!r}" if drive else ""))
    index, disk = cdroms[0]
    disk["cdrom"] = {**(disk["cdrom"] or {}), "image": image}
    return str(disk.get("name") or f"disk{index}")


async def set_cd_media(
    manager: Manager, name: str, image: str | None, *, drive: str | None = None
) -> tuple[str, VmRecord]:
    """Put ``image`` (a host path or image name; None or "": eject) into the VM's CD drive
    ``drive`` (its disk name; None: the first CD drive). Returns the drive's name and the VM
    as written. NotFound for a VM without such a drive."""
    for attempt in range(_ATTEMPTS):
        current = manager.get(name)
        body = current.document.model_dump(mode="json", by_alias=True, exclude_none=True)
        used = _with_media(body, name, drive, image or "")
        try:
            return used, await manager.replace(body, current.resource_version)
        except VersionConflict:
            if attempt == _ATTEMPTS - 1:
                raise
    raise AssertionError("unreachable")  # pragma: no cover
