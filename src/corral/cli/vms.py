"""The client commands for VMs: ``apply``, ``create``, ``list``, ``show``, lifecycle verbs,
``delete``, ``set``, ``cd``, ``console``, ``exec``, ``ip``, ``events``; plus aetherscale's
command names as aliases. Each talks to the daemon through :class:`corral.client.Client`."""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from corral.cli.completion import vm_names
from corral.cli.output import (
    OUTPUT,
    VM_COLUMNS,
    Column,
    details,
    show_items,
    show_object,
    show_stream,
    vm_name,
    vm_row,
)
from corral.printable import printable

if TYPE_CHECKING:
    from corral.client import Client

__all__ = ["register"]

_WAIT = click.option("--wait", is_flag=True, help="Wait until the VM reaches the state.")
_TIMEOUT = click.option("--timeout", type=float, default=300.0, show_default=True,
                        help="Seconds --wait waits.")  # fmt: skip
_ADOPT = click.option("--adopt-disks", "adopt", default=None, metavar="ID",
                      help="A new VM takes over these retained disks (corral disk list): "
                           "disks, UUID, TPM, firmware vars.")  # fmt: skip


def client(ctx: click.Context) -> Client:
    from corral.client import Client

    obj = ctx.find_root().obj or {}
    found = obj.get("client")
    if found is None:
        found = Client(socket=obj.get("socket"), url=obj.get("url"), token=obj.get("token"))
        ctx.find_root().obj = {**obj, "client": found}
        ctx.find_root().call_on_close(found.close)
    return found


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
        status = vm.get("status") or {}
        waits = ", ".join(status.get("pendingRestart") or [])
        click.echo(printable(f"vm/{vm['metadata']['name']} {verb}{adopted}"
                   + (f"; waits for a restart: {waits}" if waits else "")))  # fmt: skip
        if status.get("configError"):
            click.echo(printable(f"warning: vm/{vm['metadata']['name']}: not applied live: "
                       f"{status['configError']}"), err=True)  # fmt: skip


def _observed(c: Any, vm: dict[str, Any], timeout: float = 10.0) -> dict[str, Any]:
    """The VM once a running VM has taken the new generation (live changes applied, the
    rest in ``pendingRestart``), or as it is after ``timeout``."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        status = vm.get("status") or {}
        if status.get("state") != "Running" or (status.get("observedGeneration") or 0) >= (
            vm["metadata"].get("generation") or 0
        ):
            return vm
        if time.monotonic() > deadline:
            return vm
        time.sleep(0.2)
        vm = c.get_vm(vm["metadata"]["name"])


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


@click.command("list")
@click.option("--state", default=None, help="Only VMs in this state (Running, Stopped, ...).")
@click.option("-l", "--selector", "label", default=None, help="Label selector key=value.")
@OUTPUT
@click.pass_context
def list_(ctx: click.Context, state: str | None, label: str | None, output: str) -> None:
    """List VMs: state, CPUs, RAM, IPs, uptime (-o wide: pid, accelerator, restarts, age,
    labels; -o name: the names)."""
    vms = client(ctx).list_vms(state=state, label=label)
    show_items(vms, output, columns=VM_COLUMNS, name=vm_name)


@click.command()
@click.argument("name", shell_complete=vm_names)
@OUTPUT
@click.pass_context
def show(ctx: click.Context, name: str, output: str) -> None:
    """One VM: its document and status (-o json|yaml for the whole document)."""
    vm = client(ctx).get_vm(name)
    show_object(vm, output, name=vm_name(vm), text=lambda wide: details(_details(vm, wide)))


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


_WAIT_FOR = {"running": None, "booted": "condition=Booted"}  # start/restart --wait=...
_WAIT_UNTIL = click.option(
    "--wait", type=click.Choice(list(_WAIT_FOR), case_sensitive=False), default=None,
    metavar="[=running|booted]",
    help="Wait until the VM is Running (--wait), or has booted (--wait=booted: its guest agent "
         "answered, or its boot marker showed); a phase spinner on a terminal.",
)  # fmt: skip


class _OptionalWait(click.Command):
    """``--wait`` with an optional value (``--wait=booted``); a bare ``--wait``, before a VM
    name too (``start --wait web1``, as before the value existed), means ``--wait=running``."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        fixed: list[str] = []
        for i, arg in enumerate(args):
            if arg == "--":
                fixed.extend(args[i:])
                break
            bare = arg == "--wait" and (i + 1 == len(args) or args[i + 1].lower() not in _WAIT_FOR)
            fixed.append("--wait=running" if bare else arg)
        return super().parse_args(ctx, fixed)


def _lifecycle(verb: str, target: str | None, doc: str) -> click.Command:
    """``verb`` for every VM named, at once, carrying on past one VM's error (each reported;
    exit 1 if any failed). With ``--wait`` (when ``target`` says there is something to wait
    for) each VM is waited for in parallel, with a live display on a terminal."""
    booting = verb in ("start", "restart")

    @click.command(verb, help=doc, cls=_OptionalWait if booting else click.Command)
    @click.argument("names", nargs=-1, required=True, shell_complete=vm_names)
    @(_WAIT_UNTIL if booting else _WAIT)
    @_TIMEOUT
    @click.pass_context
    def command(
        ctx: click.Context, names: tuple[str, ...], wait: str | bool | None, timeout: float
    ) -> None:
        from corral.cli.progress import Progress, run_each

        c = client(ctx)
        waits = bool(wait) and target is not None
        until = _WAIT_FOR[str(wait).lower()] if booting and waits else None
        shown = "Booted" if until else target

        def one(name: str) -> dict[str, Any]:
            return c.action(name, verb, wait=timeout if waits else None, until=until)

        def done(name: str, vm: dict[str, Any]) -> str:
            return _lifecycle_line(verb, name, vm, shown if waits else None)

        with Progress(c, names, enabled=waits) as progress:
            failed = run_each(names, one, done, progress)
        if failed:
            ctx.exit(1)

    return command


def _lifecycle_line(verb: str, name: str, vm: dict[str, Any], waited: str | None) -> str:
    """``vm/web1 start``; waited for: ``vm/web1 start (Running)``, ``vm/web1 stop (Stopped,
    by powerdown)``."""
    if waited is None:
        return f"vm/{name} {verb}"
    status = vm.get("status") or {}
    if verb == "stop":
        by = status.get("stoppedBy")
        return f"vm/{name} {verb} ({status.get('state')}" + (f", by {by})" if by else ")")
    return f"vm/{name} {verb} ({waited})"


start = _lifecycle("start", "Running", "Start VMs (desired state Running).")
stop = _lifecycle(
    "stop", "Stopped",
    "Stop VMs gracefully, all at once: ACPI powerdown (pressed again every 10 s), "
    "powerdownTimeout, quit, kill. With --wait, a countdown on a terminal.",
)  # fmt: skip
restart = _lifecycle("restart", "Running", "Stop gracefully and start again.")
reset = _lifecycle("reset", None, "Hard-reset VMs (the guest reboots at once).")
kill = _lifecycle("kill", None, "Kill qemu now (SIGKILL); the VM stays Stopped.")


_FOR = re.compile(r"(?i)(state=[a-z]+|condition=[a-z]+(=(true|false))?)")


def _check_for(_: click.Context, __: click.Parameter, value: str) -> str:
    if not _FOR.fullmatch(value):
        raise click.BadParameter(
            f"{value!r}: give state=STATE (Running, Stopped, ...) or condition=NAME[=false] "
            "(Booted, AgentConnected, ...)"
        )
    return value


@click.command("wait")
@click.argument("names", nargs=-1, required=True, shell_complete=vm_names)
@click.option("--for", "until", required=True, callback=_check_for, metavar="WHAT",
              help="state=STATE (Running, Stopped, ...) or condition=NAME[=false] (Booted, "
                   "AgentConnected, DisplayConnected, ...).")  # fmt: skip
@click.option("--timeout", type=click.FloatRange(0, 86400, min_open=True), default=300.0,
              show_default=True, help="Seconds to wait.")  # fmt: skip
@click.pass_context
def wait_(ctx: click.Context, names: tuple[str, ...], until: str, timeout: float) -> None:
    """Wait until VMs reach a state or condition (like kubectl wait), all at once; exit 1 if
    one does not in time (the error says where it is). A phase spinner on a terminal.

    corral wait web1 --for=condition=Booted --timeout 120
    """
    from corral.cli.progress import Progress, run_each

    c = client(ctx)

    def one(name: str) -> dict[str, Any]:
        return c.wait(name, until, timeout=timeout)

    with Progress(c, names) as progress:
        failed = run_each(names, one, lambda name, _: f"vm/{name} {until} met", progress)
    if failed:
        ctx.exit(1)


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


def _set_media(ctx: click.Context, name: str, image: str, drive: str | None) -> str:
    c = client(ctx)
    vm = c.get_vm(name)
    disks = vm["spec"]["vm"].get("disks") or []
    cdroms = [(i, d) for i, d in enumerate(disks) if "cdrom" in d]
    if drive is not None:
        cdroms = [(i, d) for i, d in cdroms if (d.get("name") or f"disk{i}") == drive]
    if not cdroms:
        from corral.errors import NotFound

        raise NotFound(f"VM {name!r} has no CD drive" + (f" {drive!r}" if drive else ""))
    index, disk = cdroms[0]
    disk["cdrom"] = {**disk["cdrom"], "image": image}
    meta = vm["metadata"]
    doc = {"metadata": {k: meta[k] for k in ("name", "labels", "annotations", "resourceVersion")
                        if k in meta}, "spec": vm["spec"]}  # fmt: skip
    c.replace_vm(name, doc)
    return str(disk.get("name") or f"disk{index}")


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
    used = _set_media(ctx, name, "", drive)
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
@click.argument("name", shell_complete=vm_names)
@OUTPUT
@click.pass_context
def ip(ctx: click.Context, name: str, output: str) -> None:
    """The guest's IP addresses (from the guest agent), one per line."""
    ips = list((client(ctx).get_vm(name).get("status") or {}).get("ips") or [])
    show_object({"name": name, "ips": ips}, output, name=ips, text=lambda wide: ips)


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


# --- aetherscale's command names ---------------------------------------------------------


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
    import secrets

    vm_name = name or f"vm-{secrets.token_hex(3)}"
    doc = {
        "metadata": {"name": vm_name},
        "spec": {"vm": {
            "state": "Stopped" if no_start else "Running",
            "maximumCpus": cpus, "currentCpus": cpus, "maximumRam": ram, "firmware": "bios",
            "disks": [{"name": "root", "file": {"image": image}, "bootindex": 0}],
            "networks": [{"user": {}}],
        }},
    }  # fmt: skip
    client(ctx).create_vm(doc)
    click.echo(vm_name)


def _alias(verb: str, doc: str) -> click.Command:
    @click.command(f"{verb}-vm", help=doc, hidden=True)
    @click.option("--vm-id", required=True, shell_complete=vm_names)
    @click.option("--kill", "hard", is_flag=True, help="stop-vm: kill instead of powerdown.")
    @click.pass_context
    def command(ctx: click.Context, vm_id: str, hard: bool) -> None:
        c = client(ctx)
        if verb == "delete":
            c.delete_vm(vm_id, delete_disks=True)  # as aetherscale does
        else:
            c.action(vm_id, "kill" if verb == "stop" and hard else verb)
        click.echo(f"vm/{vm_id} {verb}")

    return command


@click.command("list-vms", hidden=True)
@click.pass_context
def list_vms(ctx: click.Context) -> None:
    """aetherscale: list VMs (name and state)."""
    for vm in client(ctx).list_vms():
        click.echo(f"{vm['metadata']['name']}\t{(vm.get('status') or {}).get('state')}")


def register(cli: click.Group) -> None:
    for command in (apply, create, list_, show, start, stop, restart, reset, kill, wait_,
                    delete, set_, cd, exec_, ip, events, console, display, create_vm, list_vms,
                    _alias("start", "aetherscale: start a VM."),
                    _alias("stop", "aetherscale: stop a VM (--kill: at once)."),
                    _alias("delete", "aetherscale: delete a VM and its disks.")):  # fmt: skip
        cli.add_command(command)
