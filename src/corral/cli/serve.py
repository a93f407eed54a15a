"""``corral serve``: run the manager daemon (like ``corral run`` is the runner's entry point,
this is the one place the CLI imports the manager)."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import click

_STATE_HELP = "Everything the daemon keeps (store, images, VM disks, runtime files) lives here."


def manager_config(
    state_dir: str, config: str | None, **overrides: object
) -> object:  # ManagerConfig, imported lazily for a fast `corral --help`
    from corral.manager import load_manager_config

    return load_manager_config(Path(config) if config else None, stateDir=state_dir, **overrides)


@click.command()
@click.option("--state-dir", required=True, type=click.Path(file_okay=False), help=_STATE_HELP)
@click.option(
    "--config",
    "config_file",
    default=None,
    type=click.Path(dir_okay=False),
    help="Daemon config (YAML): backend, limits, backoff, overcommit.",
)
@click.option(
    "--policy",
    "policy_file",
    default=None,
    type=click.Path(dir_okay=False),
    help="Host policy (default /etc/corral/host.yaml if present).",
)
@click.option("--backend", type=click.Choice(["embedded", "systemd"]), default=None)
@click.option(
    "--accel",
    type=click.Choice(["kvm", "tcg"]),
    default=None,
    help="Force an accelerator for every VM (default: per VM, auto-probed).",
)
@click.option("--resync", type=float, default=None, help="Seconds between full resyncs.")
@click.option(
    "--stop-vms-on-exit",
    is_flag=True,
    default=None,
    help="Host-shutdown mode: stop every VM gracefully on SIGTERM.",
)
def serve(
    state_dir: str,
    config_file: str | None,
    policy_file: str | None,
    backend: str | None,
    accel: str | None,
    resync: float | None,
    stop_vms_on_exit: bool | None,
) -> None:
    """Run the manager: keep every VM in its desired state; SIGTERM leaves VMs running."""
    from corral.manager import ManagerConfig
    from corral.manager.daemon import serve as run_daemon

    cfg = manager_config(
        state_dir, config_file, policyFile=policy_file, backend=backend, accelerator=accel,
        resyncSeconds=resync, stopVmsOnExit=stop_vms_on_exit,
    )  # fmt: skip
    assert isinstance(cfg, ManagerConfig)
    sys.exit(asyncio.run(run_daemon(cfg)))
