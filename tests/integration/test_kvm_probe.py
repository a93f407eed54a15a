"""The host fingerprint against the real host: the boot probe really runs guest code, the KVM
verdict matches what the host can do, and ``corral host info --json`` reports real facts.

Written to hold on any host: where /dev/kvm is missing, inaccessible or comes from the nested
``kvm_pvm`` hypervisor, KVM must be reported unusable (and ``--accel kvm`` refused); elsewhere
the verdict must agree with a fresh boot probe under KVM.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest

from corral.qemu.fingerprint import find_emulator, probe_kvm, run_boot_probe
from tests.integration.harness import (
    QEMU_TOOLS,
    VmDirs,
    option_after,
    require_tools,
    run_corral,
    run_render,
    tiny_document,
)

pytestmark = [pytest.mark.integration]


def _kvm_excluded_by_host() -> str | None:
    """Why this host cannot offer KVM without even trying, or None."""
    if not os.path.exists("/dev/kvm"):
        return "no /dev/kvm"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "/dev/kvm not accessible"
    if os.path.exists("/sys/module/kvm_pvm"):
        return "kvm_pvm"
    return None


def _emulator() -> str:
    require_tools(QEMU_TOOLS)
    return find_emulator()


@pytest.mark.timeout(60)
def test_tcg_boot_probe_runs_guest_code() -> None:
    probe = run_boot_probe(_emulator(), "tcg", timeout=30)
    assert probe.usable, probe.reason
    assert "ran guest code" in probe.reason


@pytest.mark.timeout(60)
def test_boot_probe_fails_for_an_unknown_accelerator() -> None:
    """The probe's success means something: a bogus accelerator does not pass it."""
    probe = run_boot_probe(_emulator(), "nosuchaccel", timeout=30)
    assert not probe.usable
    assert "failed" in probe.reason


@pytest.mark.timeout(120)
def test_kvm_verdict_matches_the_host(tiny_guest: Any) -> None:
    emulator = _emulator()
    verdict = probe_kvm(emulator, use_cache=False, timeout=30)
    excluded = _kvm_excluded_by_host()
    dirs = VmDirs.create()
    try:
        doc = tiny_document(tiny_guest, name="accel")
        if excluded is not None:
            assert not verdict.usable, verdict
            if excluded == "kvm_pvm":
                assert "kvm_pvm" in verdict.reason, verdict.reason
            refused = run_render(doc, dirs, accel="kvm")
            assert refused.returncode == 1, refused
            assert "KVM is not usable" in refused.stderr, refused.stderr
            assert refused.stdout == ""
        else:
            fresh = run_boot_probe(emulator, "kvm", timeout=30)
            assert verdict.usable == fresh.usable, (verdict, fresh)
        auto = run_render(doc, dirs, accel="auto")
        assert auto.returncode == 0, auto.stderr
        accel = option_after(json.loads(auto.stdout), "-accel")[0].split(",")[0]
        assert accel == ("kvm" if verdict.usable else "tcg")
    finally:
        dirs.remove()


@pytest.mark.timeout(120)
def test_host_info_json_reports_qemu_version_and_ovmf() -> None:
    emulator = _emulator()
    proc = run_corral(["host", "info", "--json"])
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)

    assert info["emulator"] == emulator
    version = info["qemu_version"]
    assert re.fullmatch(r"\d+\.\d+\.\d+", version), version
    parsed = tuple(int(p) for p in version.split("."))
    banner = subprocess.run(
        [emulator, "--version"], capture_output=True, text=True, timeout=30, check=True
    ).stdout
    m = re.search(r"version (\d+)\.(\d+)(?:\.(\d+))?", banner)
    assert m, banner
    assert parsed == (int(m[1]), int(m[2]), int(m[3] or 0)), (version, banner)
    assert parsed >= (6, 2, 0), f"qemu {version} is older than corral supports"

    uefi = info["firmware"]["uefi"]
    assert uefi is not None, "no OVMF found: apt-get install ovmf"
    for key in ("code", "vars"):
        assert Path(uefi[key]).is_file(), uefi
        assert Path(uefi[key]).stat().st_size >= 128 * 1024, uefi
    assert "tcg" in info["accelerators"]
    assert {"q35", "pc", "microvm"} <= set(info["machines"])
    assert info["kvm_usable"] is (probe_kvm(emulator).usable)
    if _kvm_excluded_by_host() is not None:
        assert info["kvm_usable"] is False, info["kvm_reason"]
    assert info["swtpm"] is not None, "swtpm not found: apt-get install swtpm swtpm-tools"
    assert info["policy"]["argsAllowlist"] is not None
