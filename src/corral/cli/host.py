"""``corral host ...``: what this host offers."""

from __future__ import annotations

import click

from corral.cli.output import OUTPUT, details, show_object


@click.group()
def host() -> None:
    """Inspect this host."""


@host.command("info")
@click.option("--json", "as_json", is_flag=True, hidden=True, help="Same as -o json.")
@OUTPUT
@click.option("--emulator", default="qemu-system-x86_64", show_default=True)
@click.option(
    "--policy",
    "policy_file",
    default=None,
    type=click.Path(dir_okay=False),
    help="Host policy file to show (default /etc/corral/host.yaml if present).",
)
def info(as_json: bool, output: str, emulator: str, policy_file: str | None) -> None:
    """qemu version, whether KVM really works (probed), machines, OVMF, swtpm, tools
    (-o wide: every machine type and the OVMF vars files; -o name: the host's name)."""
    import socket

    from corral.qemu.fingerprint import host_info
    from corral.spec import load_policy

    facts = host_info(emulator)
    policy = load_policy(policy_file)
    data = facts.to_dict()
    data["policy"] = policy.model_dump(mode="json", by_alias=True)

    def text(wide: bool) -> list[str]:
        named = [m for m in facts.machines if m in ("q35", "pc", "microvm")]
        others = len(facts.machines) - len(named)
        machines = ", ".join(facts.machines if wide else named)
        paths = policy.image_paths if policy.image_paths is not None else "any"
        return details([
            ("qemu", f"{facts.emulator} {facts.qemu_version}"),
            ("kvm usable", f"{'yes' if facts.kvm_usable else 'no'} ({facts.kvm_reason})"),
            ("accelerators", ", ".join(facts.accelerators)),
            ("machines", machines if wide else f"{machines} (+{others} versioned)"),
            *((f"ovmf {kind}", (f"{files['code']} (vars {files['vars']})" if wide
                                else files["code"]) if files else "not found")
              for kind, files in facts.firmware.items()),
            ("swtpm", facts.swtpm or "not found (apt-get install swtpm swtpm-tools)"),
            *((tool, path or "not found") for tool, path in facts.tools.items()),
            ("tsc kHz", facts.tsc_khz),
            ("policy", f"imagePaths={paths} argsAllowlist={policy.args_allowlist}"),
        ])  # fmt: skip

    show_object(data, "json" if as_json else output, name=socket.gethostname(), text=text)


@host.command("shutdown")
@click.option("--state-dir", default=None, type=click.Path(file_okay=False),
              help="Act on this state dir directly (no daemon may be running).")  # fmt: skip
@click.option("--config", "config_file", default=None, type=click.Path(dir_okay=False))
@click.option("--timeout", type=float, default=None, help="Override every VM's powerdownTimeout.")
@click.option("--json", "as_json", is_flag=True, hidden=True, help="Same as -o json.")
@OUTPUT
@click.pass_context
def shutdown(
    ctx: click.Context,
    state_dir: str | None,
    config_file: str | None,
    timeout: float | None,
    as_json: bool,
    output: str,
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
        from corral.cli.connection import client

        result = client(ctx).host_shutdown(timeout)
    forced = sorted(n for n, how in result.items() if how in ("quit", "kill"))
    tail = f": {', '.join(forced)}" if forced else ""
    lines = [*(f"{name:<32} {how}" for name, how in sorted(result.items())),
             f"{len(result)} VM(s) stopped, {len(forced)} needed force{tail}"]  # fmt: skip
    show_object(dict(sorted(result.items())), "json" if as_json else output,
                name=sorted(result), text=lambda wide: lines)  # fmt: skip
