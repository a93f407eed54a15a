"""The runner's Kubernetes placement: ``corral run --kube`` inside a runner pod.

* :class:`KubeDocumentSource` reads the VirtualMachine object itself and watches it (no
  ConfigMap in between: one hop from ``kubectl patch`` to the runner). Only a new
  ``metadata.generation`` is a new document; status writes (the runner's own) are not.
* :class:`KubeStatusSink` patches the object's status subresource (state, conditions
  Running/Booted/AgentConnected/DisplayConnected, CPUs, RAM, IPs, node, runner version,
  display password serial), coalescing bursts into one patch, and posts an Event on the
  object for each state transition.
* :func:`run_kube_program` runs :func:`corral.runner.program.run_program` with them; with
  ``guestShutdownStops`` a guest power-off sets ``spec.vm.state: Stopped`` before the runner
  exits (the operator then removes the pod), otherwise the runner restarts the VM.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from corral import __version__
from corral.errors import CorralError, SpecError
from corral.k8s.api import KubeApi
from corral.k8s.crd import CrdNames, names_for
from corral.k8s.resources import IMAGE_PATHS_ENV, runner_document
from corral.runner.status import ConditionStatus, VmState, VmStatus
from corral.spec import HostPolicy, VmDocument
from corral.spec.sizes import format_size

__all__ = ["KubeDocumentSource", "KubeStatusSink", "run_kube_program", "status_patch"]


def object_path(names: CrdNames, namespace: str, name: str | None = None) -> str:
    base = f"/apis/{names.group}/{names.version}/namespaces/{namespace}/{names.plural}"
    return f"{base}/{name}" if name else base


class KubeDocumentSource:
    """The VM document from its VirtualMachine object, kept current by a watch."""

    def __init__(self, api: KubeApi, names: CrdNames, namespace: str, obj: dict[str, Any]):
        self.api = api
        self.names = names
        self.namespace = namespace
        self.name: str = obj["metadata"]["name"]
        self.obj = obj
        self._doc = runner_document(obj)
        self._generation = obj["metadata"].get("generation")
        self._pending: dict[str, Any] | None = None
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @classmethod
    async def open(
        cls, api: KubeApi, names: CrdNames, namespace: str, name: str
    ) -> KubeDocumentSource:
        obj = await api.get(object_path(names, namespace, name))
        source = cls(api, names, namespace, obj)
        source._task = asyncio.ensure_future(source._watch(obj["metadata"]["resourceVersion"]))
        return source

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def current(self) -> VmDocument:
        return self._doc

    def reload(self) -> None:
        self._generation = None  # the next object seen counts as new
        self._changed.set()

    def _seen(self, obj: dict[str, Any]) -> None:
        self.obj = obj
        generation = obj["metadata"].get("generation")
        if generation != self._generation:
            self._generation = generation
            self._pending = obj
            self._changed.set()

    async def _watch(self, version: str) -> None:
        path = object_path(self.names, self.namespace)
        selector = f"metadata.name={self.name}"
        while True:
            try:
                async for event in self.api.watch(path, version, field_selector=selector):
                    obj = event.get("object") or {}
                    version = obj.get("metadata", {}).get("resourceVersion", version)
                    if event.get("type") in ("ADDED", "MODIFIED"):
                        self._seen(obj)
            except asyncio.CancelledError:
                raise
            except CorralError as exc:
                print(f"corral: watch of {self.name} failed: {exc}", file=sys.stderr)
                await asyncio.sleep(2)
                with contextlib.suppress(CorralError):  # relist: a too-old version (410)
                    obj = await self.api.get(object_path(self.names, self.namespace, self.name))
                    version = obj["metadata"]["resourceVersion"]
                    self._seen(obj)

    async def wait_change(self, timeout: float) -> VmDocument | None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._changed.wait(), timeout)
        self._changed.clear()
        if self._pending is None and self._generation is None:  # reload(): read it again
            with contextlib.suppress(CorralError):
                self._seen(await self.api.get(object_path(self.names, self.namespace, self.name)))
        obj, self._pending = self._pending, None
        if obj is None:
            return None
        self._doc = runner_document(obj)  # raises SpecError: the last good one stays
        return self._doc


_CONDITIONS = ("Running", "Booted", "AgentConnected", "DisplayConnected")


def status_patch(
    status: VmStatus, *, node: str | None, serial: int, generation: int | None
) -> dict[str, Any]:
    """The status subresource for one runner status (Kubernetes-style conditions)."""
    conditions: list[dict[str, Any]] = []
    running = ConditionStatus(
        status.state is VmState.RUNNING, status.state.value, status.updated_at
    )
    for kind in _CONDITIONS:
        cond = running if kind == "Running" else status.conditions.get(kind)
        if cond is None:
            cond = ConditionStatus(False, "Unknown", status.updated_at)
        entry: dict[str, Any] = {
            "type": kind,
            "status": "True" if cond.status else "False",
            "reason": cond.reason,
            "lastTransitionTime": cond.since,
        }
        if cond.message:
            entry["message"] = cond.message
        conditions.append(entry)
    return {
        "state": status.state.value,
        "conditions": conditions,
        "cpus": status.cpus,
        "ram": format_size(status.ram) if status.ram else None,
        "ips": list(status.ips),
        "node": node,
        "runnerVersion": __version__,
        "displayPasswordSerial": serial,
        "observedGeneration": generation,
        "restarts": status.restarts,
        "configError": status.config_error,
        "pendingRestart": list(status.pending_restart),
        "stoppedBy": status.stopped_by,
        "startedAt": status.started_at,
        "bootedAt": status.booted_at,
        "updatedAt": status.updated_at,
    }


class KubeStatusSink:
    """A :class:`~corral.runner.contract.StatusSink` (and event sink) patching the VM's
    status subresource; a background task sends the newest status, so a burst of changes is
    one patch and the supervisor never waits for the API server."""

    def __init__(self, source: KubeDocumentSource, serial: int = 0) -> None:
        self.source = source
        self.api = source.api
        self.node = os.environ.get("CORRAL_NODE_NAME") or None
        self.serial = serial
        self.latest: VmStatus | None = None
        self._state: str | None = None
        self._changed = asyncio.Event()
        self._task = asyncio.ensure_future(self._send())
        self._events: list[tuple[str, str, str]] = []

    def __call__(self, status: VmStatus, /) -> None:
        self.latest = status
        if status.state.value != self._state:
            self._state = status.state.value
            kind = "Warning" if status.state is VmState.CRASHED else "Normal"
            self._events.append((kind, status.state.value, f"the VM is {status.state.value}"))
        self._changed.set()

    def event(self, event: dict[str, object], /) -> None:
        """Runner events: counted (display password serial) and echoed as JSON lines."""
        if event.get("event") == "DisplayPasswordSet":
            self.serial += 1
            self._changed.set()
        print(json.dumps(event, default=str), file=sys.stderr, flush=True)

    async def _send(self) -> None:
        path = object_path(self.source.names, self.source.namespace, self.source.name)
        while True:
            await self._changed.wait()
            self._changed.clear()
            status = self.latest
            events, self._events = self._events, []
            if status is not None:
                body = status_patch(
                    status,
                    node=self.node,
                    serial=self.serial,
                    generation=self.source.obj["metadata"].get("generation"),
                )
                try:
                    await self.api.merge_patch(f"{path}/status", {"status": body})
                except CorralError as exc:
                    print(f"corral: status patch failed: {exc}", file=sys.stderr)
                    await asyncio.sleep(1)
                    self._changed.set()
            for kind, reason, message in events:
                with contextlib.suppress(CorralError):
                    await post_event(self.api, self.source.obj, kind, reason, message, "runner")

    async def flush(self) -> None:
        """Send what is pending now (before the runner exits)."""
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        if self.latest is not None or self._events:
            self._changed.set()
            self._task = asyncio.ensure_future(self._send())
            for _ in range(50):
                await asyncio.sleep(0.1)
                if not self._changed.is_set() and not self._events:
                    break
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


async def post_event(
    api: KubeApi, obj: dict[str, Any], kind: str, reason: str, message: str, component: str
) -> None:
    """A core/v1 Event on ``obj`` (``kubectl describe`` shows it)."""
    meta = obj["metadata"]
    stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    await api.create(
        f"/api/v1/namespaces/{meta['namespace']}/events",
        {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
            "involvedObject": {
                "apiVersion": obj["apiVersion"],
                "kind": obj["kind"],
                "name": meta["name"],
                "namespace": meta["namespace"],
                "uid": meta["uid"],
            },
            "type": kind,
            "reason": reason,
            "message": message,
            "source": {"component": f"corral-{component}"},
            "firstTimestamp": stamp,
            "lastTimestamp": stamp,
            "count": 1,
        },
    )


def pod_policy() -> HostPolicy:
    """The runner pod's host policy without ``--policy``: images from URLs, qemu as the pod's
    user, and ``imagePaths`` only the pod's own volumes and devices (``CORRAL_IMAGE_PATHS``,
    set by the operator; none when it is missing): a privileged pod sees the host's /dev, and
    a VirtualMachine's author must not reach it through a disk path."""
    paths = [p for p in os.environ.get(IMAGE_PATHS_ENV, "").split(":") if p]
    return HostPolicy(remote_images=True, run_as=None, image_paths=paths)


async def run_kube_program(
    namespace: str,
    name: str,
    *,
    group: str = "corral.dev",
    data_dir: str | None = None,
    runtime_dir: str | None = None,
    display_secret_file: str | None = None,
    policy_file: str | None = None,
    accel: str | None = None,
    poll: float = 0.5,
) -> int:
    """``corral run --kube``: run the VM of one VirtualMachine object until it stops."""
    from corral.qemu.fingerprint import find_emulator, resolve_accelerator
    from corral.runner.config import resolve_paths
    from corral.runner.program import run_program
    from corral.spec import load_policy

    names = names_for(group)
    api = KubeApi.from_environment()
    try:
        source = await KubeDocumentSource.open(api, names, namespace, name)
    except SpecError:
        await api.aclose()
        raise
    obj_status = source.obj.get("status") or {}
    sink = KubeStatusSink(source, serial=int(obj_status.get("displayPasswordSerial") or 0))
    try:
        doc = source.current()
        if doc.vm.state == "Stopped":  # the operator removes this pod: never start the VM
            print(f"corral: {name} is Stopped; waiting for the pod to go", file=sys.stderr)
            await _wait_for_signal()
            return 0
        policy = load_policy(policy_file) if policy_file else pod_policy()
        paths = resolve_paths(
            doc,
            data_dir=data_dir,
            runtime_dir=runtime_dir,
            display_secret_file=display_secret_file,
        )
        for disk in doc.vm.disks:  # a claim's filesystem holds its image file
            if disk.file is not None and disk.file.path:
                Path(disk.file.path).parent.mkdir(parents=True, exist_ok=True)
        resolved = resolve_accelerator(accel, find_emulator(paths.emulator)) if accel else None
        code = await run_program(
            source,
            paths,
            policy,
            accelerator=resolved,
            events=sink.event,
            status_sinks=[sink],
            poll=poll,
        )
        latest = sink.latest
        stops = source.current().spec.guest_shutdown_stops
        if latest is not None and latest.stopped_by == "guest" and stops:
            path = object_path(names, namespace, name)  # else the pod restarts the VM
            await api.merge_patch(path, {"spec": {"vm": {"state": "Stopped"}}})
        await sink.flush()
        return code
    finally:
        await source.close()
        await api.aclose()


async def _wait_for_signal() -> None:
    import signal

    loop = asyncio.get_running_loop()
    done = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, done.set)
    try:
        await done.wait()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
