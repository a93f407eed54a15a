"""aetherscale's command names (hidden aliases): ``create-vm``, ``start-vm``, ``stop-vm``,
``delete-vm``, ``list-vms``; what they mean is :mod:`corral.spec.aetherscale`'s."""

from __future__ import annotations

import click

from corral.cli.completion import vm_names
from corral.cli.connection import client

__all__ = ["create_vm", "delete_vm", "list_vms", "start_vm", "stop_vm"]


@click.command("create-vm", hidden=True)
@click.option("--image", required=True, help="A base image in the image store.")
@click.option("--name", default=None, help="VM name (default: vm-<random>).")
@click.option("--cpus", type=click.IntRange(1, 1024), default=1, show_default=True)
@click.option("--ram", default="1Gi", show_default=True)
@click.option("--no-start", is_flag=True)
@click.pass_context
def create_vm(ctx: click.Context, image: str, name: str | None, cpus: int, ram: str,
              no_start: bool) -> None:  # fmt: skip
    """aetherscale: create a VM from a base image (its own overlay) and start it."""
    from corral.spec.aetherscale import create_document, new_vm_name

    vm_name = name or new_vm_name()
    client(ctx).create_vm(create_document(image, vm_name, cpus=cpus, ram=ram, start=not no_start))
    click.echo(vm_name)


def _alias(verb: str, doc: str) -> click.Command:
    @click.command(f"{verb}-vm", help=doc, hidden=True)
    @click.option("--vm-id", required=True, shell_complete=vm_names)
    @click.option("--kill", "hard", is_flag=True, help="stop-vm: kill instead of powerdown.")
    @click.pass_context
    def command(ctx: click.Context, vm_id: str, hard: bool) -> None:
        from corral.spec.aetherscale import VERBS

        c = client(ctx)
        meaning = VERBS[f"{verb}-vm"]
        if meaning.action == "delete":
            c.delete_vm(vm_id, delete_disks=meaning.delete_disks)
        else:
            c.action(vm_id, meaning.hard_action if hard and meaning.hard_action else meaning.action)
        click.echo(f"vm/{vm_id} {verb}")

    return command


@click.command("list-vms", hidden=True)
@click.pass_context
def list_vms(ctx: click.Context) -> None:
    """aetherscale: list VMs (name and state)."""
    for vm in client(ctx).list_vms():
        click.echo(f"{vm['metadata']['name']}\t{(vm.get('status') or {}).get('state')}")


start_vm = _alias("start", "aetherscale: start a VM.")
stop_vm = _alias("stop", "aetherscale: stop a VM (--kill: at once).")
delete_vm = _alias("delete", "aetherscale: delete a VM and its disks.")
