"""Secrets at rest and in flight (issue 9, item 10): a VM's cloud-init data (passwords, keys)
lives only in private files, and nowhere else: not in events, status, process argv, logs or
error messages. The manager's state dir is 0700 and its store 0600 (libvirt, Incus), also
when an older corral left them 0755/0644."""

from __future__ import annotations

import json
import os
import secrets
import sqlite3
import stat
from pathlib import Path
from typing import Any

import pytest

from corral.errors import CorralError
from tests.integration import test_manager
from tests.integration.test_manager import Box, tiny

box = test_manager.box  # the manager fixture, shared

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def argv_holding(secret: bytes) -> list[str]:
    """Every process on this host whose argv (``ps``, /proc/PID/cmdline) holds ``secret``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if secret in cmdline:
                found.append(f"{entry.name}: {cmdline[:200]!r}")
    return found


def files_holding(root: Path, secret: bytes) -> dict[str, int]:
    """{path: mode} of every regular file under ``root`` whose bytes hold ``secret``."""
    found = {}
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink() and secret in path.read_bytes():
            found[str(path.relative_to(root))] = mode(path)
    return found


async def test_user_data_secret_stays_in_private_files(box: Box, tiny_guest: Any) -> None:
    state = box.root
    # what an older corral left: a 0755 state dir, vms and run dirs, a 0644 store
    os.chmod(state, 0o755)  # noqa: S103 (the point of the test)
    for sub in ("vms", "run"):
        (state / sub).mkdir()
        os.chmod(state / sub, 0o755)  # noqa: S103
    old = sqlite3.connect(state / "corral.db")
    old.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
    old.commit()
    old.close()
    os.chmod(state / "corral.db", 0o644)

    m = await box.open()

    assert {p: oct(mode(state / p)) for p in (".", "vms", "run")} == dict.fromkeys(
        (".", "vms", "run"), "0o700"
    )
    store_files = sorted(state.glob("corral.db*"))
    assert [p.name for p in store_files] == ["corral.db", "corral.db-shm", "corral.db-wal"]
    assert all(mode(p) == 0o600 for p in store_files), [(p.name, oct(mode(p))) for p in store_files]

    secret = f"corral-secret-{secrets.token_hex(8)}"
    doc = tiny(tiny_guest, "sec", useTpm=True)
    doc["spec"]["cloudInit"] = {
        "userData": {
            "password": secret,
            "chpasswd": {"expire": False},
            "ssh_authorized_keys": [f"ssh-ed25519 AAAAC3Nz {secret}@host"],
        }
    }
    await m.create(doc)
    status = await box.running("sec")
    needle = secret.encode()

    # argv: qemu, swtpm, and every other process (corral's own included)
    qemu_argv = Path(f"/proc/{status['pid']}/cmdline").read_bytes()
    assert b"cidata" in qemu_argv and needle not in qemu_argv
    assert status.get("swtpmPid"), status
    assert argv_holding(needle) == []
    # events (the manager's and the runner's), the status, error messages
    events = m.events()
    assert {"Created", "StateChanged"} <= {e.kind for e in events}
    assert [e.kind for e in events if needle in json.dumps(e.to_json()).encode()] == []
    assert needle not in json.dumps(box.status("sec")).encode()
    for bad in (
        {"spec": {"cloudInit": {"metaData": secret}}},  # a wrong type, holding the secret
        {"spec": {"cloudInit": {"userData": 1234, "metaData": [secret]}}},
    ):
        with pytest.raises(CorralError) as err:
            await m.patch("sec", bad)
        text = str(err.value) + json.dumps([str(i) for i in err.value.issues])
        assert "spec.cloudInit" in text and secret not in text, text
    # files: only the seed, the runner's record of what it started and the store hold it,
    # each 0600 in a 0700 dir
    vm_dir, run_dir = state / "vms" / "sec", state / "run" / "sec"
    assert mode(vm_dir) == 0o700 and mode(run_dir) == 0o700
    assert files_holding(vm_dir, needle) == {"cidata.img": 0o600}
    assert files_holding(run_dir, needle) == {"started.json": 0o600}  # qemu.log, status, ...
    holding_store = files_holding(state, needle)
    assert set(holding_store) - {"corral.db", "corral.db-wal"} == {
        "vms/sec/cidata.img",
        "run/sec/started.json",
    }
    assert all(v == 0o600 for v in holding_store.values()), holding_store

    await m.stop("sec", wait=60)
    assert argv_holding(needle) == []
