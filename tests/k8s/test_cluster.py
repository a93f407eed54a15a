"""The test cluster harness itself: a real kubelet runs pods from the corral runner image, and
a pod's service-account token reaches the API server with its own (RBAC-limited) identity."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from tests.integration.harness import build_guest
from tests.k8s.cluster import (
    BRIDGE,
    PAUSE_IMAGE,
    STATE_PREFIX,
    Cluster,
    ClusterError,
    RunnerImage,
    new_state_dir,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]


def run_pod(
    cluster: Cluster, name: str, spec: dict[str, Any], timeout: float = 180
) -> tuple[str, float]:
    """Apply a pod, wait until it has succeeded; return its log and apply → running seconds.
    A pod that fails raises with its status and log."""
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": "default"},
        "spec": spec,
    }
    started = time.monotonic()
    cluster.kubectl("apply", "-f", "-", input=json.dumps(pod))
    running_after: list[float] = []

    def finished() -> bool:
        phase = cluster.kubectl_json("get", "pod", name)["status"].get("phase")
        if phase in ("Running", "Succeeded", "Failed") and not running_after:
            running_after.append(time.monotonic() - started)
        if phase == "Failed":
            log = cluster.kubectl("logs", name, check=False)
            status = cluster.kubectl("get", "pod", name, "-o", "yaml").stdout
            pytest.fail(f"pod {name} failed:\n{log.stdout}{log.stderr}\n{status}")
        return phase == "Succeeded"

    try:
        cluster.wait_for(f"pod {name} to succeed", finished, timeout=timeout, interval=0.3)
        return cluster.kubectl("logs", name).stdout, running_after[0]
    finally:
        cluster.kubectl("delete", "pod", name, "--wait=false", check=False)


def _container(image: RunnerImage, argv: list[str], **extra: Any) -> dict[str, Any]:
    return {
        "name": "main",
        "image": image.name,
        "imagePullPolicy": "Never",
        "command": argv,
        "securityContext": {"privileged": True},
        **extra,
    }


def test_missing_binaries_fail_naming_make_kube(tmp_path: Path) -> None:
    cluster = Cluster(tmp_path / "state", bin_dir=tmp_path / "1.20" / "bin")
    with pytest.raises(ClusterError, match=r"missing .*kube-apiserver.*Run\s+`make kube`"):
        cluster.start()
    assert not (tmp_path / "state").exists()


def test_a_stale_cluster_process_is_refused_with_its_pid(tmp_path: Path) -> None:
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "etcd").symlink_to(Path(sys.executable).resolve())
    argv = [str(fake / "etcd"), "-c", "import time; time.sleep(600)", f"/tmp/{STATE_PREFIX}dead"]
    stale = subprocess.Popen(argv)
    cluster = Cluster(tmp_path / "state")
    try:
        time.sleep(0.5)
        assert stale.poll() is None, "the stand-in for a stale etcd runs"
        with pytest.raises(ClusterError, match=rf"session that died.*pid {stale.pid}: "):
            cluster.start()
        assert stale.poll() is None, "a stale process is reported, never killed"
    finally:
        cluster.stop()
        stale.kill()
        stale.wait()


def test_teardown_kills_pods_unmounts_first_and_keeps_host_paths(tmp_path: Path) -> None:
    """Runs before the session cluster (first test of the first file): a cluster of its own
    with a running bridge-network pod that mounts a host dir; stop() leaves no shim, no mount,
    no new entry in the machine-wide paths, no bridge, and the host dir's file intact."""
    host_dir = tmp_path / "precious"
    host_dir.mkdir()
    (host_dir / "keep").write_text("still here")
    cluster = Cluster(new_state_dir())
    cluster.start()
    try:
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "teardown", "namespace": "default"},
            "spec": {
                "containers": [
                    {
                        "name": "main",
                        "image": PAUSE_IMAGE,
                        "imagePullPolicy": "Never",
                        "volumeMounts": [{"name": "host", "mountPath": "/host"}],
                    }
                ],
                "volumes": [{"name": "host", "hostPath": {"path": str(host_dir)}}],
            },
        }
        started = time.monotonic()
        cluster.kubectl("apply", "-f", "-", input=json.dumps(pod))
        cluster.wait_for(
            "pod teardown Running",
            lambda: cluster.kubectl_json("get", "pod", "teardown")["status"]["phase"] == "Running",
        )
        print(f"pause pod apply -> running: {time.monotonic() - started:.1f} s")
        assert cluster.shim_pids(), "a running pod has containerd shims"
        assert cluster.mounts_below(cluster.state_dir), "a running pod has mounts in the state dir"
    finally:
        cluster.stop(keep_lock=True)  # no other cluster may write there while we look
    try:
        print(f"cluster: {cluster.timings}")
        assert cluster.shim_pids() == []
        assert cluster.mounts_below(cluster.state_dir) == []
        assert cluster.outside_entries() == cluster.outside_before
        assert not Path(f"/sys/class/net/{BRIDGE}").exists()
    finally:
        cluster.release_lock()
    cluster.remove_state()
    assert not cluster.state_dir.exists()
    assert (host_dir / "keep").read_text() == "still here"


def test_node_is_ready_and_kubectl_is_the_built_one(kube_cluster: Cluster) -> None:
    node = kube_cluster.kubectl_json("get", "node", kube_cluster.node_name)
    ready = {c["type"]: c["status"] for c in node["status"]["conditions"]}
    assert ready["Ready"] == "True", node["status"]["conditions"]
    version = kube_cluster.kubectl_json("version")
    assert version["clientVersion"]["gitVersion"].startswith("v1.20."), version
    assert version["serverVersion"]["gitVersion"] == version["clientVersion"]["gitVersion"]
    assert node["status"]["nodeInfo"]["containerRuntimeVersion"].startswith("containerd://")


def test_privileged_host_network_pod_runs_qemu_and_corral(
    kube_cluster: Cluster, corral_image: RunnerImage, guest_cache_dir: Path
) -> None:
    kernel = build_guest("tiny").kernel
    assert kernel.is_relative_to(guest_cache_dir)
    script = (
        "qemu-system-x86_64 --version && corral --version"
        f" && test -r {kernel} && test -c /dev/kvm && echo ok"
    )
    spec = {
        "restartPolicy": "Never",
        "hostNetwork": True,
        "dnsPolicy": "Default",
        "containers": [
            _container(
                corral_image,
                ["sh", "-c", script],
                volumeMounts=[
                    {"name": "guests", "mountPath": str(guest_cache_dir), "readOnly": True}
                ],
            )
        ],
        "volumes": [
            {"name": "guests", "hostPath": {"path": str(guest_cache_dir), "type": "Directory"}}
        ],
    }
    log, to_running = run_pod(kube_cluster, "harness-qemu", spec)
    print(f"pod apply -> running: {to_running:.1f} s")
    assert "QEMU emulator version" in log, log
    assert "corral, version" in log, log
    assert log.strip().endswith("ok"), log


_PROBE = """
import os, ssl, urllib.error, urllib.request
d = "/var/run/secrets/kubernetes.io/serviceaccount/"
ctx = ssl.create_default_context(cafile=d + "ca.crt")
env = os.environ
base = "https://%s:%s" % (env["KUBERNETES_SERVICE_HOST"], env["KUBERNETES_SERVICE_PORT"])
auth = {"Authorization": "Bearer " + open(d + "token").read()}
own = "/api/v1/namespaces/default/pods/" + env["POD_NAME"]
for path in (own, "/api/v1/namespaces/kube-system/pods"):
    req = urllib.request.Request(base + path, headers=auth)
    try:
        code = urllib.request.urlopen(req, context=ctx, timeout=10).status
    except urllib.error.HTTPError as exc:
        code = exc.code
    print(path, code)
"""


def test_service_account_token_reaches_the_api(
    kube_cluster: Cluster, corral_image: RunnerImage
) -> None:
    rbac = {
        "apiVersion": "v1",
        "kind": "List",
        "items": [
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "Role",
                "metadata": {"name": "harness-read-pods", "namespace": "default"},
                "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get"]}],
            },
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "RoleBinding",
                "metadata": {"name": "harness-read-pods", "namespace": "default"},
                "roleRef": {
                    "apiGroup": "rbac.authorization.k8s.io",
                    "kind": "Role",
                    "name": "harness-read-pods",
                },
                "subjects": [{"kind": "ServiceAccount", "name": "default", "namespace": "default"}],
            },
        ],
    }
    kube_cluster.kubectl("apply", "-f", "-", input=json.dumps(rbac))
    env = [{"name": k, "value": v} for k, v in kube_cluster.in_cluster_env.items()]
    env.append({"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}})
    spec = {
        "restartPolicy": "Never",
        "hostNetwork": True,
        "dnsPolicy": "Default",
        "containers": [_container(corral_image, ["python3", "-c", _PROBE], env=env)],
    }
    try:
        log, _ = run_pod(kube_cluster, "harness-token", spec)
    finally:
        kube_cluster.kubectl("delete", "-f", "-", input=json.dumps(rbac), check=False)
    # Its own pod: allowed by the Role; another namespace: authenticated but forbidden, so the
    # token carries the pod's service-account identity (a 401 would mean no identity at all).
    assert "/api/v1/namespaces/default/pods/harness-token 200" in log, log
    assert "/api/v1/namespaces/kube-system/pods 403" in log, log
