"""VM document -> qemu argv, through Jinja2 templates (VM types), never through a shell.

A VM type is a template ``<name>.yaml.j2`` that renders a YAML list whose items are strings or
(nested) lists of strings; the list is flattened into argv. The package ships ``standard``
(q35/pc, BIOS or OVMF) and ``microvm``; a host adds or overrides types with template dirs.

Untrusted values never pass through YAML text: ``opts(...)`` and ``raw(...)`` put each value
in a side table and write a placeholder token into the template's output; after the YAML is
parsed the tokens are swapped back for the exact values. A path full of quotes, newlines,
``#`` or ``,`` therefore reaches qemu unchanged (commas doubled by :func:`qopts` where qemu
parses options), and cannot add an argument or an option.

The template sees ``vm``, a plain view of the document computed here (see
:func:`build_view`), so that templates stay declarative and all rules are tested Python.
"""

from __future__ import annotations

import functools
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import jinja2
import yaml

from corral.errors import SpecError
from corral.qemu.options import OptionValue, qopts
from corral.spec.models import (
    DiskInterface,
    Firmware,
    MachineType,
    VmDocument,
    default_uuid,
    is_remote_image,
    stable_mac,
)
from corral.spec.policy import DEFAULT_BRIDGE_HELPER

__all__ = ["FirmwareFiles", "RenderContext", "VmFiles", "build_view", "render_argv"]

PACKAGE_TEMPLATES = Path(__file__).parent / "templates"
_TOKEN = re.compile(r"@@corral:(\d+)@@")


@dataclass(frozen=True)
class FirmwareFiles:
    """The OVMF code file (read-only) and the VM's own writable vars file."""

    code: str
    vars: str


class VmFiles(Protocol):
    """Where a VM's files are: the runner's :class:`~corral.runner.config.RunnerPaths` owns
    the layout (this layer may not import it), the argv only points qemu at it."""

    @property
    def pidfile(self) -> Path: ...
    @property
    def qmp(self) -> Path: ...
    @property
    def qga(self) -> Path: ...
    @property
    def console(self) -> Path: ...
    @property
    def console_log(self) -> Path: ...
    @property
    def swtpm_sock(self) -> Path: ...
    def overlay(self, disk: str) -> Path: ...


@dataclass(frozen=True)
class RenderContext:
    """Everything the argv needs that is not in the document: where files are, what the host
    decided (accelerator, firmware files), and how the runner wants qemu started.

    ``accelerator`` is already resolved (``kvm`` or ``tcg``): resolving ``auto`` needs a host
    probe, which belongs to the caller. ``bridge_helper``, ``sandbox`` (the ``-sandbox``
    options, None: off) and ``run_as`` (the user qemu drops to) are host policy.
    ``tap_fds`` maps a NIC's index to a tap the runner opened on its bridge (passed to qemu):
    qemu then runs no helper itself. ``files``: where the VM's sockets, logs and overlays are.
    """

    files: VmFiles
    accelerator: str = "tcg"
    machine_uuid: uuid.UUID | None = None
    firmware: FirmwareFiles | None = None
    seed_image: str | None = None
    volume_paths: Mapping[int, str] = field(default_factory=dict)
    paused: bool = True
    no_shutdown: bool = True
    tsc_khz: int | None = None
    tcg_tb_size: int | None = None
    template_dirs: Sequence[str] = ()
    bridge_helper: str = DEFAULT_BRIDGE_HELPER
    tap_fds: Mapping[int, int] = field(default_factory=dict)
    sandbox: Mapping[str, OptionValue] | None = None
    run_as: str | None = None


_NIC_DRIVER = {
    "virtio-net": "virtio-net-pci",
    "virtio-net-pci": "virtio-net-pci",
    "e1000": "e1000",
    "e1000e": "e1000e",
    "rtl8139": "rtl8139",
    "vmxnet3": "vmxnet3",
}


def _cache_opts(cache: str) -> tuple[dict[str, OptionValue], bool]:
    """qemu's old ``cache=`` modes as blockdev options plus the device's write-cache flag."""
    direct = cache in ("none", "directsync")
    no_flush = cache == "unsafe"
    write_cache = cache not in ("writethrough", "directsync")
    node: dict[str, OptionValue] = {
        "cache.direct": True if direct else None,
        "cache.no-flush": True if no_flush else None,
    }
    return node, write_cache


def build_view(doc: VmDocument, ctx: RenderContext) -> dict[str, Any]:
    """The document as the templates see it: derived values made explicit, ids assigned."""
    vm = doc.vm
    accel = ctx.accelerator
    if accel not in ("kvm", "tcg"):
        raise SpecError.single(
            "spec.vm.accelerator", f"must be resolved to kvm or tcg, not {accel}"
        )
    machine_uuid = vm.machine_uuid or ctx.machine_uuid or default_uuid(doc.name)
    cpu_model = vm.cpu_model or ("host" if accel == "kvm" else "max")
    if cpu_model == "host" and accel != "kvm":
        raise SpecError.single(
            "spec.vm.cpuModel", "'host' needs KVM, and this VM runs under TCG; use e.g. 'max'"
        )
    microvm = vm.machine is MachineType.MICROVM
    if vm.firmware.is_secure and vm.machine is not MachineType.Q35:
        raise SpecError.single("spec.vm.firmware", "secure boot needs the q35 machine (SMM)")

    topo = vm.cpu_topology
    cpu = {
        "model": cpu_model,
        "features": [(f[1:], f[0] == "+") for f in vm.cpu_features],
        "current": vm.cur_cpus,
        "maximum": vm.max_cpus,
        "sockets": (topo.sockets or None) if topo else None,
        "dies": (topo.dies_per_socket or None) if topo else None,
        "cores": (topo.cores_per_die or None) if topo else None,
        "threads": (topo.threads_per_core or None) if topo else None,
    }

    firmware: dict[str, Any] = {"kind": vm.firmware.value, "uefi": False, "secure": False}
    if vm.firmware.is_uefi and not microvm:
        if ctx.firmware is None:
            raise SpecError.single(
                "spec.vm.firmware", f"{vm.firmware.value} needs OVMF files; none were found"
            )
        firmware.update(
            uefi=True,
            secure=vm.firmware.is_secure,
            code=ctx.firmware.code,
            vars=ctx.firmware.vars,
        )

    disks: list[dict[str, Any]] = []
    need_scsi = False
    ide_slots = _ide_slots(vm.machine)
    for i, disk in enumerate(vm.disks):
        name = disk.name or f"disk{i}"
        node = f"d{i}"
        entry: dict[str, Any] = {
            "index": i,
            "name": name,
            "id": f"{name}",
            "node": node,
            "bootindex": disk.bootindex,
            "serial": None,
            "read_only": False,
            "cache": {},
            "write_cache": True,
            "discard": None,
            "location": "filename",
        }
        if disk.cdrom is not None:
            iface = disk.cdrom.interface or ("ide" if vm.machine is MachineType.PC else "scsi")
            image = disk.cdrom.image or None
            remote = is_remote_image(image)
            entry.update(
                kind="cdrom",
                interface=iface,
                path=image,
                format="raw",
                # qemu's curl driver (Debian: qemu-block-extra) for VM-Operator's URLs
                driver=image.split(":", 1)[0].lower() if image and remote else "file",
                location="url" if remote else "filename",
                read_only=True,
            )
        elif disk.file is not None:
            f = disk.file
            path = f.path if f.path is not None else str(ctx.files.overlay(name))
            cache, write_cache = _cache_opts(f.cache)
            entry.update(
                kind="disk",
                interface=f.interface.value,
                path=path,
                format=f.format.value,
                driver="file",
                read_only=f.read_only,
                cache=cache,
                write_cache=write_cache,
                discard="unmap" if f.discard and not f.read_only else None,
                serial=f.serial,
            )
        elif disk.device is not None:
            d = disk.device
            entry.update(
                kind="disk",
                interface=d.interface.value,
                path=d.path,
                format="raw",
                driver="host_device",
                read_only=d.read_only,
                cache={"cache.direct": True},
                serial=d.serial,
            )
        else:
            if i not in ctx.volume_paths:
                raise SpecError.single(
                    f"spec.vm.disks[{i}].volumeClaimTemplate",
                    "a volume claim is provided by Kubernetes; locally use a file or device disk",
                )
            entry.update(
                kind="disk",
                interface="virtio",
                path=ctx.volume_paths[i],
                format="raw",
                driver="host_device",
                cache={"cache.direct": True},
            )
        if microvm and entry["interface"] not in ("virtio", "scsi"):
            raise SpecError.single(
                f"spec.vm.disks[{i}]", f"the microvm machine has no {entry['interface']} bus"
            )
        if entry["interface"] == DiskInterface.IDE.value:
            if not ide_slots:
                raise SpecError.single(
                    f"spec.vm.disks[{i}]", f"no free IDE slot on the {vm.machine.value} machine"
                )
            entry["bus"], entry["unit"] = ide_slots.pop(0)
        if entry["interface"] == "scsi":
            need_scsi = True
        disks.append(entry)

    nics: list[dict[str, Any]] = []
    for i, net in enumerate(vm.networks):
        nic = net.nic
        driver = _NIC_DRIVER[nic.device]
        if microvm:
            if driver != "virtio-net-pci":
                raise SpecError.single(
                    f"spec.vm.networks[{i}].{net.kind}.device", "microvm supports only virtio-net"
                )
            driver = "virtio-net-device"
        entry = {
            "index": i,
            "id": f"net{i}",
            "kind": net.kind,
            "driver": driver,
            "mac": nic.mac or stable_mac(machine_uuid, i),
            "fd": ctx.tap_fds.get(i),
        }
        if net.user is not None:
            u = net.user
            options: list[tuple[str, OptionValue]] = [
                ("id", entry["id"]),
                ("net", u.net),
                ("hostname", u.hostname),
            ]
            options += [
                (
                    "hostfwd",
                    f"{p.protocol}:{p.host_address}:{p.host_port}-"
                    f"{p.guest_address or ''}:{p.guest_port}",
                )
                for p in u.port_forwards
            ]
            entry["options"] = options
        elif net.tap is not None:
            entry["ifname"] = net.tap.ifname
            entry["bridge"] = net.tap.bridge
            entry["helper"] = ctx.bridge_helper
        elif net.bridge is not None:
            entry["bridge"] = net.bridge.name
            entry["helper"] = ctx.bridge_helper
        elif net.vde is not None:
            entry["socket"] = net.vde.socket
            entry["port"] = net.vde.port
        nics.append(entry)

    display: dict[str, Any] = {"spice": None, "vnc": None, "outputs": 1}
    if vm.display is not None:
        display["outputs"] = vm.display.outputs
        if vm.display.spice is not None:
            s = vm.display.spice
            display["spice"] = {
                "port": s.port,
                "address": s.address,
                "streaming_video": s.streaming_video,
                "usb_redirects": s.usb_redirects,
            }
        if vm.display.vnc is not None:
            v = vm.display.vnc
            host = f"[{v.address}]" if ":" in v.address else v.address
            display["vnc"] = {
                "listen": f"{host}:{v.port - 5900}",
                "websocket": v.websocket_port,
            }
    if microvm and vm.cur_cpus != vm.max_cpus:
        raise SpecError.single(
            "spec.vm.currentCpus",
            f"the microvm machine has no CPU hot-plug: use currentCpus = maximumCpus "
            f"({vm.max_cpus})",
        )
    if microvm and (display["spice"] or display["vnc"]):
        raise SpecError.single("spec.vm.display", "the microvm machine has no graphics device")

    cmdline = vm.cmdline
    if microvm and accel == "tcg" and ctx.tsc_khz and "tsc_early_khz=" not in (cmdline or ""):
        # A microvm has no PIT/HPET to calibrate the TSC against; under TCG the guest hangs.
        cmdline = (
            f"{cmdline} tsc_early_khz={ctx.tsc_khz}"
            if cmdline
            else (f"tsc_early_khz={ctx.tsc_khz}")
        )

    tpm = None
    if vm.use_tpm:
        model = "tpm-tis" if vm.machine is MachineType.PC else "tpm-crb"
        tpm = {"socket": str(ctx.files.swtpm_sock), "model": model}

    return {
        "name": doc.name,
        "uuid": str(machine_uuid),
        "machine": vm.machine.value,
        "accel": accel,
        "tcg_tb_size": ctx.tcg_tb_size if accel == "tcg" else None,
        "cpu": cpu,
        "ram": {"maximum_mib": vm.maximum_ram // 1024**2, "current_mib": vm.cur_ram // 1024**2},
        "firmware": firmware,
        "boot_menu": vm.boot_menu,
        "rtc_base": vm.rtc_base,
        "rtc_clock": vm.rtc_clock,
        "kernel": vm.kernel,
        "initrd": vm.initrd,
        "cmdline": cmdline,
        "tpm": tpm,
        "agent": {"socket": str(ctx.files.qga)} if vm.guest_agent else None,
        "qmp_socket": str(ctx.files.qmp),
        "console_socket": str(ctx.files.console),
        "console_log": str(ctx.files.console_log),
        "pidfile": str(ctx.files.pidfile),
        "sandbox": dict(ctx.sandbox) if ctx.sandbox is not None else None,
        "run_as": ctx.run_as,
        "paused": ctx.paused,
        "no_shutdown": ctx.no_shutdown,
        "disks": disks,
        "scsi": need_scsi,
        "seed": {"path": ctx.seed_image} if ctx.seed_image else None,
        "nics": nics,
        "display": display,
        "extra_args": list(vm.extra_args),
        "firmware_kind": Firmware(vm.firmware).value,
    }


def _ide_slots(machine: MachineType) -> list[tuple[str, int]]:
    if machine is MachineType.Q35:
        return [(f"ide.{n}", 0) for n in range(6)]  # the ICH9 AHCI controller: one per port
    if machine is MachineType.PC:
        return [("ide.0", 0), ("ide.0", 1), ("ide.1", 0), ("ide.1", 1)]
    return []


class _Values:
    """Side table of untrusted values; templates only ever emit tokens into YAML."""

    def __init__(self) -> None:
        self.items: list[str] = []

    def token(self, value: str) -> str:
        self.items.append(value)
        return f'"@@corral:{len(self.items) - 1}@@"'

    def opts(self, head: str | None = None, *rest: Any, **kwargs: OptionValue) -> str:
        pairs: list[tuple[str, OptionValue]] = []
        for extra in rest:
            if isinstance(extra, Mapping):
                pairs.extend(extra.items())
            elif isinstance(extra, list | tuple):
                pairs.extend((str(k), v) for k, v in extra)
            else:
                raise TypeError("opts() takes a head, then mappings or lists of key/value pairs")
        pairs.extend(kwargs.items())
        return self.token(qopts(head, pairs))

    def raw(self, value: object) -> str:
        if value is None:
            raise jinja2.UndefinedError("raw() of a missing value")
        text = str(value)
        if "\x00" in text:
            raise ValueError("an argument cannot contain NUL")
        return self.token(text)

    def substitute(self, node: object) -> list[str]:
        out: list[str] = []
        self._flatten(node, out)
        return out

    def _flatten(self, node: object, out: list[str]) -> None:
        if node is None:
            return
        if isinstance(node, list):
            for item in node:
                self._flatten(item, out)
            return
        if isinstance(node, bool | int | float):
            out.append(str(node).lower() if isinstance(node, bool) else str(node))
            return
        if not isinstance(node, str):
            raise SpecError(f"template produced a {type(node).__name__}, not an argument")
        whole = _TOKEN.fullmatch(node)
        if whole:
            out.append(self.items[int(whole.group(1))])
        elif "@@corral:" in node:
            raise SpecError("template mixed a value token into a larger string; use opts()")
        else:
            out.append(node)


@functools.lru_cache(maxsize=16)
def _environment(template_dirs: tuple[str, ...]) -> jinja2.Environment:
    """One environment per search path, so each template is compiled once per process."""
    search = [*template_dirs, str(PACKAGE_TEMPLATES)]
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(search),
        undefined=jinja2.StrictUndefined,
        autoescape=False,  # noqa: S701 - renders YAML argv lists, never HTML
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )


def render_argv(
    doc: VmDocument, ctx: RenderContext, emulator: str = "qemu-system-x86_64"
) -> list[str]:
    """The full argv (``argv[0]`` is the emulator) for the document's VM type."""
    view = build_view(doc, ctx)
    values = _Values()
    env = _environment(tuple(ctx.template_dirs))
    name = doc.vm.template_name
    try:
        template = env.get_template(f"{name}.yaml.j2")
    except jinja2.TemplateNotFound as exc:
        raise SpecError.single("spec.vm.template", f"no VM type {name!r} on this host") from exc
    try:
        text = template.render(vm=view, opts=values.opts, raw=values.raw)
    except jinja2.TemplateError as exc:
        raise SpecError(f"VM type {name!r} failed to render: {exc}") from exc
    try:
        tree = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise SpecError(f"VM type {name!r} rendered invalid YAML: {exc}") from exc
    if not isinstance(tree, list):
        raise SpecError(f"VM type {name!r} must render a YAML list of arguments")
    return [emulator, *values.substitute(tree)]
