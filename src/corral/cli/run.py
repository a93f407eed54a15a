"""``corral run -c vm.yaml``: one VM in the foreground, like VM-Operator's runner.

Starts the VM (or re-attaches to it if its qemu is still alive), then watches the document
and the display secret file and applies changes in place. SIGTERM/SIGINT stop the VM
gracefully; SIGHUP re-reads the document at once. Exit code 0 after a clean stop, 1 if
qemu crashed or could not start. Events are JSON lines on stderr (or ``--events FILE``).
The program itself is :mod:`corral.runner.program`; this module only parses flags.

As the ``corral`` program (not inside another, e.g. a test's CliRunner) it leaves with
``os._exit`` once the runner has returned: qemu and swtpm are reaped, the status and events
files written and closed, stdout/stderr flushed; what is left (asyncio's executor threads, the
interpreter's teardown of every module) only delays the exit a supervisor waits on.

``corral run --kube --namespace NS --name VM`` is the runner of a Kubernetes pod: the document
is the VirtualMachine object, the status goes to its status subresource
(:mod:`corral.k8s.runner`).
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import click


@click.command()
@click.option("-c", "--config", "config", default=None, type=click.Path(dir_okay=False))
@click.option("--kube", is_flag=True, help="Read the VM from its Kubernetes object (in a pod).")
@click.option("--namespace", default=None, help="--kube: the VirtualMachine's namespace.")
@click.option("--name", default=None, help="--kube: the VirtualMachine's name.")
@click.option("--group", default="corral.dev", show_default=True, help="--kube: its API group.")
@click.option("--data-dir", default=None, help="Persistent files (overrides runner.dataDir).")
@click.option("--runtime-dir", default=None, help="Sockets, pidfile (overrides runner.runtimeDir).")
@click.option("--status-file", default=None, help="Status JSON (overrides runner.statusFile).")
@click.option(
    "--display-secret-file",
    default=None,
    help="Display password file, or a dir with display-password and password-expiry.",
)
@click.option("--policy", "policy_file", default=None, type=click.Path(dir_okay=False))
@click.option("--accel", type=click.Choice(["auto", "kvm", "tcg"]), default=None)
@click.option("--boot-marker", default=None, help="Serial console text that means 'booted'.")
@click.option("--events", "events_file", default=None, help="Append JSON-line events here.")
@click.option("--poll", default=0.5, show_default=True, help="Config watch interval (s).")
@click.pass_context
def run(
    ctx: click.Context,
    config: str | None,
    kube: bool,
    namespace: str | None,
    name: str | None,
    group: str,
    data_dir: str | None,
    runtime_dir: str | None,
    status_file: str | None,
    display_secret_file: str | None,
    policy_file: str | None,
    accel: str | None,
    boot_marker: str | None,
    events_file: str | None,
    poll: float,
) -> None:
    """Run one VM in the foreground and keep it matching its document."""
    if kube:
        from corral.k8s.runner import run_kube_program

        if not (namespace and name) or config:
            raise click.UsageError("--kube needs --namespace and --name, and no --config")
        sys.exit(
            asyncio.run(
                run_kube_program(
                    namespace, name, group=group, data_dir=data_dir, runtime_dir=runtime_dir,
                    display_secret_file=display_secret_file, policy_file=policy_file,
                    accel=accel, poll=poll,
                )
            )
        )  # fmt: skip
    if config is None:
        raise click.UsageError("Missing option '-c' / '--config'.")
    from corral.runner.program import run_file_program

    whole_process = bool((ctx.find_root().obj or {}).get("process"))

    async def program() -> int:
        code = await run_file_program(
            Path(config),
            data_dir=data_dir,
            runtime_dir=runtime_dir,
            status_file=status_file,
            display_secret_file=display_secret_file,
            policy_file=policy_file,
            accel=accel,
            boot_marker=boot_marker,
            events_file=events_file,
            poll=poll,
        )
        if whole_process:
            _exit_now(code)
        return code

    sys.exit(asyncio.run(program()))


def _exit_now(code: int) -> None:
    import logging

    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(code)
