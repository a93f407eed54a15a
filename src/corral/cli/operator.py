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


@operator.command()
@click.option("--group", type=_GROUPS, default="corral.dev", show_default=True,
              envvar="CORRAL_GROUP", help="API group of the VirtualMachine resources.")  # fmt: skip
@click.option("--namespace", "namespaces", multiple=True, envvar="CORRAL_NAMESPACES",
              help="Watch only these namespaces (default: all).")  # fmt: skip
@click.option("--image", default="localhost/corral:dev", show_default=True,
              envvar="CORRAL_RUNNER_IMAGE", help="The runner image of new pods.")  # fmt: skip
@click.option("--peering", default="corral", show_default=True, envvar="CORRAL_PEERING",
              help="kopf peering name: replicas with one name never act at once.")  # fmt: skip
@click.option(
    "--liveness", default=None, help="kopf liveness endpoint, e.g. http://0.0.0.0:8080/healthz"
)
def run(
    group: str, namespaces: tuple[str, ...], image: str, peering: str, liveness: str | None
) -> None:
    """Run the operator in the foreground (in-cluster or with a kubeconfig).

    Pod settings come from the environment (see docs/kubernetes.md): CORRAL_HOST_NETWORK,
    CORRAL_PRIVILEGED, CORRAL_API_HOST/CORRAL_API_PORT (the API server as runner pods reach it),
    CORRAL_HOST_PATHS (extra hostPath mounts, e.g. the guest image directory).
    """
    from corral.k8s.operator import OperatorSettings, run_operator

    settings = OperatorSettings.from_env(group=group, image=image)
    run_operator(settings, namespaces=list(namespaces), peering=peering, liveness=liveness)
