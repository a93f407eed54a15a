"""Documents a guest cannot start or boot with are refused before qemu runs (issue 11, items
1 and 2): RAM too small for OVMF's direct kernel boot, ``bootindex: 0`` beside ``kernel``
(qemu gives the kernel that index), host ports already taken; and ``bootTimeout``.

Errors are checked as the user gets them: the field's path and the reason.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from corral.errors import PolicyError, SpecError
from corral.host.ports import HostPort, busy_ports, host_ports, port_busy
from corral.runner.config import check_host
from corral.spec import HostPolicy, parse_document
from corral.spec.models import DEFAULT_BOOT_TIMEOUT, uefi_kernel_ram

MI = 1024**2


def _doc(**vm: Any) -> dict[str, Any]:
    return {"metadata": {"name": "vm1"}, "spec": {"vm": vm}}


def _issue(data: dict[str, Any]) -> tuple[str, str]:
    with pytest.raises(SpecError) as info:
        parse_document(data)
    (issue,) = info.value.issues
    return issue.loc, issue.reason


# --- RAM for OVMF's direct kernel boot ------------------------------------------------------


@pytest.mark.parametrize("firmware", ["uefi", "uefi-4m", "secure", "secure-4m"])
def test_uefi_direct_kernel_boot_at_128mi_is_refused_naming_maximum_ram(firmware: str) -> None:
    loc, reason = _issue(_doc(firmware=firmware, kernel="/k", maximumRam="128Mi"))
    assert loc == "spec.vm.maximumRam"
    assert reason.startswith(
        f"must be at least 192Mi for direct kernel boot with firmware {firmware}"
    )
    assert "OVMF" in reason and "firmware: bios" in reason


@pytest.mark.parametrize(
    "vm",
    [
        {"kernel": "/k", "maximumRam": "192Mi"},  # UEFI, enough
        {"kernel": "/k", "maximumRam": "128Mi", "firmware": "bios"},  # SeaBIOS boots it at 128Mi
        {"maximumRam": "128Mi"},  # OVMF alone (no kernel) reaches its boot manager at 64Mi
        {"kernel": "/k", "maximumRam": "128Mi", "machine": "microvm"},  # no OVMF on microvm
    ],
)
def test_ram_that_boots_is_accepted(vm: dict[str, Any]) -> None:
    assert parse_document(_doc(**vm)).vm.maximum_ram == int(vm["maximumRam"][:-2]) * MI


def test_the_floor_grows_with_the_kernel_and_initrd() -> None:
    tiny = uefi_kernel_ram(14_186_432, 4_568_956)  # the tiny test guest: boots from 153Mi
    assert tiny == 192 * MI
    assert uefi_kernel_ram(40 * MI, 20 * MI) == (128 + 180) * MI
    assert uefi_kernel_ram(40 * MI, 20 * MI + 1) == (128 + 181) * MI  # rounded up to a MiB


@pytest.fixture
def boot_files(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """A 40 MiB kernel and a 20 MiB initrd (sparse: only their sizes matter here)."""
    kernel, initrd = tmp_path / "vmlinuz", tmp_path / "initrd.img"
    for path, size in ((kernel, 40 * MI), (initrd, 20 * MI)):
        with path.open("wb") as f:
            f.truncate(size)
    yield kernel, initrd


def _boot_doc(files: tuple[Path, Path], ram: str, **vm: Any) -> Any:
    kernel, initrd = files
    return parse_document(_doc(kernel=str(kernel), initrd=str(initrd), maximumRam=ram, **vm))


def test_admission_refuses_ram_too_small_for_this_kernel_and_initrd(
    boot_files: tuple[Path, Path],
) -> None:
    with pytest.raises(SpecError) as info:
        check_host(_boot_doc(boot_files, "256Mi"), HostPolicy())
    (issue,) = info.value.issues
    assert issue.loc == "spec.vm.maximumRam"
    assert issue.reason.startswith("256Mi is too small to boot this kernel and initrd (60.0 MiB)")
    assert "needs at least 308Mi" in issue.reason

    check_host(_boot_doc(boot_files, "308Mi"), HostPolicy())
    check_host(_boot_doc(boot_files, "256Mi", firmware="bios"), HostPolicy())


def test_the_policy_is_checked_before_the_files_are_measured(
    boot_files: tuple[Path, Path], tmp_path: Path
) -> None:
    """A kernel outside imagePaths is refused as such: its size is never told."""
    policy = HostPolicy(image_paths=[str(tmp_path / "elsewhere")])
    with pytest.raises(PolicyError) as info:
        check_host(_boot_doc(boot_files, "256Mi"), policy)
    assert not isinstance(info.value, SpecError)
    assert "MiB" not in str(info.value)
    assert {i.loc for i in info.value.issues} >= {"spec.vm.kernel", "spec.vm.initrd"}


# --- bootindex 0 is the kernel's ------------------------------------------------------------


def test_bootindex_0_beside_a_kernel_is_refused_naming_the_disk() -> None:
    loc, reason = _issue(
        _doc(
            firmware="bios",
            kernel="/k",
            disks=[
                {"file": {"path": "/a"}, "bootindex": 1},
                {"cdrom": {"image": ""}, "bootindex": 0},
            ],
        )
    )
    assert loc == "spec.vm.disks[1].bootindex"
    assert "qemu gives direct kernel boot (kernel) bootindex 0" in reason
    assert "use 1 or more" in reason


@pytest.mark.parametrize(
    "vm",
    [
        {"kernel": "/k", "firmware": "bios", "disks": [{"file": {"path": "/a"}, "bootindex": 1}]},
        {"disks": [{"file": {"path": "/a"}, "bootindex": 0}]},  # no kernel: 0 is free
        {"kernel": "/k", "machine": "microvm", "disks": [{"file": {"path": "/a"}, "bootindex": 0}]},
    ],
)
def test_bootindex_that_qemu_takes_is_accepted(vm: dict[str, Any]) -> None:
    assert parse_document(_doc(**vm)).vm.disks[0].bootindex in (0, 1)


def test_the_docs_example_disk_boots_beside_a_kernel_too() -> None:
    """docs/vm-document.md's root disk, with a kernel added, still validates."""
    root = Path(__file__).resolve().parents[2]
    text = (root / "docs/vm-document.md").read_text()
    assert "bootindex: 0" not in text.split("## Rules")[0]
    parse_document(
        _doc(firmware="bios", kernel="/k", disks=[{"file": {"image": "/i"}, "bootindex": 1}])
    )


# --- bootTimeout ----------------------------------------------------------------------------


def test_boot_timeout_default_bounds_and_zero() -> None:
    assert parse_document(_doc()).vm.boot_timeout == DEFAULT_BOOT_TIMEOUT == 300
    assert parse_document(_doc(bootTimeout=0)).vm.boot_timeout == 0
    loc, reason = _issue(_doc(bootTimeout=-1))
    assert loc == "spec.vm.bootTimeout"
    assert "greater than or equal to 0" in reason


# --- host ports -----------------------------------------------------------------------------


def _listening(kind: int = socket.SOCK_STREAM) -> socket.socket:
    sock = socket.socket(socket.AF_INET, kind)
    sock.bind(("127.0.0.1", 0))
    if kind == socket.SOCK_STREAM:
        sock.listen()
    return sock


def test_host_ports_lists_forwards_and_displays_with_their_fields() -> None:
    doc = parse_document(
        _doc(
            networks=[
                {"tap": {}},
                {"user": {"portForwards": [
                    {"hostPort": 2222, "guestPort": 22},
                    {"protocol": "udp", "hostPort": 5353, "guestPort": 53, "hostAddress": "::1"},
                ]}},
            ],
            display={"spice": {"port": 5910}, "vnc": {"port": 5911, "websocketPort": 5700}},
        )
    )  # fmt: skip
    assert [(p.field, str(p)) for p in host_ports(doc)] == [
        ("spec.vm.networks[1].user.portForwards[0].hostPort", "tcp 127.0.0.1:2222"),
        ("spec.vm.networks[1].user.portForwards[1].hostPort", "udp [::1]:5353"),
        ("spec.vm.display.spice.port", "tcp 127.0.0.1:5910"),
        ("spec.vm.display.vnc.port", "tcp 127.0.0.1:5911"),
        ("spec.vm.display.vnc.websocketPort", "tcp 127.0.0.1:5700"),
    ]


def test_a_listened_tcp_port_is_busy_and_free_again_once_closed() -> None:
    sock = _listening()
    port = sock.getsockname()[1]
    doc = parse_document(
        _doc(networks=[{"user": {"portForwards": [{"hostPort": port, "guestPort": 22}]}}])
    )
    (issue,) = busy_ports(doc)
    assert issue.loc == "spec.vm.networks[0].user.portForwards[0].hostPort"
    assert issue.reason == f"tcp 127.0.0.1:{port} is taken on this host (Address already in use)"
    wildcard = HostPort("f", "tcp", "0.0.0.0", port)  # noqa: S104
    assert port_busy(wildcard) == "Address already in use"
    sock.close()
    assert busy_ports(doc) == []


def test_a_bound_udp_port_is_busy() -> None:
    with _listening(socket.SOCK_DGRAM) as sock:
        port = sock.getsockname()[1]
        assert port_busy(HostPort("f", "udp", "127.0.0.1", port)) == "Address already in use"
        assert port_busy(HostPort("f", "tcp", "127.0.0.1", port)) is None  # another protocol


def test_ports_overlap_on_the_same_address_or_a_wildcard() -> None:
    a = HostPort("x", "tcp", "127.0.0.1", 2222)
    assert a.overlaps(HostPort("y", "tcp", "127.0.0.1", 2222))
    assert a.overlaps(HostPort("y", "tcp", "0.0.0.0", 2222))  # noqa: S104
    assert HostPort("y", "tcp", "::", 2222).overlaps(a)
    assert not a.overlaps(HostPort("y", "udp", "127.0.0.1", 2222))
    assert not a.overlaps(HostPort("y", "tcp", "127.0.0.2", 2222))
    assert not a.overlaps(HostPort("y", "tcp", "127.0.0.1", 2223))


# --- what proves a guest cannot answer ACPI (the stop shortcut) -----------------------------


@pytest.mark.parametrize(
    "tail",
    [
        "SeaBIOS (version 1.16.2-debian-1.16.2-1)\nBooting from Hard Disk...\nBoot failed: not a "
        "bootable disk\n\nNo bootable device.",
        'BdsDxe: failed to load Boot0001 "UEFI QEMU DVD-ROM QM00003 " from PciRoot(0x0): Not '
        "Found\nBdsDxe: No bootable option or device was found.",
        "UEFI Interactive Shell v2.2\nEDK II\nPress ESC in 1 seconds to skip startup.nsh\nShell>",
        "!!!! X64 Exception Type - 0E(#PF - Page-Fault)  CPU Apic ID - 00000000 !!!!",
        "Can't find image information.",
        "[    1.234] Kernel panic - not syncing: VFS: Unable to mount root fs",
    ],
)
def test_firmware_and_kernel_failures_prove_nothing_answers_acpi(tail: str) -> None:
    from corral.runner.supervisor import boot_failure

    assert boot_failure(tail)


@pytest.mark.parametrize(
    "tail",
    [
        "",
        "Debian GNU/Linux 12 host ttyS0\n\nhost login:",
        "Welcome to Ubuntu 24.04 LTS\nubuntu@vm:~$",
        "a user typed Shell> into a program",  # not the UEFI shell's own prompt line
        "Windows Boot Manager",
    ],
)
def test_a_running_os_or_silence_is_no_proof(tail: str) -> None:
    from corral.runner.supervisor import boot_failure

    assert boot_failure(tail) is None
