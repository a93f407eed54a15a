"""The VM document: one YAML shape for ``corral run``, ``corral render``, the manager and the CRD.

It has the shape of VM-Operator's ``VirtualMachine`` resource (``metadata``, ``spec`` with
``guestShutdownStops``, ``cloudInit`` and ``vm``), so a VM-Operator user's file validates as it
is; corral adds local disks and networks, direct kernel boot, VNC, the machine type and the
accelerator. Fields are camelCase in documents and snake_case in Python.

Every model forbids unknown fields: a typo is an error naming the field, never silently
ignored. Rules that span fields (``currentCpus <= maximumCpus``, one disk kind per disk...) are
model validators whose messages name the field they are about.

This module holds the document root, ``spec`` and ``spec.vm``; the devices (disks, networks,
display) are in :mod:`corral.spec.devices` and the shared field types, enums and base model in
:mod:`corral.spec.fields`. Every name stays importable from here.
"""

from __future__ import annotations

import hashlib
import re
import uuid
from typing import Annotated, Any, Literal, Self

from pydantic import Field, model_validator

from corral.spec.devices import (
    BridgeNetwork,
    CdromDisk,
    DeviceDisk,
    Disk,
    Display,
    FileDisk,
    Network,
    NicModel,
    PortForward,
    SpiceDisplay,
    TapNetwork,
    UserNetwork,
    VdeNetwork,
    VncDisplay,
    is_remote_image,
)
from corral.spec.fields import (
    DNS1123_LABEL,
    Accelerator,
    DiskFormat,
    DiskInterface,
    Firmware,
    IpAddress,
    Mac,
    MachineType,
    PathStr,
    SpecModel,
    Text,
    field_error,
)
from corral.spec.sizes import ByteSize, format_size

__all__ = [
    "DEFAULT_BOOT_TIMEOUT",
    "DEFAULT_POWERDOWN_TIMEOUT",
    "DNS1123_LABEL",
    "UEFI_KERNEL_MIN_RAM",
    "Accelerator",
    "BridgeNetwork",
    "CdromDisk",
    "CloudInit",
    "CpuTopology",
    "DeviceDisk",
    "Disk",
    "DiskFormat",
    "DiskInterface",
    "Display",
    "FileDisk",
    "Firmware",
    "IpAddress",
    "Mac",
    "MachineType",
    "Metadata",
    "Network",
    "NicModel",
    "PathStr",
    "PortForward",
    "RunnerSettings",
    "Spec",
    "SpiceDisplay",
    "TapNetwork",
    "Text",
    "UserNetwork",
    "VdeNetwork",
    "VmDocument",
    "VmSpec",
    "VncDisplay",
    "is_remote_image",
    "uefi_kernel_ram",
]

_TEMPLATE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
_CPU_MODEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_CPU_FEATURE = re.compile(r"^[+-][A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_RTC_BASE = re.compile(r"^(utc|localtime|\d{4}-\d{2}-\d{2}(T\d{2}:\d{2}:\d{2})?)$")
API_VERSIONS = ("vmoperator.jdrupes.org/v1", "corral.dev/v1alpha1")


# --- CPU -----------------------------------------------------------------------------------


class CpuTopology(SpecModel):
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


class VmSpec(SpecModel):
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
                raise field_error(
                    "cpuTopology",
                    f"sockets x dies x cores x threads = {product}, but maximumCpus is "
                    f"{self.maximum_cpus}",
                )
            if self.maximum_cpus % product:
                raise field_error(
                    "cpuTopology",
                    f"the given counts multiply to {product}, which does not divide "
                    f"maximumCpus {self.maximum_cpus}",
                )
        if self.current_cpus is not None and self.current_cpus > self.max_cpus:
            raise field_error(
                "currentCpus",
                f"{self.current_cpus} is more than maximumCpus ({self.max_cpus})",
            )
        if self.maximum_ram < 128 * 1024**2:
            raise field_error("maximumRam", "must be at least 128Mi (qemu guests panic below)")
        if self.maximum_ram % (1024**2):
            mib = self.maximum_ram / 1024**2
            raise field_error(
                "maximumRam",
                f"must be a whole number of MiB ({format_size(self.maximum_ram)} is "
                f"{mib:.2f}Mi: write {int(mib)}Mi or {round(mib / 1024) or 1}Gi)",
            )
        if self.current_ram is not None:
            if self.current_ram > self.maximum_ram:
                raise field_error("currentRam", "is more than maximumRam")
            if self.current_ram < 64 * 1024**2:
                raise field_error("currentRam", "must be at least 64Mi")
        if (self.initrd is not None or self.cmdline is not None) and self.kernel is None:
            raise field_error("kernel", "initrd and cmdline need a kernel for direct boot")
        if self.kernel is not None and self.machine is not MachineType.MICROVM:
            if self.firmware.is_uefi and self.maximum_ram < UEFI_KERNEL_MIN_RAM:
                raise field_error(
                    "maximumRam",
                    f"must be at least {format_size(UEFI_KERNEL_MIN_RAM)} for direct kernel "
                    f"boot with firmware {self.firmware.value}: OVMF loads the kernel and "
                    "initrd into guest RAM first and faults with less (an exception dump on the "
                    "console), so the guest never boots; or use firmware: bios",
                )
            for i, disk in enumerate(self.disks):
                if disk.bootindex == 0:
                    raise field_error(
                        f"disks.{i}.bootindex",
                        "0 is the kernel's: qemu gives direct kernel boot (kernel) bootindex 0 "
                        "and refuses to start with a second one; use 1 or more",
                    )
        if self.machine is MachineType.MICROVM:
            if self.kernel is None:
                raise field_error("kernel", "a microvm has no firmware disk boot; give a kernel")
            if self.use_tpm:
                raise field_error("useTpm", "the microvm machine has no TPM interface")
        names = [d.name for d in self.disks if d.name is not None]
        dups = sorted({n for n in names if names.count(n) > 1})
        if dups:
            raise field_error("disks", f"disk names must be unique; repeated: {', '.join(dups)}")
        macs = [n.nic.mac for n in self.networks if n.nic.mac is not None]
        dup_macs = sorted({m for m in macs if macs.count(m) > 1})
        if dup_macs:
            raise field_error("networks", f"MAC addresses repeat: {', '.join(dup_macs)}")
        if self.display and self.display.spice and self.display.vnc:
            s, v = self.display.spice, self.display.vnc
            if s.port == v.port and s.address == v.address:
                raise field_error("display", "spice and vnc cannot listen on the same port")
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


class CloudInit(SpecModel):
    """Data for the NoCloud seed (``meta-data``, ``user-data``, ``network-config``).

    ``userData`` may be a mapping (written as ``#cloud-config``) or a string (written as is,
    e.g. a shell script or a ``#cloud-config`` text).
    """

    meta_data: dict[str, Any] = Field(default_factory=dict)
    user_data: dict[str, Any] | str | None = None
    network_config: dict[str, Any] | None = None


class Spec(SpecModel):
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


class Metadata(SpecModel):
    name: Annotated[str, Field(pattern=DNS1123_LABEL.pattern, max_length=63)]
    namespace: Annotated[str, Field(pattern=DNS1123_LABEL.pattern)] | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)
    # Kept when a document comes from `kubectl get -o yaml`; corral never acts on them.
    uid: str | None = None
    resource_version: str | None = None
    generation: int | None = None
    creation_timestamp: str | None = None


class RunnerSettings(SpecModel):
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


class VmDocument(SpecModel):
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
