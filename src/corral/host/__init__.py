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
