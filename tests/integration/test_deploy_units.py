"""The shipped systemd units (deploy/*.service), checked by the real ``systemd-analyze verify``
as the generated runner units are (tests/integration/test_systemd_backend.py), with the
executable pointed at the ``corral`` this test runs (verify insists that it exists); and their
command lines parsed by the real CLI."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import click
import pytest

from corral.cli.main import cli
from tests.integration.test_systemd_backend import NEEDS_ANALYZE, assert_verified, verify

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
SHIPPED = "/usr/local/bin/corral"
CORRAL = Path(sys.executable).with_name("corral")


def settings(text: str) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in text.splitlines():
        if "=" in line and not line.lstrip().startswith(("#", ";")):
            key, value = line.split("=", 1)
            found.setdefault(key.strip(), []).append(value.strip())
    return found


def installed(tmp_path: Path, name: str) -> tuple[Path, dict[str, list[str]]]:
    """The unit as installed where corral lives: only the executable's path differs."""
    text = (DEPLOY / name).read_text()
    assert SHIPPED in text
    local = text.replace(SHIPPED, str(CORRAL))
    assert [a for a, b in zip(text.splitlines(), local.splitlines(), strict=True) if a != b] == [
        line for line in text.splitlines() if SHIPPED in line
    ]
    path = tmp_path / name
    path.write_text(local)
    return path, settings(text)


def parses(argv: list[str]) -> None:
    """The real CLI parses ``argv`` (options and choices checked, nothing run)."""
    assert argv[0] == SHIPPED
    ctx = cli.make_context("corral", argv[1:2])
    command = cli.get_command(ctx, argv[1])
    assert command is not None, argv
    if argv[2:3] and isinstance(command, type(cli)):
        command = command.get_command(ctx, argv[2])
        assert command is not None, argv
        command.make_context(argv[2], argv[3:])
    else:
        command.make_context(argv[1], argv[2:])


@NEEDS_ANALYZE
def test_corral_service_is_a_notify_unit_that_never_stops_vms(tmp_path: Path) -> None:
    assert CORRAL.exists(), f"{CORRAL} missing: pip install -e ."
    path, values = installed(tmp_path, "corral.service")
    assert_verified(path, verify(path))
    assert values["Type"] == ["notify"] and values["NotifyAccess"] == ["main"]
    assert values["KillMode"] == ["process"]  # qemu stays when the daemon stops or restarts
    assert values["StateDirectoryMode"] == ["0700"]
    argv = shlex.split(values["ExecStart"][0])
    assert argv[1:] == ["serve", "--state-dir", "/var/lib/corral", "--log-format", "json"]
    parses(argv)
    with pytest.raises(click.BadParameter, match="'yaml' is not one of"):
        parses([*argv[:-1], "yaml"])  # the parse check is real


@NEEDS_ANALYZE
def test_corral_guests_service_stops_vms_at_shutdown_only(tmp_path: Path) -> None:
    path, values = installed(tmp_path, "corral-guests.service")
    # verify loads the units it names too: corral.service beside it, installed the same way
    installed(tmp_path, "corral.service")
    assert_verified(path, verify(path))
    assert values["Type"] == ["oneshot"] and values["RemainAfterExit"] == ["yes"]
    assert values["After"] == ["corral.service"] and values["Wants"] == ["corral.service"]
    assert "Requires" not in values and "BindsTo" not in values  # a restart must not stop VMs
    argv = shlex.split(values["ExecStop"][0])
    assert argv[1:] == ["host", "shutdown"]
    parses(argv)
