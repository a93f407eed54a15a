"""A VM's own OVMF variable store.

UEFI keeps its boot entries, Secure Boot keys and settings in the vars file, and the guest
writes them (an installer adds its boot entry there). So each VM gets a private copy of the
host's template once, and that copy is never overwritten: replacing it would silently drop
the guest's boot entries. The copy is published atomically (no half-copied vars file can be
seen by qemu) and is 0600.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from corral.errors import HostError
from corral.host.atomic import ensure_private_dir, publish_new, temp_sibling

__all__ = ["ensure_vars"]


def ensure_vars(template: Path, dest: Path) -> bool:
    """Copy the OVMF vars ``template`` to ``dest`` unless ``dest`` exists.

    Returns True if copied now, False if ``dest`` was already there (left as it is). A
    missing template raises :class:`HostError` (the ``ovmf`` package provides it).
    """
    if os.path.lexists(dest):
        return False
    target = Path(os.path.abspath(dest))
    ensure_private_dir(target.parent)
    tmp = temp_sibling(target)
    try:
        with open(template, "rb") as src:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            with os.fdopen(fd, "wb") as out:
                shutil.copyfileobj(src, out)
    except FileNotFoundError as exc:
        tmp.unlink(missing_ok=True)
        raise HostError(f"OVMF vars template {template} not found: apt-get install ovmf") from exc
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise HostError(f"cannot copy OVMF vars {template} to {dest}: {exc}") from exc
    return publish_new(tmp, target)
