"""``corral operator``: the Kubernetes operator (``run``) and its CRD (``crd``)."""

from __future__ import annotations

import click
import yaml

_GROUPS = click.Choice(["corral.dev", "vmoperator.jdrupes.org"])


@click.group()
def operator() -> None:
    """The Kubernetes operator: VirtualMachine resources become runner pods."""


@operator.command()
@click.option(
    "--group",
    type=_GROUPS,
    default="corral.dev",
    show_default=True,
    help="API group to serve (vmoperator.jdrupes.org: VM-Operator's resources unchanged).",
)
def crd(group: str) -> None:
    """Print the VirtualMachine CRD (YAML), generated from the VM document's schema.

    Example: corral operator crd | kubectl apply -f -
    """
    from corral.k8s.crd import crd_manifest

    click.echo(yaml.safe_dump(crd_manifest(group), sort_keys=False), nl=False)
