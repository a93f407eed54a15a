"""``corral host ...``: what this host offers."""

from __future__ import annotations

import json

import click


@click.group()
def host() -> None:
    """Inspect this host."""


@host.command("info")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--emulator", default="qemu-system-x86_64", show_default=True)
@click.option(
    "--policy",
    "policy_file",
    default=None,
    type=click.Path(dir_okay=False),
    help="Host policy file to show (default /etc/corral/host.yaml if present).",
)
def info(as_json: bool, emulator: str, policy_file: str | None) -> None:
    """qemu version, whether KVM really works (probed), machines, OVMF, swtpm, tools."""
    from corral.qemu.fingerprint import host_info
    from corral.spec import load_policy

    facts = host_info(emulator)
    policy = load_policy(policy_file)
    if as_json:
        data = facts.to_dict()
        data["policy"] = policy.model_dump(mode="json", by_alias=True)
        click.echo(json.dumps(data, indent=2))
        return
    click.echo(f"qemu:               {facts.emulator} {facts.qemu_version}")
    kvm = "yes" if facts.kvm_usable else "no"
    click.echo(f"kvm usable:         {kvm} ({facts.kvm_reason})")
    click.echo(f"accelerators:       {', '.join(facts.accelerators)}")
    named = [m for m in facts.machines if m in ("q35", "pc", "microvm")]
    others = len(facts.machines) - len(named)
    click.echo(f"machines:           {', '.join(named)} (+{others} versioned)")
    for kind, files in facts.firmware.items():
        click.echo(f"{'ovmf ' + kind + ':':<20}{files['code'] if files else 'not found'}")
    swtpm = facts.swtpm or "not found (apt-get install swtpm swtpm-tools)"
    click.echo(f"swtpm:              {swtpm}")
    for tool, path in facts.tools.items():
        click.echo(f"{tool + ':':<20}{path or 'not found'}")
    click.echo(f"tsc kHz:            {facts.tsc_khz}")
    paths = policy.image_paths if policy.image_paths is not None else "any"
    click.echo(f"policy:             imagePaths={paths} argsAllowlist={policy.args_allowlist}")


@host.command("shutdown")
@click.option("--state-dir", default=None, type=click.Path(file_okay=False),
              help="Act on this state dir directly (no daemon may be running).")  # fmt: skip
@click.option("--config", "config_file", default=None, type=click.Path(dir_okay=False))
@click.option("--timeout", type=float, default=None, help="Override every VM's powerdownTimeout.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def shutdown(
    ctx: click.Context,
    state_dir: str | None,
    config_file: str | None,
    timeout: float | None,
    as_json: bool,
) -> None:
    """Stop every VM gracefully, in parallel; report which needed force (libvirt-guests).

    Through the running daemon, or with --state-dir on a state dir no daemon serves.
    Desired states are kept: the VMs start again when the daemon next starts.
    """
    if state_dir is not None:
        import asyncio

        from corral.cli.serve import manager_config
        from corral.manager import ManagerConfig
        from corral.manager.daemon import host_shutdown

        cfg = manager_config(state_dir, config_file)
        assert isinstance(cfg, ManagerConfig)
        result = asyncio.run(host_shutdown(cfg, timeout))
    else:
        from corral.cli.vms import client

        result = client(ctx).host_shutdown(timeout)
    if as_json:
        click.echo(json.dumps(result, indent=2, sort_keys=True))
        return
    forced = sorted(n for n, how in result.items() if how in ("quit", "kill"))
    for name, how in sorted(result.items()):
        click.echo(f"{name:<32} {how}")
    tail = f": {', '.join(forced)}" if forced else ""
    click.echo(f"{len(result)} VM(s) stopped, {len(forced)} needed force{tail}")
