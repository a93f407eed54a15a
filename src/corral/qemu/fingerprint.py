"""What this host can run: the qemu binary and version, whether KVM *really* works, machine
types, OVMF firmware, swtpm and the seed tools.

"KVM usable" is proven, never assumed from ``/dev/kvm``. Some hosts expose ``/dev/kvm`` from a
software nested hypervisor (the ``kvm_pvm`` module) on which qemu starts and QMP even reports
KVM enabled, yet ordinary guests die minutes later with "KVM internal error". So:

1. no ``/dev/kvm`` or no read/write access -> not usable;
2. ``/sys/module/kvm_pvm`` present -> not usable (the nested PVM hypervisor);
3. otherwise a boot probe: qemu runs a 16-byte real-mode program from the reset vector under
   ``-accel kvm`` that writes to ``isa-debug-exit``; only the expected exit code proves KVM
   executed guest code. The answer is cached per (kernel, qemu binary, /dev/kvm) because the
   probe costs a qemu start.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from corral.errors import HostError
from corral.qemu.argv import FirmwareFiles

__all__ = [
    "HostInfo",
    "KvmProbe",
    "find_emulator",
    "find_firmware",
    "firmware_for",
    "host_info",
    "host_tsc_khz",
    "probe_kvm",
    "qemu_version",
    "resolve_accelerator",
    "run_boot_probe",
    "supports_option",
]

FIRMWARE_DIRS = (
    "/usr/share/OVMF",
    "/usr/share/edk2/ovmf",
    "/usr/share/edk2/x64",
    "/usr/share/qemu",
)
# (code, vars template) candidates per firmware kind, first found wins.
_FIRMWARE_FILES: dict[str, list[tuple[str, str]]] = {
    "uefi": [("OVMF_CODE.fd", "OVMF_VARS.fd"), ("OVMF_CODE_4M.fd", "OVMF_VARS_4M.fd")],
    "uefi-4m": [("OVMF_CODE_4M.fd", "OVMF_VARS_4M.fd"), ("OVMF_CODE.4m.fd", "OVMF_VARS.4m.fd")],
    "secure": [
        ("OVMF_CODE.secboot.fd", "OVMF_VARS.ms.fd"),
        ("OVMF_CODE_4M.secboot.fd", "OVMF_VARS_4M.ms.fd"),
    ],
    "secure-4m": [
        ("OVMF_CODE_4M.secboot.fd", "OVMF_VARS_4M.ms.fd"),
        ("OVMF_CODE.secboot.4m.fd", "OVMF_VARS.secboot.4m.fd"),
    ],
}
_PROBE_EXIT = (0x42 << 1) | 1  # isa-debug-exit turns a written value v into exit code 2v+1


def find_emulator(name: str = "qemu-system-x86_64") -> str:
    found = name if os.path.isabs(name) and os.access(name, os.X_OK) else shutil.which(name)
    if not found:
        raise HostError(f"{name} not found: apt-get install qemu-system-x86 qemu-utils")
    return found


def qemu_version(emulator: str) -> tuple[int, int, int]:
    out = subprocess.run(
        [emulator, "--version"], capture_output=True, text=True, timeout=20, check=False
    ).stdout
    match = re.search(r"version (\d+)\.(\d+)(?:\.(\d+))?", out)
    if not match:
        raise HostError(f"cannot read the version of {emulator}: {out.strip()[:200]!r}")
    major, minor, micro = match.groups()
    return int(major), int(minor), int(micro or 0)


@functools.lru_cache(maxsize=8)
def _options(emulator: str, mtime: float) -> frozenset[str]:
    out = subprocess.run(
        [emulator, "-help"], capture_output=True, text=True, timeout=20, check=False
    ).stdout
    return frozenset(m.group(1) for m in re.finditer(r"^(-[a-z][a-z0-9_-]*)", out, re.M))


def supports_option(emulator: str, option: str) -> bool:
    """Whether this qemu build has ``option`` (``-sandbox`` needs libseccomp), from ``-help``;
    cached per binary and modification time."""
    try:
        mtime = os.stat(emulator).st_mtime
    except OSError:
        return False
    return option in _options(emulator, mtime)


def _help_list(emulator: str, option: str) -> list[str]:
    out = subprocess.run(
        [emulator, option, "help"], capture_output=True, text=True, timeout=20, check=False
    ).stdout
    names: list[str] = []
    for line in out.splitlines()[1:]:
        word = line.split(maxsplit=1)[0] if line.strip() else ""
        if word and not word.endswith(":"):
            names.append(word)
    return names


def find_firmware(kind: str, dirs: tuple[str, ...] = FIRMWARE_DIRS) -> tuple[str, str] | None:
    """The (code, vars template) files for ``uefi``, ``uefi-4m``, ``secure``, ``secure-4m``."""
    for code, vars_template in _FIRMWARE_FILES.get(kind, []):
        for directory in dirs:
            c, v = Path(directory) / code, Path(directory) / vars_template
            if c.is_file() and v.is_file():
                return str(c), str(v)
    return None


def firmware_for(kind: str, vars_path: str) -> FirmwareFiles | None:
    """Firmware files for rendering: the host's code file and the VM's own vars file."""
    found = find_firmware(kind)
    return FirmwareFiles(code=found[0], vars=vars_path) if found else None


def host_tsc_khz() -> int | None:
    """The host TSC rate in kHz (for ``tsc_early_khz`` on microvm guests under TCG)."""
    try:
        return int(Path("/sys/devices/system/cpu/cpu0/tsc_freq_khz").read_text().strip())
    except (OSError, ValueError):
        pass
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    match = re.search(r"^cpu MHz\s*:\s*([0-9.]+)", text, re.MULTILINE)
    return int(float(match.group(1)) * 1000) if match else None


@dataclass(frozen=True)
class KvmProbe:
    usable: bool
    reason: str
    cached: bool = False


def _probe_cache_key(emulator: str) -> str:
    try:
        st = os.stat(emulator)
        dev = os.stat("/dev/kvm")
        kvm_id = f"{dev.st_rdev}"
    except OSError:
        return ""
    return f"{os.uname().release}|{emulator}|{st.st_mtime_ns}|{kvm_id}"


def _cache_file() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "corral" / "kvm-probe.json"


def probe_kvm(
    emulator: str | None = None, use_cache: bool = True, timeout: float = 15.0
) -> KvmProbe:
    """Decide whether guests can really run under KVM here (see the module docstring)."""
    if not os.path.exists("/dev/kvm"):
        return KvmProbe(False, "/dev/kvm does not exist")
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return KvmProbe(False, "/dev/kvm is not readable and writable by this user")
    if os.path.exists("/sys/module/kvm_pvm"):
        return KvmProbe(
            False, "/dev/kvm comes from kvm_pvm, a software nested hypervisor: guests crash on it"
        )
    emulator = emulator or find_emulator()
    key = _probe_cache_key(emulator)
    cache = _cache_file()
    if use_cache and key:
        try:
            data = json.loads(cache.read_text())
            if isinstance(data, dict) and data.get("key") == key:
                return KvmProbe(bool(data["usable"]), str(data["reason"]), cached=True)
        except (OSError, ValueError, KeyError):
            pass
    result = run_boot_probe(emulator, "kvm", timeout)
    if key:
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_suffix(".tmp")
            tmp.write_text(json.dumps({"key": key, **asdict(result)}))
            tmp.replace(cache)
        except OSError:
            pass
    return result


def run_boot_probe(emulator: str, accel: str, timeout: float = 15.0) -> KvmProbe:
    """Run 16 bytes of guest code at the reset vector under ``accel``; see the docstring."""
    code = bytes([0xB0, 0x42, 0xE6, 0xF4, 0xF4])  # mov al,0x42; out 0xf4,al; hlt
    bios = bytearray(b"\xf4" * 65536)
    bios[0xFFF0 : 0xFFF0 + len(code)] = code
    with tempfile.TemporaryDirectory(prefix="corral-probe-") as tmp:
        image = Path(tmp) / "probe.bin"
        image.write_bytes(bytes(bios))
        argv = [
            emulator, "-machine", "pc", "-accel", accel, "-nodefaults", "-no-user-config",
            "-display", "none", "-bios", str(image), "-m", "16",
            "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04",
        ]  # fmt: skip
        try:
            proc = subprocess.run(
                argv, capture_output=True, text=True, timeout=timeout, check=False
            )
        except subprocess.TimeoutExpired:
            return KvmProbe(False, f"the {accel} boot probe did not finish in {timeout:.0f} s")
    if proc.returncode == _PROBE_EXIT:
        return KvmProbe(True, f"the {accel} boot probe ran guest code")
    err = proc.stderr.strip().splitlines()
    last = err[-1] if err else "no output"
    return KvmProbe(False, f"the {accel} boot probe failed (exit {proc.returncode}): {last}")


def resolve_accelerator(requested: str, emulator: str | None = None) -> str:
    """``auto`` -> ``kvm`` if the probe proves it, else ``tcg``; ``kvm`` is refused if it is
    not usable (the reason says why); ``tcg`` is always possible."""
    if requested == "tcg":
        return "tcg"
    probe = probe_kvm(emulator)
    if requested == "kvm" and not probe.usable:
        raise HostError(f"accelerator kvm was asked for but KVM is not usable: {probe.reason}")
    return "kvm" if probe.usable else "tcg"


@dataclass(frozen=True)
class HostInfo:
    emulator: str
    qemu_version: str
    kvm_usable: bool
    kvm_reason: str
    machines: list[str]
    accelerators: list[str]
    firmware: dict[str, dict[str, str] | None]
    swtpm: str | None
    tools: dict[str, str | None] = field(default_factory=dict)
    tsc_khz: int | None = None

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def host_info(emulator_name: str = "qemu-system-x86_64") -> HostInfo:
    emulator = find_emulator(emulator_name)
    version = ".".join(str(p) for p in qemu_version(emulator))
    probe = probe_kvm(emulator)
    firmware: dict[str, dict[str, str] | None] = {}
    for kind in _FIRMWARE_FILES:
        found = find_firmware(kind)
        firmware[kind] = {"code": found[0], "vars": found[1]} if found else None
    tools = {
        name: shutil.which(name)
        for name in ("qemu-img", "mkfs.vfat", "mcopy", "swtpm_setup", "qemu-bridge-helper")
    }
    if tools["qemu-bridge-helper"] is None and os.path.exists("/usr/lib/qemu/qemu-bridge-helper"):
        tools["qemu-bridge-helper"] = "/usr/lib/qemu/qemu-bridge-helper"
    return HostInfo(
        emulator=emulator,
        qemu_version=version,
        kvm_usable=probe.usable,
        kvm_reason=probe.reason,
        machines=_help_list(emulator, "-machine"),
        accelerators=_help_list(emulator, "-accel"),
        firmware=firmware,
        swtpm=shutil.which("swtpm"),
        tools=tools,
        tsc_khz=host_tsc_khz(),
    )
