"""Host policy: image paths (with symlink and ``..`` escapes), extra args, emulators, limits,
and reading the policy file."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from corral.errors import PolicyError, SpecError
from corral.spec import HostPolicy, VmDocument, check_policy, load_policy, parse_document
from corral.spec import policy as policy_module
from corral.spec.policy import path_within

GI = 1024**3


def _doc(vm: dict[str, Any] | None = None, **top: Any) -> VmDocument:
    data: dict[str, Any] = {
        "metadata": {"name": "pol"},
        "spec": {"vm": {"maximumCpus": 1, **(vm or {})}},
    }
    data.update(top)
    return parse_document(data)


def _refusals(doc: VmDocument, policy: HostPolicy, emulator: str | None = None) -> dict[str, str]:
    with pytest.raises(PolicyError) as info:
        check_policy(doc, policy, emulator=emulator)
    err = info.value
    assert err.message == "refused by host policy"
    assert err.status == 422
    return {i.loc: i.reason for i in err.issues}


@pytest.fixture
def tree(tmp_path: Path) -> dict[str, Path]:
    """``allowed/`` holds images; ``outside/`` does not; links point both ways."""
    allowed = tmp_path / "allowed"
    outside = tmp_path / "outside"
    allowed.mkdir()
    outside.mkdir()
    (allowed / "disk.qcow2").write_bytes(b"")
    (outside / "secret.img").write_bytes(b"")
    (allowed / "sub").mkdir()
    (allowed / "sub" / "inner.iso").write_bytes(b"")
    (allowed / "escape.qcow2").symlink_to(outside / "secret.img")
    (allowed / "escape-dir").symlink_to(outside, target_is_directory=True)
    (outside / "back.qcow2").symlink_to(allowed / "disk.qcow2")
    (allowed / "inner-link.iso").symlink_to(allowed / "sub" / "inner.iso")
    return {"root": tmp_path, "allowed": allowed, "outside": outside}


def _policy(tree: dict[str, Path], **fields: Any) -> HostPolicy:
    return HostPolicy.model_validate({"imagePaths": [str(tree["allowed"])], **fields})


# --- imagePaths ----------------------------------------------------------------------------


def test_path_within_plain_inside_and_outside(tree: dict[str, Path]) -> None:
    allowed = [str(tree["allowed"])]
    assert path_within(str(tree["allowed"] / "disk.qcow2"), allowed)
    assert path_within(str(tree["allowed"] / "sub" / "inner.iso"), allowed)
    assert path_within(str(tree["allowed"] / "not-yet-created.qcow2"), allowed)
    assert path_within(str(tree["allowed"]), allowed)
    assert not path_within(str(tree["outside"] / "secret.img"), allowed)
    assert not path_within("/etc/shadow", allowed)


def test_path_within_refuses_symlink_escapes(tree: dict[str, Path]) -> None:
    allowed = [str(tree["allowed"])]
    assert not path_within(str(tree["allowed"] / "escape.qcow2"), allowed)
    assert not path_within(str(tree["allowed"] / "escape-dir" / "secret.img"), allowed)
    assert path_within(str(tree["allowed"] / "inner-link.iso"), allowed)
    assert path_within(str(tree["outside"] / "back.qcow2"), allowed), "resolved target counts"


def test_path_within_refuses_dotdot_escapes(tree: dict[str, Path]) -> None:
    allowed = [str(tree["allowed"])]
    assert not path_within(f"{tree['allowed']}/../outside/secret.img", allowed)
    assert not path_within(f"{tree['allowed']}/sub/../../outside/secret.img", allowed)
    assert path_within(f"{tree['allowed']}/sub/../disk.qcow2", allowed)


def test_path_within_is_not_a_string_prefix_check(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    (tmp_path / "images-evil").mkdir()
    allowed = [str(tmp_path / "images")]
    assert not path_within(str(tmp_path / "images-evil" / "x.qcow2"), allowed)
    assert not path_within(str(tmp_path / "images-evil"), allowed)
    assert path_within(str(tmp_path / "images" / "x.qcow2"), allowed)


def test_path_within_allowed_dir_given_through_a_symlink(tree: dict[str, Path]) -> None:
    alias = tree["root"] / "alias"
    alias.symlink_to(tree["allowed"], target_is_directory=True)
    assert path_within(str(tree["allowed"] / "disk.qcow2"), [str(alias)])
    assert not path_within(str(tree["outside"] / "secret.img"), [str(alias)])


def test_path_within_any_of_several_dirs(tree: dict[str, Path]) -> None:
    dirs = [str(tree["root"] / "nope"), str(tree["outside"])]
    assert path_within(str(tree["outside"] / "secret.img"), dirs)
    assert not path_within(str(tree["allowed"] / "disk.qcow2"), dirs)


def test_image_paths_allow_everything_inside(tree: dict[str, Path]) -> None:
    a = tree["allowed"]
    doc = _doc(
        {
            "kernel": str(a / "vmlinuz"),
            "initrd": str(a / "initrd.img"),
            "disks": [
                {"file": {"path": str(a / "disk.qcow2")}},
                {"file": {"image": str(a / "sub" / "base.qcow2")}},
                {"device": {"path": str(a / "dev")}},
                {"cdrom": {"image": str(a / "sub" / "inner.iso")}},
                {"cdrom": {"image": ""}},
            ],
        }
    )
    check_policy(doc, _policy(tree))


@pytest.mark.parametrize(
    ("vm", "loc"),
    [
        ({"disks": [{"file": {"path": "@OUT@"}}]}, "spec.vm.disks[0].file.path"),
        ({"disks": [{"file": {"image": "@OUT@"}}]}, "spec.vm.disks[0].file.image"),
        ({"disks": [{"device": {"path": "@OUT@"}}]}, "spec.vm.disks[0].device.path"),
        ({"disks": [{"cdrom": {"image": "@OUT@"}}]}, "spec.vm.disks[0].cdrom.image"),
        ({"kernel": "@OUT@"}, "spec.vm.kernel"),
        ({"kernel": "@IN@", "initrd": "@OUT@"}, "spec.vm.initrd"),
    ],
)
@pytest.mark.parametrize("escape", ["plain", "symlink", "dotdot", "symlinked-dir"])
def test_image_paths_refuse_every_path_field(
    tree: dict[str, Path], vm: dict[str, Any], loc: str, escape: str
) -> None:
    a = tree["allowed"]
    outside = {
        "plain": str(tree["outside"] / "secret.img"),
        "symlink": str(a / "escape.qcow2"),
        "dotdot": f"{a}/../outside/secret.img",
        "symlinked-dir": str(a / "escape-dir" / "secret.img"),
    }[escape]

    def fill(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: fill(v) for k, v in node.items()}
        if isinstance(node, list):
            return [fill(v) for v in node]
        return {"@OUT@": outside, "@IN@": str(a / "vmlinuz")}.get(node, node)

    refusals = _refusals(_doc(fill(vm)), _policy(tree))
    assert list(refusals) == [loc]
    reason = refusals[loc]
    assert repr(outside) in reason
    assert f"(resolved: {os.path.realpath(outside)})" in reason
    assert "is outside the allowed image paths" in reason
    assert str(tree["allowed"]) in reason


def test_image_paths_list_every_violation_with_its_field(tree: dict[str, Path]) -> None:
    out = str(tree["outside"] / "secret.img")
    doc = _doc(
        {
            "kernel": out,
            "disks": [
                {"file": {"path": str(tree["allowed"] / "disk.qcow2")}},
                {"file": {"path": out}},
                {"cdrom": {"image": out}},
            ],
        }
    )
    assert set(_refusals(doc, _policy(tree))) == {
        "spec.vm.disks[1].file.path",
        "spec.vm.disks[2].cdrom.image",
        "spec.vm.kernel",
    }


def test_image_paths_need_absolute_paths(tree: dict[str, Path]) -> None:
    doc = _doc({"disks": [{"file": {"path": "disk.qcow2"}}]})
    refusals = _refusals(doc, _policy(tree))
    assert refusals == {"spec.vm.disks[0].file.path": "'disk.qcow2' must be an absolute path"}


def test_relative_paths_from_a_file_are_checked_after_resolution(tree: dict[str, Path]) -> None:
    from corral.spec import load_document_file

    file = tree["allowed"] / "vm.yaml"
    file.write_text(
        "metadata: {name: f}\n"
        "spec: {vm: {disks: [{file: {path: disk.qcow2}},\n"
        "                    {cdrom: {image: ../outside/secret.img}}]}}\n"
    )
    refusals = _refusals(load_document_file(file), _policy(tree))
    assert list(refusals) == ["spec.vm.disks[1].cdrom.image"]


def test_no_image_paths_means_any_path() -> None:
    doc = _doc({"kernel": "/anywhere/vmlinuz", "disks": [{"file": {"path": "relative.qcow2"}}]})
    check_policy(doc, HostPolicy())


# --- argsAllowlist -------------------------------------------------------------------------


def test_default_policy_allows_no_extra_args() -> None:
    refusals = _refusals(_doc({"extraArgs": ["-device", "usb-kbd"]}), HostPolicy())
    assert refusals == {
        "spec.vm.extraArgs[0]": "'-device' is not in the host's argsAllowlist "
        "(empty: no extra args allowed)"
    }


def test_listed_flags_pass_and_values_need_no_listing() -> None:
    policy = HostPolicy.model_validate({"argsAllowlist": ["-device", "-global"]})
    doc = _doc({"extraArgs": ["-device", "usb-kbd,id=kbd0", "-global", "usb-tablet.port=1"]})
    check_policy(doc, policy)


def test_every_flag_must_be_listed() -> None:
    policy = HostPolicy.model_validate({"argsAllowlist": ["-device"]})
    doc = _doc(
        {"extraArgs": ["-device", "usb-kbd", "-chardev", "x", "--device", "usb-kbd", "-device"]}
    )
    refusals = _refusals(doc, policy)
    assert set(refusals) == {"spec.vm.extraArgs[2]", "spec.vm.extraArgs[4]"}
    assert refusals["spec.vm.extraArgs[2]"] == (
        "'-chardev' is not in the host's argsAllowlist (['-device'])"
    )


def test_allowlist_matches_whole_arguments_only() -> None:
    policy = HostPolicy.model_validate({"argsAllowlist": ["-device"]})
    refusals = _refusals(_doc({"extraArgs": ["-device=virtio-rng"]}), policy)
    assert list(refusals) == ["spec.vm.extraArgs[0]"]
    refusals = _refusals(_doc({"extraArgs": ["-dev"]}), policy)
    assert list(refusals) == ["spec.vm.extraArgs[0]"]


def test_values_after_an_allowed_option_need_no_listing() -> None:
    policy = HostPolicy.model_validate({"argsAllowlist": ["-device", "-k", "-rtc"]})
    doc = _doc({"extraArgs": ["-device", "usb-kbd", "-k", "de", "-rtc", "base=utc"]})
    check_policy(doc, policy)


@pytest.mark.parametrize(
    ("args", "stray"),
    [
        (["/etc/shadow"], [0]),
        (["usb-kbd"], [0]),
        (["-device", "usb-kbd", "/outside/disk.img"], [2]),
        (["x", "-device", "usb-tablet", "z"], [0, 3]),
    ],
)
def test_a_value_that_follows_no_option_is_refused(args: list[str], stray: list[int]) -> None:
    """qemu opens a stray positional argument as a disk image (``-hda``): that would bypass
    both the args allowlist and imagePaths, so it is refused even by a permissive policy."""
    policy = HostPolicy.model_validate({"argsAllowlist": ["-device"], "imagePaths": ["/srv"]})
    refusals = _refusals(_doc({"extraArgs": args}), policy)
    assert list(refusals) == [f"spec.vm.extraArgs[{i}]" for i in stray]
    for i in stray:
        assert refusals[f"spec.vm.extraArgs[{i}]"] == (
            f"{args[i]!r} follows no option: qemu would open it as a disk image"
        )


def test_default_policy_allows_no_extra_values_either() -> None:
    refusals = _refusals(_doc({"extraArgs": ["disk.img"]}), HostPolicy())
    assert list(refusals) == ["spec.vm.extraArgs[0]"]


def test_value_of_a_refused_option_is_not_reported_twice() -> None:
    refusals = _refusals(_doc({"extraArgs": ["-monitor", "stdio"]}), HostPolicy())
    assert list(refusals) == ["spec.vm.extraArgs[0]"]


# --- emulators -----------------------------------------------------------------------------


def test_default_emulator_is_allowed_by_name() -> None:
    check_policy(_doc(), HostPolicy(), emulator="qemu-system-x86_64")
    check_policy(_doc(runner={"emulator": "qemu-system-x86_64"}), HostPolicy())


def test_other_emulators_are_refused() -> None:
    assert _refusals(_doc(), HostPolicy(), emulator="qemu-system-aarch64") == {
        "runner.emulator": "'qemu-system-aarch64' is not an allowed emulator ['qemu-system-x86_64']"
    }
    refusals = _refusals(_doc(runner={"emulator": "/tmp/evil/qemu"}), HostPolicy())
    assert list(refusals) == ["runner.emulator"]


def test_explicit_emulator_wins_over_the_document() -> None:
    doc = _doc(runner={"emulator": "qemu-system-aarch64"})
    check_policy(doc, HostPolicy(), emulator="qemu-system-x86_64")
    policy = HostPolicy.model_validate({"emulators": ["qemu-system-aarch64"]})
    check_policy(_doc(runner={"emulator": "qemu-system-x86_64"}), policy, "qemu-system-aarch64")


def test_no_emulator_named_is_not_checked() -> None:
    check_policy(_doc(), HostPolicy.model_validate({"emulators": []}))


def test_absolute_emulator_path_must_be_the_listed_name_on_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bindir = tmp_path / "bin"
    elsewhere = tmp_path / "elsewhere"
    bindir.mkdir()
    elsewhere.mkdir()
    for d in (bindir, elsewhere):
        (d / "qemu-system-x86_64").write_text("#!/bin/sh\n")
    monkeypatch.setenv("PATH", f"{tmp_path / 'empty'}{os.pathsep}{bindir}")
    check_policy(_doc(), HostPolicy(), emulator=str(bindir / "qemu-system-x86_64"))
    refusals = _refusals(_doc(), HostPolicy(), emulator=str(elsewhere / "qemu-system-x86_64"))
    assert list(refusals) == ["runner.emulator"]
    listed_abs = HostPolicy.model_validate({"emulators": [str(elsewhere / "qemu-system-x86_64")]})
    check_policy(_doc(), listed_abs, emulator=str(elsewhere / "qemu-system-x86_64"))


# --- limits --------------------------------------------------------------------------------


def test_max_cpus_per_vm() -> None:
    policy = HostPolicy.model_validate({"maxCpusPerVm": 2})
    check_policy(_doc({"maximumCpus": 2}), policy)
    assert _refusals(_doc({"maximumCpus": 3}), policy) == {
        "spec.vm.maximumCpus": "3 CPUs is more than this host allows per VM (2)"
    }


def test_max_cpus_per_vm_counts_the_default_and_the_topology() -> None:
    policy = HostPolicy.model_validate({"maxCpusPerVm": 2})
    data: dict[str, Any] = {"metadata": {"name": "d"}, "spec": {"vm": {}}}
    assert list(_refusals(parse_document(data), policy)) == ["spec.vm.maximumCpus"]
    data["spec"]["vm"] = {"cpuTopology": {"sockets": 2, "coresPerDie": 2, "threadsPerCore": 1}}
    assert list(_refusals(parse_document(data), policy)) == ["spec.vm.maximumCpus"]


def test_max_ram_per_vm() -> None:
    policy = HostPolicy.model_validate({"maxRamPerVm": "2Gi"})
    assert policy.max_ram_per_vm == 2 * GI
    check_policy(_doc({"maximumRam": "2Gi"}), policy)
    assert _refusals(_doc({"maximumRam": "3Gi", "currentRam": "1Gi"}), policy) == {
        "spec.vm.maximumRam": "is more than this host allows per VM"
    }


def test_every_violation_is_reported_at_once(tree: dict[str, Path]) -> None:
    doc = _doc(
        {
            "maximumCpus": 8,
            "maximumRam": "8Gi",
            "extraArgs": ["-monitor", "stdio"],
            "disks": [{"file": {"path": "/etc/passwd"}}],
        },
        runner={"emulator": "qemu-system-arm"},
    )
    policy = _policy(tree, maxCpusPerVm=4, maxRamPerVm="4Gi")
    assert list(_refusals(doc, policy)) == [
        "spec.vm.disks[0].file.path",
        "spec.vm.extraArgs[0]",
        "runner.emulator",
        "spec.vm.maximumCpus",
        "spec.vm.maximumRam",
    ]


# --- the policy model and file -----------------------------------------------------------


def test_policy_defaults() -> None:
    policy = HostPolicy()
    assert policy.image_paths is None
    assert policy.args_allowlist == []
    assert policy.emulators == ["qemu-system-x86_64"]
    assert policy.template_dirs == []
    assert policy.max_cpus_per_vm is None and policy.max_ram_per_vm is None


def test_load_policy_from_yaml(tmp_path: Path) -> None:
    file = tmp_path / "host.yaml"
    file.write_text(
        """
imagePaths: [/var/lib/corral/images, /srv/isos]
argsAllowlist: [-device, -global]
emulators: [qemu-system-x86_64, /opt/qemu/bin/qemu-system-x86_64]
templateDirs: [/etc/corral/templates]
maxCpusPerVm: 16
maxRamPerVm: 64Gi
"""
    )
    policy = load_policy(file)
    assert policy.image_paths == ["/var/lib/corral/images", "/srv/isos"]
    assert policy.args_allowlist == ["-device", "-global"]
    assert policy.emulators == ["qemu-system-x86_64", "/opt/qemu/bin/qemu-system-x86_64"]
    assert policy.template_dirs == ["/etc/corral/templates"]
    assert policy.max_cpus_per_vm == 16
    assert policy.max_ram_per_vm == 64 * GI
    assert load_policy(str(file)) == policy


def test_empty_policy_file_means_defaults(tmp_path: Path) -> None:
    file = tmp_path / "host.yaml"
    file.write_text("# nothing configured\n")
    assert load_policy(file) == HostPolicy()


def test_default_policy_file_is_used_when_present(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    default = tmp_path / "host.yaml"
    monkeypatch.setattr(policy_module, "DEFAULT_POLICY_FILE", default)
    assert load_policy() == HostPolicy()
    default.write_text("argsAllowlist: [-device]\n")
    assert load_policy().args_allowlist == ["-device"]


def test_named_policy_file_must_exist(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(SpecError, match=f"host policy file {missing} does not exist"):
        load_policy(missing)


@pytest.mark.parametrize(
    ("text", "loc", "reason"),
    [
        ("imagePath: [/x]\n", "imagePath", "unknown field"),
        ("argsAllowList: [-device]\n", "argsAllowList", "unknown field"),
        ("maxCpusPerVm: 0\n", "maxCpusPerVm", "greater than or equal to 1"),
        ("maxRamPerVm: 12Q\n", "maxRamPerVm", "unknown unit 'Q'"),
        ("imagePaths: /var/lib/images\n", "imagePaths", "valid list"),
        ("emulators: [[a]]\n", "emulators[0]", "valid string"),
    ],
)
def test_bad_policy_file_names_the_field(tmp_path: Path, text: str, loc: str, reason: str) -> None:
    file = tmp_path / "host.yaml"
    file.write_text(text)
    with pytest.raises(SpecError) as info:
        load_policy(file)
    err = info.value
    assert err.message == f"invalid host policy {file}"
    assert [i.loc for i in err.issues] == [loc]
    assert reason in err.issues[0].reason
    assert str(err).startswith(f"invalid host policy {file}: {loc}: ")


def test_policy_file_that_is_not_yaml(tmp_path: Path) -> None:
    file = tmp_path / "host.yaml"
    file.write_text("imagePaths: [unclosed\n")
    with pytest.raises(SpecError, match=f"cannot read host policy {file}"):
        load_policy(file)


def test_policy_file_that_is_not_a_mapping(tmp_path: Path) -> None:
    file = tmp_path / "host.yaml"
    file.write_text("- /var/lib/images\n")
    with pytest.raises(SpecError) as info:
        load_policy(file)
    assert info.value.message == f"invalid host policy {file}"
    assert info.value.issues


# --- security: what an allowlisted option may still not do (issue 9, item 4) ----------------

_PERMISSIVE = {
    "argsAllowlist": [
        "-device", "-global", "-drive", "-object", "-smbios", "-k", "-boot", "-no-reboot",
        "-set", "-nic", "-dump-vmstate",
    ]
}  # fmt: skip


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["-device", "loader,file=/outside/secret"], "deviceAllowlist"),
        (["-device", "vfio-pci,host=0000:01:00.0"], "deviceAllowlist"),
        (["-device", "usb-host,hostbus=1,hostaddr=2"], "deviceAllowlist"),
        (["-device", "usb-tablet,romfile=/etc/shadow"], "properties ['romfile']"),
        (["-device", "driver=loader,file=/etc/shadow"], "deviceAllowlist"),
        (["-device", '{"driver": "loader", "file": "/etc/shadow"}'], "JSON option syntax"),
        (["-global", "usb-tablet.romfile=/etc/shadow"], "properties ['romfile']"),
        (["-global", "driver=e1000,property=romfile,value=/etc/shadow"], "deviceAllowlist"),
        (["-drive", "file=/etc/shadow,if=virtio"], "refused even when allowlisted"),
        (["-object", "memory-backend-file,id=m,mem-path=/dev/shm/x"], "refused even when"),
        (["-smbios", "file=/etc/shadow"], "refused even when"),
        (["-boot", "menu=on,splash=/etc/shadow"], "'splash' is not an option corral allows"),
        (["-k", "/etc/shadow"], "one plain word"),
        # found by review: a flag takes no value, so what follows it is a stray -hda
        (["-no-reboot", "/etc/shadow"], "follows no option"),
        (
            ["-no-reboot", 'json:{"driver":"raw","file":{"filename":"/etc/shadow"}}'],
            "follows no option",
        ),
        # options a denylist missed: positive list now
        (["-set", "chardev.console.logfile=/etc/cron.d/x"], "refused even when"),
        (["-nic", "user,tftp=/etc"], "refused even when"),
        (["-dump-vmstate", "/etc/passwd"], "refused even when"),
    ],
)
def test_allowlisted_options_cannot_reach_host_files_or_devices(
    args: list[str], needle: str
) -> None:
    policy = HostPolicy.model_validate(_PERMISSIVE)
    refusals = _refusals(_doc({"extraArgs": args}), policy)
    assert len(refusals) == 1
    assert needle in next(iter(refusals.values()))


def test_safe_devices_pass_and_a_host_extends_the_device_allowlist() -> None:
    policy = HostPolicy.model_validate(_PERMISSIVE)
    check_policy(_doc({"extraArgs": ["-device", "usb-tablet,id=t0", "-k", "de"]}), policy)
    wider = HostPolicy.model_validate({**_PERMISSIVE, "deviceAllowlist": {"e1000": ["mac"]}})
    check_policy(_doc({"extraArgs": ["-device", "e1000,mac=52:54:00:00:00:01"]}), wider)
    assert "usb-tablet" not in wider.device_allowlist  # the host's list replaces the default


def test_remote_images_and_vde_sockets_are_host_policy() -> None:
    doc = _doc({"disks": [{"cdrom": {"image": "https://example.org/x.iso"}}]})
    refusals = _refusals(doc, HostPolicy())
    assert "remoteImages" in refusals["spec.vm.disks[0].cdrom.image"]
    check_policy(doc, HostPolicy(remote_images=True))
    vde = _doc({"networks": [{"vde": {"socket": "/run/other/vde.ctl"}}]})
    refusals = _refusals(vde, HostPolicy(vde_sockets=["/run/vde"]))
    assert "vdeSockets" in refusals["spec.vm.networks[0].vde.socket"]
    check_policy(_doc({"networks": [{"vde": {"socket": "/run/vde/a.ctl"}}]}),
                 HostPolicy(vde_sockets=["/run/vde"]))  # fmt: skip


@pytest.mark.parametrize(
    "helper", ["/bin/sh -c id", "relative/helper", "/x;id", "/x$(id)", "/a,b", "/x`id`"]
)
def test_bridge_helper_is_a_plain_absolute_program(helper: str) -> None:
    with pytest.raises(ValidationError):
        HostPolicy.model_validate({"bridgeHelper": helper})


def test_tcg_tb_size_comes_from_the_host_policy(tmp_path: Path) -> None:
    """``tcgTbSize`` (MiB) sizes every TCG guest's translation cache: many small TCG guests
    fit on one host (bench/compare.py's density waves); KVM guests never get it."""
    from corral.runner.config import render_for_host, resolve_paths

    doc = parse_document({"metadata": {"name": "tb"}, "spec": {"vm": {"maximumRam": "128Mi"}},
                          "runner": {"dataDir": str(tmp_path / "d"),
                                     "runtimeDir": str(tmp_path / "r")}})  # fmt: skip
    paths = resolve_paths(doc)

    def accel(policy: HostPolicy, accelerator: str) -> str:
        argv = render_for_host(doc, paths, policy, accelerator=accelerator)
        return argv[argv.index("-accel") + 1]

    small = HostPolicy.model_validate({"tcgTbSize": 16})
    assert accel(small, "tcg") == "tcg,tb-size=16"
    assert accel(HostPolicy(), "tcg") == "tcg"
    assert accel(small, "kvm") == "kvm"
    with pytest.raises(ValidationError, match="tcgTbSize"):
        HostPolicy.model_validate({"tcgTbSize": 0})
