"""Failed states and the daemon's pending decisions while the store cannot be written (review of
8d5345c), with real qemu, real guests under TCG and a real SQLite store that another
connection holds write-locked (``BEGIN EXCLUSIVE`` left open, as an admin's ``sqlite3`` does):

* a user's request that the store refuses (503) changed nothing: the daemon's pending desired
  Stopped (a guest's poweroff) is kept, so no resync starts the VM, and a Failed VM stays
  Failed (item 3);
* at daemon stop, the daemon's pending desired states get one last write; what the store
  still cannot take is logged with its count (item 5);
* a delete whose record the store cannot remove once the disks are handled says so, keeps the
  deletion and finishes it in the background; nothing starts the VM meanwhile (item 6);
* only a start failure that would repeat makes a VM Failed (qemu killed by a signal stays on
  backoff), and a Failed VM holds no CPUs and no ports (item 7);
* ``start --wait`` of a VM that becomes Failed ends with the start's error while its status
  cannot be written (item 8);
* a log follow goes on while the store cannot be read, and ends cleanly when the daemon
  stops (item 12).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from corral.errors import PolicyError, QemuError, StoreUnavailable
from corral.manager import Manager
from corral.runner.status import VmState
from corral.spec import HostPolicy
from tests.integration.test_boot_failures import forward
from tests.integration.test_manager import Box, box_maker, qemu_pids, tiny, until
from tests.unit.test_store_errors import locked

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PREFIX = "fs-"
BAD_VGA = ["-vga", "bogusvga"]  # qemu exits with code 1: "unknown vga type"


@pytest.fixture
async def make_box() -> AsyncIterator[Callable[..., Box]]:
    async with box_maker(PREFIX) as make:
        yield make


def count(m: Manager, name: str, kind: str) -> int:
    return sum(1 for e in m.events(name) if e.kind == kind)


async def failed_vm(b: Box, guest: Any, name: str, **vm: Any) -> Manager:
    """A manager (its policy lets ``-vga`` pass) with VM ``name`` Failed: qemu refused its
    argv twice the same way."""
    m = b.manager or await b.open(HostPolicy(args_allowlist=["-vga"]))
    await m.create(tiny(guest, name, maximumCpus=1, extraArgs=BAD_VGA, **vm))
    await until(lambda: b.status(name).get("state") == "Failed", 60, f"{name} Failed")
    return m


async def written(m: Manager) -> None:
    """Until the daemon's own records are in the store."""
    await until(lambda: m.store_unavailable is None and m._writeback.pending == 0, 20, "written")


# --- item 3: a refused request changes nothing -------------------------------------------


async def test_a_refused_stop_keeps_the_daemons_pending_stop(
    make_box: Callable[..., Box], tiny_guest: Any
) -> None:
    """A guest powers off (guestShutdownStops: the daemon decides desired Stopped) while the
    store is locked; a user's stop is refused (503). The daemon's decision is still pending:
    resyncs do not start the VM, and it is written once the store can be written."""
    b = make_box()
    m = await b.open()
    doc = tiny(tiny_guest, "fs-off", maximumCpus=1)
    doc["spec"]["guestShutdownStops"] = True
    await m.create(doc)
    await b.running("fs-off")
    with locked(b.config.store):
        result = await m.exec(
            "fs-off", ["/bin/sh", "-c", "(sleep 0.3; poweroff -f) >/dev/null 2>&1 &"]
        )
        assert result.exit_code == 0
        await until(lambda: qemu_pids("fs-off") == [], 60, "the guest powered off")
        with pytest.raises(StoreUnavailable, match="locked"):
            await m.stop("fs-off")
        for _ in range(40):  # four resyncs (1 s) while the store stays locked
            assert qemu_pids("fs-off") == [], "a resync started the VM its guest powered off"
            await asyncio.sleep(0.1)
        assert m.get("fs-off").desired == "Running"  # the store has not taken it yet
    await until(lambda: m.get("fs-off").desired == "Stopped", 20, "desired Stopped written")
    await asyncio.sleep(2)
    assert qemu_pids("fs-off") == []


async def test_a_refused_stop_keeps_a_vm_failed(
    make_box: Callable[..., Box], tiny_guest: Any
) -> None:
    b = make_box()
    m = await failed_vm(b, tiny_guest, "fs-stay")
    await written(m)
    assert count(m, "fs-stay", "StartFailed") == 2
    with locked(b.config.store):
        with pytest.raises(StoreUnavailable, match="nothing was changed"):
            await m.stop("fs-stay")
        await asyncio.sleep(2.5)  # resyncs: a Failed VM is not started again
    await asyncio.sleep(2)
    await written(m)
    assert count(m, "fs-stay", "StartFailed") == 2  # not retried
    status = b.status("fs-stay")
    assert status["state"] == "Failed" and status["desiredState"] == "Running"


# --- item 5: pending desired states at daemon stop -----------------------------------------


async def test_daemon_stop_writes_pending_desired_states_and_logs_what_is_lost(
    make_box: Callable[..., Box], tiny_guest: Any, caplog: pytest.LogCaptureFixture
) -> None:
    b = make_box()
    m = await b.open()
    doc = tiny(tiny_guest, "fs-never", maximumCpus=1)
    doc["spec"]["restartPolicy"] = "Never"
    await m.create(doc)
    await b.running("fs-never")

    # the store stays locked through the stop: the daemon's decision is lost, and it says so
    caplog.set_level(logging.WARNING, logger="corral.manager")
    with locked(b.config.store):
        (pid,) = qemu_pids("fs-never")
        os.kill(pid, signal.SIGKILL)
        await until(lambda: "fs-never" in m._pending_desired, 20, "the daemon's desired Stopped")
        await m.close()
    (lost,) = [r for r in caplog.records if r.getMessage() == "StoreRecordsLost"]
    fields = lost.__dict__["fields"]
    assert fields["desiredStates"] == {"fs-never": "Stopped"}
    assert fields["records"] >= 1 and "locked" in fields["error"]

    m = await b.open()  # the decision was lost: the VM is still desired Running
    assert m.get("fs-never").desired == "Running"
    await b.running("fs-never")

    # the store is let go just before the stop: the last write takes the decision
    with locked(b.config.store):
        (pid,) = qemu_pids("fs-never")
        os.kill(pid, signal.SIGKILL)
        await until(lambda: "fs-never" in m._pending_desired, 20, "the daemon's desired Stopped")
        await m.store.run(time.sleep, 0)  # the daemon's try in flight, if any, has failed
    await m.close()
    m = await b.open()
    assert m.get("fs-never").desired == "Stopped"
    await asyncio.sleep(2)
    assert qemu_pids("fs-never") == []


# --- item 6: a delete whose record the store cannot remove ---------------------------------


async def test_a_delete_the_store_cannot_finish_says_so_and_finishes_later(
    make_box: Callable[..., Box], tiny_guest: Any
) -> None:
    b = make_box()
    m = await b.open()
    await m.create(tiny(tiny_guest, "fs-del", maximumCpus=1, powerdownTimeout=5))
    await b.running("fs-del")
    deaf = await m.exec("fs-del", ["/bin/sh", "-c", "kill $(cat /run/acpid.pid)"])
    assert deaf.exit_code == 0  # its stop takes the whole powerdownTimeout

    deleting = asyncio.ensure_future(m.delete("fs-del"))
    await until(
        lambda: m.backend.observe("fs-del").state is VmState.STOPPING, 30, "fs-del stopping"
    )
    with locked(b.config.store):  # taken once the delete is under way
        with pytest.raises(StoreUnavailable) as info:
            await deleting
        message = str(info.value)
        (kept,) = [r for r in m.list_retained() if r.vm == "fs-del"]
        assert message.startswith(
            f"VM 'fs-del' is stopped and its disks are retained as {kept.id}, but the store "
            "cannot delete its record now (the store is unavailable: another process holds "
            "the write lock"
        ), message
        assert message.endswith(
            "the deletion is kept and retried in the background, and nothing starts the VM"
        )
        assert "nothing was changed" not in message
        assert info.value.reason == "locked" and info.value.retry_after == 2
        assert m.store.find("fs-del") is not None  # the record waits for the store
        for _ in range(30):  # three resyncs: nothing starts the VM whose disks are gone
            assert qemu_pids("fs-del") == []
            await asyncio.sleep(0.1)
    await until(lambda: m.store.find("fs-del") is None, 20, "the record deleted")
    deleted = [e for e in m.store.events("fs-del") if e.kind == "Deleted"]
    assert [e.data for e in deleted] == [
        {"deleteDisks": False, "retainedDisks": kept.id, "recordPending": True}
    ]
    await asyncio.sleep(2)
    assert qemu_pids("fs-del") == []
    assert [r.id for r in m.list_retained() if r.vm == "fs-del"] == [kept.id]


# --- item 7: what makes a VM Failed, and what a Failed VM holds ----------------------------


async def test_qemu_killed_by_a_signal_at_every_start_stays_on_backoff(
    make_box: Callable[..., Box], tiny_guest: Any
) -> None:
    """qemu killed (SIGKILL, as the OOM killer does) before its start completes, at every
    start: the same error each time, yet a start may pass next time, so it is retried with
    backoff, never Failed; once the killing stops, the VM runs."""
    b = make_box(backoff_max_seconds=2)
    m = await b.open()
    killing = True
    killed: set[int] = set()

    def killer() -> None:
        while killing:
            for pid in qemu_pids("fs-oom"):
                os.kill(pid, signal.SIGKILL)
                killed.add(pid)
            time.sleep(0.002)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    try:
        await m.create(tiny(tiny_guest, "fs-oom", maximumCpus=1))
        await until(lambda: count(m, "fs-oom", "StartFailed") >= 4, 40, "four failed starts")
    finally:
        killing = False
        thread.join()
    errors = {e.data["error"] for e in m.events("fs-oom") if e.kind == "StartFailed"}
    assert any("qemu exited before its QMP socket" in e for e in errors), errors
    assert count(m, "fs-oom", "Failed") == 0
    assert b.status("fs-oom")["state"] != "Failed"
    assert len(killed) >= 4
    await b.running("fs-oom")  # the backoff starts it again, and now it runs


def capacity_one() -> float:
    """A cpuOvercommit that gives room for exactly one one-CPU VM on this host."""
    return 1.5 / len(os.sched_getaffinity(0))


async def test_a_failed_vm_holds_no_cpus_and_no_ports(
    make_box: Callable[..., Box], tiny_guest: Any
) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = int(probe.getsockname()[1])
    b = make_box(cpu_overcommit=capacity_one())
    m = await failed_vm(b, tiny_guest, "fs-holds", networks=forward(port))
    assert m.get("fs-holds").desired == "Running"

    # the Failed VM's qemu is stopped: its CPU and its port are free for another VM
    await m.create(tiny(tiny_guest, "fs-takes", maximumCpus=1, networks=forward(port)))
    await until(lambda: len(qemu_pids("fs-takes")) == 1, 30, "fs-takes started")

    # and a user's start of the Failed VM is admitted again, against them
    with pytest.raises(PolicyError, match="this host allows 1"):
        await m.start("fs-holds")
    assert b.status("fs-holds")["state"] == "Failed"


# --- item 8: a wait while the store cannot be written ---------------------------------------


async def test_start_wait_ends_with_the_error_while_the_store_is_locked(
    make_box: Callable[..., Box], tiny_guest: Any
) -> None:
    b = make_box()
    m = await failed_vm(b, tiny_guest, "fs-wait")
    with locked(b.config.store):  # its status (Failed again) cannot be written
        begun = time.monotonic()
        with pytest.raises(QemuError) as info:
            await m.start("fs-wait", wait=45)  # desired Running already: nothing to write
        took = time.monotonic() - begun
        assert took < 25, f"start --wait ended after {took:.1f}s"
        assert "failed to start, twice the same way" in str(info.value)
        assert "unknown vga type: bogusvga" in str(info.value)
        with pytest.raises(QemuError, match="twice the same way"):
            await m.wait("fs-wait", "state=Running", 45)
        failed = await m.wait("fs-wait", "state=Failed", 5)  # what is waited for
        assert failed.name == "fs-wait"


# --- item 12: a log follow while the store cannot be read, and at daemon stop ---------------

# another process holding SQLite's WAL read locks (what a process recovering the WAL holds):
# every read of the store fails (SQLITE_PROTOCOL, after SQLite's own ~10 s of retries)
READ_LOCKER = """
import fcntl, os, sys
fd = os.open(sys.argv[1] + "-shm", os.O_RDWR)
fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 5, 123, os.SEEK_SET)  # WAL_READ_LOCK(0..4)
print("locked", flush=True)
sys.stdin.readline()
"""


@pytest.mark.timeout(300)
async def test_a_log_follow_goes_on_while_the_store_cannot_be_read_and_ends_at_stop(
    make_box: Callable[..., Box], tiny_guest: Any
) -> None:
    b = make_box()
    m = await failed_vm(b, tiny_guest, "fs-log")
    chunks: list[bytes] = []

    async def follow() -> None:
        async for chunk in m.logs("fs-log", "qemu", follow=True):
            chunks.append(chunk)

    following = asyncio.ensure_future(follow())
    await until(lambda: b"unknown vga type" in b"".join(chunks), 20, "the log's past")
    locker = subprocess.Popen(
        [sys.executable, "-c", READ_LOCKER, str(b.config.store)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE,
    )  # fmt: skip
    try:
        assert locker.stdout is not None and locker.stdout.readline() == b"locked\n"
        with pytest.raises(StoreUnavailable):
            m.store.find("fs-log")  # the store cannot be read now
        await asyncio.sleep(12)  # the follow's own look at the store failed meanwhile
        assert not following.done(), following
        with m.backend.log_file("fs-log", "qemu").open("ab") as log:
            log.write(b"fs-log: written while the store could not be read\n")
    finally:
        assert locker.stdin is not None
        locker.stdin.write(b"\n")
        locker.stdin.close()
        locker.wait()
        if locker.stdout is not None:
            locker.stdout.close()
    await until(lambda: b"could not be read" in b"".join(chunks), 20, "the follow goes on")

    await m.close()
    await asyncio.wait_for(following, 10)  # ends, cleanly
    assert following.exception() is None
