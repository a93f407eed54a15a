"""Retained disks: the data of deleted VMs, kept until the user adopts or deletes it.

A VM's data dir (``<vms>/<name>``: its qcow2 overlays, the persisted UUID, OVMF vars, TPM
state, cloud-init seed) belongs to that VM, not to its name. Deleting a VM without its disks
moves the whole dir aside, by one ``rename`` on the same filesystem, with a small record; a new
VM of the same name starts with an empty data dir (a fresh UUID, fresh overlays, TPM and
firmware vars), so it never sees the old guest's data. Nothing here deletes data unasked: a
retained set stays until the user deletes it, or adopts it into a new VM, whose data dir it
then becomes (again by one rename)::

    <vms>/web1/                      ── delete web1 ──────────►  <vms>/.retained/web1.3f9a0c1e/
    <vms>/.retained/web1.3f9a0c1e/   ── create web2 --adopt ──►  <vms>/web2/
    <vms>/.retained/web1.3f9a0c1e/   ── disk delete ──────────►  (gone)

A set's id is ``<vm>.<8 hex>``; VM names are DNS-1123 labels, so ``.retained`` is never a VM's
dir. The record (``retained.json`` in the set) says which VM left it, its UUID and when; what
the record lacks (a crash between the rename and its write) is read from the set itself.
Removal first renames the set to a hidden name, so a set being removed can no longer be
adopted, then deletes it off the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import re
import secrets
import shutil
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from corral.errors import Conflict, HostError, NotFound
from corral.host.atomic import ensure_private_dir
from corral.host.chain import ChainError, read_qcow2
from corral.runner.status import now_iso, write_atomic
from corral.spec.models import DNS1123_LABEL

__all__ = ["RECORD_FILE", "RetainedDisk", "RetainedDisks", "RetainedSet"]

RECORD_FILE = "retained.json"
_AREA = ".retained"
_ID = re.compile(r"(?P<vm>[a-z0-9](?:[-a-z0-9]{0,61}[a-z0-9])?)\.[0-9a-f]{8}")
_MAX_RECORD = 64 * 1024


@dataclass(frozen=True)
class RetainedDisk:
    """One disk file of a retained set: ``bytes`` on the host, ``virtual_size`` the guest's,
    ``backing_file`` the base image its overlay needs (so that image is not deleted)."""

    name: str
    bytes: int
    virtual_size: int
    backing_file: str | None = None

    def to_json(self) -> dict[str, str | int | None]:
        return {"name": self.name, "bytes": self.bytes, "virtualSize": self.virtual_size,
                "backingFile": self.backing_file}  # fmt: skip


@dataclass(frozen=True)
class RetainedSet:
    """The data dir a deleted VM left behind."""

    id: str
    vm: str
    uuid: str | None
    deleted_at: str
    path: Path
    disks: tuple[RetainedDisk, ...]
    bytes: int

    def to_json(self) -> dict[str, object]:
        """camelCase, as the REST API and ``corral disk list -o json`` show it."""
        return {
            "id": self.id,
            "vm": self.vm,
            "uuid": self.uuid,
            "deletedAt": self.deleted_at,
            "disks": [d.to_json() for d in self.disks],
            "bytes": self.bytes,
            "path": str(self.path),
        }


class RetainedDisks:
    """The retained area of one VM data root (``<vms>/.retained``) and the moves in and out.

    Every method is synchronous and short (renames and stats) except the removals, which are
    awaited: a manager calls the moves between its checks and its store write without yielding.
    """

    def __init__(self, data_root: Path) -> None:
        self.data_root = data_root
        self.root = data_root / _AREA

    def data_dir(self, name: str) -> Path:
        return self.data_root / name

    # --- moving data in ------------------------------------------------------------------

    def retain(self, name: str) -> RetainedSet | None:
        """Move VM ``name``'s data dir aside, whole, by one rename. None if it has no data
        (an empty dir is removed). The VM must be stopped and forgotten by its backend."""
        source = self.data_dir(name)
        if not _has_entries(source):
            with contextlib.suppress(OSError):
                source.rmdir()
            return None
        ensure_private_dir(self.root)
        set_id = f"{name}.{secrets.token_hex(4)}"
        target = self.root / set_id
        vm_uuid = _read_uuid(source)
        try:
            os.rename(source, target)
        except OSError as exc:
            raise HostError(f"cannot move {source} aside to {target}: {exc}") from exc
        found = RetainedSet(
            set_id, name, vm_uuid, now_iso(), target, _disks(target), _tree_bytes(target)
        )
        _write_record(found)
        return found

    def retain_orphans(self, known: set[str]) -> list[RetainedSet]:
        """Retain the data dir of every name that is no VM (left by a corral that kept data
        dirs in place, or by a crash): a VM created later under that name starts empty."""
        try:
            entries = sorted(self.data_root.iterdir())
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise HostError(f"cannot list {self.data_root}: {exc}") from exc
        found = []
        for entry in entries:
            name = entry.name
            if name in known or not DNS1123_LABEL.fullmatch(name) or not _real_dir(entry):
                continue
            retained = self.retain(name)
            if retained is not None:
                found.append(retained)
        return found

    async def release(self, name: str, *, delete: bool) -> RetainedSet | None:
        """A deleted VM's data dir: retained unless ``delete`` (then it is removed).

        Every backend's ``forget`` calls this, so where deleted data goes is decided once."""
        if not delete:
            return self.retain(name)
        source = self.data_dir(name)
        if source.is_symlink() or not source.exists():
            return None
        await self._remove(source)
        return None

    # --- reading -------------------------------------------------------------------------

    def all(self) -> list[RetainedSet]:
        """Every retained set, oldest first."""
        try:
            entries = list(self.root.iterdir())
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise HostError(f"cannot list {self.root}: {exc}") from exc
        found = [_load(e) for e in entries if _ID.fullmatch(e.name) and _real_dir(e)]
        return sorted(found, key=lambda r: (r.deleted_at, r.id))

    def get(self, ref: str) -> RetainedSet:
        """A set by its id, or by the name of the VM that left it if it left only one."""
        if _ID.fullmatch(ref):
            path = self.root / ref
            if _real_dir(path):
                return _load(path)
        elif DNS1123_LABEL.fullmatch(ref):
            matches = [r for r in self.all() if r.vm == ref]
            if len(matches) == 1:
                return matches[0]
            if matches:
                ids = ", ".join(r.id for r in matches)
                raise Conflict(f"VM {ref!r} left {len(matches)} retained disk sets ({ids}); "
                               "name one by its id")  # fmt: skip
        raise NotFound(f"no retained disks {ref!r} (corral disk list)")

    # --- moving data out -----------------------------------------------------------------

    def adopt(self, ref: str, name: str) -> RetainedSet:
        """Make set ``ref`` the data dir of VM ``name`` (one rename): its disks, UUID, TPM
        and firmware vars come back. Conflict if that data dir holds anything."""
        found = self.get(ref)
        target = self.data_dir(name)
        if _has_entries(target) or target.is_symlink():
            raise Conflict(
                f"the data dir of VM {name!r} ({target}) is not empty; "
                f"cannot adopt retained disks {found.id!r} into it"
            )
        try:
            self.data_root.mkdir(parents=True, exist_ok=True)
            os.rename(found.path, target)
        except FileNotFoundError as exc:
            raise NotFound(f"retained disks {found.id!r} are gone (corral disk list)") from exc
        except OSError as exc:
            if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
                raise Conflict(f"the data dir of VM {name!r} ({target}) is not empty") from exc
            raise HostError(f"cannot move {found.path} to {target}: {exc}") from exc
        with contextlib.suppress(OSError):
            (target / RECORD_FILE).unlink(missing_ok=True)
        return found

    def unadopt(self, found: RetainedSet, name: str) -> None:
        """Undo :meth:`adopt` (the VM could not be created): the set is retained again."""
        target = self.data_dir(name)
        try:
            os.rename(target, found.path)
        except OSError as exc:
            raise HostError(f"cannot move {target} back to {found.path}: {exc}") from exc
        _write_record(found)

    async def delete(self, ref: str) -> RetainedSet:
        """Remove a retained set for good (only ever on the user's request)."""
        found = self.get(ref)
        await self._remove(found.path)
        return found

    async def _remove(self, path: Path) -> None:
        ensure_private_dir(self.root)
        trash = self.root / f".trash-{path.name}-{secrets.token_hex(4)}"
        try:
            os.rename(path, trash)
        except FileNotFoundError as exc:
            raise NotFound(f"{path} is gone") from exc
        except OSError as exc:
            raise HostError(f"cannot remove {path}: {exc}") from exc
        await asyncio.to_thread(shutil.rmtree, trash, ignore_errors=True)
        if trash.exists():
            raise HostError(f"could not remove all of {trash}")


def _real_dir(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink()


def _has_entries(path: Path) -> bool:
    try:
        with os.scandir(path) as entries:
            return any(True for _ in entries)
    except (FileNotFoundError, NotADirectoryError):
        return False
    except OSError as exc:
        raise HostError(f"cannot read {path}: {exc}") from exc


def _read_uuid(directory: Path) -> str | None:
    try:
        with open(directory / "uuid", "rb") as f:
            return str(uuid.UUID(f.read(64).decode().strip()))
    except (OSError, ValueError):
        return None


def _qcow2_header(path: Path, on_disk: int) -> tuple[int, str | None]:
    """A qcow2's guest-visible size and backing file name, from its header (no qemu-img:
    listing stays cheap); for anything else its length and None."""
    try:
        header = read_qcow2(str(path))
    except ChainError:
        return on_disk, None
    if header is None:
        return on_disk, None
    return header.virtual_size, header.backing


def _disks(directory: Path) -> tuple[RetainedDisk, ...]:
    """The VM's disk overlays (``<disk>.qcow2``) with their sizes."""
    found = []
    for entry in sorted(directory.glob("*.qcow2")):
        try:
            st = entry.lstat()
        except OSError:
            continue
        if entry.is_file() and not entry.is_symlink():
            found.append(
                RetainedDisk(entry.name, st.st_blocks * 512, *_qcow2_header(entry, st.st_size))
            )
    return tuple(found)


def _tree_bytes(directory: Path) -> int:
    """Bytes the set occupies on the host (allocated blocks: overlays are sparse)."""
    total = 0
    for root, _dirs, files in os.walk(directory):
        for name in files:
            if name == RECORD_FILE and root == str(directory):
                continue
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
    return total


def _write_record(found: RetainedSet) -> None:
    """The set is retained whether or not its record gets written (:func:`_load` copes)."""
    record = {k: v for k, v in found.to_json().items() if k not in ("path", "bytes")}
    with contextlib.suppress(OSError):
        write_atomic(found.path / RECORD_FILE, json.dumps(record, indent=2).encode(), 0o600)


def _load(path: Path) -> RetainedSet:
    match = _ID.fullmatch(path.name)
    assert match is not None
    record: dict[str, object] = {}
    try:
        with open(path / RECORD_FILE, "rb") as f:
            loaded = json.loads(f.read(_MAX_RECORD))
        if isinstance(loaded, dict):
            record = loaded
    except (OSError, ValueError):
        pass
    vm_uuid = record.get("uuid")
    deleted_at = record.get("deletedAt")
    if not isinstance(deleted_at, str):
        try:
            mtime = path.stat().st_mtime
        except OSError:
            mtime = 0.0
        deleted_at = (
            datetime.fromtimestamp(mtime, UTC).isoformat(timespec="milliseconds")
            .replace("+00:00", "Z")
        )  # fmt: skip
    return RetainedSet(
        id=path.name,
        vm=match["vm"],
        uuid=vm_uuid if isinstance(vm_uuid, str) else _read_uuid(path),
        deleted_at=deleted_at,
        path=path,
        disks=_disks(path),
        bytes=_tree_bytes(path),
    )
