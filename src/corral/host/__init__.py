"""Host-side files and helper processes a VM needs before qemu starts.

The manager's base-image store (:mod:`.images`; its records in :mod:`.sidecar`, the bytes it
imports from :mod:`.sources` through :mod:`.imports`), overlays and blank disks (:mod:`.overlay`),
the cloud-init NoCloud seed (:mod:`.seed`), the VM's own OVMF vars (:mod:`.firmware`), its
software TPM (:mod:`.swtpm`), the process helpers they share (:mod:`.process`), and the
capped, rotated logs a running qemu appends to (:mod:`.consolelog`).
Everything is made once or only on change, published atomically, and never through a shell.
Failures are :class:`~corral.errors.HostError` naming what to install or what went wrong,
with the cause chained (the image store also raises SpecError, NotFound and Conflict for
what its callers ask).

Imports only ``corral.spec`` and ``corral.errors`` (DESIGN.md layers).
"""

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from corral.host.bridge import open_bridge_tap
    from corral.host.firmware import ensure_vars
    from corral.host.images import ImageRecord, ImageStore
    from corral.host.overlay import ImageInfo, ensure_disk, ensure_overlay, image_info
    from corral.host.process import (
        TOOL_PACKAGES,
        find_qemu,
        find_tool,
        pid_alive,
        process_age,
        process_cmdline,
        process_exe_name,
        process_start_time,
        read_pidfile,
        run_tool,
    )
    from corral.host.seed import SEED_LABEL, default_instance_id, ensure_seed, seed_files
    from corral.host.swtpm import Swtpm, SwtpmState

# name -> the module that defines it, imported on first use: a runner (``corral run``) that
# needs the overlay and the seed never loads the image store's download code (http.client).
_WHERE = {
    "open_bridge_tap": "bridge", "ensure_vars": "firmware", "ImageRecord": "images",
    "ImageStore": "images", "ImageInfo": "overlay", "ensure_disk": "overlay",
    "ensure_overlay": "overlay", "image_info": "overlay", "TOOL_PACKAGES": "process",
    "find_qemu": "process", "find_tool": "process", "pid_alive": "process",
    "process_age": "process", "process_cmdline": "process", "process_exe_name": "process",
    "process_start_time": "process", "read_pidfile": "process", "run_tool": "process",
    "SEED_LABEL": "seed", "default_instance_id": "seed", "ensure_seed": "seed",
    "seed_files": "seed", "Swtpm": "swtpm", "SwtpmState": "swtpm",
}  # fmt: skip


def __getattr__(name: str) -> object:
    where = _WHERE.get(name)
    if where is None:
        raise AttributeError(f"module 'corral.host' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f"corral.host.{where}"), name)
    globals()[name] = value
    return value


__all__ = [
    "SEED_LABEL",
    "TOOL_PACKAGES",
    "ImageInfo",
    "ImageRecord",
    "ImageStore",
    "Swtpm",
    "SwtpmState",
    "default_instance_id",
    "ensure_disk",
    "ensure_overlay",
    "ensure_seed",
    "ensure_vars",
    "find_qemu",
    "find_tool",
    "image_info",
    "open_bridge_tap",
    "pid_alive",
    "process_age",
    "process_cmdline",
    "process_exe_name",
    "process_start_time",
    "read_pidfile",
    "run_tool",
    "seed_files",
]
