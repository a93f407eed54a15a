"""``corral start|stop|restart|reset|kill`` (many VMs at once, ``--wait`` with a live display)
and ``corral wait`` (``--for=state=...|condition=...``, like kubectl wait)."""

from __future__ import annotations

import re
from typing import Any

import click

from corral.cli.completion import vm_names
from corral.cli.connection import client

__all__ = ["kill", "reset", "restart", "start", "stop", "wait_"]

_WAIT = click.option("--wait", is_flag=True, help="Wait until the VM reaches the state.")
_TIMEOUT = click.option("--timeout", type=float, default=300.0, show_default=True,
                        help="Seconds --wait waits.")  # fmt: skip


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
            return c.act(name, verb, wait=timeout if waits else None, until=until)

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
        return c.wait(name, until, timeout=timeout).to_json()

    with Progress(c, names) as progress:
        failed = run_each(names, one, lambda name, _: f"vm/{name} {until} met", progress)
    if failed:
        ctx.exit(1)
