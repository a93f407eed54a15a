"""The ``corral`` command line, in-process with click's CliRunner: output shapes, error lines
and exit codes (0 ok, 1 corral error, 2 usage error).

``render`` needs the qemu binary on PATH (it is not run); ``host info`` runs
``qemu-system-x86_64 --version`` and its ``help`` listings, with the KVM probe faked so the
test never boots anything.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from corral import __version__
from corral.cli.main import cli
from corral.errors import SpecError
from corral.qemu import fingerprint
from corral.qemu.fingerprint import KvmProbe

VM = """\
metadata: {name: cli-vm}
spec:
  vm:
    firmware: bios
    machine: pc
    maximumCpus: 2
    maximumRam: 256Mi
    machineUuid: 2b6c0a0e-7f51-4bd4-9d1a-6e0f6b9f4c11
    disks:
      - file: {path: images/root.qcow2}
      - cdrom: {image: ""}
    networks:
      - user:
          portForwards: [{hostPort: 2222, guestPort: 22}]
"""


def _invoke(*args: str) -> Result:
    return CliRunner().invoke(cli, list(args), prog_name="corral")


@pytest.fixture
def files(tmp_path: Path) -> dict[str, str]:
    (tmp_path / "images").mkdir()
    vm = tmp_path / "vm.yaml"
    vm.write_text(VM)
    policy = tmp_path / "host.yaml"
    policy.write_text(f"imagePaths: [{tmp_path / 'images'}]\n")
    return {
        "vm": str(vm),
        "policy": str(policy),
        "data": str(tmp_path / "data"),
        "run": str(tmp_path / "run"),
        "images": str(tmp_path / "images"),
        "root": str(tmp_path),
    }


def _render(files: dict[str, str], *extra: str) -> Result:
    return _invoke(
        "render",
        "-c",
        files["vm"],
        "--accel",
        "tcg",
        "--data-dir",
        files["data"],
        "--runtime-dir",
        files["run"],
        "--policy",
        files["policy"],
        *extra,
    )


# --- render --------------------------------------------------------------------------------


def test_render_prints_one_argument_per_line(files: dict[str, str]) -> None:
    result = _render(files, "--no-pause")
    assert result.exit_code == 0, result.output
    assert result.stderr == ""
    lines = result.stdout.splitlines()
    assert lines[0].endswith("qemu-system-x86_64")
    assert lines[lines.index("-accel") + 1] == "tcg"
    assert lines[lines.index("-machine") + 1].startswith("pc")
    assert lines[lines.index("-uuid") + 1] == "2b6c0a0e-7f51-4bd4-9d1a-6e0f6b9f4c11"
    assert "-S" not in lines and "-no-shutdown" not in lines
    joined = "\n".join(lines)
    assert f"filename={files['images']}/root.qcow2" in joined, "relative to the document"
    assert "hostfwd=tcp:127.0.0.1:2222-:22" in joined
    assert f"{files['run']}/qmp.sock" in joined
    assert not any(line == "" for line in lines)


def test_render_json_prints_the_same_argv_as_a_list(files: dict[str, str]) -> None:
    plain = _render(files, "--no-pause")
    as_json = _render(files, "--no-pause", "--json")
    assert as_json.exit_code == 0, as_json.output
    argv = json.loads(as_json.stdout)
    assert isinstance(argv, list) and all(isinstance(a, str) for a in argv)
    assert argv == plain.stdout.splitlines()


def test_render_pauses_for_a_runner_by_default(files: dict[str, str]) -> None:
    result = _render(files, "--json")
    assert result.exit_code == 0, result.output
    argv = json.loads(result.stdout)
    assert "-S" in argv and "-no-shutdown" in argv
    standalone = json.loads(_render(files, "--json", "--standalone").stdout)
    assert "-S" not in standalone and "-no-shutdown" not in standalone


def test_render_refused_by_policy_exits_1_and_names_the_field(files: dict[str, str]) -> None:
    Path(files["vm"]).write_text(VM.replace("images/root.qcow2", "../outside.qcow2"))
    result = _render(files)
    assert result.exit_code == 1
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert lines[0] == "error: refused by host policy"
    assert lines[1].startswith("  spec.vm.disks[0].file.path: ")
    assert "outside the allowed image paths" in lines[1]
    assert "Traceback" not in result.output


def test_render_refuses_extra_args_by_default(files: dict[str, str]) -> None:
    Path(files["vm"]).write_text(VM + "    extraArgs: [-monitor, stdio]\n")
    result = _render(files)
    assert result.exit_code == 1
    assert "  spec.vm.extraArgs[0]: '-monitor' is not in the host's argsAllowlist" in (
        result.stderr
    )


def test_render_missing_file_is_a_corral_error(tmp_path: Path) -> None:
    result = _invoke("render", "-c", str(tmp_path / "nope.yaml"), "--accel", "tcg")
    assert result.exit_code == 1
    assert re.match(r"error: cannot read .*nope\.yaml", result.stderr)


def test_render_needs_a_config() -> None:
    result = _invoke("render")
    assert result.exit_code == 2
    assert "Missing option '-c' / '--config'" in result.stderr


def test_render_accel_is_a_choice(files: dict[str, str]) -> None:
    result = _invoke("render", "-c", files["vm"], "--accel", "hvf")
    assert result.exit_code == 2
    assert "'hvf' is not one of 'auto', 'kvm', 'tcg'" in result.stderr


# --- validate ------------------------------------------------------------------------------


def test_validate_a_good_file(files: dict[str, str]) -> None:
    result = _invoke("validate", "-c", files["vm"])
    assert result.exit_code == 0, result.output
    assert result.stdout == f"{files['vm']}: VM 'cli-vm' is valid\n"


def test_validate_a_bad_file_exits_1_with_one_error_line_and_field_issues(
    tmp_path: Path,
) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        """\
metadata: {name: Bad_Name}
spec:
  vm:
    maximumCpus: 2
    currentCpus: 3
    disks:
      - file: {path: /a}
      - file: {pth: /b}
"""
    )
    result = _invoke("validate", "-c", str(bad))
    assert result.exit_code == 1
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert lines[0] == "error: invalid VM document"
    assert all(line.startswith("  ") for line in lines[1:])
    issues = [line.strip() for line in lines[1:]]
    assert issues[0].startswith("metadata.name: must be a DNS-1123 label")
    assert "spec.vm.disks[1].file.pth: unknown field (did you mean 'path'?)" in issues
    assert len(issues) == 2, "the cross-field rule runs only once the fields are valid"


def test_validate_reports_cross_field_rules(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("metadata: {name: a}\nspec: {vm: {maximumCpus: 2, currentCpus: 3}}\n")
    result = _invoke("validate", "-c", str(bad))
    assert result.exit_code == 1
    assert result.stderr == (
        "error: invalid VM document\n  spec.vm.currentCpus: 3 is more than maximumCpus (2)\n"
    )


def test_validate_bad_yaml_names_the_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("metadata: {name: a}\nspec: [\n")
    result = _invoke("validate", "-c", str(bad))
    assert result.exit_code == 1
    assert re.match(rf"error: {re.escape(str(bad))}:\d+:\d+: not valid YAML", result.stderr)
    assert len(result.stderr.splitlines()) == 1


def test_validate_with_a_policy(files: dict[str, str], tmp_path: Path) -> None:
    ok = _invoke("validate", "-c", files["vm"], "--policy", files["policy"])
    assert ok.exit_code == 0, ok.output
    strict = tmp_path / "strict.yaml"
    strict.write_text("maxCpusPerVm: 1\n")
    refused = _invoke("validate", "-c", files["vm"], "--policy", str(strict))
    assert refused.exit_code == 1
    assert refused.stderr.splitlines() == [
        "error: refused by host policy",
        "  spec.vm.maximumCpus: 2 CPUs is more than this host allows per VM (1)",
    ]


def test_validate_with_a_bad_policy_file_names_its_field(
    files: dict[str, str], tmp_path: Path
) -> None:
    bad = tmp_path / "bad-policy.yaml"
    bad.write_text("imagePath: [/x]\n")
    result = _invoke("validate", "-c", files["vm"], "--policy", str(bad))
    assert result.exit_code == 1
    assert result.stderr.splitlines() == [
        f"error: invalid host policy {bad}",
        "  imagePath: unknown field (did you mean 'imagePaths'?)",
    ]


def test_debug_shows_the_exception_instead(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("metadata: {name: a}\nspec: {vm: {maximumCpus: 2, currentCpus: 3}}\n")
    result = _invoke("--debug", "validate", "-c", str(bad))
    assert isinstance(result.exception, SpecError)
    assert "error: invalid VM document" not in result.stderr


# --- usage errors, schema, version -------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ["render", "--bogus"],
        ["validate", "-c"],
        ["--bogus"],
        ["no-such-command"],
        ["host", "info", "--bogus"],
    ],
)
def test_usage_errors_exit_2(args: list[str]) -> None:
    result = _invoke(*args)
    assert result.exit_code == 2
    assert "Error:" in result.stderr
    assert "Traceback" not in result.output


def test_schema_prints_the_json_schema() -> None:
    result = _invoke("schema")
    assert result.exit_code == 0, result.output
    schema = json.loads(result.stdout)
    assert schema["title"] == "corral VirtualMachine"
    assert "VmSpec" in schema["$defs"]
    assert "maximumRam" in schema["$defs"]["VmSpec"]["properties"]


def test_version() -> None:
    result = _invoke("--version")
    assert result.exit_code == 0
    assert result.stdout.strip() == f"corral, version {__version__}"


def test_help_lists_the_commands() -> None:
    result = _invoke("--help")
    assert result.exit_code == 0
    for command in ("render", "validate", "schema", "host"):
        assert re.search(rf"^\s+{command}\s", result.stdout, re.M), command


# --- host info -----------------------------------------------------------------------------


@pytest.fixture
def no_probe(monkeypatch: pytest.MonkeyPatch) -> None:
    def fake(emulator: str | None = None, use_cache: bool = True, timeout: float = 15) -> KvmProbe:
        return KvmProbe(False, "faked: /dev/kvm comes from kvm_pvm")

    monkeypatch.setattr(fingerprint, "probe_kvm", fake)


@pytest.mark.usefixtures("no_probe")
def test_host_info_json(files: dict[str, str]) -> None:
    result = _invoke("host", "info", "--json", "--policy", files["policy"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert {
        "emulator",
        "qemu_version",
        "kvm_usable",
        "kvm_reason",
        "machines",
        "accelerators",
        "firmware",
        "swtpm",
        "tools",
        "tsc_khz",
        "policy",
    } <= set(data)
    assert data["emulator"].endswith("qemu-system-x86_64")
    assert re.fullmatch(r"\d+\.\d+\.\d+", data["qemu_version"])
    assert data["kvm_usable"] is False
    assert data["kvm_reason"] == "faked: /dev/kvm comes from kvm_pvm"
    assert {"q35", "pc", "microvm"} <= set(data["machines"])
    assert "tcg" in data["accelerators"]
    assert set(data["firmware"]) == {"uefi", "uefi-4m", "secure", "secure-4m"}
    for files_found in data["firmware"].values():
        assert files_found is None or set(files_found) == {"code", "vars"}
    assert {"qemu-img", "mkfs.vfat", "mcopy", "swtpm_setup", "qemu-bridge-helper"} <= set(
        data["tools"]
    )
    assert data["policy"]["imagePaths"] == [files["images"]]
    assert data["policy"]["argsAllowlist"] == []


@pytest.mark.usefixtures("no_probe")
def test_host_info_text(files: dict[str, str]) -> None:
    result = _invoke("host", "info", "--policy", files["policy"])
    assert result.exit_code == 0, result.output
    assert re.search(r"^qemu:\s+\S+qemu-system-x86_64 \d+\.\d+\.\d+$", result.stdout, re.M)
    assert re.search(r"^kvm usable:\s+no \(faked: ", result.stdout, re.M)
    assert f"imagePaths=['{files['images']}']" in result.stdout


def test_host_info_unknown_emulator_is_a_host_error() -> None:
    result = _invoke("host", "info", "--emulator", "qemu-system-does-not-exist")
    assert result.exit_code == 1
    assert result.stderr.startswith("error: qemu-system-does-not-exist not found: apt-get install")
