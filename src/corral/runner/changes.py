"""Desired vs live: what a new VM document changes, and what of that can be applied in place.

Live (applied over QMP / the guest agent without restarting qemu): ``currentCpus``,
``currentRam``, CD media (``disks[].cdrom.image``), ``powerdownTimeout``,
``bootTimeout`` (it bounds the next start), ``guestShutdownStops``, and the display password
(which is not in the document). Everything else that differs is *pending restart*: reported
in the status and applied on the next start.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from corral.errors import SpecError
from corral.host.chain import ChainError, open_file
from corral.spec import VmDocument

__all__ = [
    "DisplaySecret",
    "cdrom_media",
    "pending_restart",
    "read_display_secret",
    "write_display_secret",
]

_LIVE_VM_FIELDS = {"currentCpus", "currentRam", "powerdownTimeout", "bootTimeout", "state"}
_EXPIRY = re.compile(r"^(never|now|\+\d+|\d+)$")


def cdrom_media(doc: VmDocument) -> dict[str, str | None]:
    """{device id: image or None (no media)} for every CD drive, ids as the template gives."""
    media: dict[str, str | None] = {}
    for i, disk in enumerate(doc.vm.disks):
        if disk.cdrom is not None:
            media[disk.name or f"disk{i}"] = disk.cdrom.image or None
    return media


def _restart_view(doc: VmDocument) -> dict[str, object]:
    vm = doc.vm.model_dump(mode="json", by_alias=True, exclude_none=True)
    for key in _LIVE_VM_FIELDS:
        vm.pop(key, None)
    for disk in vm.get("disks", []):
        if isinstance(disk, dict) and isinstance(disk.get("cdrom"), dict):
            disk["cdrom"].pop("image", None)
    view: dict[str, object] = {f"spec.vm.{k}": v for k, v in vm.items()}
    spec = doc.spec
    if spec.cloud_init is not None:
        view["spec.cloudInit"] = spec.cloud_init.model_dump(mode="json", by_alias=True)
    if doc.runner is not None:
        view["runner"] = doc.runner.model_dump(mode="json", by_alias=True, exclude_none=True)
    return view


def pending_restart(started: VmDocument, desired: VmDocument) -> list[str]:
    """Field paths whose change needs a restart of qemu (sorted; empty if none)."""
    if started.name != desired.name:
        raise SpecError.single("metadata.name", "a running VM cannot be renamed")
    old, new = _restart_view(started), _restart_view(desired)
    return sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))


@dataclass(frozen=True)
class DisplaySecret:
    password: str | None
    expiry: str | None


_SECRET_MAX = 4096


def _read_small(path: Path, field: str) -> str | None:
    """A small regular file's text, read without blocking; None if it does not exist.

    The secret's path may be a document's (``corral run``): a FIFO would block the event
    loop, ``/dev/zero`` would never end. Only a regular file of at most 4 KiB is read."""
    try:
        fd = open_file(str(path), block_devices=False)
    except ChainError as exc:
        raise SpecError.single(field, str(exc)) from exc
    if fd is None:
        return None
    try:
        info = os.fstat(fd)
        if info.st_size > _SECRET_MAX:
            raise SpecError.single(field, f"{path} is larger than {_SECRET_MAX} bytes")
        return os.read(fd, _SECRET_MAX).decode("utf-8", errors="replace")
    finally:
        os.close(fd)


def read_display_secret(path: Path | None) -> DisplaySecret:
    """The display password (and expiry) from the runner's display secret.

    ``path`` is a file holding the password (first line), or a directory laid out like
    VM-Operator's mounted secret: ``display-password`` and, optionally, ``password-expiry``
    (``+SECONDS``, a unix time, ``never`` or ``now``). Files are read without blocking and
    only if they are small regular files (see :func:`_read_small`).
    """
    if path is None or not path.exists():
        return DisplaySecret(None, None)
    field = "runner.displaySecretFile"
    if path.is_dir():
        pw_file, expiry_file = path / "display-password", path / "password-expiry"
    else:
        pw_file, expiry_file = path, None
    text = _read_small(pw_file, field)
    password = text.splitlines()[0] if text else None
    expiry = None
    if expiry_file is not None:
        expiry = (_read_small(expiry_file, field) or "").strip() or None
        if expiry is not None and not _EXPIRY.match(expiry):
            raise SpecError.single(
                field,
                f"password-expiry {expiry!r} must be +SECONDS, a unix time, 'never' or 'now'",
            )
    return DisplaySecret(password or None, expiry)


def write_display_secret(path: Path, password: str, expiry: str) -> None:
    """Write a display secret in the directory form :func:`read_display_secret` reads
    (``display-password`` and ``password-expiry``, 0600 in a 0700 dir), each file replaced
    atomically, the expiry first so a reader never pairs the new password with an old
    expiry. A plain file at ``path`` (the file form) is replaced by the directory."""
    if not _EXPIRY.match(expiry):
        raise SpecError.single("expiry", f"{expiry!r} must be +SECONDS, a unix time, never, now")
    if path.is_file() or path.is_symlink():
        path.unlink()
    path.mkdir(mode=0o700, exist_ok=True)
    os.chmod(path, 0o700)
    for name, text in (("password-expiry", expiry), ("display-password", password)):
        tmp = path / f".{name}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        try:
            os.write(fd, f"{text}\n".encode())
        finally:
            os.close(fd)
        os.replace(tmp, path / name)
