"""Host fingerprint logic without touching the host: OVMF search in fake dirs, version parsing
from sample outputs, the KVM verdict from faked probe facts, and accelerator resolution.

No process is started: ``subprocess.run`` and the host's ``/dev/kvm`` facts are faked.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from corral.errors import HostError
from corral.qemu import fingerprint
from corral.qemu.argv import FirmwareFiles
from corral.qemu.fingerprint import (
    KvmProbe,
    find_firmware,
    firmware_for,
    probe_kvm,
    qemu_version,
    resolve_accelerator,
    run_boot_probe,
)

# --- OVMF firmware search ------------------------------------------------------------------


def _touch(directory: Path, *names: str) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for name in names:
        (directory / name).write_bytes(b"\0")


def test_find_firmware_debian_layout(tmp_path: Path) -> None:
    ovmf = tmp_path / "OVMF"
    _touch(
        ovmf,
        "OVMF_CODE.fd",
        "OVMF_VARS.fd",
        "OVMF_CODE_4M.fd",
        "OVMF_VARS_4M.fd",
        "OVMF_CODE.secboot.fd",
        "OVMF_VARS.ms.fd",
        "OVMF_CODE_4M.secboot.fd",
        "OVMF_VARS_4M.ms.fd",
    )
    dirs = (str(ovmf),)
    assert find_firmware("uefi", dirs) == (str(ovmf / "OVMF_CODE.fd"), str(ovmf / "OVMF_VARS.fd"))
    assert find_firmware("uefi-4m", dirs) == (
        str(ovmf / "OVMF_CODE_4M.fd"),
        str(ovmf / "OVMF_VARS_4M.fd"),
    )
    assert find_firmware("secure", dirs) == (
        str(ovmf / "OVMF_CODE.secboot.fd"),
        str(ovmf / "OVMF_VARS.ms.fd"),
    )
    assert find_firmware("secure-4m", dirs) == (
        str(ovmf / "OVMF_CODE_4M.secboot.fd"),
        str(ovmf / "OVMF_VARS_4M.ms.fd"),
    )


def test_find_firmware_uefi_falls_back_to_the_4m_build(tmp_path: Path) -> None:
    """Debian bookworm ships only the 4M build: ``uefi`` must still find firmware."""
    _touch(tmp_path, "OVMF_CODE_4M.fd", "OVMF_VARS_4M.fd")
    assert find_firmware("uefi", (str(tmp_path),)) == (
        str(tmp_path / "OVMF_CODE_4M.fd"),
        str(tmp_path / "OVMF_VARS_4M.fd"),
    )


def test_find_firmware_fedora_style_names(tmp_path: Path) -> None:
    edk2 = tmp_path / "edk2" / "ovmf"
    _touch(edk2, "OVMF_CODE.secboot.4m.fd", "OVMF_VARS.secboot.4m.fd", "OVMF_CODE.4m.fd")
    _touch(edk2, "OVMF_VARS.4m.fd")
    dirs = (str(tmp_path / "missing"), str(edk2))
    assert find_firmware("secure-4m", dirs) == (
        str(edk2 / "OVMF_CODE.secboot.4m.fd"),
        str(edk2 / "OVMF_VARS.secboot.4m.fd"),
    )
    assert find_firmware("uefi-4m", dirs) == (
        str(edk2 / "OVMF_CODE.4m.fd"),
        str(edk2 / "OVMF_VARS.4m.fd"),
    )


def test_find_firmware_needs_both_code_and_vars(tmp_path: Path) -> None:
    _touch(tmp_path, "OVMF_CODE.fd", "OVMF_VARS_4M.fd", "OVMF_CODE.secboot.fd")
    dirs = (str(tmp_path),)
    assert find_firmware("uefi", dirs) is None
    assert find_firmware("secure", dirs) is None


def test_find_firmware_ignores_directories_named_like_files(tmp_path: Path) -> None:
    (tmp_path / "OVMF_CODE.fd").mkdir()
    (tmp_path / "OVMF_VARS.fd").mkdir()
    assert find_firmware("uefi", (str(tmp_path),)) is None


def test_find_firmware_first_directory_wins_for_the_same_files(tmp_path: Path) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    _touch(one, "OVMF_CODE.fd", "OVMF_VARS.fd")
    _touch(two, "OVMF_CODE.fd", "OVMF_VARS.fd")
    assert find_firmware("uefi", (str(two), str(one))) == (
        str(two / "OVMF_CODE.fd"),
        str(two / "OVMF_VARS.fd"),
    )
    assert find_firmware("uefi", (str(one), str(two))) == (
        str(one / "OVMF_CODE.fd"),
        str(one / "OVMF_VARS.fd"),
    )


def test_find_firmware_preferred_files_win_over_directory_order(tmp_path: Path) -> None:
    """The file pair is the first criterion: the 2M build in a later dir beats the 4M build
    in an earlier one for ``uefi``."""
    one, two = tmp_path / "one", tmp_path / "two"
    _touch(one, "OVMF_CODE_4M.fd", "OVMF_VARS_4M.fd")
    _touch(two, "OVMF_CODE.fd", "OVMF_VARS.fd")
    assert find_firmware("uefi", (str(one), str(two))) == (
        str(two / "OVMF_CODE.fd"),
        str(two / "OVMF_VARS.fd"),
    )


@pytest.mark.parametrize("kind", ["bios", "", "UEFI", "secure-2m"])
def test_find_firmware_unknown_kind(tmp_path: Path, kind: str) -> None:
    _touch(tmp_path, "OVMF_CODE.fd", "OVMF_VARS.fd")
    assert find_firmware(kind, (str(tmp_path),)) is None


def test_find_firmware_empty_search_path() -> None:
    assert find_firmware("uefi", ()) is None


def test_firmware_for_pairs_host_code_with_the_vms_vars(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[str] = []

    def fake_find(kind: str, dirs: tuple[str, ...] = ()) -> tuple[str, str] | None:
        seen.append(kind)
        return ("/fw/CODE.fd", "/fw/VARS-template.fd") if kind == "uefi" else None

    monkeypatch.setattr(fingerprint, "find_firmware", fake_find)
    assert firmware_for("uefi", "/data/vm1/efivars.fd") == FirmwareFiles(
        code="/fw/CODE.fd", vars="/data/vm1/efivars.fd"
    )
    assert firmware_for("secure", "/data/vm1/efivars.fd") is None
    assert seen == ["uefi", "secure"]


# --- qemu version --------------------------------------------------------------------------


def _fake_run(
    monkeypatch: pytest.MonkeyPatch,
    handler: Callable[[list[str]], subprocess.CompletedProcess[str]],
) -> list[list[str]]:
    calls: list[list[str]] = []

    def run(argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        calls.append(list(argv))
        assert kwargs.get("timeout"), "every host command needs a timeout"
        return handler(list(argv))

    monkeypatch.setattr(fingerprint.subprocess, "run", run)
    return calls


@pytest.mark.parametrize(
    ("output", "version"),
    [
        (
            "QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)\n"
            "Copyright (c) 2003-2022 Fabrice Bellard and the QEMU Project developers\n",
            (7, 2, 22),
        ),
        (
            "QEMU emulator version 6.2.0 (Debian 1:6.2+dfsg-2ubuntu6.15)\n"
            "Copyright (c) 2003-2021 Fabrice Bellard and the QEMU Project developers\n",
            (6, 2, 0),
        ),
        ("QEMU emulator version 8.2.2 (qemu-8.2.2-1.fc40)\nCopyright ...\n", (8, 2, 2)),
        ("QEMU emulator version 9.1.50 (v9.1.0-1234-gabcdef)\n", (9, 1, 50)),
        ("QEMU emulator version 10.0.0\n", (10, 0, 0)),
        ("QEMU emulator version 4.2\n", (4, 2, 0)),
    ],
)
def test_qemu_version_from_sample_output(
    monkeypatch: pytest.MonkeyPatch, output: str, version: tuple[int, int, int]
) -> None:
    calls = _fake_run(monkeypatch, lambda argv: subprocess.CompletedProcess(argv, 0, output, ""))
    assert qemu_version("/usr/bin/qemu-system-x86_64") == version
    assert calls == [["/usr/bin/qemu-system-x86_64", "--version"]]


@pytest.mark.parametrize("output", ["", "qemu-system-x86_64: command not found\n", "version x.y"])
def test_qemu_version_unreadable(monkeypatch: pytest.MonkeyPatch, output: str) -> None:
    _fake_run(monkeypatch, lambda argv: subprocess.CompletedProcess(argv, 1, output, ""))
    with pytest.raises(HostError, match="cannot read the version of /opt/qemu"):
        qemu_version("/opt/qemu")


# --- the boot probe ------------------------------------------------------------------------


def test_boot_probe_success_runs_the_reset_vector_program(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen: dict[str, Any] = {}

    def handler(argv: list[str]) -> subprocess.CompletedProcess[str]:
        bios = Path(argv[argv.index("-bios") + 1])
        image = bios.read_bytes()
        seen["argv"] = argv
        seen["size"] = len(image)
        seen["reset"] = image[0xFFF0 : 0xFFF0 + 5]
        return subprocess.CompletedProcess(argv, (0x42 << 1) | 1, "", "")

    _fake_run(monkeypatch, handler)
    probe = run_boot_probe("/usr/bin/qemu-system-x86_64", "kvm", timeout=5)
    assert probe == KvmProbe(True, "the kvm boot probe ran guest code")
    argv = seen["argv"]
    assert argv[0] == "/usr/bin/qemu-system-x86_64"
    assert argv[argv.index("-accel") + 1] == "kvm"
    assert "isa-debug-exit,iobase=0xf4,iosize=0x04" in argv
    assert "-nodefaults" in argv
    assert seen["size"] == 65536
    assert seen["reset"] == bytes([0xB0, 0x42, 0xE6, 0xF4, 0xF4])


def test_boot_probe_removes_its_temporary_image(monkeypatch: pytest.MonkeyPatch) -> None:
    images: list[Path] = []

    def handler(argv: list[str]) -> subprocess.CompletedProcess[str]:
        images.append(Path(argv[argv.index("-bios") + 1]))
        return subprocess.CompletedProcess(argv, 133, "", "")

    _fake_run(monkeypatch, handler)
    run_boot_probe("qemu", "tcg")
    assert images and not images[0].exists() and not images[0].parent.exists()


@pytest.mark.parametrize(
    ("code", "stderr", "reason"),
    [
        (
            1,
            "qemu: warning: x\nKVM internal error. Suberror: 1\n",
            "the kvm boot probe failed (exit 1): KVM internal error. Suberror: 1",
        ),
        (0, "", "the kvm boot probe failed (exit 0): no output"),
        (-9, "", "the kvm boot probe failed (exit -9): no output"),
        (
            1,
            "qemu-system-x86_64: -accel kvm: Could not access KVM kernel module\n",
            "the kvm boot probe failed (exit 1): qemu-system-x86_64: -accel kvm: Could not "
            "access KVM kernel module",
        ),
    ],
)
def test_boot_probe_failure_says_why(
    monkeypatch: pytest.MonkeyPatch, code: int, stderr: str, reason: str
) -> None:
    _fake_run(monkeypatch, lambda argv: subprocess.CompletedProcess(argv, code, "", stderr))
    assert run_boot_probe("qemu", "kvm") == KvmProbe(False, reason)


def test_boot_probe_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    def handler(argv: list[str]) -> subprocess.CompletedProcess[str]:
        raise subprocess.TimeoutExpired(argv, 3)

    _fake_run(monkeypatch, handler)
    assert run_boot_probe("qemu", "kvm", timeout=3) == KvmProbe(
        False, "the kvm boot probe did not finish in 3 s"
    )


# --- the KVM verdict -----------------------------------------------------------------------


class _Host:
    """Fakes for the three host facts probe_kvm looks at; everything else is the real host."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.dev_kvm = True
        self.rw = True
        self.kvm_pvm = False
        self.probes: list[tuple[str, str]] = []
        self.probe_result = KvmProbe(True, "the kvm boot probe ran guest code")
        real_exists = os.path.exists
        real_access = os.access

        def exists(path: Any) -> bool:
            if path == "/dev/kvm":
                return self.dev_kvm
            if path == "/sys/module/kvm_pvm":
                return self.kvm_pvm
            return real_exists(path)

        def access(path: Any, mode: int, **kwargs: Any) -> bool:
            if path == "/dev/kvm":
                return self.rw
            return real_access(path, mode, **kwargs)

        def boot_probe(emulator: str, accel: str, timeout: float = 15.0) -> KvmProbe:
            self.probes.append((emulator, accel))
            return self.probe_result

        monkeypatch.setattr(fingerprint.os.path, "exists", exists)
        monkeypatch.setattr(fingerprint.os, "access", access)
        monkeypatch.setattr(fingerprint, "run_boot_probe", boot_probe)


@pytest.fixture
def host(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[_Host]:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(fingerprint, "_probe_cache_key", lambda emulator: f"key|{emulator}")
    yield _Host(monkeypatch)


def _cache(tmp_path: Path) -> Path:
    return tmp_path / "cache" / "corral" / "kvm-probe.json"


def test_no_dev_kvm(host: _Host) -> None:
    host.dev_kvm = False
    assert probe_kvm("/usr/bin/qemu") == KvmProbe(False, "/dev/kvm does not exist")
    assert host.probes == []


def test_dev_kvm_without_access(host: _Host) -> None:
    host.rw = False
    assert probe_kvm("/usr/bin/qemu") == KvmProbe(
        False, "/dev/kvm is not readable and writable by this user"
    )
    assert host.probes == []


def test_kvm_pvm_is_never_usable(host: _Host) -> None:
    """The nested PVM hypervisor passes every cheap check and crashes guests minutes later:
    its presence alone decides, before any probe or cache."""
    host.kvm_pvm = True
    probe = probe_kvm("/usr/bin/qemu")
    assert probe.usable is False
    assert "kvm_pvm" in probe.reason and "software nested hypervisor" in probe.reason
    assert host.probes == []


def test_kvm_pvm_wins_over_a_cached_yes(host: _Host, tmp_path: Path) -> None:
    cache = _cache(tmp_path)
    cache.parent.mkdir(parents=True)
    cache.write_text(json.dumps({"key": "key|/usr/bin/qemu", "usable": True, "reason": "ok"}))
    host.kvm_pvm = True
    assert probe_kvm("/usr/bin/qemu").usable is False


def test_probe_runs_once_then_the_verdict_is_cached(host: _Host, tmp_path: Path) -> None:
    first = probe_kvm("/usr/bin/qemu")
    assert first == KvmProbe(True, "the kvm boot probe ran guest code", cached=False)
    assert host.probes == [("/usr/bin/qemu", "kvm")]
    assert json.loads(_cache(tmp_path).read_text()) == {
        "key": "key|/usr/bin/qemu",
        "usable": True,
        "reason": "the kvm boot probe ran guest code",
        "cached": False,
    }
    second = probe_kvm("/usr/bin/qemu")
    assert second == KvmProbe(True, "the kvm boot probe ran guest code", cached=True)
    assert len(host.probes) == 1


def test_a_failed_probe_is_cached_too(host: _Host) -> None:
    host.probe_result = KvmProbe(False, "the kvm boot probe failed (exit 1): KVM internal error")
    assert probe_kvm("/usr/bin/qemu").usable is False
    again = probe_kvm("/usr/bin/qemu")
    assert again.cached and not again.usable and "KVM internal error" in again.reason
    assert len(host.probes) == 1


def test_cache_of_another_key_is_ignored(host: _Host, tmp_path: Path) -> None:
    cache = _cache(tmp_path)
    cache.parent.mkdir(parents=True)
    cache.write_text(json.dumps({"key": "key|/other/qemu", "usable": False, "reason": "old"}))
    assert probe_kvm("/usr/bin/qemu") == KvmProbe(True, "the kvm boot probe ran guest code")
    assert host.probes == [("/usr/bin/qemu", "kvm")]
    assert json.loads(cache.read_text())["key"] == "key|/usr/bin/qemu"


@pytest.mark.parametrize(
    "content", ["", "not json", "[]", "null", "42", '{"key": "key|/usr/bin/qemu"}']
)
def test_broken_cache_means_probing_again(host: _Host, tmp_path: Path, content: str) -> None:
    cache = _cache(tmp_path)
    cache.parent.mkdir(parents=True)
    cache.write_text(content)
    assert probe_kvm("/usr/bin/qemu").cached is False
    assert host.probes == [("/usr/bin/qemu", "kvm")]


def test_use_cache_false_always_probes(host: _Host) -> None:
    probe_kvm("/usr/bin/qemu")
    probe_kvm("/usr/bin/qemu", use_cache=False)
    assert len(host.probes) == 2


def test_no_cache_key_means_no_cache(
    host: _Host, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fingerprint, "_probe_cache_key", lambda emulator: "")
    probe_kvm("/usr/bin/qemu")
    probe_kvm("/usr/bin/qemu")
    assert len(host.probes) == 2
    assert not _cache(tmp_path).exists()


def test_cache_key_changes_with_the_emulator(tmp_path: Path) -> None:
    """The real key: kernel release, binary path and mtime, and /dev/kvm's device number."""
    if not os.path.exists("/dev/kvm"):
        assert fingerprint._probe_cache_key(str(tmp_path)) == ""
        return
    one, two = tmp_path / "one", tmp_path / "two"
    one.write_text("a")
    two.write_text("b")
    key = fingerprint._probe_cache_key(str(one))
    assert key.startswith(os.uname().release + "|" + str(one) + "|")
    assert key != fingerprint._probe_cache_key(str(two))
    assert fingerprint._probe_cache_key(str(tmp_path / "missing")) == ""


# --- resolving the accelerator ------------------------------------------------------------


@pytest.fixture
def verdict(monkeypatch: pytest.MonkeyPatch) -> list[KvmProbe]:
    """Set ``verdict[0]`` to the probe's answer; ``verdict`` grows by one per probe."""
    answers = [KvmProbe(False, "the kvm boot probe failed (exit 1): KVM internal error")]

    def fake(emulator: str | None = None, use_cache: bool = True, timeout: float = 15) -> KvmProbe:
        answers.append(answers[0])
        return answers[0]

    monkeypatch.setattr(fingerprint, "probe_kvm", fake)
    return answers


def test_tcg_needs_no_probe(verdict: list[KvmProbe]) -> None:
    assert resolve_accelerator("tcg", "/usr/bin/qemu") == "tcg"
    assert len(verdict) == 1


def test_auto_uses_kvm_when_the_probe_proves_it(verdict: list[KvmProbe]) -> None:
    verdict[0] = KvmProbe(True, "the kvm boot probe ran guest code")
    assert resolve_accelerator("auto", "/usr/bin/qemu") == "kvm"
    assert len(verdict) == 2


def test_auto_falls_back_to_tcg(verdict: list[KvmProbe]) -> None:
    assert resolve_accelerator("auto", "/usr/bin/qemu") == "tcg"
    verdict[0] = KvmProbe(False, "/dev/kvm comes from kvm_pvm, ...")
    assert resolve_accelerator("auto", "/usr/bin/qemu") == "tcg"


def test_kvm_demanded_but_unusable_is_an_error_with_the_reason(verdict: list[KvmProbe]) -> None:
    with pytest.raises(HostError) as info:
        resolve_accelerator("kvm", "/usr/bin/qemu")
    assert str(info.value) == (
        "accelerator kvm was asked for but KVM is not usable: "
        "the kvm boot probe failed (exit 1): KVM internal error"
    )
    assert info.value.status == 503


def test_kvm_demanded_and_usable(verdict: list[KvmProbe]) -> None:
    verdict[0] = KvmProbe(True, "ok")
    assert resolve_accelerator("kvm", "/usr/bin/qemu") == "kvm"
