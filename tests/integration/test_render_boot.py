"""The argv ``corral render`` prints boots real guests.

Each test writes a VM document, runs ``corral render --json --accel tcg --no-pause`` as a
separate process, starts qemu with exactly that argv and talks to the guest only over the
channels the template configured: the serial console log file, QMP and the guest agent.
KVM is never used (``--accel tcg``), so this passes on hosts whose /dev/kvm is absent or broken.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.integration.harness import (
    POWERDOWN_MARKER,
    QEMU_TOOLS,
    SWTPM_TOOLS,
    RenderedVm,
    VmDirs,
    option_after,
    require_ovmf,
    require_tools,
    run_render,
    tiny_document,
    tk,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TINY_BOOT_TIMEOUT = 90.0
UEFI_BOOT_TIMEOUT = 120.0
DEBIAN_BOOT_TIMEOUT = 180.0
POWERDOWN_TIMEOUT = 30.0

Render = Callable[..., list[str]]


def _standalone(argv: list[str]) -> None:
    """--no-pause: the guest runs at once and qemu exits when the guest powers off."""
    assert "-S" not in argv and "-no-shutdown" not in argv, argv
    assert option_after(argv, "-accel")[0].split(",")[0] == "tcg", argv


def _report(label: str, boot_s: float, down_s: float) -> None:
    print(f"\n{label}: start->marker {boot_s:.1f}s, powerdown->exit {down_s:.1f}s")


@pytest.mark.timeout(240)
def test_tiny_q35_bios_boots_agent_answers_powerdown_exits(
    tiny_guest: Any, vm_dirs: VmDirs, render_vm: Render
) -> None:
    argv = render_vm(tiny_document(tiny_guest, machine="q35", firmware="bios"))
    _standalone(argv)
    assert option_after(argv, "-kernel") == [str(tiny_guest.kernel)]
    assert "pflash0=fw-code" not in " ".join(argv)  # BIOS: no OVMF
    with RenderedVm(argv, vm_dirs) as vm:
        boot_s = vm.wait_marker(TINY_BOOT_TIMEOUT)
        agent = vm.agent()
        assert agent.execute("guest-ping") == {}
        assert vm.qmp.execute("query-status")["status"] == "running"
        assert vm.dirs.runtime.joinpath("qemu.pid").read_text().strip() == str(vm.vm.proc.pid)
        down_s = vm.powerdown(POWERDOWN_TIMEOUT)
        assert POWERDOWN_MARKER in vm.console()
    _report("tiny q35/bios", boot_s, down_s)


@pytest.mark.timeout(240)
def test_tiny_microvm_boots_and_powerdown_exits(
    tiny_guest: Any, vm_dirs: VmDirs, render_vm: Render
) -> None:
    argv = render_vm(tiny_document(tiny_guest, machine="microvm", firmware="bios"))
    _standalone(argv)
    assert option_after(argv, "-machine")[0].startswith("microvm,")
    assert not any("-pci" in a for a in argv), "microvm has no PCI bus"
    with RenderedVm(argv, vm_dirs) as vm:
        boot_s = vm.wait_marker(TINY_BOOT_TIMEOUT)
        assert vm.agent().execute("guest-ping") == {}
        down_s = vm.powerdown(POWERDOWN_TIMEOUT)
        assert POWERDOWN_MARKER in vm.console()
    _report("tiny microvm", boot_s, down_s)


@pytest.mark.timeout(300)
def test_tiny_q35_uefi_with_tpm(tiny_guest: Any, vm_dirs: VmDirs, render_vm: Render) -> None:
    """OVMF (the VM's own vars copy in the data dir) + swtpm on the socket the argv names."""
    require_tools(SWTPM_TOOLS)
    code, vars_template = require_ovmf("uefi")
    argv = render_vm(tiny_document(tiny_guest, machine="q35", firmware="uefi", useTpm=True))
    _standalone(argv)
    joined = "\n".join(argv)
    assert f"filename={code}," in joined and f"filename={vm_dirs.efivars}" in joined
    assert f"path={vm_dirs.swtpm_socket}" in joined
    # What the runner does before qemu starts: the VM's own vars file, and swtpm.
    shutil.copyfile(vars_template, vm_dirs.efivars)
    with (
        tk.Swtpm(vm_dirs.data / "tpm", vm_dirs.swtpm_socket, vm_dirs.root / "swtpm.log") as tpm,
        RenderedVm(argv, vm_dirs) as vm,
    ):
        boot_s = vm.wait_marker(UEFI_BOOT_TIMEOUT)
        assert "CORRAL-FACT tpm=present" in vm.console()
        rc, out, err = vm.agent(timeout=90).exec(
            "/bin/sh", ["-c", "test -c /dev/tpm0 && cat /sys/class/tpm/tpm0/tpm_version_major"]
        )
        assert rc == 0 and out.strip() == "2", (rc, out, err)
        rc, out, _ = vm.agent().exec("/bin/sh", ["-c", "ls /sys/firmware/efi"])
        assert rc == 0, "the guest did not boot through UEFI"
        down_s = vm.powerdown(POWERDOWN_TIMEOUT)
        assert tpm.proc.wait(timeout=10) is not None  # --terminate: swtpm follows qemu
    _report("tiny q35/uefi+tpm", boot_s, down_s)


@pytest.mark.timeout(240)
def test_comma_and_space_paths_boot(tiny_guest: Any) -> None:
    """Kernel, initrd, a raw disk, data and runtime dirs all under paths containing ', ':
    qemu sees each one as one file (``,,`` escaping where qemu parses options)."""
    dirs = VmDirs.create(data_name="da, ta", runtime_name="r, un")
    try:
        boot = dirs.root / "boot, files"
        boot.mkdir()
        kernel = Path(shutil.copyfile(tiny_guest.kernel, boot / "vmlinuz, x"))
        initrd = Path(shutil.copyfile(tiny_guest.initrd, boot / "initrd, x.img"))
        disk = dirs.data / "disk, 1.raw"
        signature = b"corral,comma disk"
        with disk.open("wb") as fh:
            fh.write(signature)
            fh.truncate(1024**2)
        doc = tiny_document(tiny_guest, name="commas")
        doc["spec"]["vm"].update(
            kernel=str(kernel),
            initrd=str(initrd),
            disks=[{"name": "data", "file": {"path": str(disk), "format": "raw"}}],
        )
        result = run_render(doc, dirs)
        assert result.returncode == 0, result.stderr
        argv = json.loads(result.stdout)
        _standalone(argv)
        assert option_after(argv, "-kernel") == [str(kernel)]
        assert f"filename={str(disk).replace(',', ',,')}," in "\n".join(argv)
        with RenderedVm(argv, dirs) as vm:
            boot_s = vm.wait_marker(TINY_BOOT_TIMEOUT)
            assert dirs.console_log.is_file() and dirs.qmp_socket.is_socket()
            rc, out, err = vm.agent().exec("/bin/sh", ["-c", f"head -c {len(signature)} /dev/vda"])
            assert rc == 0 and out == signature.decode(), (rc, out, err)
            down_s = vm.powerdown(POWERDOWN_TIMEOUT)
        _report("tiny q35/bios, comma paths", boot_s, down_s)
    finally:
        dirs.remove()


@pytest.mark.timeout(420)
def test_debian_q35_bios_overlay_boots_and_powers_down(
    debian_guest: Any, vm_dirs: VmDirs, render_vm: Render
) -> None:
    require_tools(QEMU_TOOLS)
    overlay = tk.make_overlay(debian_guest.disk, vm_dirs.data / "root.qcow2")
    base_mtime = os.stat(debian_guest.disk).st_mtime_ns
    doc: dict[str, Any] = {
        "metadata": {"name": "debian"},
        "spec": {
            "vm": {
                "machine": "q35",
                "firmware": "bios",
                "maximumCpus": 2,
                "maximumRam": "1Gi",
                "kernel": str(debian_guest.kernel),
                "initrd": str(debian_guest.initrd),
                "cmdline": debian_guest.cmdline,
                "disks": [{"name": "root", "file": {"path": str(overlay)}}],
            }
        },
    }
    argv = render_vm(doc)
    _standalone(argv)
    with RenderedVm(argv, vm_dirs) as vm:
        boot_s = vm.wait_marker(DEBIAN_BOOT_TIMEOUT)
        agent = vm.agent(timeout=60)
        assert agent.execute("guest-ping") == {}
        rc, out, err = agent.exec("/bin/findmnt", ["-n", "-o", "SOURCE", "/"])
        assert rc == 0 and out.strip() == "/dev/vda", (rc, out, err)
        down_s = vm.powerdown(60)
        assert re.search(r"reboot: Power down", vm.console()), vm.console()[-2000:]
    assert os.stat(debian_guest.disk).st_mtime_ns == base_mtime, "the base image was written"
    _report("debian q35/bios", boot_s, down_s)


@pytest.mark.timeout(120)
def test_extra_args_refused_by_policy_start_nothing(tiny_guest: Any, vm_dirs: VmDirs) -> None:
    doc = tiny_document(tiny_guest, name="extra", extraArgs=["-no-reboot"])
    before = _qemu_processes_using(vm_dirs.root)
    result = run_render(doc, vm_dirs, policy={"emulators": ["qemu-system-x86_64"]})
    assert result.returncode == 1, (result.returncode, result.stdout, result.stderr)
    assert result.stdout == ""
    assert result.stderr.startswith("error: "), result.stderr
    assert "spec.vm.extraArgs[0]" in result.stderr and "'-no-reboot'" in result.stderr
    assert "argsAllowlist" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    time.sleep(0.5)
    assert list(vm_dirs.runtime.iterdir()) == [], "render wrote runtime files"
    assert _qemu_processes_using(vm_dirs.root) == before == []
    # The same document renders once the host allows the option.
    allowed = run_render(doc, vm_dirs, policy={"argsAllowlist": ["-no-reboot"]})
    assert allowed.returncode == 0, allowed.stderr
    assert '"-no-reboot"' in allowed.stdout
    # an option corral does not know stays refused even when a host lists it
    unknown = tiny_document(tiny_guest, name="extra", extraArgs=["-foo"])
    refused = run_render(unknown, vm_dirs, policy={"argsAllowlist": ["-foo"]})
    assert refused.returncode == 1 and "refused even when allowlisted" in refused.stderr


def _qemu_processes_using(path: Path) -> list[int]:
    """Pids of processes whose command line mentions ``path``."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = proc.joinpath("cmdline").read_bytes()
        except OSError:
            continue
        if b"qemu" in cmdline and str(path).encode() in cmdline:
            pids.append(int(proc.name))
    return pids
