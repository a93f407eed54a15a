"""What a VirtualMachine object becomes: the runner pod, its claims, the display secret and
the document the runner in the pod runs (pure functions, no cluster)."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from corral.errors import SpecError
from corral.k8s.resources import (
    OperatorSettings,
    claim_disks,
    claim_manifest,
    data_claim_manifest,
    display_secret_manifest,
    document_of,
    pod_manifest,
    runner_document,
    wants_display_secret,
)
from corral.spec import parse_document
from tests.unit.test_k8s_crd import VMOPERATOR_EXAMPLES


def _obj(example: str = "basic-vm", **vm: Any) -> dict[str, Any]:
    obj = copy.deepcopy(VMOPERATOR_EXAMPLES[example])
    obj["metadata"] |= {
        "uid": "0b6e1f2a-1111-2222-3333-444455556666",
        "generation": 3,
        # what the API server adds: never part of a document
        "managedFields": [{"manager": "kubectl", "operation": "Update"}],
        "selfLink": "/apis/vmoperator.jdrupes.org/v1/namespaces/vmop-test/vms/test-vm",
    }
    obj["spec"]["vm"] |= vm
    return obj


_LABELS = {
    "app.kubernetes.io/name": "vm-runner",
    "app.kubernetes.io/instance": "test-vm",
    "app.kubernetes.io/managed-by": "corral",
}


def test_claims_are_named_like_vmoperator_and_never_owned() -> None:
    obj = _obj()
    disks = claim_disks(parse_document(document_of(obj)))
    assert [(d.index, d.claim, d.block) for d in disks] == [
        (2, "system-disk-test-vm", False),
        (3, "disk3-disk-test-vm", False),
    ]
    claim = claim_manifest(obj, disks[0])
    assert claim["metadata"]["name"] == "system-disk-test-vm"
    assert claim["metadata"]["namespace"] == "vmop-test"
    assert claim["metadata"]["labels"] == _LABELS
    assert claim["metadata"]["annotations"] == {"use_as": "system-disk"}
    assert "ownerReferences" not in claim["metadata"]  # deleting the VM keeps its disks
    assert claim["spec"]["storageClassName"] == "local-path"
    assert claim["spec"]["resources"] == {"requests": {"storage": "1Gi"}}
    data = data_claim_manifest(obj, OperatorSettings())
    assert data["metadata"]["name"] == "test-vm-runner-data"
    assert "ownerReferences" not in data["metadata"]


def test_a_bad_claim_name_is_refused_with_its_field() -> None:
    obj = _obj()
    obj["spec"]["vm"]["disks"][2]["volumeClaimTemplate"]["metadata"]["name"] = "Sys_Disk"
    with pytest.raises(SpecError) as info:
        claim_disks(parse_document(document_of(obj)))
    assert info.value.issues[0].loc == "spec.vm.disks[2].volumeClaimTemplate.metadata.name"


def test_pod_shape() -> None:
    obj = _obj(powerdownTimeout=60)
    obj["spec"]["vm"]["disks"][3]["volumeClaimTemplate"]["spec"]["volumeMode"] = "Block"
    settings = OperatorSettings(
        api_host="127.0.0.1", api_port="6443", data_host_path="/var/lib/corral/k8s",
        host_paths=("/srv/guests",), image_volume="claim:vmop-image-repository",
    )  # fmt: skip
    pod = pod_manifest(obj, settings, display="test-vm-display-secret")
    meta, spec = pod["metadata"], pod["spec"]
    assert meta["name"] == "test-vm" and meta["namespace"] == "vmop-test"
    assert meta["labels"] == {**_LABELS, "app.kubernetes.io/component": "runner"}
    assert meta["ownerReferences"][0]["uid"] == obj["metadata"]["uid"]
    assert spec["terminationGracePeriodSeconds"] == 90  # powerdownTimeout + margin
    assert spec["hostNetwork"] is True and spec["dnsPolicy"] == "Default"
    (container,) = spec["containers"]
    assert container["securityContext"] == {"privileged": True}
    assert container["image"] == "localhost/corral:dev"
    assert container["resources"] == {"requests": {"cpu": 1, "memory": "2Gi"}}
    args = container["args"]
    assert args[:2] == ["run", "--kube"]
    assert args[args.index("--name") + 1] == "test-vm"
    assert args[args.index("--display-secret-file") + 1] == "/var/run/corral/display-secret"
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["KUBERNETES_SERVICE_HOST"] == "127.0.0.1"
    assert env["KUBERNETES_SERVICE_PORT"] == "6443"
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts["disk-system"] == "/var/lib/corral/disks/system"
    assert mounts["display-secret"] == "/var/run/corral/display-secret"
    assert mounts["images"] == "/var/lib/corral/images"
    assert mounts["host-0"] == "/srv/guests"
    assert container["volumeDevices"] == [{"name": "disk-disk3", "devicePath": "/dev/disk3-disk"}]
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["disk-system"]["persistentVolumeClaim"] == {"claimName": "system-disk-test-vm"}
    assert volumes["data"]["hostPath"]["path"] == "/var/lib/corral/k8s/vmop-test/test-vm"
    assert volumes["display-secret"]["secret"] == {"secretName": "test-vm-display-secret"}
    assert volumes["images"]["persistentVolumeClaim"]["claimName"] == "vmop-image-repository"


def test_privileged_and_host_network_are_configurable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CORRAL_HOST_NETWORK", "false")
    monkeypatch.setenv("CORRAL_PRIVILEGED", "0")
    settings = OperatorSettings.from_env()
    pod = pod_manifest(_obj(), settings)
    assert pod["spec"]["hostNetwork"] is False and pod["spec"]["dnsPolicy"] == "ClusterFirst"
    assert pod["spec"]["containers"][0]["securityContext"] == {"privileged": False}
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert volumes["data"]["persistentVolumeClaim"] == {"claimName": "test-vm-runner-data"}
    assert "display-secret" not in volumes


def test_generated_display_secret_expires_at_once_and_is_found_by_labels() -> None:
    obj = _obj("dev-example")
    secret = display_secret_manifest(obj, "s3cret")
    assert secret["metadata"]["labels"]["app.kubernetes.io/component"] == "display-secret"
    assert secret["metadata"]["labels"]["app.kubernetes.io/instance"] == "test-vm"
    assert secret["stringData"] == {"display-password": "s3cret", "password-expiry": "now"}
    assert wants_display_secret(parse_document(document_of(obj)))
    obj["spec"]["vm"]["display"]["spice"]["generateSecret"] = False
    assert not wants_display_secret(parse_document(document_of(obj)))
    assert not wants_display_secret(parse_document(document_of(_obj(display=None))))


def test_runner_document_maps_claims_and_images_into_the_pod() -> None:
    obj = _obj()
    obj["spec"]["vm"]["disks"][3]["volumeClaimTemplate"]["spec"]["volumeMode"] = "Block"
    doc = runner_document({**obj, "status": {"state": "Running"}})
    cd_url, cd_rel, fs, block = doc.vm.disks
    assert cd_url.cdrom is not None and cd_url.cdrom.image == "https://test.com/test.iso"
    assert cd_url.bootindex == 0
    assert cd_rel.cdrom is not None and cd_rel.cdrom.image == "/var/lib/corral/images/image.iso"
    assert fs.file is not None and fs.file.path == "/var/lib/corral/disks/system/disk.qcow2"
    assert fs.file.size == 1024**3
    assert block.device is not None and block.device.path == "/dev/disk3-disk"
    assert doc.vm.current_cpus == 2 and doc.name == "test-vm"


def test_a_runner_pod_may_name_only_its_own_volumes_and_devices(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The attack: a VirtualMachine author points a disk at the host's /dev/sda (a privileged
    pod sees the host's /dev) or at /etc in the pod. The runner's policy (no --policy) names
    only the pod's own volumes and claim devices, so both are refused by field; the VM's own
    claims, images and host paths pass."""
    from corral.errors import PolicyError
    from corral.k8s.runner import pod_policy
    from corral.spec import check_policy

    obj = _obj()
    obj["spec"]["vm"]["disks"][3]["volumeClaimTemplate"]["spec"]["volumeMode"] = "Block"
    settings = OperatorSettings(
        host_paths=("/srv/guests",), image_volume="claim:vmop-image-repository"
    )
    pod = pod_manifest(obj, settings, display="test-vm-display-secret")
    (container,) = pod["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    paths = env["CORRAL_IMAGE_PATHS"].split(":")
    assert "/dev/disk3-disk" in paths and "/var/lib/corral/disks/system" in paths
    assert {"/var/lib/corral/images", "/srv/guests", "/var/lib/corral/vm"} <= set(paths)
    assert not any(p in ("/", "/dev", "/run/corral") for p in paths)

    monkeypatch.setenv("CORRAL_IMAGE_PATHS", env["CORRAL_IMAGE_PATHS"])
    policy = pod_policy()
    doc = runner_document({**obj, "status": {"state": "Running"}})
    check_policy(doc, policy)  # the VM's own claims, images and device pass

    for evil in ("/dev/sda", "/etc/shadow"):
        bad = copy.deepcopy(obj)
        bad["spec"]["vm"]["disks"].append({"file": {"path": evil}})
        with pytest.raises(PolicyError) as refused:
            check_policy(runner_document({**bad, "status": {"state": "Running"}}), policy)
        assert "spec.vm.disks[4].file.path" in str(refused.value.issues), evil

    monkeypatch.delenv("CORRAL_IMAGE_PATHS")
    with pytest.raises(PolicyError):  # an old pod without the list: nothing local, not all
        check_policy(doc, pod_policy())
