"""What a VM needs on the host before its qemu starts: its files (data and runtime dirs, the
persisted UUID, disk overlays and blank disks, OVMF vars, the cloud-init seed; made once,
never overwritten) and the taps of its bridge NICs (opened by the host's helper, not by qemu).
"""

from __future__ import annotations

import os
from pathlib import Path

from corral.errors import HostError, SpecError
from corral.host import ensure_disk, ensure_overlay, ensure_seed, ensure_vars, open_bridge_tap
from corral.host.atomic import write_atomic
from corral.qemu.fingerprint import find_firmware
from corral.runner.config import RunnerPaths
from corral.spec import HostPolicy, VmDocument
from corral.spec.models import MachineType

__all__ = ["open_taps", "prepare_files"]


async def prepare_files(doc: VmDocument, paths: RunnerPaths) -> None:
    """Create what the VM needs on disk; never recreate or overwrite what exists."""
    paths.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    paths.runtime_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(paths.runtime_dir, 0o700)
    uuid_file = paths.uuid_file
    if doc.vm.machine_uuid is None and not uuid_file.exists():
        import uuid as _uuid

        write_atomic(uuid_file, f"{_uuid.uuid4()}\n".encode())
    for i, disk in enumerate(doc.vm.disks):
        f = disk.file
        if f is None:
            continue
        name = disk.name or f"disk{i}"
        if f.image is not None:
            overlay = paths.overlay(name)
            await ensure_overlay(Path(f.image), overlay, size=f.size)
        elif f.path is not None and not Path(f.path).exists():
            if f.size is None:
                raise SpecError.single(
                    f"spec.vm.disks[{i}].file.path",
                    f"{f.path} does not exist; give a size to create it",
                )
            await ensure_disk(Path(f.path), f.size, f.format.value)
    if doc.vm.firmware.is_uefi and doc.vm.machine is not MachineType.MICROVM:
        found = find_firmware(doc.vm.firmware.value)
        if found is None:
            raise HostError(
                f"no OVMF files for firmware {doc.vm.firmware.value} (apt-get install ovmf)"
            )
        ensure_vars(Path(found[1]), paths.efivars)
    if doc.spec.cloud_init is not None:
        await ensure_seed(paths.seed_image, doc.spec.cloud_init, doc.name)


async def open_taps(doc: VmDocument, policy: HostPolicy) -> dict[int, int]:
    """Taps on bridges for the VM's bridge NICs, made by the host's helper (never by
    qemu, which keeps its sandbox); {NIC index: fd}. Nothing is left open on failure."""
    taps: dict[int, int] = {}
    try:
        for i, net in enumerate(doc.vm.networks):
            if net.bridge is not None:
                taps[i] = await open_bridge_tap(policy.bridge_helper, net.bridge.name)
            elif net.tap is not None and net.tap.ifname is None:
                taps[i] = await open_bridge_tap(policy.bridge_helper, net.tap.bridge)
    except BaseException:
        for fd in taps.values():
            os.close(fd)
        raise
    return taps
