"""``corral operator run``: VirtualMachine objects become runner pods (on kopf).

One idempotent :func:`reconcile` per VM, run on every watch event of the VM and of its pod
(retried with backoff while the cluster refuses something for now), so a restarted operator
picks up where it stopped and two events racing end in one pod: the pod, the claims and the
generated secret have fixed names, and a creation that finds its object already there (409)
is success. State Running creates what is missing; Stopped deletes the pod (a graceful ACPI
powerdown: its grace period is ``powerdownTimeout`` plus a margin). A runner pod that
disappears while the VM should run is recreated.

Nothing here needs cleaning when a VM is deleted: the pod and a generated display secret are
owned by the VM (the garbage collector deletes them), and the claims are never deleted with the
VM. So the operator sets no finalizers, and kopf keeps no state on the objects (watch event
handlers only; a restarted operator's first list reconciles every VM).
Replicas never both act: kopf peering, each replica with a random priority, so all but the
highest freeze.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import kopf

from corral.errors import Conflict, CorralError, NotFound, SpecError
from corral.k8s.api import KubeApi, load_credentials
from corral.k8s.crd import CrdNames, names_for
from corral.k8s.resources import (
    OperatorSettings,
    claim_disks,
    claim_manifest,
    data_claim_manifest,
    display_secret_manifest,
    document_of,
    pod_manifest,
    wants_display_secret,
)
from corral.k8s.runner import object_path, post_event
from corral.spec import parse_document

__all__ = ["Operator", "OperatorSettings", "run_operator"]

log = logging.getLogger("corral.operator")
RESYNC_SECONDS = 60


@dataclass
class Operator:
    settings: OperatorSettings
    names: CrdNames
    api: KubeApi
    accounts: set[str] = field(default_factory=set)

    def _core(self, namespace: str, kind: str, name: str | None = None) -> str:
        base = f"/api/v1/namespaces/{namespace}/{kind}"
        return f"{base}/{name}" if name else base

    async def _event(self, obj: dict[str, Any], kind: str, reason: str, message: str) -> None:
        try:
            await post_event(self.api, obj, kind, reason, message, "operator")
        except CorralError as exc:
            log.warning("cannot post event %s on %s: %s", reason, obj["metadata"]["name"], exc)

    async def _ensure(self, path: str, body: dict[str, Any]) -> bool:
        """Create ``body`` unless it exists; True if this call created it."""
        try:
            await self.api.create(path, body)
        except Conflict:
            return False
        return True

    async def _runner_account(self, namespace: str) -> None:
        """The runner's service account in a VM namespace, bound to the ``corral-runner``
        cluster role (deploy/kubernetes/rbac.yaml) there only."""
        if namespace in self.accounts:
            return
        account = self.settings.service_account
        await self._ensure(
            self._core(namespace, "serviceaccounts"),
            {"apiVersion": "v1", "kind": "ServiceAccount",
             "metadata": {"name": account, "namespace": namespace}},
        )  # fmt: skip
        await self._ensure(
            f"/apis/rbac.authorization.k8s.io/v1/namespaces/{namespace}/rolebindings",
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "RoleBinding",
                "metadata": {"name": "corral-runner", "namespace": namespace},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                            "name": "corral-runner"},
                "subjects": [{"kind": "ServiceAccount", "name": account,
                              "namespace": namespace}],
            },
        )  # fmt: skip
        self.accounts.add(namespace)

    async def _display_secret(self, obj: dict[str, Any]) -> str | None:
        """VM-Operator's rule: the secret labelled display-secret for this instance, else a
        generated one (unless ``generateSecret: false``)."""
        meta = obj["metadata"]
        selector = ",".join(
            f"{k}={v}"
            for k, v in {
                "app.kubernetes.io/component": "display-secret",
                "app.kubernetes.io/instance": meta["name"],
            }.items()
        )
        found = await self.api.request(
            "GET", self._core(meta["namespace"], "secrets"), params={"labelSelector": selector}
        )
        items = sorted(found.get("items", []), key=lambda s: s["metadata"]["name"])
        if items:
            name: str = items[0]["metadata"]["name"]
            return name
        doc = parse_document(document_of(obj))
        if not wants_display_secret(doc):
            return None
        secret = display_secret_manifest(obj, secrets.token_urlsafe(16))
        if await self._ensure(self._core(meta["namespace"], "secrets"), secret):
            made = f"generated {secret['metadata']['name']} (its password expired)"
            await self._event(obj, "Normal", "DisplaySecretGenerated", made)
        generated: str = secret["metadata"]["name"]
        return generated

    async def reconcile(self, obj: dict[str, Any]) -> None:
        """Make the cluster match one VirtualMachine object (idempotent)."""
        meta = obj["metadata"]
        name, namespace = meta["name"], meta["namespace"]
        if meta.get("deletionTimestamp"):
            return  # the garbage collector removes the pod; the claims stay
        try:
            doc = parse_document(document_of(obj))
            disks = claim_disks(doc)
        except SpecError as exc:
            await self._invalid(obj, exc)
            return
        pod_path = self._core(namespace, "pods", name)
        try:
            pod: dict[str, Any] | None = await self.api.get(pod_path)
        except NotFound:
            pod = None
        if doc.vm.state == "Stopped":
            if pod is not None and not pod["metadata"].get("deletionTimestamp"):
                await self.api.delete(pod_path)
                await self._event(obj, "Normal", "Stopping", f"deleted runner pod {name}")
            elif pod is None and (obj.get("status") or {}).get("state") not in (None, "Stopped"):
                await self._status(obj, {"state": "Stopped"})
            return
        for disk in disks:
            claim = claim_manifest(obj, disk)
            if await self._ensure(self._core(namespace, "persistentvolumeclaims"), claim):
                await self._event(obj, "Normal", "ClaimCreated", f"created claim {disk.claim}")
        if self.settings.data_host_path is None:
            data = data_claim_manifest(obj, self.settings)
            await self._ensure(self._core(namespace, "persistentvolumeclaims"), data)
        if pod is not None:
            return  # running, or being deleted: its DELETED event brings us back
        await self._runner_account(namespace)
        display = await self._display_secret(obj)
        manifest = pod_manifest(obj, self.settings, display=display)
        if await self._ensure(self._core(namespace, "pods"), manifest):
            await self._event(obj, "Normal", "Starting", f"created runner pod {name}")
            if (obj.get("status") or {}).get("state") in (None, "Stopped", "Crashed"):
                await self._status(obj, {"state": "Starting"})

    async def _invalid(self, obj: dict[str, Any], exc: SpecError) -> None:
        message = "; ".join([exc.message, *map(str, exc.issues)])[:1000]
        status = obj.get("status") or {}
        if status.get("configError") != message:
            await self._event(obj, "Warning", "InvalidSpec", message)
            await self._status(obj, {"configError": message})

    async def _status(self, obj: dict[str, Any], patch: dict[str, Any]) -> None:
        meta = obj["metadata"]
        path = object_path(self.names, meta["namespace"], meta["name"])
        with contextlib.suppress(NotFound):  # deleted meanwhile
            await self.api.merge_patch(f"{path}/status", {"status": patch})

    async def reconcile_retrying(
        self, namespace: str, name: str, obj: dict[str, Any] | None = None
    ) -> None:
        """:meth:`reconcile`, retried with backoff (1 s doubling to 30 s, about 3 min in
        all) while the cluster refuses something for now (a runner service account whose
        token is not made yet, an API server restarting); each retry reads the VM again."""
        for delay in (1, 2, 4, 8, 16, 30, 30, 30, 30, 30, 0):
            try:
                if obj is None:
                    obj = await self.api.get(object_path(self.names, namespace, name))
                await self.reconcile(obj)
                return
            except NotFound:
                return  # the VM is gone
            except CorralError as exc:
                log.warning("reconcile %s/%s: %s (again in %d s)", namespace, name, exc, delay)
                if not delay:
                    return
                await asyncio.sleep(delay)
                obj = None


def build_registry(operator: Operator) -> kopf.OperatorRegistry:
    """kopf handlers for one group: event handlers only (no finalizers, no state kept on the
    objects)."""
    registry = kopf.OperatorRegistry()
    names = operator.names
    group, version, plural = names.group, names.version, names.plural
    runner_labels = {
        "app.kubernetes.io/managed-by": "corral",
        "app.kubernetes.io/component": "runner",
    }

    async def on_vm(body: kopf.Body, type: str | None, **_: Any) -> None:
        if type == "DELETED":
            return
        meta = body.get("metadata", {})
        await operator.reconcile_retrying(meta["namespace"], meta["name"], dict(body))

    async def on_pod(body: kopf.Body, type: str | None, **_: Any) -> None:
        if type != "DELETED":
            return
        meta = body.get("metadata", {})
        vm = (meta.get("labels") or {}).get("app.kubernetes.io/instance")
        if vm:
            await operator.reconcile_retrying(meta["namespace"], vm)

    async def on_startup(settings: kopf.OperatorSettings, **_: Any) -> None:
        settings.posting.enabled = False  # our own events carry the VM's transitions
        # no timers for a periodic resync: kopf would put a finalizer on every VM for them
        settings.watching.server_timeout = RESYNC_SECONDS

    def login(**_: Any) -> kopf.ConnectionInfo:
        """kopf's own logins need a client library; ours are the runner's credentials."""
        creds = load_credentials()
        return kopf.ConnectionInfo(
            server=creds.server,
            ca_path=creds.ca_path,
            ca_data=creds.ca_data,
            token=creds.current_token(),
            scheme="Bearer" if creds.token or creds.token_file else None,
            certificate_path=creds.cert_path,
            certificate_data=creds.cert_data,
            private_key_path=creds.key_path,
            private_key_data=creds.key_data,
            default_namespace=creds.namespace,
        )

    kopf.on.login(registry=registry)(login)
    kopf.on.startup(registry=registry)(on_startup)
    kopf.on.event(group, version, plural, registry=registry)(on_vm)
    kopf.on.event("", "v1", "pods", labels=runner_labels, registry=registry)(on_pod)
    return registry


async def _ensure_peering(name: str, namespaces: Sequence[str]) -> None:
    """The peering object kopf needs before it starts (kubectl cannot apply it together with
    its CRD in one ``apply -k``: the kind is unknown until the CRD is established)."""
    api = KubeApi.from_environment()
    body: dict[str, Any] = {"apiVersion": "kopf.dev/v1", "metadata": {"name": name}}
    try:
        if namespaces:
            for namespace in namespaces:
                path = f"/apis/kopf.dev/v1/namespaces/{namespace}/kopfpeerings"
                meta = {"name": name, "namespace": namespace}
                with contextlib.suppress(Conflict):
                    await api.create(path, {**body, "kind": "KopfPeering", "metadata": meta})
        else:
            with contextlib.suppress(Conflict):
                await api.create(
                    "/apis/kopf.dev/v1/clusterkopfpeerings", {**body, "kind": "ClusterKopfPeering"}
                )
    finally:
        await api.aclose()


def run_operator(
    settings: OperatorSettings,
    *,
    namespaces: Sequence[str] = (),
    peering: str = "corral",
    liveness: str | None = None,
) -> None:
    """Run until SIGTERM, as one of the peers named ``peering`` (created when missing)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    operator = Operator(settings, names_for(settings.group), KubeApi.from_environment())
    registry = build_registry(operator)
    asyncio.run(_ensure_peering(peering, namespaces))
    try:
        kopf.run(
            registry=registry,
            clusterwide=not namespaces,
            namespaces=list(namespaces),
            peering_name=peering,
            priority=random.randint(1, 32000),  # noqa: S311 (a tie-breaker, not a secret)
            liveness_endpoint=liveness,
        )
    finally:
        with contextlib.suppress(RuntimeError):  # its pool belonged to kopf's loop
            asyncio.run(operator.api.aclose())
