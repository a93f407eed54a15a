#!/usr/bin/env python3
"""Build the Kubernetes binaries the test cluster runs, from Debian's ``kubernetes`` source.

Usage (as root, on Debian bookworm)::

    python3 kube/build.py [--cache-dir DIR] [--force]

Debian ships no kube-apiserver or kubelet binaries, but its ``kubernetes`` source package
(1.20.5+really1.20.2) builds with Debian's Go. This script installs the build dependencies,
adds a ``deb-src`` entry mirroring the existing ``deb`` entries if there is none, fetches
the source, swaps the vendored modern-go/reflect2 1.0.1 for Debian's 1.0.2 (1.0.1 crashes
kube-apiserver on the first custom resource under Go >= 1.18), and builds
kube-apiserver, kube-controller-manager, kube-scheduler, kubelet and kubectl with
``CGO_ENABLED=0`` and a GOPATH/GOCACHE private to the build.

The result is ``${CORRAL_KUBE_CACHE:-~/.cache/corral/kube}/<version>/bin`` (outside the
checkout). A complete ``bin`` is never rebuilt unless ``--force``; the build runs in a scratch
directory next to it and ``bin`` appears only when every binary is there, so an interrupted
build leaves nothing half-made. Every step's output goes to ``<version>/build.log``; a failing
step stops the build with its name and the log's tail. A lock file serialises concurrent runs.

Cold, on two cores: about 7 minutes and ~3.5 GB of scratch space (removed afterwards).
"""

from __future__ import annotations

import argparse
import fcntl
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

#: Debian's upstream version of the ``kubernetes`` source package this builds (bookworm).
VERSION = "1.20.5+really1.20.2"
#: What the build produces, in ``<cache>/<version>/bin``.
BINARIES = ("kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubelet", "kubectl")
BUILD_DEPS = (
    "golang-go",
    "rsync",
    "golang-github-modern-go-reflect2-dev",
    "dpkg-dev",
    "etcd-server",
)
REFLECT2_DEBIAN = Path("/usr/share/gocode/src/github.com/modern-go/reflect2")
REFLECT2_VERSION = "v1.0.2"


class BuildError(RuntimeError):
    """A build step failed; the message names the step and ends with the log's tail."""


def cache_root() -> Path:
    """``$CORRAL_KUBE_CACHE`` or ``~/.cache/corral/kube``."""
    env = os.environ.get("CORRAL_KUBE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "corral" / "kube"


def bin_dir(cache_dir: Path | None = None) -> Path:
    """Where the built binaries are (whether or not they exist yet)."""
    return (cache_dir or cache_root()) / VERSION / "bin"


def missing_binaries(where: Path | None = None) -> list[str]:
    """The binaries not (yet) in ``where`` (default :func:`bin_dir`); empty when complete."""
    where = where or bin_dir()
    return [b for b in BINARIES if not os.access(where / b, os.X_OK)]


class _Log:
    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)

    def note(self, text: str) -> None:
        line = f"[kube-build {time.strftime('%H:%M:%S')}] {text}"
        print(line, flush=True)
        with self.path.open("a") as fh:
            fh.write(line + "\n")

    def tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def run(
        self,
        step: str,
        argv: Sequence[str],
        cwd: Path | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.note(f"{step}: {' '.join(argv)}")
        with self.path.open("a") as fh:
            proc = subprocess.run(
                list(argv),
                check=False,
                cwd=cwd,
                env=env,
                stdout=fh,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        if proc.returncode != 0:
            raise BuildError(
                f"kube build step '{step}' failed (exit {proc.returncode}); "
                f"log {self.path}:\n{self.tail()}"
            )


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _apt_env() -> dict[str, str]:
    return {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}


def _have_packages(names: Sequence[str]) -> bool:
    proc = subprocess.run(
        ["dpkg-query", "-W", "-f", "${db:Status-Abbrev}\n", *names],
        capture_output=True,
        text=True,
        check=False,
    )
    states = proc.stdout.split()
    return (
        proc.returncode == 0
        and len(states) == len(names)
        and all(s.startswith("ii") for s in states)
    )


def _deb_src_stanzas() -> str:
    """deb-src stanzas mirroring every ``deb`` entry apt has (deb822 and one-line files)."""
    out: list[str] = []
    sources = Path("/etc/apt/sources.list.d")
    for path in sorted(sources.glob("*.sources")):
        for stanza in re.split(r"\n\s*\n", path.read_text()):
            if re.search(r"^Types:.*\bdeb\b", stanza, re.M) and "Enabled: no" not in stanza:
                out.append(re.sub(r"^Types:.*$", "Types: deb-src", stanza.strip(), flags=re.M))
    for path in [Path("/etc/apt/sources.list"), *sorted(sources.glob("*.list"))]:
        if path.is_file():
            for line in path.read_text().splitlines():
                if line.startswith("deb "):
                    words = line[4:].split()
                    opts = words.pop(0) + " " if words and words[0].startswith("[") else ""
                    out.append(
                        f"Types: deb-src\nURIs: {words[0]}\nSuites: {words[1]}\n"
                        f"Components: {' '.join(words[2:])}"
                        + (f"\n# options {opts}" if opts else "")
                    )
    return "\n\n".join(out) + "\n"


def _ensure_deb_src(log: _Log) -> None:
    probe = subprocess.run(
        ["apt-cache", "showsrc", "kubernetes"], capture_output=True, text=True, check=False
    )
    if probe.returncode == 0 and "Package: kubernetes" in probe.stdout:
        return
    target = Path("/etc/apt/sources.list.d/corral-deb-src.sources")
    log.note(f"adding deb-src entries in {target}")
    target.write_text(
        "# added by corral kube/build.py: apt-get source kubernetes\n" + _deb_src_stanzas()
    )
    log.run("apt-get update", ["apt-get", "update", "-qq"], env=_apt_env())


def _swap_reflect2(src: Path, log: _Log) -> None:
    vendored = src / "vendor" / "github.com" / "modern-go" / "reflect2"
    if not (REFLECT2_DEBIAN / "reflect2.go").is_file():
        raise BuildError(
            f"{REFLECT2_DEBIAN} is missing: install golang-github-modern-go-reflect2-dev"
        )
    log.note(f"replacing {vendored} with Debian's reflect2 {REFLECT2_VERSION}")
    shutil.rmtree(vendored)
    shutil.copytree(REFLECT2_DEBIAN, vendored, symlinks=False)
    for name in ("go.mod", "vendor/modules.txt"):
        path = src / name
        text, n = re.subn(
            r"(github\.com/modern-go/reflect2) v1\.0\.1\b",
            rf"\1 {REFLECT2_VERSION}",
            path.read_text(),
        )
        if n == 0:
            raise BuildError(f"{path}: no 'github.com/modern-go/reflect2 v1.0.1' to bump")
        path.write_text(text)
    for sub in src.glob("staging/src/k8s.io/*/go.mod"):
        text = sub.read_text()
        if "modern-go/reflect2 v1.0.1" in text:
            sub.write_text(
                text.replace("modern-go/reflect2 v1.0.1", f"modern-go/reflect2 {REFLECT2_VERSION}")
            )


def build(cache_dir: Path | None = None, force: bool = False) -> Path:
    """Build (if needed) and return the bin dir holding :data:`BINARIES`."""
    root = (cache_dir or cache_root()) / VERSION
    final = root / "bin"
    log = _Log(root / "build.log")
    with _locked(root / ".lock"):
        if not force and not missing_binaries(final):
            return final
        started = time.monotonic()
        log.note(f"building Kubernetes {VERSION} into {final}")
        if not _have_packages(BUILD_DEPS):
            log.run("apt-get update", ["apt-get", "update", "-qq"], env=_apt_env())
            log.run(
                "install build deps",
                ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *BUILD_DEPS],
                env=_apt_env(),
            )
        _ensure_deb_src(log)
        work = root / "work"
        if work.exists():
            shutil.rmtree(work)
        work.mkdir(parents=True)
        log.run("apt-get source kubernetes", ["apt-get", "source", "-qq", "kubernetes"], cwd=work)
        dirs = [d for d in work.iterdir() if d.is_dir() and d.name.startswith("kubernetes-")]
        if len(dirs) != 1:
            raise BuildError(
                f"expected one unpacked kubernetes-* source dir in {work}, found {dirs}"
            )
        src = dirs[0]
        if VERSION.split("+", maxsplit=1)[0] not in src.name and VERSION not in src.name:
            log.note(f"note: source dir {src.name} (expected {VERSION})")
        _swap_reflect2(src, log)
        env = {
            **os.environ,
            "CGO_ENABLED": "0",
            "GOPATH": str(work / "gopath"),
            "GOCACHE": str(work / "gocache"),
            "GOFLAGS": "-mod=vendor",
            "GO111MODULE": "on",
            "KUBE_GIT_VERSION": "v" + VERSION.rsplit("really", maxsplit=1)[-1],
            "KUBE_GIT_TREE_STATE": "clean",
        }
        env.pop("GOROOT", None)
        log.run(
            "make", ["make", "WHAT=" + " ".join(f"cmd/{b}" for b in BINARIES)], cwd=src, env=env
        )
        out = src / "_output" / "bin"
        if not out.is_dir():
            out = src / "_output" / "local" / "bin" / "linux" / "amd64"
        staged = root / "bin.new"
        if staged.exists():
            shutil.rmtree(staged)
        staged.mkdir()
        for name in BINARIES:
            if not (out / name).is_file():
                raise BuildError(
                    f"make finished but {out / name} is missing; log {log.path}:\n{log.tail()}"
                )
            shutil.copy2(out / name, staged / name)
        if final.exists():
            shutil.rmtree(final)
        staged.rename(final)
        subprocess.run(["chmod", "-R", "u+w", str(work)], check=False)
        shutil.rmtree(work, ignore_errors=True)
        log.note(f"done in {time.monotonic() - started:.0f} s: {', '.join(BINARIES)} in {final}")
    return final


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="default: $CORRAL_KUBE_CACHE or ~/.cache/corral/kube",
    )
    parser.add_argument(
        "--force", action="store_true", help="rebuild even if the binaries are cached"
    )
    args = parser.parse_args(argv)
    try:
        print(build(args.cache_dir, args.force))
    except BuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
