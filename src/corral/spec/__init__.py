"""The VM document and host policy: validated, typed, with errors that name the field.

Imports nothing of corral but :mod:`corral.errors`.
"""

from corral.spec.document import (
    document_json_schema,
    load_document,
    load_document_file,
    parse_document,
)
from corral.spec.models import (
    Accelerator,
    Disk,
    DiskInterface,
    Firmware,
    MachineType,
    Network,
    VmDocument,
    VmSpec,
    default_uuid,
    stable_mac,
)
from corral.spec.policy import HostPolicy, check_policy, load_policy
from corral.spec.sizes import ByteSize, format_size, parse_size

__all__ = [
    "Accelerator",
    "ByteSize",
    "Disk",
    "DiskInterface",
    "Firmware",
    "HostPolicy",
    "MachineType",
    "Network",
    "VmDocument",
    "VmSpec",
    "check_policy",
    "default_uuid",
    "document_json_schema",
    "format_size",
    "load_document",
    "load_document_file",
    "load_policy",
    "parse_document",
    "parse_size",
    "stable_mac",
]
