"""Every rule of the VM document, and the message a user sees when it is broken.

Errors are checked as the user gets them: a :class:`SpecError` whose issues carry the field's
path in the document (``spec.vm.disks[1].file.path``) and a reason.
"""

from __future__ import annotations

import copy
import json
import re
import uuid
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from corral.errors import CorralError, SpecError
from corral.spec import (
    document_json_schema,
    load_document,
    load_document_file,
    parse_document,
    stable_mac,
)
from corral.spec.models import DNS1123_LABEL, VmDocument, default_uuid

MI, GI = 1024**2, 1024**3


def _doc(vm: dict[str, Any] | None = None, **top: Any) -> dict[str, Any]:
    data: dict[str, Any] = {"metadata": {"name": "vm1"}, "spec": {"vm": vm or {}}}
    data.update(top)
    return data


def _issues(data: object) -> list[tuple[str, str]]:
    with pytest.raises(SpecError) as info:
        parse_document(data)
    assert info.value.message == "invalid VM document"
    assert info.value.issues, "a SpecError must say what is wrong"
    return [(i.loc, i.reason) for i in info.value.issues]


def _issue(data: object) -> tuple[str, str]:
    issues = _issues(data)
    assert len(issues) == 1, issues
    return issues[0]


def _vm_issue(vm: dict[str, Any]) -> tuple[str, str]:
    return _issue(_doc(vm))


# --- the minimal document and its defaults ----------------------------------------------


def test_minimal_document_and_defaults() -> None:
    doc = parse_document(_doc())
    vm = doc.vm
    assert doc.name == "vm1"
    assert doc.api_version is None and doc.kind is None and doc.runner is None
    assert vm.state == "Stopped"
    assert vm.firmware.value == "uefi"
    assert vm.machine.value == "q35"
    assert vm.accelerator.value == "auto"
    assert vm.guest_agent is True
    assert vm.extra_args == []
    assert vm.template is None and vm.template_name == "standard"
    assert vm.maximum_ram == GI and vm.cur_ram == GI
    assert vm.max_cpus == 4 and vm.cur_cpus == 4
    assert vm.powerdown_timeout == 120  # not VM-Operator's 900: see DEFAULT_POWERDOWN_TIMEOUT
    assert (vm.rtc_base, vm.rtc_clock) == ("utc", "rt")
    assert vm.use_tpm is False and vm.boot_menu is False
    assert vm.disks == [] and vm.networks == [] and vm.display is None
    assert doc.spec.guest_shutdown_stops is False


def test_microvm_template_is_the_default_for_the_microvm_machine() -> None:
    doc = parse_document(_doc({"machine": "microvm", "kernel": "/k"}))
    assert doc.vm.template_name == "microvm"
    doc = parse_document(_doc({"machine": "microvm", "kernel": "/k", "template": "my_type-2"}))
    assert doc.vm.template_name == "my_type-2"


def test_template_name_pattern() -> None:
    loc, reason = _vm_issue({"template": "../etc/passwd"})
    assert loc == "spec.vm.template"
    assert reason.startswith("must be a template name")


def test_models_are_frozen() -> None:
    doc = parse_document(_doc())
    with pytest.raises(ValidationError):
        doc.vm.maximum_cpus = 8  # type: ignore[misc]


def test_snake_case_names_work_from_python() -> None:
    doc = VmDocument.model_validate(
        {"metadata": {"name": "py"}, "spec": {"vm": {"maximum_cpus": 2, "use_tpm": True}}}
    )
    assert doc.vm.max_cpus == 2 and doc.vm.use_tpm is True


# --- CPUs ----------------------------------------------------------------------------------


def test_current_cpus_more_than_maximum() -> None:
    assert _vm_issue({"maximumCpus": 2, "currentCpus": 3}) == (
        "spec.vm.currentCpus",
        "3 is more than maximumCpus (2)",
    )


def test_current_cpus_against_the_default_maximum_of_four() -> None:
    assert _vm_issue({"currentCpus": 5}) == (
        "spec.vm.currentCpus",
        "5 is more than maximumCpus (4)",
    )


def test_current_cpus_equal_to_maximum_is_fine() -> None:
    vm = parse_document(_doc({"maximumCpus": 3, "currentCpus": 3})).vm
    assert (vm.max_cpus, vm.cur_cpus) == (3, 3)


def test_current_cpus_default_to_maximum() -> None:
    vm = parse_document(_doc({"maximumCpus": 6})).vm
    assert vm.cur_cpus == 6


@pytest.mark.parametrize(
    ("field", "value"),
    [("maximumCpus", 0), ("maximumCpus", 1025), ("currentCpus", 0)],
)
def test_cpu_counts_are_bounded(field: str, value: int) -> None:
    loc, reason = _vm_issue({field: value})
    assert loc == f"spec.vm.{field}"
    assert "greater than or equal to 1" in reason or "less than or equal to 1024" in reason


def test_topology_product_must_match_maximum_cpus() -> None:
    vm = {
        "maximumCpus": 4,
        "cpuTopology": {"sockets": 2, "coresPerDie": 3, "threadsPerCore": 1},
    }
    assert _vm_issue(vm) == (
        "spec.vm.cpuTopology",
        "sockets x dies x cores x threads = 6, but maximumCpus is 4",
    )


def test_topology_with_dies_counts_in_the_product() -> None:
    vm = {
        "maximumCpus": 8,
        "cpuTopology": {"sockets": 2, "diesPerSocket": 2, "coresPerDie": 2, "threadsPerCore": 2},
    }
    assert _vm_issue(vm) == (
        "spec.vm.cpuTopology",
        "sockets x dies x cores x threads = 16, but maximumCpus is 8",
    )
    vm["maximumCpus"] = 16
    assert parse_document(_doc(vm)).vm.max_cpus == 16


def test_partial_topology_must_divide_maximum_cpus() -> None:
    assert _vm_issue({"maximumCpus": 6, "cpuTopology": {"sockets": 4}}) == (
        "spec.vm.cpuTopology",
        "the given counts multiply to 4, which does not divide maximumCpus 6",
    )
    vm = parse_document(_doc({"maximumCpus": 6, "cpuTopology": {"sockets": 2}})).vm
    assert vm.max_cpus == 6


def test_complete_matching_topology_is_fine() -> None:
    vm = parse_document(
        _doc(
            {
                "maximumCpus": 8,
                "currentCpus": 2,
                "cpuTopology": {"sockets": 2, "coresPerDie": 2, "threadsPerCore": 2},
            }
        )
    ).vm
    assert vm.cpu_topology is not None and vm.cpu_topology.complete
    assert (vm.max_cpus, vm.cur_cpus) == (8, 2)


def test_maximum_cpus_default_to_the_topology_product() -> None:
    vm = parse_document(
        _doc({"cpuTopology": {"sockets": 2, "coresPerDie": 3, "threadsPerCore": 2}})
    ).vm
    assert vm.max_cpus == 12


def test_topology_unknown_field_is_named() -> None:
    assert _vm_issue({"cpuTopology": {"cores": 2}}) == (
        "spec.vm.cpuTopology.cores",
        "unknown field (did you mean 'coresPerDie'?)",
    )


def test_cpu_model_and_features() -> None:
    vm = parse_document(_doc({"cpuModel": "EPYC-v4", "cpuFeatures": ["+avx2", "-svm"]})).vm
    assert vm.cpu_model == "EPYC-v4" and vm.cpu_features == ["+avx2", "-svm"]
    loc, reason = _vm_issue({"cpuModel": "host,+avx2"})
    assert loc == "spec.vm.cpuModel"
    assert "put features in cpuFeatures" in reason
    loc, _ = _vm_issue({"cpuFeatures": ["avx2"]})
    assert loc == "spec.vm.cpuFeatures[0]"


# --- RAM -----------------------------------------------------------------------------------


def test_current_ram_more_than_maximum() -> None:
    assert _vm_issue({"maximumRam": "1Gi", "currentRam": "2Gi"}) == (
        "spec.vm.currentRam",
        "is more than maximumRam",
    )


def test_current_ram_against_the_default_maximum() -> None:
    assert _vm_issue({"currentRam": "1025Mi"}) == ("spec.vm.currentRam", "is more than maximumRam")
    assert parse_document(_doc({"currentRam": "1Gi"})).vm.cur_ram == GI


def test_ram_floors_and_granularity() -> None:
    assert _vm_issue({"maximumRam": "64Mi"}) == (
        "spec.vm.maximumRam",
        "must be at least 128Mi (qemu guests panic below)",
    )
    assert _vm_issue({"maximumRam": 1_000_000_000}) == (
        "spec.vm.maximumRam",
        "must be a whole number of MiB (1GB is 953.67Mi: write 953Mi or 1Gi)",
    )
    assert _vm_issue({"maximumRam": "1Gi", "currentRam": "32Mi"}) == (
        "spec.vm.currentRam",
        "must be at least 64Mi",
    )
    vm = parse_document(_doc({"maximumRam": "128Mi", "currentRam": "64Mi"})).vm
    assert (vm.maximum_ram, vm.cur_ram) == (128 * MI, 64 * MI)


def test_bad_size_names_the_field_and_the_reason() -> None:
    loc, reason = _vm_issue({"maximumRam": "12Q"})
    assert loc == "spec.vm.maximumRam"
    assert reason.startswith("unknown unit 'Q' in '12Q'")
    assert "Value error" not in reason


# --- names ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["a", "vm1", "web-1", "0", "a" * 63, "1-2-3"])
def test_dns1123_names_accepted(name: str) -> None:
    assert parse_document({"metadata": {"name": name}, "spec": {"vm": {}}}).name == name


@pytest.mark.parametrize(
    "name", ["", "-a", "a-", "A", "Web", "a_b", "a.b", "a b", "a" * 64, "ä", "a\n"]
)
def test_dns1123_names_refused(name: str) -> None:
    loc, reason = _issue({"metadata": {"name": name}, "spec": {"vm": {}}})
    assert loc == "metadata.name"
    assert reason.startswith("must be a DNS-1123 label") or "at most 63" in reason


def test_dns1123_pattern_is_anchored() -> None:
    assert DNS1123_LABEL.match("ok-name")
    assert not DNS1123_LABEL.match("ok-name/../x")


def test_name_is_required() -> None:
    assert _issue({"metadata": {}, "spec": {"vm": {}}}) == ("metadata.name", "is required")
    assert ("metadata", "is required") in _issues({"spec": {"vm": {}}})
    assert ("spec.vm", "is required") in _issues({"metadata": {"name": "x"}, "spec": {}})


def test_namespace_is_a_dns1123_label() -> None:
    loc, reason = _issue({"metadata": {"name": "a", "namespace": "Bad"}, "spec": {"vm": {}}})
    assert (loc, reason.split(" (got")[0]) == ("metadata.namespace", "must be a DNS-1123 label")


def test_kubectl_metadata_is_kept() -> None:
    doc = parse_document(
        {
            "metadata": {
                "name": "a",
                "namespace": "vms",
                "uid": "1234",
                "resourceVersion": "77",
                "generation": 3,
                "creationTimestamp": "2024-01-01T00:00:00Z",
                "labels": {"app": "x"},
                "annotations": {"note": "y"},
            },
            "spec": {"vm": {}},
            "status": {"conditions": []},
        }
    )
    assert doc.metadata.resource_version == "77"
    assert doc.status == {"conditions": []}
    assert "status" not in doc.model_dump(by_alias=True)


# --- unknown fields (extra="forbid") -----------------------------------------------------


@pytest.mark.parametrize(
    ("data", "loc", "meant"),
    [
        ({**_doc(), "spce": {}}, "spce", "spec"),
        ({"metadata": {"name": "a", "nmae": "b"}, "spec": {"vm": {}}}, "metadata.nmae", "name"),
        (
            {"metadata": {"name": "a"}, "spec": {"vm": {}, "gueshutdown": 1}},
            "spec.gueshutdown",
            "guestShutdownStops",
        ),
        (_doc({"maximumCPUs": 2}), "spec.vm.maximumCPUs", "maximumCpus"),
        (_doc({"maximum_ram": "1Gi", "maximumRAM": 1}), "spec.vm.maximumRAM", "maximumRam"),
        (
            _doc({"disks": [{"file": {"path": "/a"}}, {"file": {"pth": "/b"}}]}),
            "spec.vm.disks[1].file.pth",
            "path",
        ),
        (
            _doc({"disks": [{"cdrom": {"image": "", "media": "x"}}]}),
            "spec.vm.disks[0].cdrom.media",
            None,
        ),
        (
            _doc({"networks": [{"user": {"nett": "10.0.0.0/24"}}]}),
            "spec.vm.networks[0].user.nett",
            "net",
        ),
        (_doc({"display": {"spice": {"prot": 1}}}), "spec.vm.display.spice.prot", "port"),
        (_doc(runner={"dataDri": "/x"}), "runner.dataDri", "dataDir"),
        (
            {"metadata": {"name": "a"}, "spec": {"vm": {}, "cloudInit": {"userdata": {}}}},
            "spec.cloudInit.userdata",
            "userData",
        ),
        (_doc({"cpus": 2}), "spec.vm.cpus", "maximumCpus' or 'currentCpus"),
    ],
)
def test_typos_are_errors_naming_the_field(
    data: dict[str, Any], loc: str, meant: str | None
) -> None:
    """An unknown field names its path and, when one is close, the field probably meant."""
    hint = f" (did you mean '{meant}'?)" if meant else ""
    assert _issue(data) == (loc, "unknown field" + hint)


def test_every_issue_is_reported_at_once() -> None:
    issues = _issues(
        {
            "metadata": {"name": "Bad"},
            "spec": {"vm": {"firmware": "coreboot", "disks": [{"file": {"path": ""}}]}},
        }
    )
    locs = [loc for loc, _ in issues]
    assert locs == ["metadata.name", "spec.vm.firmware", "spec.vm.disks[0].file.path"]


def test_error_path_names_the_nested_field() -> None:
    loc, reason = _vm_issue({"disks": [{"file": {"path": "/a"}}, {"file": {"path": ""}}]})
    assert loc == "spec.vm.disks[1].file.path"
    assert reason.startswith("must not be empty")


def test_spec_error_renders_one_line_per_issue() -> None:
    with pytest.raises(SpecError) as info:
        parse_document(_doc({"maximumCpus": 2, "currentCpus": 3}))
    err = info.value
    assert isinstance(err, CorralError)
    assert err.status == 422
    assert str(err) == "invalid VM document: spec.vm.currentCpus: 3 is more than maximumCpus (2)"
    assert isinstance(err.__cause__, ValidationError)


def test_nul_is_refused_in_free_text() -> None:
    loc, reason = _vm_issue({"cmdline": "a\x00b", "kernel": "/k"})
    assert loc == "spec.vm.cmdline"
    assert reason.startswith("must not contain a NUL character")
    loc, _ = _vm_issue({"extraArgs": ["-x", "y\x00"]})
    assert loc == "spec.vm.extraArgs[1]"


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        (
            "firmware",
            "coreboot",
            "must be one of 'bios', 'uefi', 'uefi-4m', 'secure' or 'secure-4m'",
        ),
        ("machine", "virt", "must be one of 'q35', 'pc' or 'microvm'"),
        ("accelerator", "hvf", "must be one of 'auto', 'kvm' or 'tcg'"),
        ("state", "Paused", "must be one of 'Running' or 'Stopped'"),
        ("rtcClock", "wall", "must be one of 'host', 'rt' or 'vm'"),
    ],
)
def test_enumerations_list_the_choices(field: str, value: str, expected: str) -> None:
    assert _vm_issue({field: value}) == (f"spec.vm.{field}", f"{expected} (got {value!r})")


@pytest.mark.parametrize("firmware", ["bios", "uefi", "uefi-4m", "secure", "secure-4m"])
def test_every_firmware_is_accepted(firmware: str) -> None:
    fw = parse_document(_doc({"firmware": firmware})).vm.firmware
    assert fw.value == firmware
    assert fw.is_uefi == (firmware != "bios")
    assert fw.is_secure == firmware.startswith("secure")


@pytest.mark.parametrize("base", ["utc", "localtime", "2006-06-17", "2006-06-17T16:01:21"])
def test_rtc_base_accepted(base: str) -> None:
    assert parse_document(_doc({"rtcBase": base})).vm.rtc_base == base


def test_rtc_base_refused() -> None:
    loc, reason = _vm_issue({"rtcBase": "utc,driftfix=none"})
    assert loc == "spec.vm.rtcBase"
    assert reason.startswith("must be utc, localtime or a date")


def test_powerdown_timeout_bounds() -> None:
    assert parse_document(_doc({"powerdownTimeout": 0})).vm.powerdown_timeout == 0
    assert _vm_issue({"powerdownTimeout": -1})[0] == "spec.vm.powerdownTimeout"
    assert _vm_issue({"powerdownTimeout": 86401})[0] == "spec.vm.powerdownTimeout"


def test_api_version_and_kind() -> None:
    for api in ("vmoperator.jdrupes.org/v1", "corral.dev/v1alpha1"):
        doc = parse_document({**_doc(), "apiVersion": api, "kind": "VirtualMachine"})
        assert doc.api_version == api and doc.kind == "VirtualMachine"
    loc, _ = _issue({**_doc(), "apiVersion": "v1"})
    assert loc == "apiVersion"
    loc, reason = _issue({**_doc(), "kind": "Pod"})
    assert loc == "kind"
    assert "VirtualMachine" in reason


# --- direct kernel boot, machine ---------------------------------------------------------


def test_initrd_and_cmdline_need_a_kernel() -> None:
    expected = ("spec.vm.kernel", "initrd and cmdline need a kernel for direct boot")
    assert _vm_issue({"initrd": "/boot/initrd"}) == expected
    assert _vm_issue({"cmdline": "console=ttyS0"}) == expected
    vm = parse_document(_doc({"kernel": "/k", "initrd": "/i", "cmdline": "quiet"})).vm
    assert (vm.kernel, vm.initrd, vm.cmdline) == ("/k", "/i", "quiet")


def test_microvm_needs_a_kernel_and_has_no_tpm() -> None:
    assert _vm_issue({"machine": "microvm"}) == (
        "spec.vm.kernel",
        "a microvm has no firmware disk boot; give a kernel",
    )
    assert _vm_issue({"machine": "microvm", "kernel": "/k", "useTpm": True}) == (
        "spec.vm.useTpm",
        "the microvm machine has no TPM interface",
    )
    assert parse_document(_doc({"machine": "pc", "useTpm": True})).vm.use_tpm


# --- disks ---------------------------------------------------------------------------------


def test_file_disk_needs_exactly_one_of_path_and_image() -> None:
    reason = "give exactly one of 'path' (a disk file) or 'image' (a base image)"
    assert _vm_issue({"disks": [{"file": {"path": "/a", "image": "/b"}}]}) == (
        "spec.vm.disks[0].file",
        reason,
    )
    assert _vm_issue({"disks": [{"file": {}}]}) == ("spec.vm.disks[0].file", reason)


def test_file_disk_fields_and_defaults() -> None:
    doc = parse_document(
        _doc(
            {
                "disks": [
                    {"file": {"path": "/d/root.qcow2"}},
                    {
                        "name": "data",
                        "file": {
                            "path": "/d/data.raw",
                            "format": "raw",
                            "interface": "nvme",
                            "readOnly": True,
                            "size": "10Gi",
                            "cache": "none",
                            "discard": False,
                            "serial": "DATA-1",
                        },
                        "bootindex": 3,
                    },
                    {"file": {"image": "/base/debian.qcow2", "size": "20Gi"}},
                ]
            }
        )
    )
    root, data, overlay = (d.file for d in doc.vm.disks)
    assert root is not None and data is not None and overlay is not None
    assert root.interface.value == "virtio" and root.format.value == "qcow2"
    assert root.read_only is False and root.cache == "writeback" and root.discard is True
    assert data.interface.value == "nvme" and data.format.value == "raw" and data.read_only
    assert data.size == 10 * GI and data.serial == "DATA-1"
    assert doc.vm.disks[1].bootindex == 3 and doc.vm.disks[1].name == "data"
    assert overlay.image == "/base/debian.qcow2" and overlay.path is None
    assert [d.kind for d in doc.vm.disks] == ["file", "file", "file"]


@pytest.mark.parametrize("interface", ["virtio", "scsi", "ide", "nvme"])
def test_disk_interfaces(interface: str) -> None:
    disk = parse_document(_doc({"disks": [{"file": {"path": "/a", "interface": interface}}]}))
    file = disk.vm.disks[0].file
    assert file is not None and file.interface.value == interface


def test_disk_interface_is_an_enum() -> None:
    assert _vm_issue({"disks": [{"file": {"path": "/a", "interface": "sata"}}]}) == (
        "spec.vm.disks[0].file.interface",
        "must be one of 'virtio', 'scsi', 'ide' or 'nvme' (got 'sata')",
    )


def test_disk_format_is_an_enum_and_an_image_disk_is_qcow2() -> None:
    loc, reason = _vm_issue({"disks": [{"file": {"path": "/a", "format": "vmdk"}}]})
    assert loc == "spec.vm.disks[0].file.format"
    assert reason.startswith("must be one of 'qcow2' or 'raw'")
    assert _vm_issue({"disks": [{"file": {"image": "/b", "format": "raw"}}]}) == (
        "spec.vm.disks[0].file.format",
        "a disk made from an image is a qcow2 overlay",
    )


def test_disk_size_floor() -> None:
    assert _vm_issue({"disks": [{"file": {"path": "/a", "size": "512Ki"}}]}) == (
        "spec.vm.disks[0].file.size",
        "must be at least 1Mi",
    )


def test_disk_serial_and_name_patterns() -> None:
    loc, reason = _vm_issue({"disks": [{"file": {"path": "/a", "serial": "has,comma"}}]})
    assert loc == "spec.vm.disks[0].file.serial"
    assert reason.startswith("must be 1-20 letters, digits")
    loc, _ = _vm_issue({"disks": [{"name": "Bad Name", "file": {"path": "/a"}}]})
    assert loc == "spec.vm.disks[0].name"


def test_disk_names_are_unique() -> None:
    disks = [
        {"name": "a", "file": {"path": "/1"}},
        {"name": "b", "file": {"path": "/2"}},
        {"name": "a", "file": {"path": "/3"}},
    ]
    assert _vm_issue({"disks": disks}) == (
        "spec.vm.disks",
        "disk names must be unique; repeated: a",
    )


def test_a_disk_has_exactly_one_kind() -> None:
    assert _vm_issue({"disks": [{}]}) == (
        "spec.vm.disks[0]",
        "a disk needs exactly one of cdrom, file, device, volumeClaimTemplate (found: none)",
    )
    assert _vm_issue({"disks": [{"cdrom": {"image": "/x"}, "file": {"path": "/a"}}]}) == (
        "spec.vm.disks[0]",
        "a disk needs exactly one of cdrom, file, device, volumeClaimTemplate (found: cdrom, file)",
    )


def test_cdrom_with_empty_image_is_a_drive_without_media() -> None:
    doc = parse_document(
        _doc({"disks": [{"cdrom": {"image": ""}}, {"cdrom": {"image": "/a.iso"}}]})
    )
    empty, full = doc.vm.disks
    assert empty.kind == "cdrom" and empty.cdrom is not None and empty.cdrom.image == ""
    assert full.cdrom is not None and full.cdrom.image == "/a.iso"


def test_cdrom_image_is_required_and_only_http_urls() -> None:
    assert _vm_issue({"disks": [{"cdrom": {}}]}) == ("spec.vm.disks[0].cdrom.image", "is required")
    for url in ("ftp://example.org/x.iso", "file:///etc/shadow", "nbd://127.0.0.1:1/x"):
        assert _vm_issue({"disks": [{"cdrom": {"image": url}}]}) == (
            "spec.vm.disks[0].cdrom.image",
            "must be a host path or an http(s):// URL; no other URL schemes",
        )
    doc = parse_document(_doc({"disks": [{"cdrom": {"image": "https://example.org/x.iso"}}]}))
    assert doc.vm.disks[0].cdrom is not None
    assert doc.vm.disks[0].cdrom.image == "https://example.org/x.iso"


def test_cdrom_url_is_never_mangled_into_a_path(tmp_path: Path) -> None:
    """Security 13: VM-Operator's ``image: https://...`` used to become ``<dir>/https:/...``."""
    file = tmp_path / "vm.yaml"
    file.write_text(
        "metadata: {name: u}\nspec:\n  vm:\n    disks:\n"
        "      - cdrom: {image: https://test.com/test.iso}\n      - cdrom: {image: image.iso}\n"
    )
    doc = load_document_file(file)
    images = [d.cdrom.image for d in doc.vm.disks if d.cdrom is not None]
    assert images == ["https://test.com/test.iso", str(tmp_path.resolve() / "image.iso")]


def test_bridge_helper_is_not_a_document_field() -> None:
    """Security 1: the helper string reached qemu, which ran it through /bin/sh -c as root."""
    loc, reason = _vm_issue(
        {"networks": [{"bridge": {"name": "br0", "helper": "/bin/sh -c 'id > /tmp/owned' #"}}]}
    )
    assert loc == "spec.vm.networks[0].bridge.helper"
    assert "host policy" in reason


def test_cdrom_interface() -> None:
    doc = parse_document(_doc({"disks": [{"cdrom": {"image": "", "interface": "scsi"}}]}))
    assert doc.vm.disks[0].cdrom is not None and doc.vm.disks[0].cdrom.interface == "scsi"
    loc, _ = _vm_issue({"disks": [{"cdrom": {"image": "", "interface": "nvme"}}]})
    assert loc == "spec.vm.disks[0].cdrom.interface"


def test_device_and_volume_claim_template_disks() -> None:
    vct = {"metadata": {"name": "root"}, "spec": {"resources": {"requests": {"storage": "40Gi"}}}}
    doc = parse_document(
        _doc(
            {
                "disks": [
                    {"device": {"path": "/dev/vg0/vm1", "interface": "scsi", "readOnly": True}},
                    {"volumeClaimTemplate": vct, "bootindex": 0},
                ]
            }
        )
    )
    device, claim = doc.vm.disks
    assert device.kind == "device" and device.device is not None
    assert device.device.path == "/dev/vg0/vm1" and device.device.read_only
    assert claim.kind == "volumeClaimTemplate" and claim.volume_claim_template == vct
    assert _vm_issue({"disks": [{"device": {}}]}) == ("spec.vm.disks[0].device.path", "is required")


def test_bootindex_bounds() -> None:
    loc, _ = _vm_issue({"disks": [{"file": {"path": "/a"}, "bootindex": -1}]})
    assert loc == "spec.vm.disks[0].bootindex"


# --- networks ------------------------------------------------------------------------------


def test_network_kinds_and_defaults() -> None:
    doc = parse_document(
        _doc(
            {
                "networks": [
                    {"tap": {}},
                    {"user": {}},
                    {"bridge": {"name": "virbr0"}},
                    {"vde": {"socket": "/run/vde.ctl", "port": 3}},
                ]
            }
        )
    )
    tap, user, bridge, vde = doc.vm.networks
    assert [n.kind for n in doc.vm.networks] == ["tap", "user", "bridge", "vde"]
    assert tap.tap is not None and tap.tap.bridge == "br0" and tap.tap.ifname is None
    assert tap.nic.device == "virtio-net" and tap.nic.mac is None
    assert user.user is not None and user.user.port_forwards == [] and user.user.net is None
    assert bridge.bridge is not None and bridge.bridge.name == "virbr0"
    assert vde.vde is not None and vde.vde.socket == "/run/vde.ctl" and vde.vde.port == 3


def test_a_network_has_exactly_one_kind() -> None:
    assert _vm_issue({"networks": [{}]}) == (
        "spec.vm.networks[0]",
        "a network needs exactly one of tap, user, bridge, vde (found: none)",
    )
    assert _vm_issue({"networks": [{"tap": {}, "user": {}}]}) == (
        "spec.vm.networks[0]",
        "a network needs exactly one of tap, user, bridge, vde (found: tap, user)",
    )


def test_nic_device_models() -> None:
    doc = parse_document(_doc({"networks": [{"user": {"device": "e1000"}}]}))
    assert doc.vm.networks[0].nic.device == "e1000"
    loc, reason = _vm_issue({"networks": [{"tap": {"device": "ne2k"}}]})
    assert loc == "spec.vm.networks[0].tap.device"
    assert reason.startswith("must be one of 'virtio-net'")


def test_port_forwards_on_user_networks() -> None:
    doc = parse_document(
        _doc(
            {
                "networks": [
                    {
                        "user": {
                            "net": "10.0.3.0/24",
                            "hostname": "guest",
                            "portForwards": [
                                {"hostPort": 2222, "guestPort": 22},
                                {"protocol": "udp", "hostPort": 5353, "guestPort": 53},
                                {"protocol": "udp", "hostPort": 2222, "guestPort": 22},
                                {
                                    "hostPort": 8080,
                                    "guestPort": 80,
                                    "hostAddress": "0.0.0.0",  # noqa: S104
                                    "guestAddress": "10.0.3.15",
                                },
                            ],
                        }
                    }
                ]
            }
        )
    )
    user = doc.vm.networks[0].user
    assert user is not None
    tcp, udp, udp_same_port, wide = user.port_forwards
    assert (tcp.protocol, tcp.host_address, tcp.host_port, tcp.guest_port) == (
        "tcp",
        "127.0.0.1",
        2222,
        22,
    )
    assert udp.protocol == "udp" and udp_same_port.protocol == "udp"
    assert wide.host_address == "0.0.0.0"  # noqa: S104
    assert wide.guest_address == "10.0.3.15"


@pytest.mark.parametrize("kind", ["tap", "bridge", "vde"])
def test_port_forwards_only_on_user_networks(kind: str) -> None:
    nic: dict[str, Any] = {"tap": {}, "bridge": {"name": "br0"}, "vde": {"socket": "/s"}}[kind]
    nic = {**nic, "portForwards": [{"hostPort": 2222, "guestPort": 22}]}
    assert _vm_issue({"networks": [{kind: nic}]}) == (
        f"spec.vm.networks[0].{kind}.portForwards",
        "unknown field",
    )


def test_port_forward_protocol_is_tcp_or_udp() -> None:
    fwd = {"protocol": "sctp", "hostPort": 1, "guestPort": 2}
    assert _vm_issue({"networks": [{"user": {"portForwards": [fwd]}}]}) == (
        "spec.vm.networks[0].user.portForwards[0].protocol",
        "must be one of 'tcp' or 'udp' (got 'sctp')",
    )


@pytest.mark.parametrize(
    ("fwd", "field"),
    [
        ({"hostPort": 0, "guestPort": 22}, "hostPort"),
        ({"hostPort": 65536, "guestPort": 22}, "hostPort"),
        ({"hostPort": 22, "guestPort": 0}, "guestPort"),
        ({"hostPort": 22, "guestPort": 22, "hostAddress": "localhost"}, "hostAddress"),
        ({"hostPort": 22, "guestPort": 22, "guestAddress": "10.0.2.300"}, "guestAddress"),
        ({"guestPort": 22}, "hostPort"),
    ],
)
def test_port_forward_fields(fwd: dict[str, Any], field: str) -> None:
    loc, _ = _vm_issue({"networks": [{"user": {"portForwards": [fwd]}}]})
    assert loc == f"spec.vm.networks[0].user.portForwards[0].{field}"


def test_port_forward_twice_is_refused() -> None:
    fwds = [{"hostPort": 2222, "guestPort": 22}, {"hostPort": 2222, "guestPort": 23}]
    assert _vm_issue({"networks": [{"user": {"portForwards": fwds}}]}) == (
        "spec.vm.networks[0].user.portForwards",
        "tcp 127.0.0.1:2222 is forwarded twice",
    )


def test_user_net_must_be_an_ipv4_network() -> None:
    assert _vm_issue({"networks": [{"user": {"net": "fe80::/64"}}]}) == (
        "spec.vm.networks[0].user.net",
        "'fe80::/64' is not an IPv4 network like 10.0.2.0/24",
    )
    assert _vm_issue({"networks": [{"user": {"net": "10.0.2.0/30"}}]}) == (
        "spec.vm.networks[0].user.net",
        "the prefix must be /29 or shorter",
    )


def test_interface_names_are_bounded() -> None:
    loc, reason = _vm_issue({"networks": [{"tap": {"ifname": "a" * 16}}]})
    assert loc == "spec.vm.networks[0].tap.ifname"
    assert reason.startswith("must be a network interface name")
    loc, _ = _vm_issue({"networks": [{"tap": {"bridge": "br0,x=y"}}]})
    assert loc == "spec.vm.networks[0].tap.bridge"


@pytest.mark.parametrize(
    ("mac", "reason"),
    [
        ("52:54:00:zz:00:01", "must be a MAC address like 52:54:00:12:34:56"),
        ("52-54-00-12-34-56", "must be a MAC address like 52:54:00:12:34:56"),
        ("52:54:00:12:34", "must be a MAC address like 52:54:00:12:34:56"),
        ("52:54:00:12:34:56:78", "must be a MAC address like 52:54:00:12:34:56"),
        ("52:54:00:12:34:56\n", "must be a MAC address like 52:54:00:12:34:56"),
        (" 52:54:00:12:34:56", "must be a MAC address like 52:54:00:12:34:56"),
        ("53:54:00:12:34:56", "must be a unicast MAC"),
        ("ff:ff:ff:ff:ff:ff", "must be a unicast MAC"),
    ],
)
def test_mac_format(mac: str, reason: str) -> None:
    loc, got = _vm_issue({"networks": [{"user": {"mac": mac}}]})
    assert loc == "spec.vm.networks[0].user.mac"
    assert got.startswith(reason)


def test_mac_is_normalized_and_unique_per_vm() -> None:
    doc = parse_document(_doc({"networks": [{"tap": {"mac": "52:54:00:AA:BB:CC"}}]}))
    assert doc.vm.networks[0].nic.mac == "52:54:00:aa:bb:cc"
    nets = [{"tap": {"mac": "52:54:00:AA:BB:CC"}}, {"user": {"mac": "52:54:00:aa:bb:cc"}}]
    assert _vm_issue({"networks": nets}) == (
        "spec.vm.networks",
        "MAC addresses repeat: 52:54:00:aa:bb:cc",
    )


_MAC_RE = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")


def test_stable_mac_is_stable_per_uuid_and_index() -> None:
    u1 = uuid.UUID("2b6c0a0e-7f51-4bd4-9d1a-6e0f6b9f4c11")
    u2 = uuid.UUID("2b6c0a0e-7f51-4bd4-9d1a-6e0f6b9f4c12")
    assert stable_mac(u1, 0) == stable_mac(u1, 0)
    assert stable_mac(u1, 0) != stable_mac(u1, 1)
    assert stable_mac(u1, 0) != stable_mac(u2, 0)
    macs = {stable_mac(u1, i) for i in range(256)}
    assert len(macs) == 256


@given(st.uuids(), st.integers(min_value=0, max_value=65535))
def test_stable_mac_is_locally_administered_unicast(machine_uuid: uuid.UUID, index: int) -> None:
    mac = stable_mac(machine_uuid, index)
    assert _MAC_RE.match(mac)
    first = int(mac[:2], 16)
    assert first & 0x02, "locally administered bit must be set"
    assert not first & 0x01, "must be unicast"
    doc = parse_document(_doc({"networks": [{"user": {"mac": mac}}]}))
    assert doc.vm.networks[0].nic.mac == mac


def test_default_uuid_is_stable_per_name() -> None:
    assert default_uuid("web") == default_uuid("web")
    assert default_uuid("web") != default_uuid("db")
    assert default_uuid("web").version == 5


def test_machine_uuid() -> None:
    value = "2b6c0a0e-7f51-4bd4-9d1a-6e0f6b9f4c11"
    assert parse_document(_doc({"machineUuid": value})).vm.machine_uuid == uuid.UUID(value)
    loc, _ = _vm_issue({"machineUuid": "not-a-uuid"})
    assert loc == "spec.vm.machineUuid"


# --- display -------------------------------------------------------------------------------


def test_display_defaults() -> None:
    display = parse_document(_doc({"display": {"spice": {}, "vnc": {"port": 5901}}})).vm.display
    assert display is not None and display.spice is not None and display.vnc is not None
    assert display.outputs == 1
    assert (display.spice.port, display.spice.address) == (5900, "127.0.0.1")
    assert display.spice.generate_secret is True and display.spice.usb_redirects == 2
    assert (display.vnc.port, display.vnc.address) == (5901, "127.0.0.1")


def test_spice_fields() -> None:
    spice = {
        "port": 5930,
        "address": "0.0.0.0",  # noqa: S104
        "server": "vmhost.example.org",
        "generateSecret": False,
        "proxyUrl": "http://proxy:3128",
        "streamingVideo": "filter",
        "usbRedirects": 0,
    }
    display = parse_document(_doc({"display": {"spice": spice}})).vm.display
    assert display is not None and display.spice is not None
    assert display.spice.server == "vmhost.example.org"
    assert display.spice.streaming_video == "filter" and display.spice.usb_redirects == 0
    loc, _ = _vm_issue({"display": {"spice": {"streamingVideo": "some"}}})
    assert loc == "spec.vm.display.spice.streamingVideo"
    loc, _ = _vm_issue({"display": {"spice": {"usbRedirects": 9}}})
    assert loc == "spec.vm.display.spice.usbRedirects"


def test_spice_and_vnc_cannot_share_a_port() -> None:
    assert _vm_issue({"display": {"spice": {}, "vnc": {}}}) == (
        "spec.vm.display",
        "spice and vnc cannot listen on the same port",
    )


def test_vnc_port_bounds() -> None:
    loc, _ = _vm_issue({"display": {"vnc": {"port": 5899}}})
    assert loc == "spec.vm.display.vnc.port"


@pytest.mark.parametrize(
    ("display", "loc"),
    [
        ({"spice": {"password": "hunter2"}}, "spec.vm.display.spice.password"),
        ({"spice": {"ticket": "hunter2"}}, "spec.vm.display.spice.ticket"),
        ({"vnc": {"password": "hunter2"}}, "spec.vm.display.vnc.password"),
        ({"password": "hunter2"}, "spec.vm.display.password"),
    ],
)
def test_display_password_is_never_in_the_document(display: dict[str, Any], loc: str) -> None:
    assert _vm_issue({"display": display}) == (loc, "unknown field")


def test_no_secret_field_in_the_schema() -> None:
    text = json.dumps(document_json_schema()).lower()
    for word in ("password", "passwd", "ticket"):
        assert f'"{word}' not in text
    runner = document_json_schema()["$defs"]["RunnerSettings"]["properties"]
    assert "displaySecretFile" in runner


def test_display_secret_is_a_file_in_the_runner_section() -> None:
    path = "/run/secrets/vm1"
    doc = parse_document(_doc(runner={"displaySecretFile": path}))
    assert doc.runner is not None
    assert doc.runner.display_secret_file == path


# --- cloud-init, runner, extras ------------------------------------------------------------


def test_cloud_init_free_mappings() -> None:
    doc = parse_document(
        {
            "metadata": {"name": "ci"},
            "spec": {
                "vm": {},
                "guestShutdownStops": True,
                "cloudInit": {
                    "metaData": {"instance-id": "i-1", "anything": {"nested": [1, 2]}},
                    "userData": {"users": [{"name": "me"}], "packages": ["curl"]},
                    "networkConfig": {"version": 2, "ethernets": {}},
                },
            },
        }
    )
    ci = doc.spec.cloud_init
    assert ci is not None and doc.spec.guest_shutdown_stops is True
    assert ci.meta_data["anything"] == {"nested": [1, 2]}
    assert ci.user_data == {"users": [{"name": "me"}], "packages": ["curl"]}
    assert ci.network_config == {"version": 2, "ethernets": {}}


def test_cloud_init_user_data_may_be_text() -> None:
    doc = parse_document(
        {"metadata": {"name": "ci"}, "spec": {"vm": {}, "cloudInit": {"userData": "#!/bin/sh\n"}}}
    )
    assert doc.spec.cloud_init is not None and doc.spec.cloud_init.user_data == "#!/bin/sh\n"


def test_runner_section() -> None:
    runner = {
        "dataDir": "/var/lib/vm1",
        "runtimeDir": "/run/vm1",
        "statusFile": "/run/vm1/status.json",
        "displaySecretFile": "/etc/vm1.secret",
        "emulator": "/usr/bin/qemu-system-x86_64",
    }
    doc = parse_document(_doc(runner=runner))
    assert doc.runner is not None
    assert doc.runner.data_dir == "/var/lib/vm1"
    assert doc.runner.runtime_dir == "/run/vm1"
    assert doc.runner.status_file == "/run/vm1/status.json"
    assert doc.runner.emulator == "/usr/bin/qemu-system-x86_64"
    assert _issue(_doc(runner={"dataDir": ""})) == ("runner.dataDir", "must not be empty (got '')")


def test_extra_args_and_guest_agent() -> None:
    vm = parse_document(_doc({"extraArgs": ["-device", "usb-kbd"], "guestAgent": False})).vm
    assert vm.extra_args == ["-device", "usb-kbd"] and vm.guest_agent is False


# --- a VM-Operator document --------------------------------------------------------------

VM_OPERATOR_DOC: dict[str, Any] = {
    "apiVersion": "vmoperator.jdrupes.org/v1",
    "kind": "VirtualMachine",
    "metadata": {"namespace": "vmop-dev", "name": "test-vm", "labels": {"app": "vm"}},
    "spec": {
        "image": {"source": "ghcr.io/mnlipp/org.jdrupes.vmoperator.runner.qemu-arch:latest"},
        "resources": {"requests": {"cpu": 1, "memory": "2Gi"}},
        "nodeName": "node-1",
        "nodeSelector": {"kubernetes.io/arch": "amd64"},
        "affinity": {"nodeAffinity": {}},
        "runnerTemplate": {"source": "Standard-VM-latest.ftl.yaml", "update": True},
        "guestShutdownStops": True,
        "loadBalancerService": {"labels": {"a": "b"}, "annotations": {}},
        "cloudInit": {
            "metaData": {"instance-id": "test-vm-1"},
            "userData": {"users": [{"name": "admin"}]},
            "networkConfig": {"version": 2},
        },
        "permissions": [{"user": "admin", "may": ["*"]}, {"role": "user", "may": ["start"]}],
        "pools": ["test-vms"],
        "loggingProperties": "level=FINE",
        "vm": {
            "state": "Running",
            "machineUuid": "b3a4fcd1-7e3c-4b11-a1d3-9f2c5b3f0e91",
            "useTpm": True,
            "firmware": "uefi-4m",
            "bootMenu": True,
            "powerdownTimeout": 120,
            "cpuModel": "host",
            "maximumCpus": 4,
            "cpuTopology": {
                "sockets": 1,
                "diesPerSocket": 1,
                "coresPerDie": 4,
                "threadsPerCore": 1,
            },
            "currentCpus": 2,
            "maximumRam": "4Gi",
            "currentRam": "2Gi",
            "rtcBase": "utc",
            "rtcClock": "rt",
            "networks": [
                {"tap": {"device": "virtio-net", "bridge": "br0", "mac": "02:16:3e:33:58:10"}},
                {"user": {"device": "virtio-net", "net": "10.0.2.0/24"}},
            ],
            "disks": [
                {
                    "volumeClaimTemplate": {
                        "metadata": {"name": "system"},
                        "spec": {
                            "storageClassName": "local-path",
                            "resources": {"requests": {"storage": "40Gi"}},
                        },
                    },
                    "bootindex": 0,
                },
                {"cdrom": {"image": ""}, "bootindex": 1},
                {"cdrom": {"image": "/var/lib/isos/install.iso"}},
            ],
            "display": {
                "outputs": 2,
                "loggedInUser": "admin",
                "spice": {
                    "port": 5910,
                    "server": "vmhost.example.org",
                    "generateSecret": True,
                    "proxyUrl": "http://proxy.example.org:3128",
                    "streamingVideo": "off",
                    "usbRedirects": 2,
                },
            },
        },
    },
}


def test_vm_operator_document_parses_unchanged() -> None:
    original = copy.deepcopy(VM_OPERATOR_DOC)
    doc = parse_document(VM_OPERATOR_DOC)
    assert original == VM_OPERATOR_DOC, "parsing must not modify the input"
    dumped = doc.model_dump(mode="json", by_alias=True, exclude_unset=True)
    assert dumped == VM_OPERATOR_DOC
    vm = doc.vm
    assert doc.api_version == "vmoperator.jdrupes.org/v1" and doc.metadata.namespace == "vmop-dev"
    assert (vm.max_cpus, vm.cur_cpus, vm.maximum_ram, vm.cur_ram) == (4, 2, 4 * GI, 2 * GI)
    assert [d.kind for d in vm.disks] == ["volumeClaimTemplate", "cdrom", "cdrom"]
    assert vm.networks[0].tap is not None and vm.networks[0].tap.bridge == "br0"
    assert doc.spec.pools == ["test-vms"]


def test_vm_operator_default_ram_spelling_is_accepted() -> None:
    """VM-Operator's CRD default and runner sample write ``maximumRam: "1G"``."""
    vm = parse_document(_doc({"maximumRam": "1G", "currentRam": "1G"})).vm
    assert vm.maximum_ram == vm.cur_ram == GI


def test_vm_operator_yaml_text_round_trips_through_the_loader() -> None:
    doc = load_document(json.dumps(VM_OPERATOR_DOC))
    assert doc == parse_document(VM_OPERATOR_DOC)


# --- loading from files and text ---------------------------------------------------------


def test_load_document_file_resolves_relative_paths(tmp_path: Path) -> None:
    vms = tmp_path / "vms"
    vms.mkdir()
    file = vms / "web.yaml"
    file.write_text(
        """
metadata: {name: web}
runner:
  dataDir: data
  runtimeDir: ./run
  statusFile: run/status.json
  displaySecretFile: ../secrets/web
  emulator: qemu-system-x86_64
spec:
  vm:
    kernel: boot/vmlinuz
    initrd: boot/initrd.img
    cmdline: root=/dev/vda console=ttyS0
    disks:
      - file: {path: disks/root.qcow2}
      - file: {image: ../images/base.qcow2}
      - file: {path: /abs/data.raw, format: raw}
      - device: {path: dev-link}
      - cdrom: {image: isos/install.iso}
      - cdrom: {image: ""}
    networks:
      - vde: {socket: vde.ctl}
      - bridge: {name: br0}
      - tap: {bridge: br0}
"""
    )
    doc = load_document_file(file)
    base = str(vms.resolve())
    vm = doc.vm
    assert vm.kernel == f"{base}/boot/vmlinuz"
    assert vm.initrd == f"{base}/boot/initrd.img"
    assert vm.cmdline == "root=/dev/vda console=ttyS0"
    files = [d.file for d in vm.disks if d.file is not None]
    assert files[0].path == f"{base}/disks/root.qcow2"
    assert files[1].image == f"{base}/../images/base.qcow2"
    assert files[2].path == "/abs/data.raw"
    assert vm.disks[3].device is not None and vm.disks[3].device.path == f"{base}/dev-link"
    cds = [d.cdrom.image for d in vm.disks if d.cdrom is not None]
    assert cds == [f"{base}/isos/install.iso", ""]
    assert vm.networks[0].vde is not None and vm.networks[0].vde.socket == f"{base}/vde.ctl"
    bridge = vm.networks[1].bridge
    assert bridge is not None and bridge.name == "br0"
    assert vm.networks[2].tap is not None and vm.networks[2].tap.bridge == "br0"
    runner = doc.runner
    assert runner is not None
    assert runner.data_dir == f"{base}/data"
    assert runner.runtime_dir == f"{base}/run"
    assert runner.status_file == f"{base}/run/status.json"
    assert runner.display_secret_file == f"{base}/../secrets/web"
    assert runner.emulator == "qemu-system-x86_64", "an emulator name is looked up on PATH"


def test_load_document_file_from_a_relative_location(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "vm.yaml").write_text(
        "metadata: {name: rel}\nspec: {vm: {disks: [{file: {path: root.qcow2}}]}}\n"
    )
    monkeypatch.chdir(tmp_path)
    doc = load_document_file("sub/vm.yaml")
    file = doc.vm.disks[0].file
    assert file is not None and file.path == str(tmp_path.resolve() / "sub" / "root.qcow2")


def test_load_document_text_keeps_relative_paths() -> None:
    doc = load_document("metadata: {name: t}\nspec: {vm: {kernel: boot/vmlinuz}}\n")
    assert doc.vm.kernel == "boot/vmlinuz"


def test_load_document_file_errors(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match=r"cannot read .*missing\.yaml"):
        load_document_file(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("metadata: {name: x}\nspec: [unclosed\n")
    with pytest.raises(SpecError) as info:
        load_document_file(bad)
    assert re.match(rf"{re.escape(str(bad))}:\d+:\d+: not valid YAML", info.value.message)
    two = tmp_path / "two.yaml"
    two.write_text("metadata: {name: a}\nspec: {vm: {}}\n---\nmetadata: {name: b}\n")
    with pytest.raises(SpecError, match="expected exactly one VM document, found 2"):
        load_document_file(two)
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing\n")
    with pytest.raises(SpecError, match="expected exactly one VM document, found 0"):
        load_document_file(empty)


def test_a_document_must_be_a_mapping() -> None:
    with pytest.raises(SpecError) as info:
        load_document("- a\n- b\n")
    assert [i.reason for i in info.value.issues] == [
        "a VM document must be a mapping with metadata and spec"
    ]


# --- the JSON schema ---------------------------------------------------------------------

_TYPES = {"object", "array", "string", "integer", "number", "boolean", "null"}
_SCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SCHEMA_MAPS = ("properties", "$defs", "patternProperties")
_SCHEMA_ONE = ("items", "additionalProperties", "not", "if", "then", "else", "contains")


def _check_schema(node: object, defs: dict[str, Any], where: str) -> None:
    """A structural check of a JSON Schema (2020-12) document, without a validator package:
    every subschema is an object or a boolean, keywords have the right shapes, every
    ``$ref`` resolves, every pattern compiles, ``required`` names declared properties."""
    if isinstance(node, bool):
        return
    assert isinstance(node, dict), where
    if "type" in node:
        types = node["type"] if isinstance(node["type"], list) else [node["type"]]
        assert set(types) <= _TYPES, f"{where}: bad type {node['type']}"
    if "$ref" in node:
        ref = node["$ref"]
        assert ref.startswith("#/$defs/"), f"{where}: {ref}"
        assert ref.removeprefix("#/$defs/") in defs, f"{where}: dangling {ref}"
    if "pattern" in node:
        re.compile(node["pattern"])
    if "enum" in node:
        assert isinstance(node["enum"], list) and node["enum"], where
    if "required" in node:
        assert isinstance(node["required"], list)
        assert set(node["required"]) <= set(node.get("properties", {})), where
    for key in ("minimum", "maximum", "minLength", "maxLength", "minItems"):
        if key in node:
            assert isinstance(node[key], int | float) and not isinstance(node[key], bool)
    for key in _SCHEMA_LISTS:
        if key in node:
            assert isinstance(node[key], list) and node[key], f"{where}.{key}"
            for i, sub in enumerate(node[key]):
                _check_schema(sub, defs, f"{where}.{key}[{i}]")
    for key in _SCHEMA_MAPS:
        if key in node:
            assert isinstance(node[key], dict), f"{where}.{key}"
            for name, sub in node[key].items():
                _check_schema(sub, defs, f"{where}.{key}.{name}")
    for key in _SCHEMA_ONE:
        if key in node:
            _check_schema(node[key], defs, f"{where}.{key}")


def test_json_schema_is_a_valid_draft_2020_12_schema() -> None:
    schema = document_json_schema()
    assert json.loads(json.dumps(schema)) == schema, "plain JSON types only"
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["title"] == "corral VirtualMachine"
    assert schema["type"] == "object"
    _check_schema(schema, schema["$defs"], "#")


def test_json_schema_contains_the_key_fields() -> None:
    schema = document_json_schema()
    defs = schema["$defs"]
    assert {"metadata", "spec"} <= set(schema["required"])
    assert {"apiVersion", "kind", "metadata", "spec", "runner"} <= set(schema["properties"])
    assert schema["additionalProperties"] is False
    vm = defs["VmSpec"]
    assert vm["additionalProperties"] is False
    for field in (
        "state",
        "machineUuid",
        "maximumCpus",
        "currentCpus",
        "cpuTopology",
        "cpuModel",
        "maximumRam",
        "currentRam",
        "firmware",
        "bootMenu",
        "powerdownTimeout",
        "useTpm",
        "rtcBase",
        "rtcClock",
        "machine",
        "accelerator",
        "kernel",
        "initrd",
        "cmdline",
        "guestAgent",
        "extraArgs",
        "template",
        "disks",
        "networks",
        "display",
    ):
        assert field in vm["properties"], field
    assert set(defs["Firmware"]["enum"]) == {"bios", "uefi", "uefi-4m", "secure", "secure-4m"}
    assert set(defs["MachineType"]["enum"]) == {"q35", "pc", "microvm"}
    assert set(defs["Accelerator"]["enum"]) == {"auto", "kvm", "tcg"}
    assert set(defs["DiskInterface"]["enum"]) == {"virtio", "scsi", "ide", "nvme"}
    assert {"cdrom", "file", "device", "volumeClaimTemplate", "bootindex"} <= set(
        defs["Disk"]["properties"]
    )
    assert {"path", "image", "size", "format", "interface", "readOnly"} <= set(
        defs["FileDisk"]["properties"]
    )
    assert {"tap", "user", "bridge", "vde"} <= set(defs["Network"]["properties"])
    assert "portForwards" in defs["UserNetwork"]["properties"]
    assert "portForwards" not in defs["TapNetwork"]["properties"]
    assert {"protocol", "hostPort", "guestPort", "hostAddress"} <= set(
        defs["PortForward"]["properties"]
    )
    assert {"dataDir", "runtimeDir", "statusFile", "displaySecretFile"} <= set(
        defs["RunnerSettings"]["properties"]
    )
    assert {"guestShutdownStops", "cloudInit", "vm"} <= set(defs["Spec"]["properties"])
    assert {"metaData", "userData", "networkConfig"} <= set(defs["CloudInit"]["properties"])


def test_json_schema_size_pattern_matches_what_the_parser_accepts() -> None:
    ram = document_json_schema()["$defs"]["VmSpec"]["properties"]["maximumRam"]
    pattern = next(s["pattern"] for s in ram["anyOf"] if s.get("type") == "string")
    for text in ("512Mi", "4Gi", "2G", "1073741824", "1.5Gi", " 2GB "):
        assert re.fullmatch(pattern, text), text
    assert not re.fullmatch(pattern, "-1Gi")
    assert not re.fullmatch(pattern, "2 GB")
    assert any(s.get("type") == "integer" for s in ram["anyOf"])


def test_json_schema_patterns_agree_with_the_models() -> None:
    schema = document_json_schema()
    name = schema["$defs"]["Metadata"]["properties"]["name"]
    assert re.fullmatch(name["pattern"], "web-1")
    assert not re.fullmatch(name["pattern"], "Web_1")
    assert "name" in schema["$defs"]["Metadata"]["required"]
