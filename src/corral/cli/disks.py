"""``corral disk list|delete``: the disks deleted VMs left behind (their whole data dir).

A VM deleted without ``--delete-disks`` keeps its data for the user, never for the next VM of
its name; ``corral create -f vm.yaml --adopt-disks ID`` gives it to a new VM.
"""

from __future__ import annotations

from typing import Any

import click

from corral.cli.connection import client
from corral.cli.output import OUTPUT, Column, age, format_bytes, show_items

__all__ = ["disk"]


@click.group()
def disk() -> None:
    """Retained disks: data dirs of deleted VMs (overlays, UUID, TPM, firmware vars)."""


@disk.command("list")
@OUTPUT
@click.pass_context
def list_(ctx: click.Context, output: str) -> None:
    """Retained disk sets: the VM that left each, its disks, size on disk, age (-o wide: the
    path; -o name: the IDs)."""
    show_items(client(ctx).list_disks(), output, columns=_COLUMNS, name=lambda s: s["id"])


_COLUMNS: list[Column[dict[str, Any]]] = [
    Column("ID", lambda s: s["id"]),
    Column("VM", lambda s: s["vm"]),
    Column("UUID", lambda s: s.get("uuid")),
    Column("DISKS", lambda s: ",".join(f"{d['name']}:{format_bytes(d['virtualSize'])}"
                                       for d in s.get("disks") or [])),
    Column("ON DISK", lambda s: format_bytes(s.get("bytes"))),
    Column("DELETED", lambda s: age(s.get("deletedAt"))),
    Column("PATH", lambda s: s.get("path"), wide=True),
]  # fmt: skip


@disk.command("delete")
@click.argument("ids", nargs=-1, required=True)
@click.pass_context
def delete(ctx: click.Context, ids: tuple[str, ...]) -> None:
    """Delete retained disk sets for good (by ID, or by the VM name that left only one)."""
    c = client(ctx)
    for set_id in ids:
        c.delete_disks(set_id)
        click.echo(f"disk/{set_id} deleted")
