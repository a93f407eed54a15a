"""Host policy: what this host allows a VM document to use, checked before anything starts.

Like Nomad's qemu driver: ``imagePaths`` bounds every host path a document names (disks,
CD images, base images, kernels), after resolving symlinks and ``..``; ``argsAllowlist`` lists
the qemu options ``extraArgs`` may use (every argument starting with ``-`` must be listed; the
default allows none; any other argument must directly follow an option, because qemu opens a
stray value as a disk image); ``emulators`` lists the qemu binaries a runner may execute.

A missing policy file means the defaults below: any image path, no extra args, the standard
emulator. Hosts shared between users should ship ``/etc/corral/host.yaml``.
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.alias_generators import to_camel

from corral.errors import FieldIssue, PolicyError, SpecError
from corral.spec.document import issues_from_validation
from corral.spec.models import VmDocument
from corral.spec.sizes import ByteSize

__all__ = [
    "DEFAULT_POLICY_FILE",
    "HostPolicy",
    "check_policy",
    "load_policy",
    "path_within",
]

DEFAULT_POLICY_FILE = Path("/etc/corral/host.yaml")


class HostPolicy(BaseModel):
    model_config = ConfigDict(
        extra="forbid", alias_generator=to_camel, populate_by_name=True, frozen=True
    )

    image_paths: list[str] | None = Field(
        default=None, description="allowed directories for host paths; null means any path"
    )
    args_allowlist: list[str] = Field(default_factory=list)
    emulators: list[str] = Field(default_factory=lambda: ["qemu-system-x86_64"])
    template_dirs: list[str] = Field(default_factory=list)
    max_cpus_per_vm: int | None = Field(default=None, ge=1)
    max_ram_per_vm: ByteSize | None = None


def load_policy(path: str | os.PathLike[str] | None = None) -> HostPolicy:
    """Read a policy file. ``None`` reads the default file if present, else the defaults;
    an explicitly named file must exist."""
    file = Path(path) if path is not None else DEFAULT_POLICY_FILE
    if not file.exists():
        if path is not None:
            raise SpecError(f"host policy file {file} does not exist")
        return HostPolicy()
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise SpecError(f"cannot read host policy {file}: {exc}") from exc
    try:
        return HostPolicy.model_validate(data)
    except ValidationError as exc:
        raise SpecError(f"invalid host policy {file}", issues_from_validation(exc)) from exc


def path_within(path: str, allowed: list[str]) -> bool:
    """True if ``path``, with symlinks and ``..`` resolved, lies inside an allowed dir."""
    real = os.path.realpath(path)
    for root in allowed:
        real_root = os.path.realpath(root)
        try:
            if os.path.commonpath([real, real_root]) == real_root:
                return True
        except ValueError:
            continue
    return False


def _document_paths(doc: VmDocument) -> list[tuple[str, str]]:
    vm = doc.vm
    paths: list[tuple[str, str]] = []
    for i, disk in enumerate(vm.disks):
        where = f"spec.vm.disks[{i}]"
        if disk.file is not None:
            if disk.file.path is not None:
                paths.append((f"{where}.file.path", disk.file.path))
            if disk.file.image is not None:
                paths.append((f"{where}.file.image", disk.file.image))
        if disk.device is not None:
            paths.append((f"{where}.device.path", disk.device.path))
        if disk.cdrom is not None and disk.cdrom.image:
            paths.append((f"{where}.cdrom.image", disk.cdrom.image))
    if vm.kernel is not None:
        paths.append(("spec.vm.kernel", vm.kernel))
    if vm.initrd is not None:
        paths.append(("spec.vm.initrd", vm.initrd))
    return paths


def check_policy(doc: VmDocument, policy: HostPolicy, emulator: str | None = None) -> None:
    """Raise :class:`PolicyError` listing every violation; return quietly if there is none."""
    issues: list[FieldIssue] = []
    if policy.image_paths is not None:
        for loc, path in _document_paths(doc):
            if not os.path.isabs(path):
                issues.append(FieldIssue(loc, f"{path!r} must be an absolute path"))
            elif not path_within(path, policy.image_paths):
                issues.append(
                    FieldIssue(
                        loc,
                        f"{path!r} (resolved: {os.path.realpath(path)}) is outside the "
                        f"allowed image paths {policy.image_paths}",
                    )
                )
    allowed_args = set(policy.args_allowlist)
    after_flag = False
    for i, arg in enumerate(doc.vm.extra_args):
        if arg.startswith("-") and arg not in allowed_args:
            issues.append(
                FieldIssue(
                    f"spec.vm.extraArgs[{i}]",
                    f"{arg!r} is not in the host's argsAllowlist "
                    f"({sorted(allowed_args) or 'empty: no extra args allowed'})",
                )
            )
        elif not arg.startswith("-") and not after_flag:
            # qemu takes a value that follows no option as a disk image (-hda)
            issues.append(
                FieldIssue(
                    f"spec.vm.extraArgs[{i}]",
                    f"{arg!r} follows no option: qemu would open it as a disk image",
                )
            )
        after_flag = arg.startswith("-")
    chosen = emulator or (doc.runner.emulator if doc.runner else None)
    if chosen is not None and not _emulator_allowed(chosen, policy.emulators):
        issues.append(
            FieldIssue(
                "runner.emulator", f"{chosen!r} is not an allowed emulator {policy.emulators}"
            )
        )
    if policy.max_cpus_per_vm is not None and doc.vm.max_cpus > policy.max_cpus_per_vm:
        issues.append(
            FieldIssue(
                "spec.vm.maximumCpus",
                f"{doc.vm.max_cpus} CPUs is more than this host allows per VM "
                f"({policy.max_cpus_per_vm})",
            )
        )
    if policy.max_ram_per_vm is not None and doc.vm.maximum_ram > policy.max_ram_per_vm:
        issues.append(FieldIssue("spec.vm.maximumRam", "is more than this host allows per VM"))
    if issues:
        raise PolicyError.of(issues)


def _emulator_allowed(emulator: str, allowed: list[str]) -> bool:
    """An emulator is named by basename (found on PATH) or by absolute path."""
    if emulator in allowed:
        return True
    return os.path.isabs(emulator) and any(
        not os.path.isabs(a) and os.path.basename(emulator) == a and _on_path(emulator)
        for a in allowed
    )


def _on_path(path: str) -> bool:
    for directory in os.environ.get("PATH", "").split(os.pathsep):
        if directory and os.path.realpath(os.path.join(directory, os.path.basename(path))) == (
            os.path.realpath(path)
        ):
            return True
    return False
