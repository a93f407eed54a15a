"""Host policy: what this host allows a VM document to use, checked before anything starts.

Like Nomad's qemu driver: ``imagePaths`` bounds every host path a document names (disks,
CD images, base images, kernels), after resolving symlinks and ``..``; ``argsAllowlist`` lists
the qemu options ``extraArgs`` may use (every argument starting with ``-`` must be listed; the
default allows none; any other argument must directly follow an option, because qemu opens a
stray value as a disk image); ``emulators`` lists the qemu binaries a runner may execute.

``deviceAllowlist`` narrows an allowlisted ``-device``/``-global`` further, to device drivers
and the properties each may set: ``-device loader,file=/etc/shadow`` or ``romfile=`` would hand
a host file to the guest, ``vfio-pci``/``usb-host`` a host device. Values of any other
allowlisted option may not name host files either (``file=``, ``path=``...).

Programs and defence in depth are host policy too, never document strings: ``bridgeHelper``
(the setuid helper qemu runs for bridge networks), ``sandbox`` (qemu's seccomp filter) and
``runAs`` (the unprivileged user qemu drops to).

A missing policy file means the defaults below: any image path, no extra args, the standard
emulator, Debian's bridge helper, the sandbox on, qemu as ``corral-qemu`` (or ``nobody``).
Hosts shared between users should ship ``/etc/corral/host.yaml``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic.alias_generators import to_camel

from corral.errors import FieldIssue, PolicyError, SpecError
from corral.spec.document import issues_from_validation
from corral.spec.models import VmDocument, is_remote_image
from corral.spec.optstring import split_options
from corral.spec.sizes import ByteSize

__all__ = [
    "DEFAULT_BRIDGE_HELPER",
    "DEFAULT_DEVICE_ALLOWLIST",
    "DEFAULT_POLICY_FILE",
    "HostPolicy",
    "check_policy",
    "load_policy",
    "path_within",
]

DEFAULT_POLICY_FILE = Path("/etc/corral/host.yaml")
DEFAULT_BRIDGE_HELPER = "/usr/lib/qemu/qemu-bridge-helper"

_COMMON_PROPS = ["id", "bus", "addr"]
DEFAULT_DEVICE_ALLOWLIST: dict[str, list[str]] = {
    # input and small emulated devices that touch no host resource (no sound: an hda codec
    # loads qemu's host audio backends and could reach a host microphone)
    "usb-tablet": ["id", "bus", "port"],
    "usb-kbd": ["id", "bus", "port"],
    "usb-mouse": ["id", "bus", "port"],
    "virtio-keyboard-pci": _COMMON_PROPS,
    "virtio-mouse-pci": _COMMON_PROPS,
    "virtio-tablet-pci": _COMMON_PROPS,
    "qemu-xhci": [*_COMMON_PROPS, "p2", "p3"],
    "usb-ehci": _COMMON_PROPS,
    "i6300esb": _COMMON_PROPS,
    "pvpanic": ["id", "ioport"],
    "virtio-serial-pci": [*_COMMON_PROPS, "max_ports"],
}
"""Drivers an allowlisted ``-device``/``-global`` may name by default, with their properties.

Never in it: ``loader``, anything with ``romfile``/``file``/``drive``/``chardev``/``netdev``
properties, host pass-through (``vfio-pci``, ``usb-host``, ``vhost-*``), ``ivshmem``."""

_WORD = re.compile(r"^[A-Za-z0-9_.+:-]{1,64}$")
_EXTRA_OPTIONS: dict[str, str | frozenset[str] | None] = {
    "-device": "device",
    "-global": "device",
    "-k": "word",
    "-vga": "word",
    "-watchdog-action": "word",
    "-rtc": frozenset({"base", "clock", "driftfix"}),
    "-boot": frozenset({"order", "once", "menu", "splash-time", "reboot-timeout", "strict"}),
    "-overcommit": frozenset({"mem-lock", "cpu-pm"}),
    "-msg": frozenset({"timestamp", "guest-name"}),
    "-action": frozenset({"reboot", "shutdown", "panic", "watchdog"}),
    "-no-reboot": None,
    "-no-hpet": None,
    "-usb": None,
}
"""The qemu options ``extraArgs`` can ever use, even when a host allowlists more, and what
each takes: None (a flag: no value), ``device`` (``deviceAllowlist`` decides), ``word`` (one
plain word), or the option keys it may set, whose values are plain words. Anything else
(``-drive``, ``-object``, ``-set``, ``-nic``, ``-chardev``, ``-smbios``, ``-dump-vmstate``...)
can open host files, sockets or programs, or undo corral's own setup: a positive list, because
qemu has too many such options for a denylist to stay complete."""


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
    device_allowlist: dict[str, list[str]] = Field(
        default_factory=lambda: {k: list(v) for k, v in DEFAULT_DEVICE_ALLOWLIST.items()},
        description="drivers an allowlisted -device/-global may name, with their properties",
    )
    bridge_helper: str = Field(
        default=DEFAULT_BRIDGE_HELPER,
        description="the helper qemu runs to attach a tap to a bridge (never from a document)",
    )
    vde_sockets: list[str] | None = Field(
        default=None, description="allowed directories for vde switch sockets; null means any"
    )
    remote_images: bool = Field(
        default=False,
        description="allow http(s) URLs as cdrom images (qemu's curl driver fetches them)",
    )
    sandbox: bool = Field(default=True, description="qemu's seccomp sandbox (-sandbox on,...)")
    run_as: str | None = Field(
        default="corral-qemu",
        description="user qemu drops to after opening its files (nobody if missing); null: "
        "stay root",
    )
    tcg_tb_size: int | None = Field(
        default=None,
        ge=1,
        le=4096,
        description="TCG translation cache per VM in MiB (-accel tcg,tb-size=); null: qemu's "
        "default (up to 1 GiB); a small one packs many TCG guests on one host",
    )
    console_log_max_size: ByteSize = Field(
        default=2 * 1024**2,
        ge=4096,
        description="a VM's console.log (and qemu.log) is rotated at this size, one old file "
        "kept (virtlogd's 2 MiB by default)",
    )

    @field_validator("bridge_helper")
    @classmethod
    def _helper_is_a_program(cls, value: str) -> str:
        # qemu runs a helper with a space in it through /bin/sh -c: only a plain path here
        if not os.path.isabs(value) or re.search(r"[\s,;'\"`$|&<>()\\*?\[\]{}~!#]", value):
            raise ValueError("must be an absolute path with no spaces or shell characters")
        return value

    @field_validator("run_as")
    @classmethod
    def _user_name(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"[a-z_][a-z0-9_-]{0,31}\$?", value):
            raise ValueError("must be a user name")
        return value


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
        issues = issues_from_validation(exc, HostPolicy)
        raise SpecError(f"invalid host policy {file}", issues) from exc


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
        if disk.cdrom is not None and disk.cdrom.image and not is_remote_image(disk.cdrom.image):
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
    issues += _check_extra_args(doc.vm.extra_args, policy)
    for i, disk in enumerate(doc.vm.disks):
        image = disk.cdrom.image if disk.cdrom is not None else ""
        if is_remote_image(image) and not policy.remote_images:
            issues.append(
                FieldIssue(
                    f"spec.vm.disks[{i}].cdrom.image",
                    f"{image!r}: this host does not fetch remote images (remoteImages: false); "
                    "import it with `corral image import` and use a local path",
                )
            )
    for i, net in enumerate(doc.vm.networks):
        if net.vde is None:
            continue
        sock = net.vde.socket
        if not os.path.isabs(sock):
            issues.append(FieldIssue(f"spec.vm.networks[{i}].vde.socket", "must be absolute"))
        elif policy.vde_sockets is not None and not path_within(sock, policy.vde_sockets):
            issues.append(
                FieldIssue(
                    f"spec.vm.networks[{i}].vde.socket",
                    f"{sock!r} is outside the host's vdeSockets {policy.vde_sockets}",
                )
            )
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


def _check_extra_args(args: list[str], policy: HostPolicy) -> list[FieldIssue]:
    """Each option listed in ``argsAllowlist`` and known to corral (:data:`_EXTRA_OPTIONS`);
    a value only right after an option that takes one; values within what the option allows
    (``-device``/``-global``: ``deviceAllowlist``)."""
    allowed = set(policy.args_allowlist)
    issues: list[FieldIssue] = []
    option: str | None = None  # the option whose value comes next, if it takes one
    refused = False
    for i, arg in enumerate(args):
        loc = f"spec.vm.extraArgs[{i}]"
        if arg.startswith("-") and not _is_number(arg):
            option, refused = arg, True
            if arg not in allowed:
                issues.append(
                    FieldIssue(
                        loc,
                        f"{arg!r} is not in the host's argsAllowlist "
                        f"({sorted(allowed) or 'empty: no extra args allowed'})",
                    )
                )
            elif arg not in _EXTRA_OPTIONS:
                issues.append(
                    FieldIssue(
                        loc,
                        f"{arg!r} is refused even when allowlisted: corral allows in extraArgs "
                        f"only options that reach no host file, socket or program "
                        f"({sorted(_EXTRA_OPTIONS)}); the VM document has fields for disks, "
                        "networks and displays",
                    )
                )
            else:
                refused = False
                if _EXTRA_OPTIONS[arg] is None:
                    option = None  # a flag: whatever follows is not its value
            continue
        if option is None:
            # qemu takes a value that follows no option as a disk image (-hda)
            issues.append(
                FieldIssue(loc, f"{arg!r} follows no option: qemu would open it as a disk image")
            )
            continue
        reason = None if refused else _value_problem(option, arg, policy.device_allowlist)
        if reason is not None:
            issues.append(FieldIssue(loc, reason))
        option = None
    return issues


def _is_number(arg: str) -> bool:
    return re.fullmatch(r"-\d+(\.\d+)?", arg) is not None


def _value_problem(option: str, value: str, devices: dict[str, list[str]]) -> str | None:
    if value.lstrip().startswith("{"):
        return f"{option} {value[:40]!r}: JSON option syntax is not accepted in extraArgs"
    kind = _EXTRA_OPTIONS[option]
    parts = split_options(value)
    if kind == "device":
        return _device_problem(option, parts, devices)
    if kind == "word":
        return None if _WORD.fullmatch(value) else f"{option} takes one plain word"
    assert isinstance(kind, frozenset)
    for n, part in enumerate(parts):
        key, sep, val = part.partition("=")
        if not sep and n == 0 and _WORD.fullmatch(key):
            continue  # the implied first value (-boot c)
        if not sep or key not in kind:
            return f"{option}: {key!r} is not an option corral allows for it ({sorted(kind)})"
        if not _WORD.fullmatch(val):
            return f"{option} {key}=...: the value must be a plain word"
    return None


def _device_problem(option: str, parts: list[str], devices: dict[str, list[str]]) -> str | None:
    """``-device DRIVER,prop=v`` / ``-global DRIVER.prop=v`` (or ``driver=,property=``)."""
    props: dict[str, str] = {}
    driver: str | None = None
    for n, part in enumerate(parts):
        key, sep, val = part.partition("=")
        if not sep and n == 0:
            driver = key
        elif not sep:
            return f"{option} option {part!r} has no value"
        else:
            props[key.strip()] = val
    if option == "-global":
        if "driver" in props and "property" in props:
            driver, names = props["driver"], [props["property"]]
        elif len(props) == 1 and driver is None:
            dotted = next(iter(props))
            driver, _, prop = dotted.rpartition(".")
            names = [prop]
        else:
            return "-global must be DRIVER.PROPERTY=VALUE"
    else:
        driver = props.pop("driver", driver)
        names = list(props)
    if not driver or driver not in devices:
        return (
            f"{option} driver {driver!r} is not in the host's deviceAllowlist "
            f"({sorted(devices) or 'empty'})"
        )
    refused = [p for p in names if p not in devices[driver]]
    if refused:
        return (
            f"{option} {driver}: properties {refused} are not allowed for it by the host's "
            f"deviceAllowlist (allowed: {devices[driver]})"
        )
    return None


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
