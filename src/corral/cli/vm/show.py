"""``corral list``, ``show`` and ``ip``: what the daemon says about VMs, as tables, details
or ``-o json|yaml|name``."""

from __future__ import annotations

from typing import Any, cast

import click

from corral.cli.completion import vm_names
from corral.cli.connection import client
from corral.cli.output import OUTPUT, VM_COLUMNS, details, show_items, show_object, vm_name, vm_row

__all__ = ["ip", "list_", "show"]


@click.command("list")
@click.option("--state", default=None, help="Only VMs in this state (Running, Stopped, ...).")
@click.option("-l", "--selector", "label", default=None, help="Label selector key=value.")
@OUTPUT
@click.pass_context
def list_(ctx: click.Context, state: str | None, label: str | None, output: str) -> None:
    """List VMs: state, CPUs, RAM, IPs, uptime (-o wide: pid, accelerator, restarts, age,
    labels; -o name: the names)."""
    vms = client(ctx).read("/v1/vms", {"state": state, "label": label})["items"]
    show_items(vms, output, columns=VM_COLUMNS, name=vm_name)


@click.command()
@click.argument("name", shell_complete=vm_names)
@OUTPUT
@click.pass_context
def show(ctx: click.Context, name: str, output: str) -> None:
    """One VM: its document and status (-o json|yaml for the whole document)."""
    vm = _get(ctx, name)
    show_object(vm, output, name=vm_name(vm), text=lambda wide: details(_details(vm, wide)))


def _get(ctx: click.Context, name: str) -> dict[str, Any]:
    """The VM as the daemon sent it: the read commands only print it, so they skip the typed
    view (pydantic) and the httpx client (:meth:`corral.client.Client.read`)."""
    from urllib.parse import quote

    return cast(dict[str, Any], client(ctx).read(f"/v1/vms/{quote(name, safe='')}"))


def _details(vm: dict[str, Any], wide: bool) -> list[tuple[str, object]]:
    status = vm.get("status") or {}
    row = vm_row(vm)
    conditions = status.get("conditions") or {}
    lines = [
        ("Name", row[0]), ("State", row[1]), ("CPUs", row[2]), ("RAM", row[3]),
        ("IPs", row[4]), ("Uptime", row[5]), ("qemu pid", status.get("pid") or "-"),
        ("Accelerator", status.get("accelerator") or "-"),
        ("Conditions", ", ".join(f"{k}={v.get('status')}" for k, v in conditions.items()) or "-"),
        ("CD media", ", ".join(f"{k}={v or '(empty)'}" for k, v in
                               (status.get("cdrom") or {}).items()) or "-"),
        ("Displays", _displays(vm)),
        ("Port forwards", _forwards(vm)),
        ("Pending restart", ", ".join(status.get("pendingRestart") or []) or "-"),
        ("Generation", f"{vm['metadata'].get('generation')} (observed "
                       f"{status.get('observedGeneration')})"),
        ("Last error", status.get("lastError") or status.get("configError") or "-"),
        *_crash(status),
        *_not_booted(conditions),
    ]  # fmt: skip
    if wide:
        meta = vm.get("metadata") or {}
        lines += [
            ("UID", meta.get("uid")), ("Created", meta.get("creationTimestamp")),
            ("Labels", ", ".join(f"{k}={v}" for k, v in (meta.get("labels") or {}).items())),
            ("Restarts", status.get("restarts")), ("Stopped by", status.get("stoppedBy")),
            ("swtpm pid", status.get("swtpmPid")), ("Updated", status.get("updatedAt")),
        ]  # fmt: skip
    return lines


def _not_booted(conditions: dict[str, Any]) -> list[tuple[str, object]]:
    """A guest that showed no sign of booting in its bootTimeout: why, in its console's words."""
    booted = conditions.get("Booted") or {}
    if booted.get("status") or booted.get("reason") != "BootTimeout":
        return []
    return [("Not booted", booted.get("message") or "BootTimeout")]


def _crash(status: dict[str, Any]) -> list[tuple[str, object]]:
    """A Crashed VM: how qemu ended and its last stderr lines (unless the error says them)."""
    exit_info = status.get("exit")
    if status.get("state") != "Crashed" or not isinstance(exit_info, dict):
        return []
    if exit_info.get("code") is not None:
        how = f"code {exit_info['code']}"
    elif exit_info.get("signal") is not None:
        how = f"signal {exit_info['signal']}"
    elif exit_info.get("error"):
        how = "failed to start"
    else:
        how = "unknown (qemu was not the runner's child)"
    shown: list[tuple[str, object]] = [("Exit", how)]
    said = exit_info.get("stderr")
    if said and str(said) not in str(status.get("lastError") or ""):
        shown.append(("qemu stderr", said))
    return shown


def _displays(vm: dict[str, Any]) -> str:
    display = ((vm.get("spec") or {}).get("vm") or {}).get("display") or {}
    shown = [f"{p}://{(display[p] or {}).get('address', '127.0.0.1')}:"
             f"{(display[p] or {}).get('port', 5900)}"
             for p in ("spice", "vnc") if p in display]  # fmt: skip
    return ", ".join(shown) + " (corral display NAME: a password)" if shown else "-"


def _forwards(vm: dict[str, Any]) -> str:
    shown = []
    for nic in ((vm.get("spec") or {}).get("vm") or {}).get("networks") or []:
        for fwd in (nic.get("user") or {}).get("portForwards") or []:
            shown.append(f"{fwd.get('hostAddress', '127.0.0.1')}:{fwd['hostPort']}->"
                         f"{fwd['guestPort']}/{fwd.get('protocol', 'tcp')}")  # fmt: skip
    return ", ".join(shown) or "-"


@click.command()
@click.argument("name", shell_complete=vm_names)
@OUTPUT
@click.pass_context
def ip(ctx: click.Context, name: str, output: str) -> None:
    """The guest's IP addresses (from the guest agent), one per line."""
    ips = [str(ip) for ip in (_get(ctx, name).get("status") or {}).get("ips") or []]
    show_object({"name": name, "ips": ips}, output, name=ips, text=lambda wide: ips)
