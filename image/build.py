#!/usr/bin/env python3
"""Build the corral runner image (``localhost/corral:dev``) without Docker.

Usage (as root, with the project's venv python so pip can build the wheel)::

    .venv/bin/python image/build.py [--force]

Two layers:

1. a Debian bookworm ``debootstrap --variant=minbase`` rootfs with qemu-system-x86, qemu-utils,
   swtpm, swtpm-tools, ovmf and python3, trimmed (docs, man pages, apt lists); cached as a
   directory keyed by the package list, the mirror and :data:`BASE_RECIPE`;
2. corral: a wheel built from a copy of this checkout's ``src/`` and ``pyproject.toml``,
   installed with its dependencies from PyPI into ``/usr/local/lib/python3.11/dist-packages``
   (Debian's python3 reads it), and ``/usr/local/bin/corral``.

Packed as an OCI layout with ``umoci`` and converted with ``skopeo`` to a docker-archive,
``<cache>/corral-<key>.tar``, tag ``localhost/corral:dev``. The key hashes this script, the
base key and every file of ``src/`` plus ``pyproject.toml``, so a rerun with nothing changed
only prints the path. Import it with ``ctr -n k8s.io images import``; pods use
``imagePullPolicy: Never``. The same image runs the operator (command ``corral operator run``).
``image/Dockerfile`` builds the same image where a Docker engine exists.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
IMAGE_NAME = "localhost/corral:dev"
SUITE = "bookworm"
PACKAGES = (
    "qemu-system-x86",
    "qemu-utils",
    "swtpm",
    "swtpm-tools",
    "ovmf",
    "python3",
    "ca-certificates",
)
#: Bump when the base rootfs recipe (not the package list) changes.
BASE_RECIPE = "1"
IMAGE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
PYTHON_SITE = "usr/local/lib/python3.11/dist-packages"
TRIM = (
    "usr/share/doc",
    "usr/share/man",
    "usr/share/info",
    "usr/share/lintian",
    "usr/share/locale",
    "var/cache/apt",
    "var/lib/apt/lists",
    "var/log",
)
TOOLS = {"debootstrap": "debootstrap", "umoci": "umoci", "skopeo": "skopeo"}


class BuildError(RuntimeError):
    """A step failed; the message names it and carries the command's output tail."""


def cache_root() -> Path:
    env = os.environ.get("CORRAL_IMAGE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "corral" / "image"


def _log(text: str) -> None:
    print(f"[image {time.strftime('%H:%M:%S')}] {text}", flush=True)


def _run(argv: Sequence[str], **kwargs: Any) -> str:
    proc = subprocess.run(list(argv), capture_output=True, text=True, check=False, **kwargs)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-30:])
        raise BuildError(f"{' '.join(argv[:3])} ... failed ({proc.returncode}):\n{tail}")
    return proc.stdout


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        yield


def _guest_build() -> Any:
    spec = importlib.util.spec_from_file_location(
        "corral_image_guests", ROOT / "guests" / "build.py"
    )
    assert spec is not None and spec.loader is not None
    module = sys.modules.setdefault(spec.name, importlib.util.module_from_spec(spec))
    spec.loader.exec_module(module)
    return module


def _sha(parts: Sequence[tuple[str, bytes]]) -> str:
    h = hashlib.sha256()
    for name, data in parts:
        h.update(name.encode() + b"\0" + hashlib.sha256(data).digest())
    return h.hexdigest()[:20]


def source_files() -> list[Path]:
    """What goes into the wheel: ``pyproject.toml``, ``README.md`` and ``src/`` (no caches)."""
    files = [ROOT / "pyproject.toml", ROOT / "README.md"]
    for path in sorted((ROOT / "src").rglob("*")):
        rel = path.relative_to(ROOT).parts
        if (
            path.is_file()
            and "__pycache__" not in rel
            and not any(p.endswith(".egg-info") for p in rel)
        ):
            files.append(path)
    return files


def base_key(mirror: str) -> str:
    return _sha(
        [
            ("packages", " ".join(PACKAGES).encode()),
            ("mirror", mirror.encode()),
            ("recipe", BASE_RECIPE.encode()),
        ]
    )


def image_key(base: str) -> str:
    parts = [("base", base.encode()), ("build.py", Path(__file__).read_bytes())]
    parts += [(str(p.relative_to(ROOT)), p.read_bytes()) for p in source_files()]
    return _sha(parts)


def _build_base(cache: Path, key: str, mirror: str) -> Path:
    final = cache / f"base-{key}"
    if (final / "rootfs" / "usr" / "bin" / "qemu-system-x86_64").exists():
        return final / "rootfs"
    tmp = Path(tempfile.mkdtemp(prefix=".base-", dir=cache))
    rootfs = tmp / "rootfs"
    _log(f"debootstrap {SUITE} minbase + {', '.join(PACKAGES)} from {mirror}")
    started = time.monotonic()
    _run(
        [
            "debootstrap",
            "--variant=minbase",
            f"--include={','.join(PACKAGES)}",
            SUITE,
            str(rootfs),
            mirror,
        ],
        env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
    )
    for rel in TRIM:
        target = rootfs / rel
        if target.is_dir():
            shutil.rmtree(target)
            target.mkdir(parents=True)
    for rel in ("etc/resolv.conf", "etc/hostname"):
        (rootfs / rel).unlink(missing_ok=True)
    (rootfs / "var/cache/apt/archives/partial").mkdir(parents=True, exist_ok=True)
    (rootfs / "var/lib/apt/lists/partial").mkdir(parents=True, exist_ok=True)
    _log(f"base rootfs in {time.monotonic() - started:.0f} s")
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    return final / "rootfs"


def _build_corral_layer(work: Path) -> Path:
    """``<work>/layer`` holding ``usr/local``: corral and its dependencies."""
    src = work / "src-copy"
    for path in source_files():
        dest = src / path.relative_to(ROOT)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, dest)
    wheels = work / "wheels"
    _log("building the corral wheel")
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(wheels), str(src)])
    (wheel,) = wheels.glob("corral-*.whl")
    layer = work / "layer"
    site = layer / PYTHON_SITE
    _log("installing corral and its dependencies (PyPI)")
    if sys.version_info[:2] != (3, 11):
        raise BuildError(f"run image/build.py with Python 3.11 (the image's), not {sys.version}")
    # This interpreter's tags are the image's: CPython 3.11 on bookworm's glibc.
    _run(
        [
            sys.executable, "-m", "pip", "install", "-q", "--no-compile",
            "--no-warn-script-location", "--target", str(site), str(wheel),
        ]
    )  # fmt: skip
    shutil.rmtree(site / "bin", ignore_errors=True)
    # Byte-compiled here (3.11 bytecode is the same for every 3.11.x): pods start faster.
    _run([sys.executable, "-m", "compileall", "-q", "-j", "0", str(site)])
    script = layer / "usr/local/bin/corral"
    script.parent.mkdir(parents=True, exist_ok=True)
    script.write_text(
        "#!/usr/bin/python3\nimport sys\n\nfrom corral.cli.main import main\n\nsys.exit(main())\n"
    )
    script.chmod(0o755)
    return layer


def build(cache_dir: Path | None = None, force: bool = False) -> Path:
    """Build (or reuse) the image; return the docker-archive's path."""
    for tool, package in TOOLS.items():
        if shutil.which(tool) is None and shutil.which(tool, path="/usr/sbin:/sbin") is None:
            raise BuildError(f"{tool} not found: apt-get install {package} (or `make image`)")
    cache = cache_dir or cache_root()
    mirror = _guest_build().apt_mirror()
    with _locked(cache / ".lock"):
        bkey = base_key(mirror)
        out = cache / f"corral-{image_key(bkey)}.tar"
        if out.exists() and not force:
            return out
        started = time.monotonic()
        rootfs = _build_base(cache, bkey, mirror)
        with tempfile.TemporaryDirectory(prefix=".image-", dir=cache) as tmp:
            work = Path(tmp)
            layer = _build_corral_layer(work)
            oci = f"{work / 'oci'}:dev"
            _log("packing with umoci")
            _run(["umoci", "init", "--layout", str(work / "oci")])
            _run(["umoci", "new", "--image", oci])
            _run(["umoci", "insert", "--image", oci, str(rootfs), "/"])
            _run(["umoci", "insert", "--image", oci, str(layer / "usr" / "local"), "/usr/local"])
            _run(
                [
                    "umoci", "config", "--image", oci, "--os", "linux", "--architecture", "amd64",
                    "--config.env", f"PATH={IMAGE_PATH}",
                    "--config.cmd", "corral", "--config.cmd", "--help",
                    "--config.label", "org.opencontainers.image.title=corral runner",
                ]
            )  # fmt: skip
            partial = work / "image.tar"
            _log("converting with skopeo to a docker-archive")
            _run(
                [
                    "skopeo",
                    "--insecure-policy",
                    "copy",
                    "-q",
                    f"oci:{oci}",
                    f"docker-archive:{partial}:{IMAGE_NAME}",
                ]
            )
            for old in cache.glob("corral-*.tar"):
                old.unlink()
            shutil.move(partial, out)
        _log(
            f"{IMAGE_NAME} in {out} "
            f"({out.stat().st_size >> 20} MiB, {time.monotonic() - started:.0f} s)"
        )
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """``--force`` rebuilds the corral layer; the cache dir comes from ``CORRAL_IMAGE_CACHE``."""
    parser = argparse.ArgumentParser(description="Build the corral runner image (docker-archive).")
    parser.add_argument("--force", action="store_true", help="rebuild even if cached")
    force = parser.parse_args(argv).force
    try:
        out = build(None, force)
    except BuildError as exc:
        sys.exit(f"error: {exc}")
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
