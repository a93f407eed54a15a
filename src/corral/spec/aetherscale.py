"""aetherscale's vocabulary mapped onto corral's: its message/command names and the VM
document its ``create-vm`` means. The CLI's hidden aliases use it, and so can the message API,
so the two never drift apart."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any

__all__ = ["VERBS", "Verb", "create_document", "new_vm_name"]


@dataclass(frozen=True)
class Verb:
    """What an aetherscale verb does in corral: ``action`` (a lifecycle verb, or ``delete``),
    ``hard_action`` for its ``--kill``, ``delete_disks`` for a delete."""

    action: str
    hard_action: str | None = None
    delete_disks: bool = False


VERBS: dict[str, Verb] = {
    "start-vm": Verb("start"),
    "stop-vm": Verb("stop", hard_action="kill"),
    "delete-vm": Verb("delete", delete_disks=True),  # aetherscale drops the disks too
}


def new_vm_name() -> str:
    """aetherscale's default name for a VM created without one: ``vm-<6 hex>``."""
    return f"vm-{secrets.token_hex(3)}"


def create_document(
    image: str, name: str, *, cpus: int = 1, ram: str = "1Gi", start: bool = True
) -> dict[str, Any]:
    """The VM document for aetherscale's ``create-vm``: a BIOS VM booting its own overlay of
    the base image ``image`` (from the image store), user networking, started unless not
    ``start``."""
    return {
        "metadata": {"name": name},
        "spec": {"vm": {
            "state": "Running" if start else "Stopped",
            "maximumCpus": cpus, "currentCpus": cpus, "maximumRam": ram, "firmware": "bios",
            "disks": [{"name": "root", "file": {"image": image}, "bootindex": 0}],
            "networks": [{"user": {}}],
        }},
    }  # fmt: skip
