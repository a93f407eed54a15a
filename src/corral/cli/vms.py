"""The client commands for VMs' documents (``apply``, ``create``, ``delete``, ``set``, ``cd``)
and guests (``exec``, ``events``, ``console``, ``display``); ``register`` adds these and the
ones in :mod:`corral.cli.vm` (list/show/ip, the lifecycle verbs, aetherscale's names) are
found by name in :data:`corral.cli.main.COMMANDS`. Each talks to the daemon through
:class:`corral.client.Client`."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from corral.cli.completion import vm_names
from corral.cli.connection import client
from corral.cli.output import OUTPUT, Column, show_object, show_stream
from corral.printable import printable

if TYPE_CHECKING:
    from corral.client import Client
    from corral.spec.views import VmView

__all__ = [
    "apply", "cd", "console", "create", "delete", "display", "events", "exec_", "set_",
]  # fmt: skip

_ADOPT = click.option("--adopt-disks", "adopt", default=None, metavar="ID",
                      help="A new VM takes over these retained disks (corral disk list): "
                           "disks, UUID, TPM, firmware vars.")  # fmt: skip


def _documents(files: tuple[str, ...]) -> list[dict[str, Any]]:
    import yaml

    from corral.errors import SpecError

    docs: list[dict[str, Any]] = []
    for name in files:
        try:
            text = sys.stdin.read() if name == "-" else Path(name).read_text(encoding="utf-8")
            loaded = [d for d in yaml.safe_load_all(text) if d is not None]
        except (OSError, yaml.YAMLError) as exc:
            raise SpecError(f"cannot read {name}: {exc}") from exc
        for i, doc in enumerate(loaded):
            if not isinstance(doc, dict):
                raise SpecError.single(f"{name}[{i}]", "a VM document must be a mapping")
            docs.append(doc)
    return docs


@click.command()
@click.option("-f", "--file", "files", multiple=True, required=True,
              help="VM document(s), YAML; '-' for stdin; several documents per file.")  # fmt: skip
@_ADOPT
@click.pass_context
def apply(ctx: click.Context, files: tuple[str, ...], adopt: str | None) -> None:
    """Create or update VMs from their documents (declarative, like kubectl apply)."""
    c = client(ctx)
    adopted = f" with disks {adopt}" if adopt else ""
    for doc in _one_if_adopting(_documents(files), adopt):
        verb, vm = c.apply_vm(doc, adopt_disks=adopt)
        vm = _observed(c, vm) if verb == "configured" else vm
        waits = ", ".join(vm.status.pending_restart)
        click.echo(printable(f"vm/{vm.name} {verb}{adopted}"
                   + (f"; waits for a restart: {waits}" if waits else "")))  # fmt: skip
        if vm.status.config_error:
            click.echo(printable(f"warning: vm/{vm.name}: not applied live: "
                       f"{vm.status.config_error}"), err=True)  # fmt: skip


def _observed(c: Client, vm: VmView, timeout: float = 10.0) -> VmView:
    """The VM once a running VM has taken the new generation (live changes applied, the
    rest in ``pendingRestart``), or as it is after ``timeout``."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        if vm.status.state != "Running" or (vm.status.observed_generation or 0) >= (
            vm.metadata.generation or 0
        ):
            return vm
        if time.monotonic() > deadline:
            return vm
        time.sleep(0.2)
        vm = c.get_vm(vm.name)


@click.command()
@click.option("-f", "--file", "files", multiple=True, required=True, help="VM document(s).")
@_ADOPT
@click.pass_context
def create(ctx: click.Context, files: tuple[str, ...], adopt: str | None) -> None:
    """Create VMs (an existing name is an error). A new VM starts with empty disks of its
    own, unless it adopts retained ones."""
    c = client(ctx)
    adopted = f" with disks {adopt}" if adopt else ""
    for doc in _one_if_adopting(_documents(files), adopt):
        vm = c.create_vm(doc, adopt_disks=adopt)
        click.echo(f"vm/{vm['metadata']['name']} created{adopted}")


def _one_if_adopting(docs: list[dict[str, Any]], adopt: str | None) -> list[dict[str, Any]]:
    if adopt is not None and len(docs) != 1:
        raise click.UsageError(f"--adopt-disks needs exactly one VM document, not {len(docs)}")
    return docs


@click.command()
@click.argument("names", nargs=-1, required=True, shell_complete=vm_names)
@click.option("--delete-disks", is_flag=True, help="Also delete the VM's disks (overlays).")
@click.option(
    "--force", is_flag=True,
    help="Kill qemu (SIGKILL) instead of a graceful stop, aborting one in flight.",
)  # fmt: skip
@click.pass_context
def delete(ctx: click.Context, names: tuple[str, ...], delete_disks: bool, force: bool) -> None:
    """Stop and delete VMs. Their disks are retained (corral disk list; no new VM inherits
    them) unless --delete-disks. --force kills instead of stopping gracefully."""
    c = client(ctx)
    for name in names:
        retained = c.delete_vm(name, delete_disks=delete_disks, force=force).get("retainedDisks")
        click.echo(f"vm/{name} deleted" + (" with its disks" if delete_disks else "")
                   + (f"; disks retained as {retained}" if retained else ""))  # fmt: skip


@click.command("set")
@click.argument("name", shell_complete=vm_names)
@click.option("--cpus", type=click.IntRange(1, 1024), default=None, help="currentCpus (live).")
@click.option("--ram", default=None, help="currentRam, e.g. 2Gi (live, balloon).")
@click.option("--powerdown-timeout", type=click.IntRange(0, 86400), default=None)
@click.pass_context
def set_(
    ctx: click.Context, name: str, cpus: int | None, ram: str | None, powerdown_timeout: int | None
) -> None:
    """Change a VM's CPUs / RAM in place (declaratively: the spec changes, the runner applies)."""
    vm_patch: dict[str, Any] = {}
    if cpus is not None:
        vm_patch["currentCpus"] = cpus
    if ram is not None:
        vm_patch["currentRam"] = ram
    if powerdown_timeout is not None:
        vm_patch["powerdownTimeout"] = powerdown_timeout
    if not vm_patch:
        raise click.UsageError("nothing to set: give --cpus, --ram or --powerdown-timeout")
    vm = client(ctx).patch_vm(name, {"spec": {"vm": vm_patch}})
    click.echo(f"vm/{name} patched (generation {vm['metadata']['generation']})")


@click.group()
def cd() -> None:
    """Insert or eject CD media (live)."""


def _set_media(ctx: click.Context, name: str, image: str | None, drive: str | None) -> str:
    used, _ = client(ctx).set_media(name, image, drive=drive)
    return used


@cd.command("insert")
@click.argument("name", shell_complete=vm_names)
@click.argument("image")
@click.option("--drive", default=None, help="The CD drive's disk name (default: the first).")
@click.pass_context
def cd_insert(ctx: click.Context, name: str, image: str, drive: str | None) -> None:
    """Put IMAGE (a path on the host) into the VM's CD drive."""
    path = str(Path(image).resolve()) if not image.startswith("/") else image
    used = _set_media(ctx, name, path, drive)
    click.echo(f"vm/{name} {used}: {path}")


@cd.command("eject")
@click.argument("name", shell_complete=vm_names)
@click.option("--drive", default=None)
@click.pass_context
def cd_eject(ctx: click.Context, name: str, drive: str | None) -> None:
    """Eject the VM's CD media."""
    used = _set_media(ctx, name, None, drive)
    click.echo(f"vm/{name} {used}: ejected")


@click.command("exec", context_settings={"ignore_unknown_options": True})
@click.argument("name", shell_complete=vm_names)
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@click.option("--timeout", type=float, default=60.0, show_default=True)
@click.option("-i", "--stdin", "send_stdin", is_flag=True, help="Send this process's stdin.")
@click.pass_context
def exec_(
    ctx: click.Context, name: str, command: tuple[str, ...], timeout: float, send_stdin: bool
) -> None:
    """Run a command in the guest (guest agent); exits with the command's exit code.

    corral exec web1 -- uname -a
    """
    data = sys.stdin.read() if send_stdin else None
    result = client(ctx).exec(name, list(command), stdin=data, timeout=timeout)
    sys.stdout.write(result["stdout"])
    sys.stderr.write(result["stderr"])
    code = result.get("exitCode")
    ctx.exit(int(code) if isinstance(code, int) else 1)


@click.command()
@click.argument("name", required=False, shell_complete=vm_names)
@click.option("-f", "--follow", is_flag=True, help="Keep printing new events.")
@OUTPUT
@click.pass_context
def events(ctx: click.Context, name: str | None, follow: bool, output: str) -> None:
    """Events of one VM, or of all VMs and images (-o json: one JSON object per line)."""
    show_stream(client(ctx).events(name, follow=follow), output, columns=_EVENT_COLUMNS,
                name=lambda e: e.get("event"))  # fmt: skip


def _event_detail(event: dict[str, Any]) -> str:
    import json

    extra = {k: v for k, v in event.items() if k not in ("id", "vm", "time", "event", "ts", "t")}
    return " ".join(f"{k}={json.dumps(v, default=str)}" for k, v in extra.items())


_EVENT_COLUMNS: list[Column[dict[str, Any]]] = [
    Column("ID", lambda e: e.get("id"), wide=True, width=6),
    Column("TIME", lambda e: e.get("time"), width=24),
    Column("VM", lambda e: e.get("vm"), width=16),
    Column("EVENT", lambda e: e.get("event"), width=22),
    Column("DETAILS", _event_detail),
]


@click.command()
@click.argument("name", shell_complete=vm_names)
@click.pass_context
def console(ctx: click.Context, name: str) -> None:
    """Attach to the VM's serial console; Ctrl-] leaves."""
    from corral.cli.terminal import attach_console

    attach_console(client(ctx), name)


@click.command()
@click.argument("name", shell_complete=vm_names)
@click.option("--expiry", type=click.IntRange(1, 86400), default=30, show_default=True,
              help="Seconds the password stays valid for a new connection.")  # fmt: skip
@OUTPUT
@click.pass_context
def display(ctx: click.Context, name: str, expiry: int, output: str) -> None:
    """Set a fresh display password that expires soon; print the spice:// / vnc:// URLs
    (like virsh domdisplay --include-password). remote-viewer takes the URL."""
    got = client(ctx).display(name, expiry=expiry)
    lines = [*(d["url"] for d in got["displays"]),
             f"password: {got['password']} (valid until {got['expiresAt']})"]  # fmt: skip
    show_object(got, output, name=[d["protocol"] for d in got["displays"]], text=lambda w: lines)
