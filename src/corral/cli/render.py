"""``corral render``, ``corral validate``, ``corral schema``: the document without a VM."""

from __future__ import annotations

import json

import click

from corral.cli.output import OUTPUT, show_object

_ACCELS = click.Choice(["auto", "kvm", "tcg"])


@click.command()
@click.option(
    "-c",
    "--config",
    "config",
    required=True,
    type=click.Path(dir_okay=False),
    help="The VM document (YAML).",
)
@click.option("--json", "as_json", is_flag=True, hidden=True, help="Same as -o json.")
@OUTPUT
@click.option(
    "--accel",
    type=_ACCELS,
    default=None,
    help="Override the accelerator (auto probes whether KVM really works).",
)
@click.option("--data-dir", default=None, help="The VM's data dir (overrides runner.dataDir).")
@click.option("--runtime-dir", default=None, help="Runtime dir (overrides runner.runtimeDir).")
@click.option(
    "--policy",
    "policy_file",
    default=None,
    type=click.Path(dir_okay=False),
    help="Host policy file (default /etc/corral/host.yaml if present).",
)
@click.option(
    "--standalone",
    "--no-pause",
    "standalone",
    is_flag=True,
    help="For qemu without a runner: leave out -S (start the guest at once) and "
    "-no-shutdown (qemu exits when the guest powers off).",
)
def render(
    config: str,
    as_json: bool,
    accel: str | None,
    data_dir: str | None,
    runtime_dir: str | None,
    policy_file: str | None,
    standalone: bool,
    output: str,
) -> None:
    """Print the qemu argv for a VM document, one argument per line, without starting it
    (-o json|yaml: a list; -o name: the VM's name).

    Like `virsh domxml-to-native`. The host policy is checked first.
    """
    from corral.qemu.fingerprint import find_emulator, resolve_accelerator
    from corral.runner.config import render_for_host, resolve_paths
    from corral.spec import load_document_file, load_policy

    doc = load_document_file(config)
    policy = load_policy(policy_file)
    paths = resolve_paths(doc, data_dir=data_dir, runtime_dir=runtime_dir)
    resolved = None
    if accel is not None:
        resolved = resolve_accelerator(accel, find_emulator(paths.emulator))
    argv = render_for_host(
        doc,
        paths,
        policy,
        accelerator=resolved,
        paused=not standalone,
        no_shutdown=not standalone,
    )
    show_object(argv, "json" if as_json else output, name=doc.name, text=lambda wide: argv)


@click.command()
@click.option("-c", "--config", "config", required=True, type=click.Path(dir_okay=False))
@click.option(
    "--policy",
    "policy_file",
    default=None,
    type=click.Path(dir_okay=False),
    help="Also check the document against this host policy.",
)
def validate(config: str, policy_file: str | None) -> None:
    """Check a VM document (and, with --policy, the host policy) without rendering."""
    from corral.spec import check_policy, load_document_file, load_policy

    doc = load_document_file(config)
    if policy_file is not None:
        check_policy(doc, load_policy(policy_file))
    click.echo(f"{config}: VM {doc.name!r} is valid")


@click.command()
def schema() -> None:
    """Print the JSON schema of the VM document (the basis of the Kubernetes CRD)."""
    from corral.spec import document_json_schema

    click.echo(json.dumps(document_json_schema(), indent=2))
