"""``corral disk list|delete``: the disks deleted VMs left behind (their whole data dir).

A VM deleted without ``--delete-disks`` keeps its data for the user, never for the next VM of
its name; ``corral create -f vm.yaml --adopt-disks ID`` gives it to a new VM.
"""

from __future__ import annotations

import click

from corral.cli.output import OUTPUT, age, emit, format_bytes, table
from corral.cli.vms import client

__all__ = ["disk"]


@click.group()
def disk() -> None:
    """Retained disks: data dirs of deleted VMs (overlays, UUID, TPM, firmware vars)."""


@disk.command("list")
@OUTPUT
@click.pass_context
def list_(ctx: click.Context, output: str) -> None:
    """Retained disk sets: the VM that left each, its disks, size on disk, age."""
    sets = client(ctx).list_disks()
    if output != "table":
        emit({"items": sets}, output)
        return
    table(
        ["ID", "VM", "UUID", "DISKS", "ON DISK", "DELETED"],
        [[s["id"], s["vm"], s.get("uuid") or "-",
          ", ".join(f"{d['name']} ({format_bytes(d['virtualSize'])})"
                    for d in s.get("disks") or []) or "-",
          format_bytes(s.get("bytes")), age(s.get("deletedAt"))] for s in sets],
    )  # fmt: skip


@disk.command("delete")
@click.argument("ids", nargs=-1, required=True)
@click.pass_context
def delete(ctx: click.Context, ids: tuple[str, ...]) -> None:
    """Delete retained disk sets for good (by ID, or by the VM name that left only one)."""
    c = client(ctx)
    for set_id in ids:
        c.delete_disks(set_id)
        click.echo(f"disk/{set_id} deleted")
