"""A real single-node Kubernetes cluster for the tests, started from the binaries
``kube/build.py`` caches (Debian's ``kubernetes`` 1.20 source) and Debian's etcd, containerd,
runc and CNI plugins. No kube-proxy, no cluster DNS; see ``tests/k8s/README.md``.

:class:`Cluster` owns one state dir (certificates, kubeconfigs, etcd data, containerd root and
state, kubelet root, CNI config, one log per process) and the processes it started. What the
kubelet and containerd write outside it (``/var/log/pods``, ``/var/log/containers``,
``/var/lib/cni/results``, ``/run/containerd/s``, ``/run/netns/cni-*``, the bridge) is noted
before start and only what appeared afterwards is removed on :meth:`Cluster.stop`.

One cluster per machine at a time: the kubelet's cgroups (``kubepods``), ``/var/log/pods``
and the node's ports are machine-wide, so :meth:`Cluster.start` takes a machine lock and
waits for another session's cluster to stop first.

The facts this is built from (flags, pitfalls, figures) are in the project's notes on a
single-node cluster on these machines; the numbered pitfalls below refer to them.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from types import ModuleType
from typing import IO, Any

ROOT = Path(__file__).resolve().parents[2]


def load_script(name: str, path: Path) -> ModuleType:
    """Import a build script (``kube/build.py``, ``image/build.py``) by path, once."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec is not None and spec.loader is not None
        sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[name])
    return sys.modules[name]


kube_build: Any = load_script("corral_kube_build", ROOT / "kube" / "build.py")

PAUSE_IMAGE = "localhost/corral-pause:1"
LOCK_PATH = Path("/run/corral-kube-cluster.lock")
BRIDGE = "corralk0"
STATE_PREFIX = "corral-kube-"
POD_SUBNET = "10.244.231.0/24"
SERVICE_RANGE = "10.0.231.0/24"

#: The cluster of this process that holds the machine lock (at most one).
_HOLDERS: list[Cluster] = []

_PAUSE_C = r"""
#include <signal.h>
#include <unistd.h>
static void bye(int s) { (void)s; _exit(0); }
int main(void) {
  signal(SIGTERM, bye); signal(SIGINT, bye);
  for (;;) pause();
}
"""


class ClusterError(RuntimeError):
    """The cluster (or one of its processes) did not start or a command on it failed."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def docker_archive(files: dict[str, tuple[bytes, int]], tag: str, argv: Sequence[str]) -> bytes:
    """A one-layer docker-archive (what ``ctr images import`` reads) holding ``files``
    (path -> (content, mode)), tagged ``tag``, with ``argv`` as its entrypoint."""
    import hashlib

    layer = BytesIO()
    with tarfile.open(fileobj=layer, mode="w") as tar:
        for name, (data, mode) in sorted(files.items()):
            info = tarfile.TarInfo(name.lstrip("/"))
            info.size, info.mode, info.mtime = len(data), mode, 0
            tar.addfile(info, BytesIO(data))
    layer_bytes = layer.getvalue()
    diff_id = "sha256:" + hashlib.sha256(layer_bytes).hexdigest()
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": {"Entrypoint": list(argv)},
            "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        }
    ).encode()
    config_name = hashlib.sha256(config).hexdigest() + ".json"
    manifest = json.dumps(
        [{"Config": config_name, "RepoTags": [tag], "Layers": ["layer.tar"]}]
    ).encode()
    out = BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        for name, data in (
            ("layer.tar", layer_bytes),
            (config_name, config),
            ("manifest.json", manifest),
        ):
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, BytesIO(data))
    return out.getvalue()


@dataclass
class _Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path


@dataclass
class Cluster:
    """One single-node cluster. ``start()`` it, use it, ``stop()`` it (also on failure).

    Stable attributes (tests/k8s/README.md): ``state_dir``, ``bin_dir``, ``kubeconfig``,
    ``api_url``, ``api_host``, ``api_port``, ``node_name``, ``in_cluster_env``; methods
    ``kubectl()``, ``kubectl_json()``, ``import_image()``, ``wait_for()``, ``log_tail()``.
    """

    state_dir: Path
    bin_dir: Path = field(default_factory=kube_build.bin_dir)
    lock_timeout: float = 1800.0
    node_name: str = "localhost"
    api_host: str = "127.0.0.1"
    api_port: int = field(default_factory=free_port)
    _procs: list[_Proc] = field(default_factory=list, repr=False)
    _lock: IO[str] | None = field(default=None, repr=False)
    _before: dict[str, set[str]] = field(default_factory=dict, repr=False)
    _created_dirs: list[Path] = field(default_factory=list, repr=False)
    #: Seconds per phase of the last start/stop ("lock wait", "start to Ready", "teardown").
    timings: dict[str, float] = field(default_factory=dict)

    # ---- paths --------------------------------------------------------------------------
    @property
    def api_url(self) -> str:
        return f"https://{self.api_host}:{self.api_port}"

    @property
    def kubeconfig(self) -> Path:
        """The admin kubeconfig (``system:masters``)."""
        return self.state_dir / "admin.kubeconfig"

    @property
    def pki(self) -> Path:
        return self.state_dir / "pki"

    @property
    def containerd_socket(self) -> Path:
        return self.state_dir / "containerd.sock"

    @property
    def in_cluster_env(self) -> dict[str, str]:
        """Env for a ``hostNetwork`` pod so in-cluster config reaches the API server: there is
        no kube-proxy, so the ``kubernetes`` service's cluster IP leads nowhere (pitfall 4)."""
        return {
            "KUBERNETES_SERVICE_HOST": self.api_host,
            "KUBERNETES_SERVICE_PORT": str(self.api_port),
        }

    # ---- commands ------------------------------------------------------------------------
    def kubectl(
        self, *args: str, input: str | None = None, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        """Run the BUILT kubectl (same version as the cluster) with the admin kubeconfig."""
        argv = [str(self.bin_dir / "kubectl"), "--kubeconfig", str(self.kubeconfig), *args]
        proc = subprocess.run(
            argv, input=input, capture_output=True, text=True, timeout=timeout, check=False
        )
        if check and proc.returncode != 0:
            raise ClusterError(
                f"kubectl {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}"
            )
        return proc

    def kubectl_json(self, *args: str) -> Any:
        """``kubectl <args> -o json``, parsed."""
        return json.loads(self.kubectl(*args, "-o", "json").stdout)

    def ctr(
        self, *args: str, check: bool = True, timeout: float = 300
    ) -> subprocess.CompletedProcess[str]:
        """``ctr`` against this cluster's containerd, in the CRI namespace ``k8s.io``."""
        argv = ["ctr", "--address", str(self.containerd_socket), "--namespace", "k8s.io", *args]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
        if check and proc.returncode != 0:
            raise ClusterError(
                f"ctr {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}"
            )
        return proc

    def import_image(self, tar: Path) -> None:
        """Import a docker-archive (or OCI archive) into the node's containerd; pods then use
        it with ``imagePullPolicy: Never``."""
        self.ctr("images", "import", str(tar))

    def api_get(self, path: str) -> Any:
        """GET ``path`` from the API server as admin and return the parsed JSON."""
        url = self.api_url + path  # https to our own API server only
        with urllib.request.urlopen(url, context=self._ssl(), timeout=10) as resp:  # noqa: S310
            return json.loads(resp.read())

    def wait_for(
        self, what: str, check: Callable[[], bool], timeout: float = 120, interval: float = 0.2
    ) -> None:
        """Poll ``check`` until it is true; on timeout raise with ``what`` and the logs' tails."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                if check():
                    return
            except (OSError, urllib.error.URLError, ValueError, KeyError, ClusterError):
                pass
            self._check_alive()
            if time.monotonic() > deadline:
                raise ClusterError(
                    f"timed out after {timeout:.0f} s waiting for {what}\n{self._tails()}"
                )
            time.sleep(interval)

    def log_tail(self, name: str, lines: int = 30) -> str:
        """The last lines of one process's log (``etcd``, ``kube-apiserver``, ``kubelet``, ...)."""
        try:
            text = (self.state_dir / "logs" / f"{name}.log").read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    # ---- lifecycle -----------------------------------------------------------------------
    def start(self) -> None:
        """Start everything and return when the node is Ready and the default service
        account has its token. Raises :class:`ClusterError` naming the process that failed."""
        missing = kube_build.missing_binaries(self.bin_dir)
        if missing:
            raise ClusterError(
                f"Kubernetes binaries missing in {self.bin_dir}: {', '.join(missing)}. Run "
                "`make kube` (kube/build.py builds them from Debian's kubernetes source, "
                "~8 min cold)."
            )
        for tool in ("etcd", "containerd", "ctr", "runc", "openssl", "gcc", "mount"):
            if shutil.which(tool) is None:
                raise ClusterError(
                    f"{tool} not found: run `make deps` "
                    "(installs etcd-server, containerd, runc, gcc, ...)"
                )
        if not Path("/usr/lib/cni/bridge").exists():
            raise ClusterError(
                "/usr/lib/cni/bridge missing: apt-get install containernetworking-plugins"
            )
        began = time.monotonic()
        self._take_lock()
        self.timings["lock wait"] = time.monotonic() - began
        try:
            stale = stale_cluster_processes()
            if stale:
                listed = "; ".join(f"pid {pid}: {argv[:100]}" for pid, argv in stale.items())
                raise ClusterError(
                    "a test cluster of a session that died is still running (it would share the "
                    f"node's cgroups, bridge and paths): {listed}. Kill those pids, unmount "
                    "below its state dir, then remove it"
                )
            self._note_outside_paths()
            self.state_dir.mkdir(parents=True, exist_ok=True)
            (self.state_dir / "logs").mkdir(exist_ok=True)
            began = time.monotonic()
            self._start_containerd()  # independent of the control plane: starts meanwhile
            self._make_pki()
            self._write_kubeconfigs()
            self._start_etcd()
            self._start_apiserver()
            self.timings["control plane up"] = time.monotonic() - began
            self._start_controllers()
            self._containerd_ready()
            self._start_kubelet()
            self.wait_for(f"node {self.node_name} Ready", self._node_ready, timeout=120)
            self.wait_for("the default service account's token", self._default_sa_ready, timeout=60)
            self.timings["start to Ready"] = time.monotonic() - began
        except BaseException:
            self.stop()
            raise

    def stop(self, *, keep_lock: bool = False) -> None:
        """Stop everything this cluster started and clean what it created (pitfalls 7, 8).
        ``keep_lock`` keeps the machine lock (to inspect the machine before another cluster
        starts); :meth:`release_lock` then lets it go."""
        began = time.monotonic()
        try:
            byname = {p.name: p for p in self._procs}
            if "kubelet" in byname:
                self._terminate(byname["kubelet"], 10)
            if "containerd" in byname and byname["containerd"].popen.poll() is None:
                self._remove_containers()
            for proc in reversed(self._procs):
                self._terminate(proc, 10)
            self._procs.clear()
            self._kill_orphan_shims()
            self._clean_outside_paths()
            self._unmount_below(self.state_dir)
        finally:
            if not keep_lock:
                self.release_lock()
            self.timings["teardown"] = time.monotonic() - began

    def remove_state(self) -> None:
        """Delete the state dir, but only if nothing is mounted below it any more (pitfall 8)."""
        left = self.mounts_below(self.state_dir)
        if left:
            raise ClusterError(f"not removing {self.state_dir}: still mounted below it: {left}")
        shutil.rmtree(self.state_dir, ignore_errors=True)

    # ---- pieces --------------------------------------------------------------------------
    def _take_lock(self) -> None:
        if _HOLDERS:
            raise ClusterError(
                f"this process already runs a test cluster ({_HOLDERS[0].state_dir}); "
                "one cluster per machine: stop it first"
            )
        fh = LOCK_PATH.open("a+")
        deadline = time.monotonic() + self.lock_timeout
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    fh.seek(0)
                    raise ClusterError(
                        f"another test cluster holds {LOCK_PATH} ({fh.read().strip()}) for over "
                        f"{self.lock_timeout:.0f} s; only one can run per machine"
                    ) from None
                time.sleep(1)
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()} state {self.state_dir}\n")
        fh.flush()
        self._lock = fh
        _HOLDERS.append(self)

    def release_lock(self) -> None:
        if self._lock is not None:
            fcntl.flock(self._lock, fcntl.LOCK_UN)
            self._lock.close()
            self._lock = None
            _HOLDERS.remove(self)

    def _ssl(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.pki / "ca.crt"))
        ctx.load_cert_chain(str(self.pki / "admin.crt"), str(self.pki / "admin.key"))
        return ctx

    def _openssl(self, *args: str) -> None:
        proc = subprocess.run(
            ["openssl", *args], capture_output=True, text=True, cwd=self.pki, check=False
        )
        if proc.returncode != 0:
            raise ClusterError(f"openssl {' '.join(args[:2])} failed: {proc.stderr.strip()}")

    def _cert(self, name: str, subject: str, sans: str = "") -> None:
        ext = self.pki / f"{name}.ext"
        lines = [
            "basicConstraints=CA:FALSE",
            "keyUsage=critical,digitalSignature,keyEncipherment",
            "extendedKeyUsage=serverAuth,clientAuth",
        ]
        if sans:
            lines.append(f"subjectAltName={sans}")
        ext.write_text("\n".join(lines) + "\n")
        self._openssl(
            "req", "-new", "-nodes", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-keyout", f"{name}.key", "-subj", subject, "-out", f"{name}.csr",
        )  # fmt: skip
        self._openssl(
            "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
            "-CAcreateserial", "-days", "30", "-extfile", ext.name, "-out", f"{name}.crt",
        )  # fmt: skip

    def _make_pki(self) -> None:
        self.pki.mkdir(mode=0o700, exist_ok=True)
        self._openssl(
            "req", "-x509", "-new", "-nodes", "-newkey", "ec",
            "-pkeyopt", "ec_paramgen_curve:prime256v1", "-keyout", "ca.key", "-out", "ca.crt",
            "-days", "30", "-subj", "/CN=corral-test-kube-ca",
        )  # fmt: skip
        sans = "DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc"
        sans += ",IP:127.0.0.1"
        self._cert("apiserver", "/CN=kube-apiserver", sans + ",IP:10.0.231.1")
        self._cert("kubelet", f"/CN={self.node_name}", "DNS:localhost,IP:127.0.0.1")
        self._cert("admin", "/O=system:masters/CN=corral-test-admin")
        self._cert("controller-manager", "/CN=system:kube-controller-manager")
        self._cert("scheduler", "/CN=system:kube-scheduler")
        self._cert("node", f"/O=system:nodes/CN=system:node:{self.node_name}")
        self._openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", "sa.key")
        self._openssl("ec", "-in", "sa.key", "-pubout", "-out", "sa.pub")

    def _write_kubeconfigs(self) -> None:
        for user, path in (
            ("admin", self.kubeconfig),
            ("controller-manager", self.state_dir / "controller-manager.kubeconfig"),
            ("scheduler", self.state_dir / "scheduler.kubeconfig"),
            ("node", self.state_dir / "kubelet.kubeconfig"),
        ):
            config = {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [
                    {
                        "name": "corral-test",
                        "cluster": {
                            "server": self.api_url,
                            "certificate-authority": str(self.pki / "ca.crt"),
                        },
                    }
                ],
                "users": [
                    {
                        "name": user,
                        "user": {
                            "client-certificate": str(self.pki / f"{user}.crt"),
                            "client-key": str(self.pki / f"{user}.key"),
                        },
                    }
                ],
                "contexts": [
                    {"name": "corral-test", "context": {"cluster": "corral-test", "user": user}}
                ],
                "current-context": "corral-test",
            }
            path.write_text(json.dumps(config, indent=1))
            path.chmod(0o600)

    def _spawn(self, name: str, argv: Sequence[str]) -> _Proc:
        log = self.state_dir / "logs" / f"{name}.log"
        with log.open("ab") as fh:
            popen = subprocess.Popen(
                list(argv),
                stdout=fh,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        proc = _Proc(name, popen, log)
        self._procs.append(proc)
        return proc

    def _check_alive(self) -> None:
        for proc in self._procs:
            code = proc.popen.poll()
            if code is not None:
                raise ClusterError(
                    f"{proc.name} exited with {code}; {proc.log}:\n{self.log_tail(proc.name)}"
                )

    def _tails(self) -> str:
        return "\n".join(
            f"--- {p.name} ({p.log}):\n{self.log_tail(p.name, 12)}" for p in self._procs
        )

    def _start_etcd(self) -> None:
        client, peer = free_port(), free_port()
        self.etcd_url = f"http://127.0.0.1:{client}"
        self._spawn(
            "etcd",
            [
                "etcd", "--name", "corral-test", "--data-dir", str(self.state_dir / "etcd"),
                "--listen-client-urls", self.etcd_url, "--advertise-client-urls", self.etcd_url,
                "--listen-peer-urls", f"http://127.0.0.1:{peer}",
                "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
                "--initial-cluster", f"corral-test=http://127.0.0.1:{peer}",
                "--logger", "zap", "--log-level", "warn",
            ],
        )  # fmt: skip

        def healthy() -> bool:
            with urllib.request.urlopen(self.etcd_url + "/health", timeout=2) as resp:  # noqa: S310
                return bool(json.loads(resp.read()).get("health") == "true")

        self.wait_for("etcd health", healthy, timeout=60)

    def _start_apiserver(self) -> None:
        pki = self.pki
        self._spawn(
            "kube-apiserver",
            [
                str(self.bin_dir / "kube-apiserver"),
                "--etcd-servers", self.etcd_url,
                "--bind-address", self.api_host, "--secure-port", str(self.api_port),
                "--tls-cert-file", str(pki / "apiserver.crt"),
                "--tls-private-key-file", str(pki / "apiserver.key"),
                "--client-ca-file", str(pki / "ca.crt"),
                "--kubelet-client-certificate", str(pki / "admin.crt"),
                "--kubelet-client-key", str(pki / "admin.key"),
                "--kubelet-certificate-authority", str(pki / "ca.crt"),
                "--kubelet-preferred-address-types", "Hostname,InternalIP",
                "--service-account-issuer", "https://kubernetes.default.svc",
                "--service-account-key-file", str(pki / "sa.pub"),
                "--service-account-signing-key-file", str(pki / "sa.key"),
                "--service-cluster-ip-range", SERVICE_RANGE,
                "--authorization-mode", "Node,RBAC",
                "--allow-privileged=true",
                "--profiling=false",
                "--v=1",
            ],
        )  # fmt: skip

        def ready() -> bool:
            url = self.api_url + "/readyz"
            with urllib.request.urlopen(url, context=self._ssl(), timeout=5) as resp:  # noqa: S310
                return bool(resp.status == 200)

        self.wait_for("kube-apiserver /readyz", ready, timeout=90)

    def _start_controllers(self) -> None:
        common = [
            "--bind-address",
            "127.0.0.1",
            "--port",
            "0",
            "--leader-elect=false",
            "--profiling=false",
        ]
        cm = self.state_dir / "controller-manager.kubeconfig"
        self._spawn(
            "kube-controller-manager",
            [
                str(self.bin_dir / "kube-controller-manager"), *common,
                "--secure-port", str(free_port()),
                "--kubeconfig", str(cm), "--authentication-kubeconfig", str(cm),
                "--authorization-kubeconfig", str(cm),
                "--service-account-private-key-file", str(self.pki / "sa.key"),
                "--root-ca-file", str(self.pki / "ca.crt"),
                "--cluster-signing-cert-file", str(self.pki / "ca.crt"),
                "--cluster-signing-key-file", str(self.pki / "ca.key"),
                "--use-service-account-credentials=true",
                "--service-cluster-ip-range", SERVICE_RANGE,
                "--v=1",
            ],
        )  # fmt: skip
        sc = self.state_dir / "scheduler.kubeconfig"
        self._spawn(
            "kube-scheduler",
            [
                str(self.bin_dir / "kube-scheduler"), *common,
                "--secure-port", str(free_port()),
                "--kubeconfig", str(sc), "--authentication-kubeconfig", str(sc),
                "--authorization-kubeconfig", str(sc), "--v=1",
            ],
        )  # fmt: skip

    def _pause_archive(self) -> Path:
        build = self.state_dir / "pause"
        build.mkdir(exist_ok=True)
        (build / "pause.c").write_text(_PAUSE_C)
        proc = subprocess.run(
            ["gcc", "-static", "-Os", "-s", "-o", "pause", "pause.c"],
            cwd=build,
            check=False,
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            raise ClusterError(
                f"gcc -static pause.c failed (apt-get install gcc libc6-dev): {proc.stderr}"
            )
        tar = build / "pause.tar"
        data = (build / "pause").read_bytes()
        tar.write_bytes(docker_archive({"pause": (data, 0o755)}, PAUSE_IMAGE, ["/pause"]))
        return tar

    def _start_containerd(self) -> None:
        cni = self.state_dir / "cni"
        (cni / "net.d").mkdir(parents=True, exist_ok=True)
        conflist = {
            "cniVersion": "0.4.0",
            "name": "corral-test",
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": BRIDGE,
                    "isGateway": True,
                    "ipMasq": False,
                    "hairpinMode": True,
                    "ipam": {
                        "type": "host-local",
                        "ranges": [[{"subnet": POD_SUBNET}]],
                        "dataDir": str(cni / "ipam"),
                    },
                }
            ],
        }
        (cni / "net.d" / "10-corral-test.conflist").write_text(
            json.dumps(conflist, indent=1)
        )  # pitfall 3
        root = self.state_dir / "containerd"
        config = self.state_dir / "containerd.toml"
        config.write_text(
            f"""version = 2
root = "{root / "root"}"
state = "{root / "state"}"
[grpc]
  address = "{self.containerd_socket}"
[ttrpc]
  address = ""
[debug]
  address = ""
[metrics]
  address = ""
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  restrict_oom_score_adj = true
  enable_selinux = false
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{cni / "net.d"}"
"""
        )
        self._spawn("containerd", ["containerd", "--config", str(config), "--log-level", "warn"])

    def _containerd_ready(self) -> None:
        """Wait for containerd's socket and import the sandbox (pause) image."""
        pause = self._pause_archive()
        self.wait_for(
            "containerd socket",
            lambda: self.ctr("version", check=False, timeout=10).returncode == 0,
            timeout=60,
        )
        self.import_image(pause)

    def _start_kubelet(self) -> None:
        port, healthz = free_port(), free_port()
        config = {
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "KubeletConfiguration",
            "address": "127.0.0.1",  # pitfall 2
            "port": port,
            "readOnlyPort": 0,
            "healthzBindAddress": "127.0.0.1",
            "healthzPort": healthz,
            "cgroupDriver": "cgroupfs",
            "makeIPTablesUtilChains": False,  # pitfall 4: no NAT rules on a shared machine
            "failSwapOn": False,
            "tlsCertFile": str(self.pki / "kubelet.crt"),
            "tlsPrivateKeyFile": str(self.pki / "kubelet.key"),
            "authentication": {
                "anonymous": {"enabled": False},
                "webhook": {"enabled": True},
                "x509": {"clientCAFile": str(self.pki / "ca.crt")},
            },
            "authorization": {"mode": "Webhook"},
            "resolvConf": "/etc/resolv.conf",
            "evictionHard": {
                "memory.available": "50Mi",
                "nodefs.available": "1%",
                "imagefs.available": "1%",
                "nodefs.inodesFree": "1%",
            },
            "imageGCHighThresholdPercent": 100,  # imported images cannot be pulled back
            "imageGCLowThresholdPercent": 99,
            "serializeImagePulls": False,
            "fileCheckFrequency": "5s",
            "syncFrequency": "10s",
            "nodeStatusUpdateFrequency": "4s",
        }
        path = self.state_dir / "kubelet-config.json"
        path.write_text(json.dumps(config, indent=1))
        self._spawn(
            "kubelet",
            [
                str(self.bin_dir / "kubelet"),
                "--config", str(path),
                "--kubeconfig", str(self.state_dir / "kubelet.kubeconfig"),
                "--container-runtime", "remote",
                "--container-runtime-endpoint", f"unix://{self.containerd_socket}",
                "--hostname-override", self.node_name,
                "--root-dir", str(self.state_dir / "kubelet"),
                "--cert-dir", str(self.state_dir / "kubelet-pki"),
                "--pod-infra-container-image", PAUSE_IMAGE,
                "--v=1",
            ],
        )  # fmt: skip

    def _node_ready(self) -> bool:
        node = self.api_get(f"/api/v1/nodes/{self.node_name}")
        return any(
            c["type"] == "Ready" and c["status"] == "True" for c in node["status"]["conditions"]
        )

    def _default_sa_ready(self) -> bool:
        sa = self.api_get("/api/v1/namespaces/default/serviceaccounts/default")
        return bool(sa.get("secrets"))

    # ---- teardown helpers ------------------------------------------------------------------
    def _terminate(self, proc: _Proc, grace: float) -> None:
        if proc.popen.poll() is not None:
            return
        proc.popen.send_signal(signal.SIGTERM)
        try:
            proc.popen.wait(grace)
        except subprocess.TimeoutExpired:
            proc.popen.kill()
            proc.popen.wait(10)

    def _remove_containers(self) -> None:
        """Kill and delete every task and container (pitfall 7): shims outlive containerd."""
        listed = self.ctr("containers", "list", "--quiet", check=False, timeout=30)
        for cid in listed.stdout.split():
            self.ctr("tasks", "kill", "--all", "--signal", "SIGKILL", cid, check=False, timeout=30)
        for cid in listed.stdout.split():
            for _ in range(50):
                gone = self.ctr("tasks", "delete", "--force", cid, check=False, timeout=30)
                if gone.returncode == 0 or "not found" in gone.stderr:
                    break
                time.sleep(0.1)
            self.ctr("containers", "delete", cid, check=False, timeout=30)

    def shim_pids(self) -> list[int]:
        """Pids of the containerd shims of this cluster's containerd (they outlive it)."""
        mentioning = processes_mentioning(str(self.containerd_socket))
        return [pid for pid, argv in mentioning.items() if "containerd-shim" in argv]

    def _kill_orphan_shims(self) -> None:
        for pid in self.shim_pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    OUTSIDE_PATHS = (
        "/var/log/pods",
        "/var/log/containers",
        "/var/lib/cni/results",
        "/run/containerd/s",
        "/run/netns",
    )

    def outside_entries(self) -> dict[str, set[str]]:
        """The entries of :data:`OUTSIDE_PATHS` now (compare with :attr:`outside_before`)."""
        found = {}
        for path in self.OUTSIDE_PATHS:
            try:
                found[path] = set(os.listdir(path))
            except OSError:
                found[path] = set()
        return found

    @property
    def outside_before(self) -> dict[str, set[str]]:
        """The entries of :data:`OUTSIDE_PATHS` when this cluster took the machine lock."""
        return {path: self._before.get(path, set()) for path in self.OUTSIDE_PATHS}

    def _note_outside_paths(self) -> None:
        self._before = {**self.outside_entries()}
        self._created_dirs = [Path(p) for p in self.OUTSIDE_PATHS if not Path(p).is_dir()]
        self._before["bridge"] = {BRIDGE} if Path(f"/sys/class/net/{BRIDGE}").exists() else set()

    def _clean_outside_paths(self) -> None:
        for path, before in self._before.items():
            if path == "bridge":
                continue
            try:
                names = set(os.listdir(path)) - before
            except OSError:
                continue
            for name in sorted(names):
                target = Path(path) / name
                self._unmount_below(target)
                if target.is_mount():
                    subprocess.run(["umount", "-l", str(target)], capture_output=True, check=False)
                if self.mounts_below(target) or target.is_mount():
                    continue  # never delete below a mount (pitfall 8)
                if target.is_dir() and not target.is_symlink():
                    shutil.rmtree(target, ignore_errors=True)
                else:
                    target.unlink(missing_ok=True)
        for made in self._created_dirs:
            with contextlib.suppress(OSError):
                made.rmdir()  # only if empty
        if not self._before.get("bridge") and Path(f"/sys/class/net/{BRIDGE}").exists():
            subprocess.run(["ip", "link", "delete", BRIDGE], capture_output=True, check=False)

    @staticmethod
    def mounts_below(path: Path) -> list[str]:
        prefix = str(path.resolve()) if path.exists() else str(path)
        found = []
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            point = line.split()[4].encode().decode("unicode_escape")
            if point == prefix or point.startswith(prefix.rstrip("/") + "/"):
                found.append(point)
        return found

    def _unmount_below(self, path: Path) -> None:
        """Unmount everything at or below ``path``, deepest first (pitfall 8)."""
        for _ in range(5):
            points = self.mounts_below(path)
            if not points:
                return
            for point in sorted(points, key=lambda p: p.count("/"), reverse=True):
                if (
                    subprocess.run(["umount", point], capture_output=True, check=False).returncode
                    != 0
                ):
                    subprocess.run(["umount", "-l", point], capture_output=True, check=False)


def processes_mentioning(needle: str) -> dict[int, str]:
    """``{pid: command line}`` of every process whose command line contains ``needle``."""
    found = {}
    for entry in Path("/proc").iterdir():
        try:
            cmdline = (entry / "cmdline").read_bytes() if entry.name.isdigit() else b""
        except OSError:
            continue
        if needle.encode() in cmdline:
            found[int(entry.name)] = cmdline.replace(b"\0", b" ").decode(errors="replace").strip()
    return found


def stale_cluster_processes() -> dict[int, str]:
    """Cluster processes (etcd, kube-*, containerd and its shims) of a test cluster whose
    session died without stopping it: found by their state dir's prefix in their argv."""
    names = {"etcd", "containerd", "containerd-shim-runc-v2", *kube_build.BINARIES}
    return {
        pid: argv
        for pid, argv in processes_mentioning(f"/tmp/{STATE_PREFIX}").items()
        if Path(argv.split(" ", 1)[0]).name in names
    }


def new_state_dir() -> Path:
    """A fresh short state dir under /tmp (unix socket paths must stay under 108 bytes)."""
    return Path(tempfile.mkdtemp(prefix=STATE_PREFIX, dir="/tmp"))


image_build: Any = load_script("corral_image_build", ROOT / "image" / "build.py")


@dataclass(frozen=True)
class RunnerImage:
    """The corral runner image: ``name`` for pod specs, ``tar`` the docker-archive."""

    name: str
    tar: Path


def build_runner_image() -> RunnerImage:
    """Build (or reuse from its cache) the runner image with ``image/build.py``."""
    try:
        tar = image_build.build()
    except image_build.BuildError as exc:
        raise ClusterError(f"image/build.py failed (run `make image` to see it): {exc}") from exc
    return RunnerImage(image_build.IMAGE_NAME, tar)
