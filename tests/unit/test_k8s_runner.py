"""The runner's Kubernetes status (pure part) and the kustomize base staying in step with the
code: the CRD in deploy/ is the generated one, and the RBAC grants the runner what it uses."""

from __future__ import annotations

from pathlib import Path

import yaml

from corral.k8s.crd import crd_manifest
from corral.k8s.runner import status_patch
from corral.runner.status import Condition, VmState, VmStatus

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "kubernetes"


def test_status_patch_has_kubernetes_conditions_and_live_values() -> None:
    status = VmStatus(name="test-vm", state=VmState.RUNNING, cpus=2, ram=4 * 1024**3)
    status.ips = ["10.0.2.15"]
    status.set_condition(Condition.BOOTED, True, "BootMarker")
    patch = status_patch(status, node="localhost", serial=3, generation=7)
    conditions = {c["type"]: c for c in patch["conditions"]}
    assert list(conditions) == ["Running", "Booted", "AgentConnected", "DisplayConnected"]
    assert conditions["Running"]["status"] == "True"
    assert conditions["Booted"] == {
        "type": "Booted",
        "status": "True",
        "reason": "BootMarker",
        "lastTransitionTime": status.conditions["Booted"].since,
    }
    assert conditions["AgentConnected"]["status"] == "False"
    assert patch["state"] == "Running"
    assert (patch["cpus"], patch["ram"], patch["ips"]) == (2, "4Gi", ["10.0.2.15"])
    assert (patch["node"], patch["displayPasswordSerial"], patch["observedGeneration"]) == (
        "localhost",
        3,
        7,
    )
    assert patch["runnerVersion"]
    stopped = status_patch(VmStatus(name="test-vm"), node=None, serial=0, generation=None)
    assert stopped["state"] == "Stopped" and stopped["ram"] is None
    assert {c["status"] for c in stopped["conditions"]} == {"False"}


def test_deployed_crd_is_the_generated_one() -> None:
    deployed = yaml.safe_load((DEPLOY / "crd.yaml").read_text())
    assert deployed == crd_manifest("corral.dev"), (
        "regenerate: corral operator crd > deploy/kubernetes/crd.yaml"
    )


def test_kustomization_lists_every_manifest_and_rbac_covers_the_runner() -> None:
    kustomization = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    assert listed == {p.name for p in DEPLOY.glob("*.yaml")} - {"kustomization.yaml"}
    roles = {
        doc["metadata"]["name"]: doc["rules"]
        for doc in yaml.safe_load_all((DEPLOY / "rbac.yaml").read_text())
        if doc["kind"] == "ClusterRole"
    }
    runner = {(r, v) for rule in roles["corral-runner"] for r in rule["resources"]
              for v in rule["verbs"]}  # fmt: skip
    assert {("vms", "watch"), ("vms/status", "patch"), ("events", "create")} <= runner
    assert not any(v in ("delete", "*") for _, v in runner)  # a runner never deletes
    operator = [rule for rule in roles["corral-operator"] if "persistentvolumeclaims" in
                rule["resources"]]  # fmt: skip
    assert operator[0]["verbs"] == ["get", "create"]  # claims are never deleted
