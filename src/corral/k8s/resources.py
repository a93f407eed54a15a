"""What one ``VirtualMachine`` becomes in the cluster, as pure functions of the object and
the operator's settings: the runner pod, the disks' claims, the display secret, and the
document the runner in the pod runs (claims translated to the pod's device and file paths).

Why a Pod and not a StatefulSet with 0/1 replicas: the VM's state is the operator's decision,
not a controller's. A StatefulSet recreates its pod on its own (a second, competing
reconciler), turns "stop" into a scale to 0 plus a wait, and its ``volumeClaimTemplates``
cannot be changed after creation; VM-Operator moved from a StatefulSet to a Pod for these
reasons. The operator creates the pod when ``spec.vm.state`` is Running, deletes it (a graceful
ACPI powerdown within ``terminationGracePeriodSeconds``) when Stopped, and recreates it when it
disappears while the VM should run.

Claims are named ``<name>-disk-<vm>`` as VM-Operator names them (an unnamed template is
``disk<index>``), labelled ``app.kubernetes.io/name|instance|managed-by`` and never owned by
the VM: deleting the VM keeps its disks. The pod and a generated display secret are owned by
the VM (the garbage collector removes them with it).
"""

from __future__ import annotations

import copy
import os
import re
from dataclasses import dataclass, field
from typing import Any

from corral.errors import SpecError
from corral.spec import VmDocument, parse_document
from corral.spec.devices import CdromDisk, DeviceDisk, Disk, FileDisk, is_remote_image

__all__ = [
    "APP_NAME",
    "DATA_DIR",
    "DISKS_DIR",
    "DISPLAY_SECRET_DIR",
    "IMAGES_DIR",
    "IMAGE_PATHS_ENV",
    "MANAGED_BY",
    "RUNTIME_DIR",
    "ClaimDisk",
    "OperatorSettings",
    "claim_disks",
    "claim_manifest",
    "display_secret_manifest",
    "document_of",
    "pod_manifest",
    "runner_document",
    "selector_labels",
]

APP_NAME = "vm-runner"
MANAGED_BY = "corral"
DATA_DIR = "/var/lib/corral/vm"
DISKS_DIR = "/var/lib/corral/disks"
IMAGES_DIR = "/var/lib/corral/images"
RUNTIME_DIR = "/run/corral"
DISPLAY_SECRET_DIR = "/var/run/corral/display-secret"  # noqa: S105 (a path)
IMAGE_PATHS_ENV = "CORRAL_IMAGE_PATHS"  # the pod's volumes: its runner's imagePaths
GRACE_MARGIN = 30
"""Seconds on top of ``powerdownTimeout`` before the kubelet kills the runner: its own quit
and SIGKILL steps after the powerdown wait."""


def _flag(name: str, default: bool) -> bool:
    value = os.environ.get(name)
    if value is None or not value.strip():
        return default
    return value.strip().lower() in ("1", "true", "yes", "on")


@dataclass(frozen=True)
class OperatorSettings:
    """How runner pods are shaped on this cluster (the operator's flags and environment).

    ``host_network`` and ``privileged`` default to True: /dev/kvm needs a privileged pod, and
    on a cluster without kube-proxy only host-network pods reach the API server (at
    ``api_host``:``api_port``, which the runner gets as ``KUBERNETES_SERVICE_HOST``/``PORT``).
    ``data_host_path``: the per-VM data (firmware vars, TPM state, UUID) under this host
    directory instead of a ``<vm>-runner-data`` claim. ``image_volume``: where relative cdrom
    images are (``claim:<name>`` or ``hostPath:<dir>``). ``host_paths``: host directories
    mounted read-only at the same path (base images, kernels)."""

    group: str = "corral.dev"
    image: str = "localhost/corral:dev"
    pull_policy: str = "IfNotPresent"
    host_network: bool = True
    privileged: bool = True
    api_host: str | None = None
    api_port: str | None = None
    service_account: str = "corral-runner"
    data_host_path: str | None = None
    data_storage_class: str | None = None
    data_size: str = "64Mi"
    image_volume: str | None = None
    host_paths: tuple[str, ...] = ()
    accel: str | None = None
    extra_env: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_env(cls, *, group: str = "corral.dev", image: str | None = None) -> OperatorSettings:
        env = os.environ
        paths = tuple(p for p in env.get("CORRAL_HOST_PATHS", "").split(":") if p)
        return cls(
            group=group,
            image=image or env.get("CORRAL_RUNNER_IMAGE", "localhost/corral:dev"),
            pull_policy=env.get("CORRAL_PULL_POLICY", "IfNotPresent"),
            host_network=_flag("CORRAL_HOST_NETWORK", True),
            privileged=_flag("CORRAL_PRIVILEGED", True),
            api_host=env.get("CORRAL_API_HOST") or None,
            api_port=env.get("CORRAL_API_PORT") or None,
            service_account=env.get("CORRAL_RUNNER_SERVICE_ACCOUNT", "corral-runner"),
            data_host_path=env.get("CORRAL_DATA_HOST_PATH") or None,
            data_storage_class=env.get("CORRAL_DATA_STORAGE_CLASS") or None,
            image_volume=env.get("CORRAL_IMAGE_VOLUME") or None,
            host_paths=paths,
            accel=env.get("CORRAL_ACCEL") or None,
        )


def selector_labels(vm: str) -> dict[str, str]:
    """The labels of everything made for ``vm`` (and the pod selector)."""
    return {
        "app.kubernetes.io/name": APP_NAME,
        "app.kubernetes.io/instance": vm,
        "app.kubernetes.io/managed-by": MANAGED_BY,
    }


def _owner(obj: dict[str, Any]) -> dict[str, Any]:
    meta = obj["metadata"]
    return {
        "apiVersion": obj["apiVersion"],
        "kind": obj["kind"],
        "name": meta["name"],
        "uid": meta["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


# --- disks ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClaimDisk:
    """A ``volumeClaimTemplate`` disk: its claim, and where it appears in the pod."""

    index: int
    name: str
    claim: str
    block: bool
    template: dict[str, Any]

    @property
    def device_path(self) -> str:
        return f"/dev/{self.name}-disk"

    @property
    def mount_dir(self) -> str:
        return f"{DISKS_DIR}/{self.name}"

    @property
    def image_file(self) -> str:
        return f"{self.mount_dir}/disk.qcow2"

    @property
    def volume(self) -> str:
        return f"disk-{self.name}"


_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def claim_disks(doc: VmDocument) -> list[ClaimDisk]:
    out = []
    for i, disk in enumerate(doc.vm.disks):
        template = disk.volume_claim_template
        if template is None:
            continue
        meta = template.get("metadata") or {}
        name = str(meta.get("name") or disk.name or f"disk{i}")
        claim = f"{name}-disk-{doc.name}"
        if not _NAME.match(name) or len(claim) > 253:
            raise SpecError.single(
                f"spec.vm.disks[{i}].volumeClaimTemplate.metadata.name",
                f"{name!r} must be a DNS-1123 name (the claim is {claim!r})",
            )
        spec = template.get("spec") or {}
        block = spec.get("volumeMode") == "Block"
        out.append(ClaimDisk(i, name, claim, block, copy.deepcopy(template)))
    return out


def claim_manifest(obj: dict[str, Any], disk: ClaimDisk) -> dict[str, Any]:
    """The claim of one disk: the template's spec as written, never owned by the VM."""
    meta = disk.template.get("metadata") or {}
    labels = {**(meta.get("labels") or {}), **selector_labels(obj["metadata"]["name"])}
    spec = dict(disk.template.get("spec") or {})
    spec.setdefault("accessModes", ["ReadWriteOnce"])
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {
            "name": disk.claim,
            "namespace": obj["metadata"]["namespace"],
            "labels": labels,
            "annotations": dict(meta.get("annotations") or {}),
        },
        "spec": spec,
    }


def data_claim_manifest(obj: dict[str, Any], settings: OperatorSettings) -> dict[str, Any]:
    """The small per-VM data claim (firmware vars, TPM state, the VM's UUID)."""
    vm = obj["metadata"]["name"]
    spec: dict[str, Any] = {
        "accessModes": ["ReadWriteOnce"],
        "resources": {"requests": {"storage": settings.data_size}},
    }
    if settings.data_storage_class is not None:
        spec["storageClassName"] = settings.data_storage_class
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {
            "name": f"{vm}-runner-data",
            "namespace": obj["metadata"]["namespace"],
            "labels": {**selector_labels(vm), "app.kubernetes.io/component": "runner-data"},
        },
        "spec": spec,
    }


# --- the display secret --------------------------------------------------------------------


def display_secret_manifest(obj: dict[str, Any], password: str) -> dict[str, Any]:
    """A generated display secret (VM-Operator's controller page): a random password that
    expires at once, so the display stays locked until someone sets a password of their own."""
    vm = obj["metadata"]["name"]
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": {
            "name": f"{vm}-display-secret",
            "namespace": obj["metadata"]["namespace"],
            "labels": {**selector_labels(vm), "app.kubernetes.io/component": "display-secret"},
            "ownerReferences": [_owner(obj)],
        },
        "stringData": {"display-password": password, "password-expiry": "now"},
    }


def wants_display_secret(doc: VmDocument) -> bool:
    display = doc.vm.display
    if display is None or (display.spice is None and display.vnc is None):
        return False
    return display.spice is None or display.spice.generate_secret


# --- the pod -------------------------------------------------------------------------------


def pod_manifest(
    obj: dict[str, Any],
    settings: OperatorSettings,
    *,
    display: str | None = None,
) -> dict[str, Any]:
    """The runner pod of a VirtualMachine object (validated as a VM document first)."""
    doc = parse_document(document_of(obj))
    meta = obj["metadata"]
    vm, namespace = meta["name"], meta["namespace"]
    labels = selector_labels(vm)
    volumes: list[dict[str, Any]] = [
        {"name": "runtime", "emptyDir": {"medium": "Memory", "sizeLimit": "16Mi"}},
    ]
    mounts: list[dict[str, Any]] = [{"name": "runtime", "mountPath": RUNTIME_DIR}]
    devices: list[dict[str, Any]] = []
    if settings.data_host_path:
        host_dir = f"{settings.data_host_path.rstrip('/')}/{namespace}/{vm}"
        volumes.append(
            {"name": "data", "hostPath": {"path": host_dir, "type": "DirectoryOrCreate"}}
        )
    else:
        volumes.append(
            {"name": "data", "persistentVolumeClaim": {"claimName": f"{vm}-runner-data"}}
        )
    mounts.append({"name": "data", "mountPath": DATA_DIR})
    for disk in claim_disks(doc):
        volumes.append({"name": disk.volume, "persistentVolumeClaim": {"claimName": disk.claim}})
        if disk.block:
            devices.append({"name": disk.volume, "devicePath": disk.device_path})
        else:
            mounts.append({"name": disk.volume, "mountPath": disk.mount_dir})
    if settings.image_volume:
        kind, _, where = settings.image_volume.partition(":")
        source: dict[str, Any] = (
            {"persistentVolumeClaim": {"claimName": where, "readOnly": True}}
            if kind == "claim"
            else {"hostPath": {"path": where, "type": "Directory"}}
        )
        volumes.append({"name": "images", **source})
        mounts.append({"name": "images", "mountPath": IMAGES_DIR, "readOnly": True})
    for i, path in enumerate(settings.host_paths):
        volumes.append({"name": f"host-{i}", "hostPath": {"path": path, "type": "Directory"}})
        mounts.append({"name": f"host-{i}", "mountPath": path, "readOnly": True})
    args = [
        "run",
        "--kube",
        "--group",
        settings.group,
        "--namespace",
        namespace,
        "--name",
        vm,
        "--data-dir",
        DATA_DIR,
        "--runtime-dir",
        f"{RUNTIME_DIR}/{vm}",
    ]
    # what a document may name in the pod: its own volumes and devices, never the rest of a
    # privileged pod's view of the host (/dev, /): the runner's host policy imagePaths
    image_paths = [m["mountPath"] for m in mounts if m["name"] != "runtime"]
    image_paths += [d["devicePath"] for d in devices]
    if display is not None:
        volumes.append({"name": "display-secret", "secret": {"secretName": display}})
        mounts.append({"name": "display-secret", "mountPath": DISPLAY_SECRET_DIR, "readOnly": True})
        args += ["--display-secret-file", DISPLAY_SECRET_DIR]
    if settings.accel:
        args += ["--accel", settings.accel]
    env: list[dict[str, Any]] = [
        {"name": "CORRAL_NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
        {"name": IMAGE_PATHS_ENV, "value": ":".join(image_paths)},
    ]
    if settings.api_host:
        env.append({"name": "KUBERNETES_SERVICE_HOST", "value": settings.api_host})
    if settings.api_port:
        env.append({"name": "KUBERNETES_SERVICE_PORT", "value": settings.api_port})
    env += [{"name": k, "value": v} for k, v in sorted(settings.extra_env.items())]
    container: dict[str, Any] = {
        "name": "runner",
        "image": settings.image,
        "imagePullPolicy": settings.pull_policy,
        "command": ["corral"],
        "args": args,
        "env": env,
        "volumeMounts": mounts,
        "securityContext": {"privileged": settings.privileged},
    }
    if devices:
        container["volumeDevices"] = devices
    if doc.spec.resources:
        container["resources"] = copy.deepcopy(doc.spec.resources)
    pod_spec: dict[str, Any] = {
        "serviceAccountName": settings.service_account,
        "restartPolicy": "Always",
        "terminationGracePeriodSeconds": doc.vm.powerdown_timeout + GRACE_MARGIN,
        "hostNetwork": settings.host_network,
        "dnsPolicy": "Default" if settings.host_network else "ClusterFirst",
        "containers": [container],
        "volumes": volumes,
    }
    if doc.spec.node_name:
        pod_spec["nodeName"] = doc.spec.node_name
    if doc.spec.node_selector:
        pod_spec["nodeSelector"] = dict(doc.spec.node_selector)
    if doc.spec.affinity:
        pod_spec["affinity"] = copy.deepcopy(doc.spec.affinity)
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": vm,
            "namespace": namespace,
            "labels": {**labels, "app.kubernetes.io/component": "runner"},
            "annotations": {"corral.dev/generation": str(meta.get("generation", ""))},
            "ownerReferences": [_owner(obj)],
        },
        "spec": pod_spec,
    }


# --- the document the runner in the pod runs -----------------------------------------------

_KEPT_METADATA = (
    "name", "namespace", "labels", "annotations", "uid", "resourceVersion", "generation",
    "creationTimestamp",
)  # fmt: skip


def document_of(obj: dict[str, Any]) -> dict[str, Any]:
    """The VM document inside an object as the API server returns it: no status, and only
    the metadata a document has (not managedFields, selfLink, ownerReferences...)."""
    meta = obj.get("metadata") or {}
    body = {k: v for k, v in obj.items() if k != "status"}
    body["metadata"] = {k: v for k, v in meta.items() if k in _KEPT_METADATA}
    return body


def runner_document(obj: dict[str, Any]) -> VmDocument:
    """The VM document of a VirtualMachine object as the runner in its pod runs it: each
    claim disk becomes the pod's block device (``/dev/<name>-disk``) or a qcow2 image file in
    the claim's filesystem, and a relative cdrom image is looked up in the shared image
    volume (VM-Operator's image repository)."""
    doc = parse_document(document_of(obj))
    claims = {c.index: c for c in claim_disks(doc)}
    disks: list[Disk] = []
    for i, disk in enumerate(doc.vm.disks):
        claim = claims.get(i)
        if claim is not None:
            storage = (claim.template.get("spec") or {}).get("resources", {}).get("requests", {})
            if claim.block:
                new = Disk(name=disk.name, bootindex=disk.bootindex,
                           device=DeviceDisk(path=claim.device_path))  # fmt: skip
            else:
                new = Disk(
                    name=disk.name,
                    bootindex=disk.bootindex,
                    file=FileDisk(path=claim.image_file, size=storage.get("storage", "1Gi")),
                )
            disks.append(new)
        elif (
            disk.cdrom is not None
            and disk.cdrom.image
            and not is_remote_image(disk.cdrom.image)
            and not disk.cdrom.image.startswith("/")
        ):
            image = f"{IMAGES_DIR}/{disk.cdrom.image}"
            cdrom = CdromDisk(image=image, interface=disk.cdrom.interface)
            disks.append(disk.model_copy(update={"cdrom": cdrom}))
        else:
            disks.append(disk)
    vm = doc.vm.model_copy(update={"disks": disks})
    return doc.model_copy(update={"spec": doc.spec.model_copy(update={"vm": vm})})
