"""Golden argv for representative documents.

Regenerate after an intended change with ``CORRAL_UPDATE_GOLDEN=1 pytest tests/unit`` and
review the diff of ``tests/unit/golden/*.argv`` like code.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from corral.qemu.argv import FirmwareFiles, RenderContext, render_argv
from corral.runner.config import RunnerPaths
from corral.spec import load_document_file

GOLDEN = Path(__file__).parent / "golden"
CASES = sorted(p.stem for p in GOLDEN.glob("*.yaml"))


def _context(name: str, seed: bool) -> RenderContext:
    data = f"/var/lib/corral/vms/{name}"
    return RenderContext(
        files=RunnerPaths.placed(Path(data), Path(f"/run/corral/{name}")),
        accelerator="tcg",
        firmware=FirmwareFiles("/usr/share/OVMF/OVMF_CODE_4M.fd", f"{data}/efivars.fd"),
        seed_image=f"{data}/cidata.img" if seed else None,
        tsc_khz=2000000,
    )


@pytest.mark.parametrize("case", CASES)
def test_golden_argv(case: str) -> None:
    doc = load_document_file(GOLDEN / f"{case}.yaml")
    argv = render_argv(doc, _context(doc.name, doc.spec.cloud_init is not None))
    text = "\n".join(argv) + "\n"
    expected_file = GOLDEN / f"{case}.argv"
    if os.environ.get("CORRAL_UPDATE_GOLDEN") == "1":
        expected_file.write_text(text)
    assert expected_file.exists(), f"no golden file {expected_file}; set CORRAL_UPDATE_GOLDEN=1"
    assert text == expected_file.read_text()


def test_cases_cover_what_the_issue_names() -> None:
    joined = "\n".join((GOLDEN / f"{c}.argv").read_text() for c in CASES)
    for needle in (
        "-machine\npc\n",  # pc + BIOS (no firmware options)
        "pflash0=fw-code",  # UEFI
        "tpm-crb,tpmdev=tpm0",  # TPM
        "microvm,",
        "-spice",
        "-vnc",
        "hostfwd=tcp:127.0.0.1:2222-:22",
        "hostfwd=udp:0.0.0.0:5353-:53",
        "bridge,id=net0,br=virbr0",
        "tap,id=net1,ifname=tap-server",
        "scsi-cd,id=disk1,bus=scsi0.0\n",  # empty CD
        "drive=d3",  # CD with media
        "virtio-blk-pci",
        "scsi-hd",
        "ide-hd",
        "nvme,",
    ):
        assert needle in joined, needle
