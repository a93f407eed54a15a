"""The operator on the real cluster, deployed as users deploy it (``kubectl apply -k`` of
deploy/kubernetes plus an overlay for this machine), serving VM-Operator's group so its
resources apply unchanged; runner pods boot real guests under TCG.

Figures are printed (``-s`` shows them): apply → booted, patch → CPU online, stop → pod gone.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from tests.integration.harness import build_guest
from tests.k8s.cluster import Cluster, ClusterError, RunnerImage
from tests.unit.test_k8s_crd import VMOPERATOR_EXAMPLES

from corral.k8s.crd import crd_manifest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

ROOT = Path(__file__).resolve().parents[2]
GROUP = "vmoperator.jdrupes.org"
NS = "vmop-demo"


@dataclass
class Deployed:
    cluster: Cluster
    data_dir: Path
    pv_dir: Path

    def kubectl(self, *args: str, **kw: Any) -> Any:
        return self.cluster.kubectl(*args, **kw)

    def get(self, *args: str) -> Any:
        return self.cluster.kubectl_json("get", *args)

    def vm(self, name: str, ns: str = NS) -> dict[str, Any]:
        result: dict[str, Any] = self.get("vms.vmoperator.jdrupes.org", name, "-n", ns)
        return result

    def status(self, name: str, ns: str = NS) -> dict[str, Any]:
        result: dict[str, Any] = self.vm(name, ns).get("status") or {}
        return result

    def pods(self, name: str, ns: str = NS) -> list[dict[str, Any]]:
        found = self.get("pods", "-n", ns, "-l", f"app.kubernetes.io/instance={name}")
        return list(found["items"])

    def apply(self, obj: dict[str, Any]) -> None:
        self.kubectl("apply", "-f", "-", input=json.dumps(obj))

    def patch_vm(self, name: str, patch: dict[str, Any], ns: str = NS) -> None:
        self.kubectl("patch", "vms.vmoperator.jdrupes.org", name, "-n", ns, "--type", "merge",
                     "-p", json.dumps(patch))  # fmt: skip

    def wait(self, what: str, check: Any, timeout: float = 300) -> float:
        started = time.monotonic()
        try:
            self.cluster.wait_for(what, check, timeout=timeout, interval=0.25)
        except ClusterError as exc:
            pytest.fail(f"{exc}\n--- operator:\n{self.operator_log()}", pytrace=False)
        return time.monotonic() - started

    def operator_log(self) -> str:
        proc = self.kubectl("logs", "-n", "corral-system", "-l",
                            "app.kubernetes.io/name=corral-operator", "--tail", "40",
                            check=False)  # fmt: skip
        return proc.stdout + proc.stderr

    def pod_log(self, pod: str, ns: str = NS) -> str:
        proc = self.kubectl("logs", "-n", ns, pod, check=False)
        return str(proc.stdout)


def _overlay(cluster: Cluster, guests: Path, data_dir: Path, where: Path) -> None:
    (where / "crd-vmoperator.yaml").write_text(yaml.safe_dump(crd_manifest(GROUP)))
    api = cluster.in_cluster_env
    env = {
        **api,
        "CORRAL_API_HOST": api["KUBERNETES_SERVICE_HOST"],
        "CORRAL_API_PORT": api["KUBERNETES_SERVICE_PORT"],
        "CORRAL_GROUP": GROUP,
        "CORRAL_HOST_PATHS": str(guests),
        "CORRAL_DATA_HOST_PATH": str(data_dir),
        "CORRAL_ACCEL": "tcg",
    }
    patch = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "corral-operator"},
        "spec": {"template": {"spec": {"containers": [{
            "name": "operator",
            "env": [{"name": k, "value": v} for k, v in env.items()],
        }]}}},
    }  # fmt: skip
    (where / "operator-env.yaml").write_text(yaml.safe_dump(patch))
    kustomization = {
        "bases": [os.path.relpath(ROOT / "deploy" / "kubernetes", where)],  # must be relative
        "resources": ["crd-vmoperator.yaml"],
        "patchesStrategicMerge": ["operator-env.yaml"],
    }
    (where / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))


@pytest.fixture(scope="module")
def deployed(
    kube_cluster: Cluster, corral_image: RunnerImage, guest_cache_dir: Path
) -> Iterator[Deployed]:
    root = Path(tempfile.mkdtemp(prefix="k2-op-", dir="/tmp"))
    data_dir, pv_dir, overlay = root / "data", root / "pv", root / "overlay"
    for d in (data_dir, pv_dir, overlay):
        d.mkdir()
    _overlay(kube_cluster, guest_cache_dir, data_dir, overlay)
    box = Deployed(kube_cluster, data_dir, pv_dir)
    applied = kube_cluster.kubectl("apply", "-k", str(overlay), check=False)
    assert applied.returncode == 0, f"kubectl apply -k refused deploy/: {applied.stderr}"
    kube_cluster.kubectl("create", "namespace", NS)
    try:
        box.wait("CRDs established", lambda: all(
            any(c["type"] == "Established" and c["status"] == "True"
                for c in box.get("crd", name).get("status", {}).get("conditions", []))
            for name in ("vms.vmoperator.jdrupes.org", "virtualmachines.corral.dev")
        ), 60)  # fmt: skip
        box.wait("operator pod running", lambda: any(
            p["status"].get("phase") == "Running"
            for p in box.get("pods", "-n", "corral-system")["items"]
        ), 180)  # fmt: skip
        yield box
    finally:
        with contextlib.suppress(ClusterError):
            kube_cluster.kubectl("delete", "namespace", NS, "--wait=true", timeout=300)
            kube_cluster.kubectl("delete", "-k", str(overlay), "--wait=true", timeout=300)
            kube_cluster.kubectl("delete", "pv", "--all", timeout=120)
        shutil.rmtree(root, ignore_errors=True)


def _pv(box: Deployed, name: str, labels: dict[str, str], size: str = "40Gi") -> None:
    path = box.pv_dir / name
    path.mkdir()
    box.apply({
        "apiVersion": "v1", "kind": "PersistentVolume",
        "metadata": {"name": name, "labels": labels},
        "spec": {"capacity": {"storage": size}, "accessModes": ["ReadWriteOnce"],
                 "storageClassName": "", "hostPath": {"path": str(path)},
                 "persistentVolumeReclaimPolicy": "Retain"},
    })  # fmt: skip


def _condition(status: dict[str, Any], kind: str) -> bool:
    return any(c["type"] == kind and c["status"] == "True" for c in status.get("conditions", []))


def test_vmoperator_sample_becomes_pod_claim_and_secret(deployed: Deployed) -> None:
    """The controller page's sample, unchanged: its claim binds to a matching volume, the
    pod and a generated display secret appear; Stopped removes the pod and keeps the claim;
    deleting the VM keeps the claim too."""
    box = deployed
    sample = VMOPERATOR_EXAMPLES["controller-page"]
    _pv(box, "test-vm-system", sample["spec"]["vm"]["disks"][0]["volumeClaimTemplate"]["spec"]
        ["selector"]["matchLabels"])  # fmt: skip
    started = time.monotonic()
    box.apply(sample)
    box.wait("the sample's pod", lambda: len(box.pods("test-vm")) == 1, 120)
    (pod,) = box.pods("test-vm")
    claim = box.get("pvc", "system-disk-test-vm", "-n", NS)
    assert claim["metadata"]["labels"]["app.kubernetes.io/instance"] == "test-vm"
    assert not claim["metadata"].get("ownerReferences")
    box.wait("the claim bound", lambda: box.get("pvc", "system-disk-test-vm", "-n", NS)
             ["status"].get("phase") == "Bound", 60)  # fmt: skip
    secret = box.get("secret", "test-vm-display-secret", "-n", NS)
    assert secret["metadata"]["labels"]["app.kubernetes.io/component"] == "display-secret"
    assert "display-password" in secret["data"] and "password-expiry" in secret["data"]
    assert pod["spec"]["terminationGracePeriodSeconds"] == 120 + 30
    box.wait("the sample VM running", lambda: box.status("test-vm").get("state") == "Running",
             300)  # fmt: skip
    print(f"\nsample apply -> Running: {time.monotonic() - started:.1f} s")
    status = box.status("test-vm")
    assert status["cpus"] == 2 and status["node"] == "localhost"
    assert status["ram"] in ("4Gi", "8Gi")  # no guest runs a balloon driver: it may stay at max
    events = box.get("events", "-n", NS, "--field-selector", "involvedObject.name=test-vm")
    reasons = {e["reason"] for e in events["items"]}
    assert {"ClaimCreated", "DisplaySecretGenerated", "Starting", "Running"} <= reasons, reasons

    box.patch_vm("test-vm", {"spec": {"vm": {"state": "Stopped"}}})
    gone = box.wait("the sample's pod gone", lambda: not box.pods("test-vm"), 300)
    print(f"sample state Stopped -> pod gone: {gone:.1f} s")
    assert box.get("pvc", "system-disk-test-vm", "-n", NS)["status"]["phase"] == "Bound"
    box.wait("status Stopped", lambda: box.status("test-vm").get("state") == "Stopped", 60)

    box.kubectl("delete", "vms.vmoperator.jdrupes.org", "test-vm", "-n", NS)
    box.wait("the VM gone", lambda: box.kubectl(
        "get", "vms.vmoperator.jdrupes.org", "test-vm", "-n", NS, check=False).returncode != 0,
        60)  # fmt: skip
    time.sleep(3)  # the garbage collector had its chance
    assert box.get("pvc", "system-disk-test-vm", "-n", NS)["metadata"]["name"]


def _tiny(name: str, guest: Any, **vm: Any) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/v1",
        "kind": "VirtualMachine",
        "metadata": {"name": name, "namespace": NS},
        "spec": {"guestShutdownStops": True, "vm": {
            "state": "Running", "firmware": "bios", "machine": "q35",
            "maximumCpus": 3, "currentCpus": 1, "maximumRam": "256Mi",
            "kernel": str(guest.kernel), "initrd": str(guest.initrd), "cmdline": guest.cmdline,
            "guestAgent": True, "powerdownTimeout": 60,
            "networks": [{"user": {}}], **vm,
        }},
    }  # fmt: skip


def test_tiny_guest_boots_in_a_pod_hotplugs_restarts_and_stops(deployed: Deployed) -> None:
    box = deployed
    guest = build_guest("tiny")
    started = time.monotonic()
    box.apply(_tiny("tiny", guest))
    booted = box.wait("the tiny guest booted in its pod",
                      lambda: _condition(box.status("tiny"), "Booted"), 600)  # fmt: skip
    print(f"\ntiny apply -> Booted: {booted:.1f} s (since apply {time.monotonic() - started:.1f})")
    box.wait("the guest's IP in the status", lambda: bool(box.status("tiny").get("ips")), 180)
    status = box.status("tiny")
    assert status["state"] == "Running" and status["node"] == "localhost"
    assert any(ip.startswith("10.0.2.") for ip in status["ips"]), status["ips"]
    (pod,) = box.pods("tiny")
    pod_name = pod["metadata"]["name"]

    patched = time.monotonic()
    box.patch_vm("tiny", {"spec": {"vm": {"currentCpus": 3}}})
    online = box.wait("CPUs onlined in the guest", lambda: '"VcpusOnlined"' in box.pod_log(
        pod_name) and box.status("tiny").get("cpus") == 3, 300)  # fmt: skip
    print(f"patch currentCpus 1 -> 3 -> onlined in the guest: {online:.1f} s")
    assert time.monotonic() - patched < 300

    old_uid, old_start = pod["metadata"]["uid"], box.status("tiny")["startedAt"]
    box.kubectl("delete", "pod", pod_name, "-n", NS, "--wait=false")
    box.wait("the runner pod recreated", lambda: any(
        p["metadata"]["uid"] != old_uid for p in box.pods("tiny")), 300)  # fmt: skip

    def booted_again() -> bool:
        now = box.status("tiny")
        return now.get("startedAt") != old_start and _condition(now, "Booted")

    box.wait("the VM booted again in the new pod", booted_again, 600)
    assert len(box.pods("tiny")) == 1

    (pod,) = box.pods("tiny")
    box.patch_vm("tiny", {"spec": {"vm": {"state": "Stopped"}}})
    gone = box.wait("the tiny pod gone", lambda: not box.pods("tiny"), 300)
    print(f"tiny state Stopped -> pod gone: {gone:.1f} s")
    final = box.status("tiny")
    assert final["state"] == "Stopped"
    assert final.get("stoppedBy") == "powerdown", final  # ACPI, not a kill


def test_operator_killed_mid_reconcile_makes_no_second_pod(deployed: Deployed) -> None:
    box = deployed
    guest = build_guest("tiny")
    box.apply(_tiny("tiny2", guest))
    box.kubectl("delete", "pod", "-n", "corral-system", "-l",
                "app.kubernetes.io/name=corral-operator", "--wait=false")  # fmt: skip
    box.wait("the runner pod", lambda: len(box.pods("tiny2")) >= 1, 300)
    box.wait("a new operator running", lambda: any(
        p["status"].get("phase") == "Running" and not p["metadata"].get("deletionTimestamp")
        for p in box.get("pods", "-n", "corral-system")["items"]), 180)  # fmt: skip
    time.sleep(10)  # the new operator re-lists and reconciles every VM
    assert len(box.pods("tiny2")) == 1
    box.patch_vm("tiny2", {"spec": {"vm": {"state": "Stopped"}}})
    box.wait("the tiny2 pod gone", lambda: not box.pods("tiny2"), 300)


def test_invalid_resource_is_refused_with_a_clear_message(deployed: Deployed) -> None:
    bad = _tiny("bad", build_guest("tiny"), currentCpus="lots")
    proc = deployed.kubectl("apply", "-f", "-", input=json.dumps(bad), check=False)
    assert proc.returncode != 0
    assert "currentCpus" in proc.stderr, proc.stderr
    assert deployed.kubectl("get", "vms.vmoperator.jdrupes.org", "bad", "-n", NS,
                            check=False).returncode != 0  # fmt: skip


def _vnc_security_types(port: int) -> list[int]:
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=10) as vnc:
        assert vnc.recv(12).startswith(b"RFB 003.")
        vnc.sendall(b"RFB 003.008\n")
        count = vnc.recv(1)[0]
        return list(vnc.recv(count))


def test_display_secret_rotation_reaches_qemu(deployed: Deployed) -> None:
    """A user's display secret (found by its labels) is mounted; changing it makes the runner
    set the new password in qemu (QMP set_password answered: DisplayPasswordSet, and the
    status's displayPasswordSerial counts it); VNC asks for a password (security type 2)."""
    box = deployed
    secret = {
        "apiVersion": "v1", "kind": "Secret", "type": "Opaque",
        "metadata": {"name": "tiny3-display", "namespace": NS, "labels": {
            "app.kubernetes.io/component": "display-secret",
            "app.kubernetes.io/instance": "tiny3"}},
        "stringData": {"display-password": "first1", "password-expiry": "never"},
    }  # fmt: skip
    box.apply(secret)
    box.apply(_tiny("tiny3", build_guest("tiny"), display={"vnc": {"port": 5977}}))
    box.wait("tiny3 booted", lambda: _condition(box.status("tiny3"), "Booted"), 600)
    (pod,) = box.pods("tiny3")
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert volumes["display-secret"]["secret"]["secretName"] == "tiny3-display"
    box.wait("the first password set", lambda: box.status("tiny3").get(
        "displayPasswordSerial", 0) >= 1, 120)  # fmt: skip
    first = box.status("tiny3")["displayPasswordSerial"]
    assert _vnc_security_types(5977) == [2]  # VNC authentication: a password is required

    secret["stringData"] = {"display-password": "second", "password-expiry": "+600"}
    changed = time.monotonic()
    box.apply(secret)
    took = box.wait("the new password applied", lambda: box.status("tiny3").get(
        "displayPasswordSerial", 0) > first, 400)  # fmt: skip
    print(f"\ndisplay secret changed -> set in qemu: {took:.1f} s (kubelet secret sync)")
    assert time.monotonic() - changed < 400
    log = box.pod_log(pod["metadata"]["name"])
    assert '"expiry": "+600"' in log, log[-2000:]
    box.patch_vm("tiny3", {"spec": {"vm": {"state": "Stopped"}}})
    box.wait("the tiny3 pod gone", lambda: not box.pods("tiny3"), 300)
