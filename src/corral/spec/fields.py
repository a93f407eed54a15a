"""The building blocks of the VM document's models: the strict base model, the checked
string types (host paths, free text for argv, MACs, IP addresses), the enums, and the error a
cross-field rule raises (it names the field it is about)."""

from __future__ import annotations

import ipaddress
import re
from enum import StrEnum
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict
from pydantic.alias_generators import to_camel
from pydantic_core import PydanticCustomError

__all__ = [
    "DNS1123_LABEL",
    "Accelerator",
    "DiskFormat",
    "DiskInterface",
    "Firmware",
    "IpAddress",
    "Mac",
    "MachineType",
    "PathStr",
    "SpecModel",
    "Text",
    "field_error",
]

DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_MAC = re.compile(r"^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$")


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


def _ip(value: str) -> str:
    try:
        ipaddress.ip_address(value)
    except ValueError as exc:
        raise ValueError(f"{value!r} is not an IP address") from exc
    return value


IpAddress = Annotated[str, AfterValidator(_ip)]


def field_error(field: str, reason: str) -> PydanticCustomError:
    """A cross-field rule broken; ``field`` (camelCase, may be empty) extends the error's path."""
    message = "{field}: {reason}" if field else "{reason}"
    return PydanticCustomError("corral_rule", message, {"field": field, "reason": reason})


class SpecModel(BaseModel):
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
