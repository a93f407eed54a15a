"""``corral``: entry point, error handling and exit codes.

Exit codes: 0 ok, 1 a corral error (one clear line per problem on stderr), 2 usage error.
``--debug`` (or ``CORRAL_DEBUG=1``) shows the traceback instead.
"""

from __future__ import annotations

import os
from typing import Any

import click

from corral import __version__

# name -> ("module:attr", the short help `corral --help` lists; None: a hidden command).
# Only the invoked command's module is imported; `--help` lists from this table without
# importing any (tests/unit/test_import_budget.py checks the helps against the commands).
COMMANDS: dict[str, tuple[str, str | None]] = {
    "apply": ("corral.cli.vms:apply",
              "Create or update VMs from their documents (declarative, like kubectl apply)."),
    "cd": ("corral.cli.vms:cd", "Insert or eject CD media (live)."),
    "console": ("corral.cli.vms:console", "Attach to the VM's serial console; Ctrl-] leaves."),
    "create": ("corral.cli.vms:create", "Create VMs (an existing name is an error)."),
    "create-vm": ("corral.cli.vm.aetherscale:create_vm", None),
    "delete": ("corral.cli.vms:delete", "Stop and delete VMs."),
    "delete-vm": ("corral.cli.vm.aetherscale:delete_vm", None),
    "disk": ("corral.cli.disks:disk",
             "Retained disks: data dirs of deleted VMs (overlays, UUID, TPM, firmware vars)."),
    "display": ("corral.cli.vms:display",
                "Set a fresh display password that expires soon; print the spice:// / vnc:// "
                "URLs (like virsh domdisplay --include-password). remote-viewer takes the URL."),
    "events": ("corral.cli.vms:events",
               "Events of one VM, or of all VMs and images (-o json: one JSON object per line)."),
    "exec": ("corral.cli.vms:exec_",
             "Run a command in the guest (guest agent); exits with the command's exit code."),
    "host": ("corral.cli.host:host", "Inspect this host."),
    "image": ("corral.cli.images:image",
              "Base images that VM disks overlay (each VM writes only its own qcow2 overlay)."),
    "ip": ("corral.cli.vm.show:ip",
           "The guest's IP addresses (from the guest agent), one per line."),
    "kill": ("corral.cli.vm.lifecycle:kill", "Kill qemu now (SIGKILL); the VM stays Stopped."),
    "list": ("corral.cli.vm.show:list_",
             "List VMs: state, CPUs, RAM, IPs, uptime (-o wide: pid, accelerator, restarts, "
             "age, labels; -o name: the names)."),
    "list-vms": ("corral.cli.vm.aetherscale:list_vms", None),
    "logs": ("corral.cli.logs:logs",
             "Print a VM's console log (or --qemu: qemu's log); -f follows it."),
    "render": ("corral.cli.render:render",
               "Print the qemu argv for a VM document, one argument per line, without starting "
               "it (-o json|yaml: a list; -o name: the VM's name)."),
    "operator": ("corral.cli.operator:operator",
                 "The Kubernetes operator: VirtualMachine resources become runner pods."),
    "reset": ("corral.cli.vm.lifecycle:reset", "Hard-reset VMs (the guest reboots at once)."),
    "restart": ("corral.cli.vm.lifecycle:restart", "Stop gracefully and start again."),
    "run": ("corral.cli.run:run",
            "Run one VM in the foreground and keep it matching its document."),
    "schema": ("corral.cli.render:schema",
               "Print the JSON schema of the VM document (the basis of the Kubernetes CRD)."),
    "serve": ("corral.cli.serve:serve",
              "Run the manager: keep every VM in its desired state; SIGTERM leaves VMs "
              "running."),
    "set": ("corral.cli.vms:set_",
            "Change a VM's CPUs / RAM in place (declaratively: the spec changes, the runner "
            "applies)."),
    "show": ("corral.cli.vm.show:show",
             "One VM: its document and status (-o json|yaml for the whole document)."),
    "start": ("corral.cli.vm.lifecycle:start", "Start VMs (desired state Running)."),
    "start-vm": ("corral.cli.vm.aetherscale:start_vm", None),
    "stop": ("corral.cli.vm.lifecycle:stop",
             "Stop VMs gracefully, all at once: ACPI powerdown (pressed again every 10 s), "
             "powerdownTimeout, quit, kill."),
    "stop-vm": ("corral.cli.vm.aetherscale:stop_vm", None),
    "token": ("corral.cli.serve:token", "Bearer tokens for the TCP API."),
    "user": ("corral.cli.serve:user", "Local users (bcrypt hashes) for the pages and the TCP API."),
    "validate": ("corral.cli.render:validate",
                 "Check a VM document (and, with --policy, the host policy) without rendering."),
    "wait": ("corral.cli.vm.lifecycle:wait_",
             "Wait until VMs reach a state or condition (like kubectl wait), all at once; exit "
             "1 if one does not in time (the error says where it is)."),
}  # fmt: skip


class _Group(click.Group):
    """Commands from :data:`COMMANDS`, each imported when it is invoked (uvicorn's
    name -> "module:attr" table): ``corral show`` never loads ``serve``'s web stack."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*COMMANDS, *self.commands})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self.commands or cmd_name not in COMMANDS:
            return self.commands.get(cmd_name)
        import importlib

        module, attr = COMMANDS[cmd_name][0].split(":")
        command = getattr(importlib.import_module(module), attr)
        assert isinstance(command, click.Command)
        return command

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        shown = [(n, COMMANDS[n][1] or "") for n in sorted(COMMANDS) if COMMANDS[n][1]]
        if shown:
            limit = formatter.width - 6 - max(len(n) for n, _ in shown)
            rows = [(n, _shortened(h, limit)) for n, h in shown]
            with formatter.section("Commands"):
                formatter.write_dl(rows)

    def invoke(self, ctx: click.Context) -> Any:
        from corral.errors import CorralError
        from corral.printable import printable

        try:
            return super().invoke(ctx)
        except CorralError as exc:
            if ctx.params.get("debug") or os.environ.get("CORRAL_DEBUG") == "1":
                raise
            # an error may quote qemu, a guest or a document: shown, never obeyed
            click.echo(f"error: {printable(exc.message)}", err=True)
            for issue in exc.issues:
                click.echo(f"  {printable(str(issue))}", err=True)
            ctx.exit(1)


def _shortened(text: str, limit: int) -> str:
    """``text`` in ``limit`` characters, cut at a word with "..." (as click shortens)."""
    return text if len(text) <= limit else text[: limit - 3].rsplit(" ", 1)[0] + "..."


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
@click.option("--socket", default=None, envvar="CORRAL_SOCKET",
              help="The daemon's unix socket (default /run/corral/corral.sock).")  # fmt: skip
@click.option("--url", default=None, envvar="CORRAL_URL", help="The daemon's TCP URL.")
@click.option("--token", default=None, envvar="CORRAL_TOKEN", help="Bearer token for --url.")
@click.version_option(__version__, prog_name="corral")
@click.pass_context
def cli(
    ctx: click.Context, debug: bool, socket: str | None, url: str | None, token: str | None
) -> None:
    """Run and manage QEMU virtual machines without libvirt.

    Shell completion: eval "$(_CORRAL_COMPLETE=bash_source corral)" (or zsh_source,
    fish_source).
    """
    ctx.obj = {**(ctx.obj or {}), "socket": socket, "url": url, "token": token}


def main() -> None:
    """The ``corral`` program: ``process`` tells a command it owns the whole process (and may
    end it at once, as ``corral run`` does)."""
    cli(prog_name="corral", obj={"process": True})


if __name__ == "__main__":  # pragma: no cover
    main()
