"""The VM document: one YAML shape for ``corral run``, ``corral render``, the manager and the CRD.

It has the shape of VM-Operator's ``VirtualMachine`` resource (``metadata``, ``spec`` with
``guestShutdownStops``, ``cloudInit`` and ``vm``), so a VM-Operator user's file validates as it
is; corral adds local disks and networks, direct kernel boot, VNC, the machine type and the
accelerator. Fields are camelCase in documents and snake_case in Python.

Every model forbids unknown fields: a typo is an error naming the field, never silently
ignored. Rules that span fields (``currentCpus <= maximumCpus``, one disk kind per disk...) are
model validators whose messages name the field they are about.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
import uuid
from enum import StrEnum
from typing import Annotated, Any, Literal, Self

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator
from pydantic.alias_generators import to_camel
from pydantic_core import PydanticCustomError

from corral.spec.sizes import ByteSize, format_size

__all__ = [
    "DEFAULT_BOOT_TIMEOUT",
    "DEFAULT_POWERDOWN_TIMEOUT",
    "UEFI_KERNEL_MIN_RAM",
    "Accelerator",
    "BridgeNetwork",
    "CdromDisk",
    "CloudInit",
    "CpuTopology",
    "DeviceDisk",
    "Disk",
    "DiskInterface",
    "Display",
    "FileDisk",
    "Firmware",
    "MachineType",
    "Metadata",
    "Network",
    "PortForward",
    "RunnerSettings",
    "Spec",
    "SpiceDisplay",
    "TapNetwork",
    "UserNetwork",
    "VdeNetwork",
    "VmDocument",
    "VmSpec",
    "VncDisplay",
    "is_remote_image",
    "uefi_kernel_ram",
]

DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_DISK_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]{0,18}[a-z0-9])?$")
_MAC = re.compile(r"^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$")
_TEMPLATE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
_CPU_MODEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_CPU_FEATURE = re.compile(r"^[+-][A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_IFNAME = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")
_NIC_MODELS = ("virtio-net", "virtio-net-pci", "e1000", "e1000e", "rtl8139", "vmxnet3")
_RTC_BASE = re.compile(r"^(utc|localtime|\d{4}-\d{2}-\d{2}(T\d{2}:\d{2}:\d{2})?)$")
API_VERSIONS = ("vmoperator.jdrupes.org/v1", "corral.dev/v1alpha1")


def _no_nul(value: str) -> str:
    if "\x00" in value:
        raise ValueError("must not contain a NUL character")
    return value


def _path(value: str) -> str:
    _no_nul(value)
    if not value.strip():
        raise ValueError("must not be empty")
    return value


Text = Annotated[str, AfterValidator(_no_nul)]
"""A free string that may reach qemu's argv: anything but NUL (argv cannot carry it)."""
PathStr = Annotated[str, AfterValidator(_path)]
"""A host path: non-empty, no NUL. Relative paths are resolved by the loader."""


def _mac(value: str) -> str:
    if not _MAC.fullmatch(value):
        raise ValueError("must be a MAC address like 52:54:00:12:34:56")
    if int(value[:2], 16) & 1:
        raise ValueError("must be a unicast MAC (the lowest bit of the first octet is set)")
    return value.lower()


Mac = Annotated[str, AfterValidator(_mac)]


def _field_error(field: str, reason: str) -> PydanticCustomError:
    """A cross-field rule broken; ``field`` (camelCase, may be empty) extends the error's path."""
    message = "{field}: {reason}" if field else "{reason}"
    return PydanticCustomError("corral_rule", message, {"field": field, "reason": reason})


class _Model(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        alias_generator=to_camel,
        populate_by_name=True,
        frozen=True,
        validate_default=True,
    )


class Firmware(StrEnum):
    BIOS = "bios"
    UEFI = "uefi"
    UEFI_4M = "uefi-4m"
    SECURE = "secure"
    SECURE_4M = "secure-4m"

    @property
    def is_uefi(self) -> bool:
        return self is not Firmware.BIOS

    @property
    def is_secure(self) -> bool:
        return self in (Firmware.SECURE, Firmware.SECURE_4M)


class MachineType(StrEnum):
    Q35 = "q35"
    PC = "pc"
    MICROVM = "microvm"


class Accelerator(StrEnum):
    AUTO = "auto"
    KVM = "kvm"
    TCG = "tcg"


class DiskInterface(StrEnum):
    VIRTIO = "virtio"
    SCSI = "scsi"
    IDE = "ide"
    NVME = "nvme"


class DiskFormat(StrEnum):
    QCOW2 = "qcow2"
    RAW = "raw"


# --- CPU -----------------------------------------------------------------------------------


class CpuTopology(_Model):
    """VM-Operator's topology; 0 leaves a value out of ``-smp`` so qemu derives it."""

    sockets: int = Field(default=1, ge=0, le=64)
    dies_per_socket: int = Field(default=0, ge=0, le=64)
    cores_per_die: int = Field(default=0, ge=0, le=256)
    threads_per_core: int = Field(default=0, ge=0, le=8)

    def known_product(self) -> int:
        product = 1
        for value in (
            self.sockets,
            self.dies_per_socket,
            self.cores_per_die,
            self.threads_per_core,
        ):
            product *= value or 1
        return product

    @property
    def complete(self) -> bool:
        return bool(self.sockets and self.cores_per_die and self.threads_per_core)


# --- disks ---------------------------------------------------------------------------------


_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_remote_image(image: str | None) -> bool:
    """An ``http://``/``https://`` URL (VM-Operator's cdrom images), not a host path."""
    return bool(image) and re.match(r"^https?://", image or "", re.IGNORECASE) is not None


class CdromDisk(_Model):
    """A CD drive. ``image: ""`` is a drive with no media (insert one later, live).

    ``image`` is a host path, or an ``http(s)://`` URL that qemu reads with its curl driver
    when the host policy allows remote images (``remoteImages``)."""

    image: Text
    interface: Literal["ide", "scsi"] | None = None

    @model_validator(mode="after")
    def _no_other_urls(self) -> Self:
        if _URL.match(self.image) and not is_remote_image(self.image):
            raise _field_error(
                "image", "must be a host path or an http(s):// URL; no other URL schemes"
            )
        if is_remote_image(self.image) and any(c in self.image for c in " \n\r\t"):
            raise _field_error("image", "a URL cannot contain whitespace")
        return self


class FileDisk(_Model):
    """A disk backed by a host file: an existing ``path``, or an ``image`` to overlay.

    With ``image`` the VM gets its own qcow2 overlay in its data dir on top of the base image,
    which is never written. With ``path`` and a ``size`` the file is created when missing.
    """

    path: PathStr | None = None
    image: PathStr | None = None
    size: ByteSize | None = None
    format: DiskFormat = DiskFormat.QCOW2
    interface: DiskInterface = DiskInterface.VIRTIO
    read_only: bool = False
    cache: Literal["none", "writeback", "writethrough", "unsafe", "directsync"] = "writeback"
    discard: bool = True
    serial: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,20}$")] | None = None

    @model_validator(mode="after")
    def _one_source(self) -> Self:
        if (self.path is None) == (self.image is None):
            raise _field_error(
                "", "give exactly one of 'path' (a disk file) or 'image' (a base image)"
            )
        if self.image is not None and self.format is not DiskFormat.QCOW2:
            raise _field_error("format", "a disk made from an image is a qcow2 overlay")
        if self.size is not None and self.size < 1024**2:
            raise _field_error("size", "must be at least 1Mi")
        return self


class DeviceDisk(_Model):
    """A host block device (an LV, a partition, a whole disk)."""

    path: PathStr
    interface: DiskInterface = DiskInterface.VIRTIO
    read_only: bool = False
    serial: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,20}$")] | None = None


class Disk(_Model):
    """One disk: exactly one of ``cdrom``, ``file``, ``device`` or ``volumeClaimTemplate``."""

    name: Annotated[str, Field(pattern=_DISK_NAME.pattern)] | None = None
    cdrom: CdromDisk | None = None
    file: FileDisk | None = None
    device: DeviceDisk | None = None
    volume_claim_template: dict[str, Any] | None = None
    bootindex: int | None = Field(default=None, ge=0, le=1000)

    @model_validator(mode="after")
    def _one_kind(self) -> Self:
        kinds = [
            k
            for k, v in (
                ("cdrom", self.cdrom),
                ("file", self.file),
                ("device", self.device),
                ("volumeClaimTemplate", self.volume_claim_template),
            )
            if v is not None
        ]
        if len(kinds) != 1:
            found = ", ".join(kinds) if kinds else "none"
            raise _field_error(
                "",
                f"a disk needs exactly one of cdrom, file, device, volumeClaimTemplate "
                f"(found: {found})",
            )
        return self

    @property
    def kind(self) -> str:
        if self.cdrom is not None:
            return "cdrom"
        if self.file is not None:
            return "file"
        if self.device is not None:
            return "device"
        return "volumeClaimTemplate"


# --- networks ------------------------------------------------------------------------------


def _ip(value: str) -> str:
    try:
        ipaddress.ip_address(value)
    except ValueError as exc:
        raise ValueError(f"{value!r} is not an IP address") from exc
    return value


IpAddress = Annotated[str, AfterValidator(_ip)]
NicModel = Literal["virtio-net", "virtio-net-pci", "e1000", "e1000e", "rtl8139", "vmxnet3"]


class PortForward(_Model):
    """Nomad's port_map for user networking: ``hostAddress:hostPort`` -> ``guestPort``."""

    protocol: Literal["tcp", "udp"] = "tcp"
    host_port: int = Field(ge=1, le=65535)
    guest_port: int = Field(ge=1, le=65535)
    host_address: IpAddress = "127.0.0.1"
    guest_address: IpAddress | None = None


class _Nic(_Model):
    device: NicModel = "virtio-net"
    mac: Mac | None = None


class TapNetwork(_Nic):
    """VM-Operator's tap NIC: attached to ``bridge`` through qemu-bridge-helper, or to an
    existing tap device when ``ifname`` is given."""

    bridge: Annotated[str, Field(pattern=_IFNAME.pattern)] = "br0"
    ifname: Annotated[str, Field(pattern=_IFNAME.pattern)] | None = None


class UserNetwork(_Nic):
    """qemu's user-mode (slirp) network, with optional port forwards."""

    net: Text | None = None
    hostname: Annotated[str, Field(pattern=DNS1123_LABEL.pattern)] | None = None
    port_forwards: list[PortForward] = Field(default_factory=list)

    @model_validator(mode="after")
    def _check(self) -> Self:
        if self.net is not None:
            try:
                network = ipaddress.IPv4Network(self.net, strict=False)
            except ValueError as exc:
                raise _field_error(
                    "net", f"{self.net!r} is not an IPv4 network like 10.0.2.0/24"
                ) from exc
            if network.prefixlen > 29:
                raise _field_error("net", "the prefix must be /29 or shorter")
        seen: set[tuple[str, str, int]] = set()
        for fwd in self.port_forwards:
            key = (fwd.protocol, fwd.host_address, fwd.host_port)
            if key in seen:
                raise _field_error(
                    "portForwards",
                    f"{fwd.protocol} {fwd.host_address}:{fwd.host_port} is forwarded twice",
                )
            seen.add(key)
        return self


class BridgeNetwork(_Nic):
    """A tap created by the host's bridge helper on ``name`` (the helper's ACL must allow it).

    The helper is host policy (``bridgeHelper`` in host.yaml), never a document string: qemu
    runs it as root, through ``/bin/sh -c`` when it has a space in it."""

    name: Annotated[str, Field(pattern=_IFNAME.pattern)]
    helper: Text | None = Field(
        default=None, description="refused: the bridge helper is host policy (bridgeHelper)"
    )

    @model_validator(mode="after")
    def _no_helper(self) -> Self:
        if self.helper is not None:
            raise _field_error(
                "helper",
                "the bridge helper is host policy, not part of a VM document: remove it "
                "(set bridgeHelper in /etc/corral/host.yaml)",
            )
        return self


class VdeNetwork(_Nic):
    socket: PathStr
    port: int | None = Field(default=None, ge=0)


class Network(_Model):
    """One NIC: exactly one of ``tap``, ``user``, ``bridge``, ``vde``."""

    tap: TapNetwork | None = None
    user: UserNetwork | None = None
    bridge: BridgeNetwork | None = None
    vde: VdeNetwork | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> Self:
        kinds = [k for k in ("tap", "user", "bridge", "vde") if getattr(self, k) is not None]
        if len(kinds) != 1:
            found = ", ".join(kinds) if kinds else "none"
            raise _field_error(
                "", f"a network needs exactly one of tap, user, bridge, vde (found: {found})"
            )
        return self

    @property
    def kind(self) -> str:
        return next(k for k in ("tap", "user", "bridge", "vde") if getattr(self, k) is not None)

    @property
    def nic(self) -> _Nic:
        value = getattr(self, self.kind)
        assert isinstance(value, _Nic)
        return value


# --- display -------------------------------------------------------------------------------


class SpiceDisplay(_Model):
    port: int = Field(default=5900, ge=1, le=65535)
    address: IpAddress = "127.0.0.1"
    server: Text | None = None
    generate_secret: bool = True
    proxy_url: Text | None = None
    streaming_video: Literal["off", "all", "filter"] | None = None
    usb_redirects: int = Field(default=2, ge=0, le=8)


class VncDisplay(_Model):
    port: int = Field(default=5900, ge=5900, le=65535)
    address: IpAddress = "127.0.0.1"
    websocket_port: int | None = Field(default=None, ge=1, le=65535)


class Display(_Model):
    """Remote display. Passwords come from the runner's display secret file, never from here."""

    outputs: int = Field(default=1, ge=1, le=4)
    logged_in_user: Text | None = None
    spice: SpiceDisplay | None = None
    vnc: VncDisplay | None = None


# --- the VM --------------------------------------------------------------------------------


DEFAULT_POWERDOWN_TIMEOUT = 120
"""Seconds ``stop`` waits for the guest to power off after the ACPI request (pressed again every
10 s) before it quits qemu. VM-Operator's default is 900, for servers in a cluster; locally
`corral stop` and a host shutdown would hang a quarter of an hour on a guest that ignores ACPI.
A document that sets ``powerdownTimeout`` (``900`` keeps VM-Operator's behaviour) gets exactly
that."""


DEFAULT_BOOT_TIMEOUT = 300
"""Seconds after start within which a guest must show that it booted (its guest agent answers,
or the runner's boot marker shows on the serial console) before the runner reports
``Booted=False`` with reason ``BootTimeout``. The tiny test guest boots in 5 s under TCG, a
Debian cloud image in about a minute; 300 s leaves room for a slow TCG host."""

UEFI_KERNEL_MIN_RAM = 192 * 1024**2
"""The least ``maximumRam`` for direct kernel boot (``kernel``) through OVMF, whatever the
kernel: see :func:`uefi_kernel_ram`."""


def uefi_kernel_ram(kernel_bytes: int, initrd_bytes: int) -> int:
    """The least ``maximumRam`` (bytes, whole MiB) with which OVMF boots this kernel and initrd
    directly: 128Mi plus three times their size, and at least :data:`UEFI_KERNEL_MIN_RAM`.

    OVMF copies both out of fw_cfg into guest RAM, and the kernel's EFI stub copies the initrd
    and decompresses itself there again, all before Linux runs; short of RAM, OVMF faults
    (a #GP or page-fault dump, "Can't find image information") or the stub fails ("Failed to
    load initrd") and the guest never boots. Measured with OVMF 2022.11 and qemu 7.2 (q35, TCG):
    the project's tiny guest (13.5 MiB kernel + 4.4 MiB initrd) crashes at 128Mi-152Mi and
    boots from 153Mi; with the initrd 32/64/128 MiB larger it failed at 216/290/480 MiB and
    booted at 278/374/566 MiB. Where it fails varies from boot to boot (the stub places the
    kernel at a random address), hence the margin of the factor 3."""
    need = 128 * 1024**2 + 3 * (kernel_bytes + initrd_bytes)
    mib = -(-need // 1024**2)
    return max(UEFI_KERNEL_MIN_RAM, mib * 1024**2)


class VmSpec(_Model):
    """``spec.vm``: VM-Operator's fields plus what local use and Nomad's driver add."""

    state: Literal["Running", "Stopped"] = "Stopped"
    machine_uuid: uuid.UUID | None = None
    use_tpm: bool = False
    firmware: Firmware = Firmware.UEFI
    boot_menu: bool = False
    powerdown_timeout: int = Field(default=DEFAULT_POWERDOWN_TIMEOUT, ge=0, le=86400)
    boot_timeout: int = Field(
        default=DEFAULT_BOOT_TIMEOUT,
        ge=0,
        le=86400,
        description="seconds the guest has to show it booted (guest agent or boot marker) "
        "before Booted is False with reason BootTimeout; 0: no bound",
    )
    cpu_model: Annotated[str, Field(pattern=_CPU_MODEL.pattern)] | None = None
    cpu_features: list[Annotated[str, Field(pattern=_CPU_FEATURE.pattern)]] = Field(
        default_factory=list
    )
    maximum_cpus: int | None = Field(default=None, ge=1, le=1024)
    cpu_topology: CpuTopology | None = None
    current_cpus: int | None = Field(default=None, ge=1, le=1024)
    maximum_ram: ByteSize = 1024**3
    current_ram: ByteSize | None = None
    rtc_base: Annotated[str, Field(pattern=_RTC_BASE.pattern)] = "utc"
    rtc_clock: Literal["host", "rt", "vm"] = "rt"
    networks: list[Network] = Field(default_factory=list)
    disks: list[Disk] = Field(default_factory=list)
    display: Display | None = None
    machine: MachineType = MachineType.Q35
    accelerator: Accelerator = Accelerator.AUTO
    kernel: PathStr | None = None
    initrd: PathStr | None = None
    cmdline: Text | None = None
    guest_agent: bool = True
    extra_args: list[Text] = Field(default_factory=list)
    template: Annotated[str, Field(pattern=_TEMPLATE.pattern)] | None = None

    @model_validator(mode="after")
    def _cross_field(self) -> Self:
        topo = self.cpu_topology
        if topo is not None and self.maximum_cpus is not None:
            product = topo.known_product()
            if topo.complete and product != self.maximum_cpus:
                raise _field_error(
                    "cpuTopology",
                    f"sockets x dies x cores x threads = {product}, but maximumCpus is "
                    f"{self.maximum_cpus}",
                )
            if self.maximum_cpus % product:
                raise _field_error(
                    "cpuTopology",
                    f"the given counts multiply to {product}, which does not divide "
                    f"maximumCpus {self.maximum_cpus}",
                )
        if self.current_cpus is not None and self.current_cpus > self.max_cpus:
            raise _field_error(
                "currentCpus",
                f"{self.current_cpus} is more than maximumCpus ({self.max_cpus})",
            )
        if self.maximum_ram < 128 * 1024**2:
            raise _field_error("maximumRam", "must be at least 128Mi (qemu guests panic below)")
        if self.maximum_ram % (1024**2):
            mib = self.maximum_ram / 1024**2
            raise _field_error(
                "maximumRam",
                f"must be a whole number of MiB ({format_size(self.maximum_ram)} is "
                f"{mib:.2f}Mi: write {int(mib)}Mi or {round(mib / 1024) or 1}Gi)",
            )
        if self.current_ram is not None:
            if self.current_ram > self.maximum_ram:
                raise _field_error("currentRam", "is more than maximumRam")
            if self.current_ram < 64 * 1024**2:
                raise _field_error("currentRam", "must be at least 64Mi")
        if (self.initrd is not None or self.cmdline is not None) and self.kernel is None:
            raise _field_error("kernel", "initrd and cmdline need a kernel for direct boot")
        if self.kernel is not None and self.machine is not MachineType.MICROVM:
            if self.firmware.is_uefi and self.maximum_ram < UEFI_KERNEL_MIN_RAM:
                raise _field_error(
                    "maximumRam",
                    f"must be at least {format_size(UEFI_KERNEL_MIN_RAM)} for direct kernel "
                    f"boot with firmware {self.firmware.value}: OVMF loads the kernel and "
                    "initrd into guest RAM first and faults with less (an exception dump on the "
                    "console), so the guest never boots; or use firmware: bios",
                )
            for i, disk in enumerate(self.disks):
                if disk.bootindex == 0:
                    raise _field_error(
                        f"disks.{i}.bootindex",
                        "0 is the kernel's: qemu gives direct kernel boot (kernel) bootindex 0 "
                        "and refuses to start with a second one; use 1 or more",
                    )
        if self.machine is MachineType.MICROVM:
            if self.kernel is None:
                raise _field_error("kernel", "a microvm has no firmware disk boot; give a kernel")
            if self.use_tpm:
                raise _field_error("useTpm", "the microvm machine has no TPM interface")
        names = [d.name for d in self.disks if d.name is not None]
        dups = sorted({n for n in names if names.count(n) > 1})
        if dups:
            raise _field_error("disks", f"disk names must be unique; repeated: {', '.join(dups)}")
        macs = [n.nic.mac for n in self.networks if n.nic.mac is not None]
        dup_macs = sorted({m for m in macs if macs.count(m) > 1})
        if dup_macs:
            raise _field_error("networks", f"MAC addresses repeat: {', '.join(dup_macs)}")
        if self.display and self.display.spice and self.display.vnc:
            s, v = self.display.spice, self.display.vnc
            if s.port == v.port and s.address == v.address:
                raise _field_error("display", "spice and vnc cannot listen on the same port")
        return self

    @property
    def max_cpus(self) -> int:
        """VM-Operator's rule: maximumCpus, else the topology's product, else 4."""
        if self.maximum_cpus is not None:
            return self.maximum_cpus
        if self.cpu_topology is not None:
            return self.cpu_topology.known_product()
        return 4

    @property
    def cur_cpus(self) -> int:
        return self.current_cpus if self.current_cpus is not None else self.max_cpus

    @property
    def cur_ram(self) -> int:
        return self.current_ram if self.current_ram is not None else self.maximum_ram

    @property
    def template_name(self) -> str:
        if self.template is not None:
            return self.template
        return "microvm" if self.machine is MachineType.MICROVM else "standard"


class CloudInit(_Model):
    """Data for the NoCloud seed (``meta-data``, ``user-data``, ``network-config``).

    ``userData`` may be a mapping (written as ``#cloud-config``) or a string (written as is,
    e.g. a shell script or a ``#cloud-config`` text).
    """

    meta_data: dict[str, Any] = Field(default_factory=dict)
    user_data: dict[str, Any] | str | None = None
    network_config: dict[str, Any] | None = None


class Spec(_Model):
    """``spec``: the VM plus VM-Operator's pod-level fields, which are kept for Kubernetes."""

    guest_shutdown_stops: bool = False
    restart_policy: Literal["Always", "Never"] = Field(
        default="Always",
        description="what the manager does when qemu dies on its own: restart it with "
        "exponential backoff (Always) or leave it Crashed (Never)",
    )
    cloud_init: CloudInit | None = None
    vm: VmSpec
    # VM-Operator pod-level fields: accepted so its files validate; used by the operator.
    image: dict[str, Any] | None = None
    resources: dict[str, Any] | None = None
    node_name: Text | None = None
    node_selector: dict[str, str] | None = None
    affinity: dict[str, Any] | None = None
    runner_template: dict[str, Any] | None = None
    load_balancer_service: dict[str, Any] | bool | None = None
    permissions: list[dict[str, Any]] | None = None
    pools: list[str] | None = None
    logging_properties: Text | None = None


class Metadata(_Model):
    name: Annotated[str, Field(pattern=DNS1123_LABEL.pattern, max_length=63)]
    namespace: Annotated[str, Field(pattern=DNS1123_LABEL.pattern)] | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)
    # Kept when a document comes from `kubectl get -o yaml`; corral never acts on them.
    uid: str | None = None
    resource_version: str | None = None
    generation: int | None = None
    creation_timestamp: str | None = None


class RunnerSettings(_Model):
    """Runner-only settings (``runner:``); ``corral run`` flags override them."""

    data_dir: PathStr | None = None
    runtime_dir: PathStr | None = None
    status_file: PathStr | None = None
    display_secret_file: PathStr | None = None
    emulator: PathStr | None = None
    boot_marker: Text | None = Field(
        default=None,
        description="text on the serial console that means 'booted' (besides the guest agent)",
    )


class VmDocument(_Model):
    """The whole document: ``apiVersion``/``kind`` are optional locally."""

    api_version: Literal["vmoperator.jdrupes.org/v1", "corral.dev/v1alpha1"] | None = None
    kind: Literal["VirtualMachine"] | None = None
    metadata: Metadata
    spec: Spec
    status: dict[str, Any] | None = Field(default=None, exclude=True)
    runner: RunnerSettings | None = None

    @property
    def name(self) -> str:
        return self.metadata.name

    @property
    def vm(self) -> VmSpec:
        return self.spec.vm


# --- identity derived from the document ----------------------------------------------------

_UUID_NAMESPACE = uuid.UUID("6f0b5bd6-33b4-4c5e-9a0e-2d1f0c2a7e11")


def default_uuid(name: str) -> uuid.UUID:
    """A UUID stable for a name, used only when neither the spec nor the data dir has one."""
    return uuid.uuid5(_UUID_NAMESPACE, name)


def stable_mac(machine_uuid: uuid.UUID, index: int) -> str:
    """A locally administered unicast MAC derived from the VM's UUID and the NIC's index."""
    digest = hashlib.sha256(machine_uuid.bytes + index.to_bytes(2, "big")).digest()
    octets = [(digest[0] & 0xFC) | 0x02, *digest[1:6]]
    return ":".join(f"{b:02x}" for b in octets)
