"""The devices of a VM document: disks (cdrom, file, block device, claim template), networks
(tap, user, bridge, vde) and the remote display (SPICE, VNC). Each is a tagged choice, exactly
one kind per entry, and each rule's message names its field."""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated, Any, Literal, Self

from pydantic import Field, model_validator

from corral.spec.fields import (
    DNS1123_LABEL,
    DiskFormat,
    DiskInterface,
    IpAddress,
    Mac,
    PathStr,
    SpecModel,
    Text,
    field_error,
)
from corral.spec.sizes import ByteSize

__all__ = [
    "BridgeNetwork",
    "CdromDisk",
    "DeviceDisk",
    "Disk",
    "Display",
    "FileDisk",
    "Network",
    "NicModel",
    "PortForward",
    "SpiceDisplay",
    "TapNetwork",
    "UserNetwork",
    "VdeNetwork",
    "VncDisplay",
    "is_remote_image",
]

_DISK_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]{0,18}[a-z0-9])?$")
_IFNAME = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")
_NIC_MODELS = ("virtio-net", "virtio-net-pci", "e1000", "e1000e", "rtl8139", "vmxnet3")


# --- disks ---------------------------------------------------------------------------------


_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_remote_image(image: str | None) -> bool:
    """An ``http://``/``https://`` URL (VM-Operator's cdrom images), not a host path."""
    return bool(image) and re.match(r"^https?://", image or "", re.IGNORECASE) is not None


class CdromDisk(SpecModel):
    """A CD drive. ``image: ""`` is a drive with no media (insert one later, live).

    ``image`` is a host path, or an ``http(s)://`` URL that qemu reads with its curl driver
    when the host policy allows remote images (``remoteImages``)."""

    image: Text
    interface: Literal["ide", "scsi"] | None = None

    @model_validator(mode="after")
    def _no_other_urls(self) -> Self:
        if _URL.match(self.image) and not is_remote_image(self.image):
            raise field_error(
                "image", "must be a host path or an http(s):// URL; no other URL schemes"
            )
        if is_remote_image(self.image) and any(c in self.image for c in " \n\r\t"):
            raise field_error("image", "a URL cannot contain whitespace")
        return self


class FileDisk(SpecModel):
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
            raise field_error(
                "", "give exactly one of 'path' (a disk file) or 'image' (a base image)"
            )
        if self.image is not None and self.format is not DiskFormat.QCOW2:
            raise field_error("format", "a disk made from an image is a qcow2 overlay")
        if self.size is not None and self.size < 1024**2:
            raise field_error("size", "must be at least 1Mi")
        return self


class DeviceDisk(SpecModel):
    """A host block device (an LV, a partition, a whole disk)."""

    path: PathStr
    interface: DiskInterface = DiskInterface.VIRTIO
    read_only: bool = False
    serial: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,20}$")] | None = None


class Disk(SpecModel):
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
            raise field_error(
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


NicModel = Literal["virtio-net", "virtio-net-pci", "e1000", "e1000e", "rtl8139", "vmxnet3"]


class PortForward(SpecModel):
    """Nomad's port_map for user networking: ``hostAddress:hostPort`` -> ``guestPort``."""

    protocol: Literal["tcp", "udp"] = "tcp"
    host_port: int = Field(ge=1, le=65535)
    guest_port: int = Field(ge=1, le=65535)
    host_address: IpAddress = "127.0.0.1"
    guest_address: IpAddress | None = None


class _Nic(SpecModel):
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
                raise field_error(
                    "net", f"{self.net!r} is not an IPv4 network like 10.0.2.0/24"
                ) from exc
            if network.prefixlen > 29:
                raise field_error("net", "the prefix must be /29 or shorter")
        seen: set[tuple[str, str, int]] = set()
        for fwd in self.port_forwards:
            key = (fwd.protocol, fwd.host_address, fwd.host_port)
            if key in seen:
                raise field_error(
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
            raise field_error(
                "helper",
                "the bridge helper is host policy, not part of a VM document: remove it "
                "(set bridgeHelper in /etc/corral/host.yaml)",
            )
        return self


class VdeNetwork(_Nic):
    socket: PathStr
    port: int | None = Field(default=None, ge=0)


class Network(SpecModel):
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
            raise field_error(
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


class SpiceDisplay(SpecModel):
    port: int = Field(default=5900, ge=1, le=65535)
    address: IpAddress = "127.0.0.1"
    server: Text | None = None
    generate_secret: bool = True
    proxy_url: Text | None = None
    streaming_video: Literal["off", "all", "filter"] | None = None
    usb_redirects: int = Field(default=2, ge=0, le=8)


class VncDisplay(SpecModel):
    port: int = Field(default=5900, ge=5900, le=65535)
    address: IpAddress = "127.0.0.1"
    websocket_port: int | None = Field(default=None, ge=1, le=65535)


class Display(SpecModel):
    """Remote display. Passwords come from the runner's display secret file, never from here."""

    outputs: int = Field(default=1, ge=1, le=4)
    logged_in_user: Text | None = None
    spice: SpiceDisplay | None = None
    vnc: VncDisplay | None = None
