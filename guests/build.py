#!/usr/bin/env python3
"""Build the corral integration-test guests from Debian packages, with a cache.

Two guests:

* ``tiny``: the Debian cloud kernel plus a busybox initramfs (``/init`` is
  ``guests/tiny-init.sh``) with qemu-guest-agent and the kernel modules for virtio, SCSI CD-ROM,
  ISO9660/vfat and TPM. Builds in seconds; nothing is installed into the host except (when
  missing) the host tools and the shared-library packages whose files are copied into the image.
* ``debian``: a debootstrapped Debian bookworm (systemd, cloud-init, qemu-guest-agent) on an
  ext4 qcow2 disk, plus its kernel and initrd for direct kernel boot.

Usage::

    python3 guests/build.py tiny|debian|all [--cache-dir DIR] [--force]

prints a JSON manifest ``{"tiny": {...}, "debian": {...}}`` of absolute paths on stdout.
From Python (e.g. pytest fixtures)::

    sys.path.insert(0, str(repo / "guests"))
    import build
    tiny = build.build_tiny(cache_dir)

Each build lives in ``<cache>/<kind>-<key>`` where the key is the sha256 of this file, the
tiny init script and the exact Debian package versions used. A build goes to a temporary
directory first and is renamed into place; an fcntl lock serialises concurrent builders.
Only the standard library is used; every subprocess gets an argv list, never a shell string.
"""

from __future__ import annotations

import argparse
import dataclasses
import fcntl
import gzip
import hashlib
import io
import json
import lzma
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Final

HERE: Final = Path(__file__).resolve().parent
BUILD_SCRIPT: Final = Path(__file__).resolve()
TINY_INIT: Final = HERE / "tiny-init.sh"

SUITE: Final = "bookworm"
KERNEL_META: Final = "linux-image-cloud-amd64"
READY_MARKER: Final = "CORRAL-GUEST-READY"
POWERDOWN_MARKER: Final = "CORRAL-POWERDOWN"
TINY_CMDLINE: Final = "console=ttyS0 panic=-1 no_timer_check cryptomgr.notests quiet"
DEBIAN_CMDLINE: Final = "root=/dev/vda rw console=ttyS0 panic=-1"
DEBIAN_DISK_SIZE: Final = "1536M"

# Modules the tiny /init loads (dependencies are added from modinfo). Names missing from the
# cloud kernel (e.g. ahci) or built into it (tpm_tis, tpm_crb) are skipped and recorded.
TINY_MODULES: Final = (
    "button",
    "evdev",
    "virtio_pci",
    "virtio_mmio",
    "virtio_blk",
    "virtio_net",
    "virtio_scsi",
    "virtio_console",
    "virtio_balloon",
    "virtio_rng",
    "vmw_vsock_virtio_transport",
    "scsi_mod",
    "sd_mod",
    "sr_mod",
    "cdrom",
    "isofs",
    "fat",
    "vfat",
    "nls_cp437",
    "nls_iso8859_1",
    "nls_ascii",
    "nls_utf8",
    "tpm_tis",
    "tpm_crb",
    "libata",
    "libahci",
    "ahci",
    "ata_piix",
    "ata_generic",
)

# Packages whose (host-installed) shared libraries are copied into the tiny initramfs for
# qemu-ga. Their installed versions are part of the cache key; the build fails if ldd finds a
# library owned by a package that is not listed here (so the key cannot silently go stale).
TINY_LIB_PACKAGES: Final = (
    "libc6",
    "libglib2.0-0",
    "libnuma1",
    "liburing2",
    "libudev1",
    "libpcre2-8-0",
)

DEBIAN_INCLUDE: Final = (
    "systemd-sysv",
    "udev",
    KERNEL_META,
    "cloud-init",
    "qemu-guest-agent",
    "ifupdown",
    "isc-dhcp-client",
    "lz4",
    "python3-cffi-backend",
    "dbus",
)

# host command -> Debian package providing it
HOST_TOOLS_TINY: Final = {
    "apt-get": "apt",
    "apt-cache": "apt",
    "dpkg-deb": "dpkg",
    "dpkg-query": "dpkg",
    "ldd": "libc-bin",
}
HOST_TOOLS_DEBIAN: Final = {
    "apt-cache": "apt",
    "dpkg-query": "dpkg",
    "debootstrap": "debootstrap",
    "mkfs.ext4": "e2fsprogs",
    "qemu-img": "qemu-utils",
    "chroot": "coreutils",
}

ROOT_CPIO_DIRS: Final = (
    "bin",
    "sbin",
    "usr",
    "usr/bin",
    "usr/sbin",
    "lib",
    "lib64",
    "etc",
    "dev",
    "proc",
    "sys",
    "run",
    "tmp",
    "root",
    "var",
    "var/lib",
    "var/log",
    "mnt",
    "media",
)

TINY_FILES: Final[Mapping[str, tuple[int, str]]] = {
    "etc/passwd": (0o644, "root:x:0:0:root:/root:/bin/sh\n"),
    "etc/shadow": (0o600, "root::19000:0:99999:7:::\n"),
    "etc/group": (0o644, "root:x:0:\ntty:x:5:\ndisk:x:6:\n"),
    "etc/hostname": (0o644, "corral-tiny\n"),
    "etc/hosts": (0o644, "127.0.0.1 localhost corral-tiny\n"),
    "etc/profile": (
        0o644,
        "export PATH=/bin:/sbin:/usr/bin:/usr/sbin\nexport PS1='corral-tiny# '\n",
    ),
    "etc/os-release": (
        0o644,
        'NAME="corral tiny"\nID=corral-tiny\nPRETTY_NAME="corral tiny test guest"\n',
    ),
    # busybox acpid: evdev KEY_POWER -> "PWRF" (built-in map) -> runs ./PWRF/00000080 in -c DIR.
    "etc/acpi/PWRF/00000080": (
        0o755,
        f"#!/bin/sh\necho {POWERDOWN_MARKER} >/dev/console\nsync\npoweroff -f\n",
    ),
    "etc/acpi/PWRB/00000080": (
        0o755,
        f"#!/bin/sh\necho {POWERDOWN_MARKER} >/dev/console\nsync\npoweroff -f\n",
    ),
    # qemu-ga's guest-shutdown runs /sbin/shutdown -h|-r|-H -P +0 "..."; busybox has none.
    "sbin/shutdown": (
        0o755,
        '#!/bin/sh\nsync\ncase " $* " in *" -r "*) exec reboot -f ;; esac\nexec poweroff -f\n',
    ),
    "etc/udhcpc/default.script": (
        0o755,
        """#!/bin/sh
# busybox udhcpc event script: configure $interface from the lease.
case "$1" in
deconfig)
    ip -4 addr flush dev "$interface"
    ip link set "$interface" up
    ;;
bound|renew)
    ip -4 addr flush dev "$interface"
    ip addr add "$ip/${mask:-24}" dev "$interface"
    if [ -n "$router" ]; then
        ip route del default 2>/dev/null
        for r in $router; do ip route add default via "$r" dev "$interface"; break; done
    fi
    : >/etc/resolv.conf
    for d in $dns; do echo "nameserver $d" >>/etc/resolv.conf; done
    echo "CORRAL-FACT ip=$ip" >/dev/console
    ;;
esac
exit 0
""",
    ),
}


class BuildError(RuntimeError):
    """A guest could not be built; the message says why and what to install."""


_JSON_NAMES = {"directory": "dir", "kernel": "vmlinuz"}


def _guest_json(guest: object) -> dict[str, str]:
    """A guest as the manifest JSON ``build.py`` prints: every field as a string."""
    return {
        _JSON_NAMES.get(f.name, f.name): str(getattr(guest, f.name))
        for f in dataclasses.fields(guest)  # type: ignore[arg-type]
    }


@dataclasses.dataclass(frozen=True)
class TinyGuest:
    """The busybox + cloud-kernel guest. Boot with ``-kernel kernel -initrd initrd``."""

    directory: Path
    kernel: Path
    initrd: Path
    manifest: Path
    key: str
    kernel_version: str
    cmdline: str = TINY_CMDLINE

    def to_json(self) -> dict[str, str]:
        return _guest_json(self)


@dataclasses.dataclass(frozen=True)
class DebianGuest:
    """Debian bookworm with systemd + cloud-init. Boot ``disk`` (via an overlay) as /dev/vda."""

    directory: Path
    kernel: Path
    initrd: Path
    disk: Path
    manifest: Path
    key: str
    kernel_version: str
    cmdline: str = DEBIAN_CMDLINE

    def to_json(self) -> dict[str, str]:
        return _guest_json(self)


# --------------------------------------------------------------------------------------------
# small helpers


def _log(msg: str) -> None:
    print(f"[guests/build] {msg}", file=sys.stderr, flush=True)


def _run(argv: list[str], *, cwd: Path | None = None, env: Mapping[str, str] | None = None) -> str:
    """Run argv, return stdout; raise BuildError with stderr on failure."""
    full_env = None if env is None else {**os.environ, **env}
    proc = subprocess.run(argv, cwd=cwd, env=full_env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise BuildError(
            f"command failed ({proc.returncode}): {' '.join(argv)}\n"
            f"stdout: {proc.stdout[-3000:]}\nstderr: {proc.stderr[-3000:]}"
        )
    return proc.stdout


_APT_STATE: Final[dict[str, bool]] = {"updated": False}


def _apt_update_once() -> None:
    if not _APT_STATE["updated"]:
        _log("apt-get update")
        _run(["apt-get", "update"])
        _APT_STATE["updated"] = True


def _apt_install(packages: Iterable[str]) -> None:
    pkgs = sorted(set(packages))
    if not pkgs:
        return
    if os.geteuid() != 0:
        raise BuildError(f"missing host packages, install them: apt-get install {' '.join(pkgs)}")
    _apt_update_once()
    _log(f"apt-get install {' '.join(pkgs)}")
    _run(
        ["apt-get", "install", "-y", "--no-install-recommends", *pkgs],
        env={"DEBIAN_FRONTEND": "noninteractive"},
    )


def ensure_host_tools(tools: Mapping[str, str]) -> None:
    """apt-get install the packages of the commands in ``tools`` that are not on PATH."""
    missing = {pkg for cmd, pkg in tools.items() if shutil.which(cmd) is None}
    _apt_install(missing)
    still = [cmd for cmd in tools if shutil.which(cmd) is None]
    if still:
        raise BuildError(f"commands still missing after apt-get install: {still}")


def _installed_version(package: str) -> str | None:
    proc = subprocess.run(
        ["dpkg-query", "-W", "-f", "${db:Status-Status} ${Version}", package],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        return None
    status, _, version = proc.stdout.strip().partition(" ")
    return version if status == "installed" and version else None


def _candidate_versions(packages: Iterable[str]) -> dict[str, str]:
    """{package: version apt would install/download} (``apt-cache policy`` Candidate)."""
    wanted = sorted(set(packages))
    found: dict[str, str] = {}
    for attempt in range(2):
        out = _run(["apt-cache", "policy", *wanted])
        current = None
        for line in out.splitlines():
            if line and not line[0].isspace() and line.endswith(":"):
                current = line[:-1].split(":")[0]  # "pkg:" or "pkg:amd64:"
            elif current and line.strip().startswith("Candidate:"):
                version = line.split(":", 1)[1].strip()
                if version != "(none)":
                    found[current] = version
        if all(p in found for p in wanted):
            return {p: found[p] for p in wanted}
        if attempt == 0:
            _apt_update_once()
    missing = [p for p in wanted if p not in found]
    raise BuildError(f"apt has no candidate for {missing} (check /etc/apt/sources.list*)")


def _resolve_kernel_package() -> str:
    """linux-image-cloud-amd64 (candidate) -> the versioned linux-image-6.1.0-NN-cloud-amd64."""
    for attempt in range(2):
        proc = subprocess.run(
            ["apt-cache", "show", "--no-all-versions", KERNEL_META],
            capture_output=True,
            text=True,
            check=False,
        )
        m = re.search(r"^Depends:.*?\b(linux-image-\d[^\s,(]*)", proc.stdout, re.MULTILINE)
        if m:
            return m.group(1)
        if attempt == 0:
            _apt_update_once()
    raise BuildError(f"cannot find the kernel package in {KERNEL_META}'s Depends")


def _apt_download(packages: Mapping[str, str], dest: Path) -> dict[str, Path]:
    """apt-get download pkg=version into dest; return {package: .deb path}."""
    dest.mkdir(parents=True, exist_ok=True)
    argv = ["apt-get", "download", "-o", "APT::Sandbox::User=root"]
    argv += [f"{p}={v}" for p, v in sorted(packages.items())]
    _run(argv, cwd=dest)
    debs: dict[str, Path] = {}
    for deb in dest.glob("*.deb"):
        name = _run(["dpkg-deb", "-f", str(deb), "Package"]).strip()
        version = _run(["dpkg-deb", "-f", str(deb), "Version"]).strip()
        if name in packages:
            if version != packages[name]:
                raise BuildError(f"downloaded {name} {version}, wanted {packages[name]}")
            debs[name] = deb
    missing = set(packages) - set(debs)
    if missing:
        raise BuildError(f"apt-get download did not produce: {sorted(missing)}")
    return debs


def _sha256_key(parts: Iterable[tuple[str, bytes]]) -> str:
    h = hashlib.sha256()
    for name, data in parts:
        h.update(name.encode() + b"\0" + str(len(data)).encode() + b"\0" + data)
    return h.hexdigest()


def default_cache_dir() -> Path:
    env = os.environ.get("CORRAL_CACHE_DIR")
    if env:
        return Path(env).expanduser().resolve()
    return (Path.home() / ".cache" / "corral" / "guests").resolve()


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _cached(
    cache_dir: Path, kind: str, key: str, force: bool, builder: Callable[[Path], None]
) -> Path:
    """Return ``<cache>/<kind>-<key>``, running builder(tmpdir) + atomic rename if needed.

    The builder must write ``manifest.json`` last; its presence marks a complete build.
    """
    cache_dir.mkdir(parents=True, exist_ok=True)
    final = cache_dir / f"{kind}-{key[:20]}"
    with _locked(cache_dir / f".{kind}.lock"):
        if not force and (final / "manifest.json").is_file():
            return final
        tmp = Path(tempfile.mkdtemp(prefix=f".{kind}-build-", dir=cache_dir))
        try:
            started = time.monotonic()
            tmp.chmod(0o755)
            builder(tmp)
            if not (tmp / "manifest.json").is_file():
                raise BuildError(f"{kind} builder wrote no manifest.json")
            _log(f"{kind} built in {time.monotonic() - started:.1f}s")
            if final.exists():
                trash = Path(tempfile.mkdtemp(prefix=f".{kind}-old-", dir=cache_dir))
                final.rename(trash / "old")
                shutil.rmtree(trash, ignore_errors=True)
            tmp.rename(final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        # Drop builds with other keys (running qemu processes keep their open files).
        for other in cache_dir.glob(f"{kind}-*"):
            if other != final and other.is_dir():
                shutil.rmtree(other, ignore_errors=True)
        for stale in cache_dir.glob(f".{kind}-*"):
            if stale.is_dir() and time.time() - stale.stat().st_mtime > 3600:
                shutil.rmtree(stale, ignore_errors=True)
    return final


def _write_manifest(directory: Path, data: Mapping[str, Any]) -> None:
    tmp = directory / "manifest.json.tmp"
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    tmp.rename(directory / "manifest.json")


def _read_manifest(directory: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((directory / "manifest.json").read_text())
    return data


# --------------------------------------------------------------------------------------------
# newc cpio writer


class _Cpio:
    """Minimal SVR4 "newc" cpio writer (all entries root-owned, fixed mtime)."""

    def __init__(self) -> None:
        self._buf = io.BytesIO()
        self._ino = 1

    def _entry(
        self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)
    ) -> None:
        encoded = name.encode() + b"\0"
        fields = (
            self._ino,
            mode,
            0,  # uid
            0,  # gid
            2 if stat.S_ISDIR(mode) else 1,
            0,  # mtime
            len(data),
            0,
            0,
            rdev[0],
            rdev[1],
            len(encoded),
            0,
        )
        self._ino += 1
        header = b"070701" + b"".join(f"{f:08X}".encode() for f in fields)
        self._buf.write(header + encoded)
        self._buf.write(b"\0" * (-(len(header) + len(encoded)) % 4))
        self._buf.write(data)
        self._buf.write(b"\0" * (-len(data) % 4))

    def add_tree(self, root: Path) -> None:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            rel_dir = Path(dirpath).relative_to(root)
            if str(rel_dir) != ".":
                self._add_path(root, rel_dir)
            for fname in sorted(filenames):
                self._add_path(root, rel_dir / fname)
            # symlinks to directories are listed in dirnames but not walked
            for dname in dirnames:
                if (Path(dirpath) / dname).is_symlink():
                    self._add_path(root, rel_dir / dname)

    def _add_path(self, root: Path, rel: Path) -> None:
        full = root / rel
        st = full.lstat()
        name = rel.as_posix()
        if stat.S_ISLNK(st.st_mode):
            self._entry(name, stat.S_IFLNK | 0o777, os.readlink(full).encode())
        elif stat.S_ISDIR(st.st_mode):
            self._entry(name, stat.S_IFDIR | stat.S_IMODE(st.st_mode))
        elif stat.S_ISREG(st.st_mode):
            self._entry(name, stat.S_IFREG | stat.S_IMODE(st.st_mode), full.read_bytes())
        else:
            raise BuildError(f"unsupported file type in initramfs staging: {full}")

    def add_char_device(self, name: str, mode: int, major: int, minor: int) -> None:
        self._entry(name, stat.S_IFCHR | mode, rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return self._buf.getvalue()


# --------------------------------------------------------------------------------------------
# kernel modules


def _module_name(path: Path) -> str:
    name = path.name
    for suffix in (".xz", ".zst", ".gz"):
        name = name.removesuffix(suffix)
    return name.removesuffix(".ko").replace("-", "_")


def _decompress_module(path: Path) -> bytes:
    data = path.read_bytes()
    if path.name.endswith(".ko.xz"):
        return lzma.decompress(data)
    if path.name.endswith(".ko.gz"):
        return gzip.decompress(data)
    if path.name.endswith(".ko.zst"):
        ensure_host_tools({"zstd": "zstd"})
        return subprocess.run(["zstd", "-dc", str(path)], capture_output=True, check=True).stdout
    return data


def _module_depends(ko: bytes) -> list[str]:
    """``depends=`` from the module's .modinfo section (comma separated names)."""
    m = re.search(rb"(?:^|\0)depends=([^\0]*)\0", ko)
    if not m or not m.group(1):
        return []
    return [d.replace("-", "_") for d in m.group(1).decode().split(",") if d]


@dataclasses.dataclass
class _ModulePlan:
    order: list[str]  # normalised names, dependencies first
    files: dict[str, tuple[str, bytes]]  # name -> (relpath as .ko, decompressed bytes)
    deps: dict[str, list[str]]
    builtin: list[str]
    absent: list[str]


def _plan_modules(moddir: Path, wanted: Iterable[str]) -> _ModulePlan:
    index: dict[str, Path] = {}
    for path in (moddir / "kernel").rglob("*.ko*"):
        index[_module_name(path)] = path
    builtin: set[str] = set()
    builtin_file = moddir / "modules.builtin"
    if builtin_file.is_file():
        builtin = {_module_name(Path(line)) for line in builtin_file.read_text().split()}
    plan = _ModulePlan(order=[], files={}, deps={}, builtin=[], absent=[])

    def visit(name: str, stack: tuple[str, ...]) -> None:
        if name in plan.files or name in plan.builtin or name in plan.absent:
            return
        if name in stack:
            raise BuildError(f"module dependency cycle: {' -> '.join((*stack, name))}")
        if name in builtin:
            plan.builtin.append(name)
            return
        path = index.get(name)
        if path is None:
            plan.absent.append(name)
            return
        data = _decompress_module(path)
        deps = _module_depends(data)
        for dep in deps:
            visit(dep, (*stack, name))
        rel = path.relative_to(moddir).as_posix()
        for suffix in (".xz", ".zst", ".gz"):
            rel = rel.removesuffix(suffix)
        plan.files[name] = (rel, data)
        plan.deps[name] = [d for d in deps if d in index and d not in builtin]
        plan.order.append(name)

    for name in wanted:
        visit(name.replace("-", "_"), ())
    return plan


# --------------------------------------------------------------------------------------------
# tiny guest


def _tiny_key_inputs() -> tuple[dict[str, str], dict[str, str]]:
    """({package: version} to download, {lib package: installed version})."""
    ensure_host_tools(HOST_TOOLS_TINY)
    downloads = _candidate_versions(
        [_resolve_kernel_package(), "busybox-static", "qemu-guest-agent"]
    )
    libs = {p: _installed_version(p) for p in TINY_LIB_PACKAGES}
    missing = [p for p, v in libs.items() if v is None]
    if missing:
        _apt_install(missing)
        libs = {p: _installed_version(p) for p in TINY_LIB_PACKAGES}
    return downloads, {p: v or "" for p, v in libs.items()}


def tiny_key() -> str:
    downloads, libs = _tiny_key_inputs()
    return _tiny_key(downloads, libs)


def _tiny_key(downloads: Mapping[str, str], libs: Mapping[str, str]) -> str:
    pins = "\n".join(f"{p}={v}" for p, v in sorted({**downloads, **libs}.items()))
    return _sha256_key(
        [
            ("build.py", BUILD_SCRIPT.read_bytes()),
            ("tiny-init.sh", TINY_INIT.read_bytes()),
            ("packages", pins.encode()),
        ]
    )


def _ldd(binary: Path) -> list[tuple[str, Path]]:
    """[(name as the loader looks it up, resolved host path)] for binary's shared libs."""
    out = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, check=False)
    libs: list[tuple[str, Path]] = []
    missing: list[str] = []
    for raw_line in out.stdout.splitlines():
        line = raw_line.strip()
        if "=>" in line:
            name, _, rest = line.partition("=>")
            target = rest.strip().split(" (")[0].strip()
            if target == "not found":
                missing.append(name.strip())
            elif target:
                libs.append((target, Path(target)))
        elif line.startswith("/"):  # the program interpreter
            path = line.split(" (")[0].strip()
            libs.append((path, Path(path)))
    if missing:
        raise FileNotFoundError(", ".join(missing))
    if not libs:
        raise BuildError(f"ldd found no libraries for {binary}:\n{out.stdout}{out.stderr}")
    return libs


def _owning_package(path: Path) -> str:
    candidates = [str(path), str(path.resolve())]
    for c in list(candidates):
        if c.startswith("/usr/"):
            candidates.append(c[4:])
        else:
            candidates.append("/usr" + c)
    for c in candidates:
        proc = subprocess.run(["dpkg", "-S", c], capture_output=True, text=True, check=False)
        if proc.returncode == 0 and ":" in proc.stdout:
            return proc.stdout.split(":", 1)[0].split(",")[0].strip()
    raise BuildError(f"no installed Debian package owns {path}")


def _build_tiny_into(out: Path, downloads: Mapping[str, str], libs: Mapping[str, str]) -> None:
    work = out / "work"
    debs = _apt_download(downloads, work / "debs")
    extracted = work / "extracted"
    for deb in debs.values():
        _run(["dpkg-deb", "-x", str(deb), str(extracted)])
    kernels = sorted((extracted / "boot").glob("vmlinuz-*"))
    if len(kernels) != 1:
        raise BuildError(f"expected one vmlinuz in the kernel package, found {kernels}")
    kver = kernels[0].name.removeprefix("vmlinuz-")
    shutil.copyfile(kernels[0], out / "vmlinuz")

    stage = work / "initramfs"
    for d in ROOT_CPIO_DIRS:
        (stage / d).mkdir(parents=True, exist_ok=True)
    (stage / "var/run").symlink_to("../run")

    # busybox + one symlink per applet (at the path busybox itself says)
    busybox = extracted / "bin/busybox"
    shutil.copy2(busybox, stage / "bin/busybox")
    applets = _run([str(busybox), "--list-full"]).split()
    for applet in applets:
        link = stage / applet
        if link.exists() or link.is_symlink() or applet.endswith("/busybox"):
            continue
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(stage / "bin/busybox", link.parent))

    # qemu-ga + the host's copies of its shared libraries
    qga = extracted / "usr/sbin/qemu-ga"
    shutil.copy2(qga, stage / "usr/sbin/qemu-ga")
    try:
        resolved = _ldd(qga)
    except FileNotFoundError as exc:
        raise BuildError(
            f"qemu-ga needs libraries missing on this host ({exc}); "
            f"apt-get install qemu-guest-agent (or add the package to TINY_LIB_PACKAGES)"
        ) from exc
    lib_packages: dict[str, str] = {}
    for target, host_path in resolved:
        pkg = _owning_package(host_path).split(":")[0]
        if pkg not in libs:
            raise BuildError(
                f"{host_path} belongs to {pkg}, which is not in TINY_LIB_PACKAGES; add it"
            )
        lib_packages[str(host_path)] = f"{pkg}={libs[pkg]}"
        dest = stage / target.lstrip("/")
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(host_path.resolve(), dest)
        dest.chmod(0o755)
    (stage / "var/lib/qemu-ga").mkdir(parents=True, exist_ok=True)

    # kernel modules: decompressed, dependency-ordered; modules.dep for busybox modprobe
    moddir = extracted / "lib/modules" / kver
    plan = _plan_modules(moddir, TINY_MODULES)
    smod = stage / "lib/modules" / kver
    for rel, data in plan.files.values():
        (smod / rel).parent.mkdir(parents=True, exist_ok=True)
        (smod / rel).write_bytes(data)
    dep_lines = []
    for name in plan.order:
        rel = plan.files[name][0]
        deps = _transitive_deps(name, plan.deps)
        dep_lines.append(f"{rel}: {' '.join(plan.files[d][0] for d in deps)}".rstrip())
    (smod / "modules.dep").write_text("\n".join(dep_lines) + "\n")
    for extra in ("modules.builtin", "modules.order", "modules.builtin.modinfo"):
        if (moddir / extra).is_file():
            shutil.copyfile(moddir / extra, smod / extra)
    (stage / "etc/modules.order").write_text(
        "".join(plan.files[name][0] + "\n" for name in plan.order)
    )

    for rel_path, (mode, text) in TINY_FILES.items():
        dest = stage / rel_path
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_text(text)
        dest.chmod(mode)
    shutil.copyfile(TINY_INIT, stage / "init")
    (stage / "init").chmod(0o755)

    cpio = _Cpio()
    cpio.add_tree(stage)
    cpio.add_char_device("dev/console", 0o600, 5, 1)
    cpio.add_char_device("dev/null", 0o666, 1, 3)
    raw = cpio.finish()
    (out / "initrd.img").write_bytes(gzip.compress(raw, compresslevel=6, mtime=0))

    shutil.rmtree(work)
    _write_manifest(
        out,
        {
            "kind": "tiny",
            "kernel_version": kver,
            "vmlinuz": "vmlinuz",
            "initrd": "initrd.img",
            "cmdline": TINY_CMDLINE,
            "packages": dict(sorted(downloads.items())),
            "host_lib_packages": dict(sorted(libs.items())),
            "libraries": lib_packages,
            "modules_loaded": [plan.files[n][0] for n in plan.order],
            "modules_builtin": sorted(plan.builtin),
            "modules_absent": sorted(plan.absent),
            "initramfs_uncompressed_bytes": len(raw),
        },
    )


def _transitive_deps(name: str, deps: Mapping[str, list[str]]) -> list[str]:
    seen: list[str] = []

    def walk(n: str) -> None:
        for d in deps.get(n, []):
            if d not in seen:
                seen.append(d)
                walk(d)

    walk(name)
    return seen


def build_tiny(cache_dir: Path | None = None, *, force: bool = False) -> TinyGuest:
    """Build (or reuse from cache) the tiny guest and return its paths."""
    cache = (cache_dir or default_cache_dir()).resolve()
    downloads, libs = _tiny_key_inputs()
    key = _tiny_key(downloads, libs)
    directory = _cached(
        cache, "tiny", key, force, lambda out: _build_tiny_into(out, downloads, libs)
    )
    manifest = _read_manifest(directory)
    return TinyGuest(
        directory=directory,
        kernel=directory / manifest["vmlinuz"],
        initrd=directory / manifest["initrd"],
        manifest=directory / "manifest.json",
        key=key,
        kernel_version=str(manifest["kernel_version"]),
    )


# --------------------------------------------------------------------------------------------
# Debian guest

_READY_UNIT: Final = f"""[Unit]
Description=Tell the corral test harness that boot and cloud-init are done
After=cloud-final.service multi-user.target qemu-guest-agent.service
Wants=cloud-final.service

[Service]
Type=oneshot
ExecStart=/bin/sh -c 'echo; echo {READY_MARKER} >/dev/ttyS0'
RemainAfterExit=yes

[Install]
WantedBy=multi-user.target
"""

_AUTOLOGIN_DROPIN: Final = (
    "[Service]\n"
    "ExecStart=\n"
    "ExecStart=-/sbin/agetty -o '-p -f -- \\\\u' --keep-baud --autologin root"
    " 115200,57600,38400,9600 - $TERM\n"
)

_CLOUD_CFG: Final = """# corral test image
datasource_list: [NoCloud, None]
# minbase has no update-locale (package "locales"); cc_locale would fail cloud-config.service
locale: false
"""

_INTERFACES: Final = """# cloud-init writes the NIC configuration to interfaces.d
auto lo
iface lo inet loopback

source /etc/network/interfaces.d/*
"""


def apt_mirror() -> str:
    """The Debian mirror URI this host's apt uses for SUITE (deb822 or one-line format)."""
    files = [Path("/etc/apt/sources.list")]
    d = Path("/etc/apt/sources.list.d")
    if d.is_dir():
        files += sorted(d.glob("*.sources")) + sorted(d.glob("*.list"))
    for f in files:
        if not f.is_file():
            continue
        text = f.read_text(errors="replace")
        if f.suffix == ".sources":
            for stanza in re.split(r"\n\s*\n", text):
                fields: dict[str, str] = {}
                for line in stanza.splitlines():
                    if line.startswith("#") or ":" not in line:
                        continue
                    k, _, v = line.partition(":")
                    fields[k.strip().lower()] = v.strip()
                if (
                    SUITE in fields.get("suites", "").split()
                    and "deb" in fields.get("types", "").split()
                    and fields.get("enabled", "yes").lower() != "no"
                ):
                    return fields["uris"].split()[0]
        else:
            for line in text.splitlines():
                parts = re.sub(r"\[[^]]*\]", "", line).split()
                if len(parts) >= 3 and parts[0] == "deb" and parts[2] == SUITE:
                    return parts[1]
    return "http://deb.debian.org/debian"


def _debian_key_inputs() -> tuple[str, dict[str, str]]:
    ensure_host_tools(HOST_TOOLS_DEBIAN)
    mirror = apt_mirror()
    pins = _candidate_versions([*DEBIAN_INCLUDE, _resolve_kernel_package()])
    return mirror, pins


def _debian_key(mirror: str, pins: Mapping[str, str]) -> str:
    text = "\n".join(f"{p}={v}" for p, v in sorted(pins.items()))
    return _sha256_key(
        [
            ("build.py", BUILD_SCRIPT.read_bytes()),
            ("mirror", mirror.encode()),
            ("packages", text.encode()),
        ]
    )


def debian_key() -> str:
    mirror, pins = _debian_key_inputs()
    return _debian_key(mirror, pins)


def _write(root: Path, rel: str, text: str, mode: int = 0o644) -> None:
    dest = root / rel
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.is_symlink():
        dest.unlink()
    dest.write_text(text)
    dest.chmod(mode)


def _symlink(root: Path, rel: str, target: str) -> None:
    link = root / rel
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(target)


def _configure_debian_root(root: Path, mirror: str) -> None:
    _write(root, "etc/fstab", "/dev/vda / ext4 defaults,errors=remount-ro 0 1\n")
    _write(root, "etc/hostname", "corral-debian\n")
    _write(root, "etc/hosts", "127.0.0.1 localhost\n127.0.1.1 corral-debian\n")
    _write(root, "etc/network/interfaces", _INTERFACES)
    (root / "etc/network/interfaces.d").mkdir(parents=True, exist_ok=True)
    _write(root, "etc/cloud/cloud.cfg.d/90-corral.cfg", _CLOUD_CFG)
    _write(
        root,
        "etc/apt/sources.list",
        f"deb {mirror} {SUITE} main\ndeb {mirror} {SUITE}-updates main\n",
    )
    _write(root, "etc/systemd/system/corral-ready.service", _READY_UNIT)
    _symlink(
        root,
        "etc/systemd/system/multi-user.target.wants/corral-ready.service",
        "/etc/systemd/system/corral-ready.service",
    )
    _write(
        root, "etc/systemd/system/serial-getty@ttyS0.service.d/autologin.conf", _AUTOLOGIN_DROPIN
    )
    _symlink(
        root,
        "etc/systemd/system/getty.target.wants/serial-getty@ttyS0.service",
        "/lib/systemd/system/serial-getty@.service",
    )
    # No root password (console autologin); empty machine-id = first boot, generated on boot.
    _run(["chroot", str(root), "passwd", "-d", "root"])
    _write(root, "etc/machine-id", "")
    for rel in ("var/lib/dbus/machine-id", "etc/resolv.conf"):
        p = root / rel
        if p.is_symlink() or p.exists():
            p.unlink()
    # Timers that only cost CPU under TCG.
    for unit in (
        "apt-daily.timer",
        "apt-daily-upgrade.timer",
        "e2scrub_all.timer",
        "fstrim.timer",
        "man-db.timer",
    ):
        _symlink(root, f"etc/systemd/system/{unit}", "/dev/null")
    shutil.rmtree(root / "var/cache/apt/archives", ignore_errors=True)
    (root / "var/cache/apt/archives/partial").mkdir(parents=True, exist_ok=True)
    for f in (root / "var/lib/apt/lists").glob("*_*"):
        f.unlink()
    for f in (root / "var/log").rglob("*"):
        if f.is_file():
            f.write_bytes(b"")


def _build_debian_into(out: Path, mirror: str, pins: Mapping[str, str]) -> None:
    root = out / "rootfs"
    _log(f"debootstrap {SUITE} from {mirror} (takes a few minutes)")
    _run(
        [
            "debootstrap",
            "--variant=minbase",
            f"--include={','.join(DEBIAN_INCLUDE)}",
            SUITE,
            str(root),
            mirror,
        ],
        env={"DEBIAN_FRONTEND": "noninteractive"},
    )
    # debootstrap may leave mounts behind if interrupted; it unmounts on success.
    if (root / "proc/self").exists():
        subprocess.run(["umount", "-l", str(root / "proc")], check=False)
    _configure_debian_root(root, mirror)

    kernels = sorted((root / "boot").glob("vmlinuz-*"))
    initrds = sorted((root / "boot").glob("initrd.img-*"))
    if len(kernels) != 1 or len(initrds) != 1:
        raise BuildError(f"expected one kernel and initrd in /boot: {kernels} {initrds}")
    kver = kernels[0].name.removeprefix("vmlinuz-")
    shutil.copyfile(kernels[0], out / "vmlinuz")
    shutil.copyfile(initrds[0], out / "initrd.img")

    packages = dict(
        line.split("\t", 1)
        for line in _run(
            [
                "dpkg-query",
                f"--admindir={root / 'var/lib/dpkg'}",
                "-W",
                "-f",
                "${Package}\t${Version}\n",
            ]
        ).splitlines()
        if "\t" in line
    )

    raw = out / "disk.raw"
    _log("mkfs.ext4 -d")
    _run(
        ["mkfs.ext4", "-q", "-F", "-L", "corral-root", "-d", str(root), str(raw), DEBIAN_DISK_SIZE]
    )
    shutil.rmtree(root)
    _log("qemu-img convert -c")
    _run(
        ["qemu-img", "convert", "-c", "-f", "raw", "-O", "qcow2", str(raw), str(out / "disk.qcow2")]
    )
    raw.unlink()
    _write_manifest(
        out,
        {
            "kind": "debian",
            "kernel_version": kver,
            "vmlinuz": "vmlinuz",
            "initrd": "initrd.img",
            "disk": "disk.qcow2",
            "disk_format": "qcow2",
            "disk_virtual_size": DEBIAN_DISK_SIZE,
            "cmdline": DEBIAN_CMDLINE,
            "mirror": mirror,
            "suite": SUITE,
            "pinned_candidates": dict(sorted(pins.items())),
            "packages": dict(sorted(packages.items())),
        },
    )


def build_debian(cache_dir: Path | None = None, *, force: bool = False) -> DebianGuest:
    """Build (or reuse from cache) the Debian guest and return its paths."""
    if os.geteuid() != 0:
        raise BuildError("building the Debian guest needs root (debootstrap, chroot)")
    cache = (cache_dir or default_cache_dir()).resolve()
    mirror, pins = _debian_key_inputs()
    key = _debian_key(mirror, pins)
    directory = _cached(
        cache, "debian", key, force, lambda out: _build_debian_into(out, mirror, pins)
    )
    manifest = _read_manifest(directory)
    return DebianGuest(
        directory=directory,
        kernel=directory / manifest["vmlinuz"],
        initrd=directory / manifest["initrd"],
        disk=directory / manifest["disk"],
        manifest=directory / "manifest.json",
        key=key,
        kernel_version=str(manifest["kernel_version"]),
    )


# --------------------------------------------------------------------------------------------
# CLI


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("guest", choices=["tiny", "debian", "all"])
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="default: $CORRAL_CACHE_DIR or ~/.cache/corral/guests",
    )
    parser.add_argument("--force", action="store_true", help="rebuild even if cached")
    args = parser.parse_args(argv)
    result: dict[str, dict[str, str]] = {}
    try:
        if args.guest in ("tiny", "all"):
            result["tiny"] = build_tiny(args.cache_dir, force=args.force).to_json()
        if args.guest in ("debian", "all"):
            result["debian"] = build_debian(args.cache_dir, force=args.force).to_json()
    except BuildError as exc:
        print(f"guests/build.py: error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
