"""Fixtures for the Kubernetes tests: one real single-node cluster per test session
(:class:`tests.k8s.cluster.Cluster`), the corral runner image imported into it, and the test
guests' cache dir for pods to mount. The fixture API is described in ``tests/k8s/README.md``.

The cluster needs the binaries ``make kube`` builds (cached outside the checkout); if they
are missing the tests fail and say so. ``CORRAL_KUBE_KEEP=1`` keeps the state dir (logs,
certificates) after the session for a post-mortem.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.integration.harness import build_guest
from tests.k8s.cluster import Cluster, ClusterError, RunnerImage, build_runner_image, new_state_dir


@pytest.fixture(scope="session")
def kube_cluster() -> Iterator[Cluster]:
    """The running cluster: node ``localhost`` Ready, default service account ready."""
    cluster = Cluster(new_state_dir())
    try:
        cluster.start()
    except ClusterError as exc:
        pytest.fail(
            f"the test Kubernetes cluster did not start (logs in {cluster.state_dir}/logs): {exc}",
            pytrace=False,
        )
    print(f"\ntest cluster: {_timings(cluster)}")
    try:
        yield cluster
    finally:
        cluster.stop()
        print(f"\ntest cluster: {_timings(cluster)}")
        if os.environ.get("CORRAL_KUBE_KEEP") != "1":
            cluster.remove_state()


@pytest.fixture(scope="session")
def corral_image(kube_cluster: Cluster) -> RunnerImage:
    """The runner image (``localhost/corral:dev``), built from this checkout (cached) and
    imported into the cluster's containerd."""
    try:
        began = time.monotonic()
        image = build_runner_image()
        kube_cluster.timings["runner image build"] = time.monotonic() - began
        began = time.monotonic()
        kube_cluster.import_image(image.tar)
        kube_cluster.timings["runner image import"] = time.monotonic() - began
    except ClusterError as exc:
        pytest.fail(f"the corral runner image could not be built or imported: {exc}", pytrace=False)
    return image


@pytest.fixture(scope="session")
def guest_cache_dir() -> Path:
    """The directory holding the built test guests (tiny guest built if needed); mount it in
    pods as a ``hostPath`` volume at the same path so guest paths stay valid."""
    tiny = build_guest("tiny")
    return Path(tiny.directory).resolve().parent


def _timings(cluster: Cluster) -> str:
    return ", ".join(f"{name} {secs:.1f} s" for name, secs in cluster.timings.items())
