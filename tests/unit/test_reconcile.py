"""The reconcile loop (corral.manager.reconcile) against FakeBackend, an in-memory backend
registered by name like any plug-in: no qemu, no runner. What the loop decides from what it
observes: a crash restarts with a doubling backoff, restartPolicy Never leaves the VM Stopped,
two identical start failures make it Failed (not retried, waits end at once), a refusal for
capacity is retried until room frees up, desired Stopped stops, and a capability the backend
does not declare is refused with 501 before the backend is called."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import click
import pytest

from corral.errors import CorralError, QemuError, SpecError, Unsupported
from corral.manager import BACKENDS, Manager, ManagerConfig
from corral.manager.backends import (
    Capability,
    Capacity,
    ConsoleStream,
    EventCallback,
    Observed,
    StatusCallback,
)
from corral.manager.retained import RetainedSet
from corral.qemu.agent import ExecResult
from corral.runner.status import VmState, make_event
from corral.spec import HostPolicy, VmDocument, parse_document

BACKOFF = 0.2  # backoffInitialSeconds of these managers


class FakeBackend:
    """A fake of the backend protocol, in memory: ``start`` makes a VM Running at once (or
    raises the next error of ``start_errors``), ``crash`` is qemu dying on its own; every
    state change is reported through ``on_event`` as a runner would."""

    name = "fake"
    capabilities = frozenset({Capability.LIVE_APPLY})

    def __init__(self, on_event: EventCallback, on_status: StatusCallback) -> None:
        self.on_event = on_event
        self.on_status = on_status
        self.states: dict[str, VmState] = {}
        self.starts: list[str] = []
        self.stops: list[str] = []
        self.start_errors: list[CorralError] = []
        self.applied: list[str] = []
        self.offer = Capacity(cpus=8, ram=64 * 2**30)

    @classmethod
    def from_config(
        cls,
        config: ManagerConfig,
        policy: HostPolicy,
        on_event: EventCallback,
        on_status: StatusCallback,
    ) -> FakeBackend:
        return cls(on_event, on_status)

    def _become(self, name: str, state: VmState, **fields: object) -> None:
        previous = self.states.get(name, VmState.STOPPED)
        self.states[name] = state
        event = make_event(name, "StateChanged", state=state.value, previous=previous.value)
        self.on_event(name, {**event, **fields})

    def crash(self, name: str) -> None:
        self._become(name, VmState.CRASHED, exit={"code": None, "signal": 9})

    def capacity(self) -> Capacity:
        return self.offer

    async def adopt(self, doc: VmDocument) -> bool:
        return False

    async def start(self, doc: VmDocument) -> None:
        self.starts.append(doc.name)
        if self.start_errors:
            raise self.start_errors.pop(0)
        self._become(doc.name, VmState.RUNNING)

    async def stop(self, name: str, timeout: float | None = None) -> str:
        if self.states.get(name) not in (VmState.STARTING, VmState.RUNNING):
            return "already-stopped"
        self.stops.append(name)
        self._become(name, VmState.STOPPED, stoppedBy="manager")
        return "powerdown"

    async def kill(self, name: str) -> None:
        self._become(name, VmState.STOPPED, stoppedBy="kill")

    async def reset(self, name: str) -> None:
        raise AssertionError("the manager asks capabilities first: reset is not declared")

    async def apply(self, doc: VmDocument) -> list[str]:
        assert Capability.LIVE_APPLY in self.capabilities, "asked before it is called"
        self.applied.append(doc.name)
        return []

    def observe(self, name: str) -> Observed:
        state = self.states.get(name, VmState.STOPPED)
        return Observed(state, {"state": state.value})

    async def forget(self, name: str, *, delete_disks: bool) -> RetainedSet | None:
        self.states.pop(name, None)
        return None

    def open_console(self, name: str) -> AbstractAsyncContextManager[ConsoleStream]:
        raise AssertionError("the manager asks capabilities first: console is not declared")

    def log_file(self, name: str, source: Any) -> Path:
        return Path("/nonexistent") / name / str(source)

    async def set_display_password(self, name: str, password: str, expiry: str) -> None:
        raise AssertionError("not declared")

    async def exec(
        self, name: str, argv: list[str], *, stdin: bytes | None = None, timeout: float = 60.0
    ) -> ExecResult:
        raise AssertionError("not declared")

    async def close(self) -> None:
        pass


def vm(name: str, *, state: str = "Running", restart_policy: str = "Always") -> dict[str, Any]:
    return {
        "metadata": {"name": name},
        "spec": {
            "restartPolicy": restart_policy,
            "vm": {"state": state, "maximumCpus": 2, "maximumRam": "256Mi"},
        },
    }


@pytest.fixture
async def manager(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Manager]:
    monkeypatch.setitem(BACKENDS, "fake", f"{__name__}:FakeBackend.from_config")
    config = ManagerConfig(
        state_dir=tmp_path / "state",
        backend="fake",
        backoff_initial_seconds=BACKOFF,
        backoff_max_seconds=5.0,
        resync_seconds=3600,
    )
    m = Manager(config, policy=HostPolicy())
    assert isinstance(m.backend, FakeBackend), "built from the registry by name"
    yield m
    await m.close()


def fake(m: Manager) -> FakeBackend:
    assert isinstance(m.backend, FakeBackend)
    return m.backend


async def until(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout}s")
        await asyncio.sleep(0.02)


def kinds(m: Manager, name: str, kind: str) -> list[dict[str, Any]]:
    return [e.data for e in m.events(name) if e.kind == kind]


async def test_a_crash_restarts_after_a_doubling_backoff(manager: Manager) -> None:
    await manager.open()
    await manager.create(vm("web"))
    await manager.wait_for("web", {"Running"}, 5)
    backend = fake(manager)
    assert backend.starts == ["web"]

    for n, delay in ((1, BACKOFF), (2, 2 * BACKOFF)):
        crashed = time.monotonic()
        backend.crash("web")

        def restarted(want: int = n + 1) -> bool:
            return len(backend.starts) == want

        await until(restarted, 5, f"restart {n}")
        waited = time.monotonic() - crashed
        assert waited >= delay * 0.9, f"restart {n} after {waited:.2f}s, before its backoff"
        await manager.wait_for("web", {"Running"}, 5)
        scheduled = kinds(manager, "web", "RestartScheduled")[-1]
        assert (scheduled["reason"], scheduled["failures"]) == ("Crashed", n)
        assert scheduled["delay"] == pytest.approx(delay)
        assert "killed by signal 9" in scheduled["detail"]
    await until(lambda: manager.get("web").status.get("restartCount") == 2, 5, "restartCount")


async def test_restart_policy_never_leaves_a_crashed_vm_stopped(manager: Manager) -> None:
    await manager.open()
    await manager.create(vm("once", restart_policy="Never"))
    await manager.wait_for("once", {"Running"}, 5)
    fake(manager).crash("once")
    await until(lambda: manager.get("once").desired == "Stopped", 5, "desired Stopped stored")
    await asyncio.sleep(3 * BACKOFF)
    assert fake(manager).starts == ["once"], "never started again"
    assert kinds(manager, "once", "NotRestarted") == [{"restartPolicy": "Never"}]
    assert kinds(manager, "once", "RestartScheduled") == []


async def test_two_identical_start_failures_make_it_failed(manager: Manager) -> None:
    refused = "qemu failed to start (exit code 1); qemu said: bad -machine option"
    backend = fake(manager)
    backend.start_errors = [QemuError(refused), QemuError(refused)]
    await manager.open()
    await manager.create(vm("bad"))
    began = time.monotonic()
    with pytest.raises(QemuError, match=r"twice the same way.*bad -machine option"):
        await manager.wait_for("bad", {"Running"}, 30)
    assert time.monotonic() - began < 10, "the wait ends when it is Failed, not at its timeout"
    assert backend.starts == ["bad", "bad"]
    await asyncio.sleep(4 * BACKOFF)
    assert backend.starts == ["bad", "bad"], "a Failed VM is not retried"
    await until(lambda: manager.get("bad").status.get("state") == "Failed", 5, "Failed stored")
    assert len(kinds(manager, "bad", "Failed")) == 1

    await manager.start("bad", wait=5)  # a user's start tries again, afresh
    assert backend.starts == ["bad", "bad", "bad"]


async def test_desired_stopped_stops_the_vm(manager: Manager) -> None:
    await manager.open()
    await manager.create(vm("web"))
    await manager.wait_for("web", {"Running"}, 5)
    await manager.stop("web", wait=5)
    backend = fake(manager)
    assert backend.stops == ["web"]
    assert kinds(manager, "web", "Stopped")[-1]["how"] == "powerdown"
    await asyncio.sleep(3 * BACKOFF)
    assert backend.starts == ["web"], "a VM stopped by the manager is not restarted"


async def test_a_change_reaches_a_running_vm_only_through_a_backend_that_can(
    manager: Manager,
) -> None:
    await manager.open()
    await manager.create(vm("web"))
    await manager.wait_for("web", {"Running"}, 5)
    backend = fake(manager)
    await manager.patch("web", {"spec": {"vm": {"currentCpus": 1}}})
    await until(lambda: backend.applied == ["web"], 5, "applied live")

    backend.capabilities = frozenset()  # a placement that cannot change a running VM
    await manager.patch("web", {"spec": {"vm": {"currentCpus": 2}}})
    await until(lambda: bool(kinds(manager, "web", "ApplyDeferred")), 5, "deferred")
    deferred = kinds(manager, "web", "ApplyDeferred")[-1]
    assert "next start" in deferred["reason"] and deferred["generation"] == 3
    assert backend.applied == ["web"], "not called"


async def test_a_capacity_refusal_is_retried_until_room_frees_up(manager: Manager) -> None:
    manager.store.create(parse_document(vm("big")))  # desired Running before the daemon opens
    backend = fake(manager)
    backend.offer = Capacity(cpus=0, ram=64 * 2**30)
    await manager.open()
    await until(lambda: len(kinds(manager, "big", "RestartScheduled")) >= 3, 10, "retries")
    retries = kinds(manager, "big", "RestartScheduled")
    assert all("this host allows 0" in r["detail"] for r in retries), retries
    assert [r["failures"] for r in retries[:3]] == [1, 2, 3]
    assert manager.get("big").status.get("state") != "Failed", "room may free up: not Failed"
    assert backend.starts == [], "refused by admission: the backend is never asked"

    backend.offer = Capacity(cpus=8, ram=64 * 2**30)
    await manager.wait_for("big", {"Running"}, 10)
    assert backend.starts == ["big"]
    report = manager.capacity()
    assert report["cpus"] == {"total": 8, "limit": 32, "used": 2, "available": 30}


async def test_what_the_backend_cannot_do_is_refused_with_501(manager: Manager) -> None:
    await manager.open()
    await manager.create(vm("web"))
    await manager.wait_for("web", {"Running"}, 5)
    with pytest.raises(Unsupported, match=r"fake backend cannot reset a VM \(use restart\)") as e:
        await manager.reset("web")
    assert e.value.status == 501
    with pytest.raises(Unsupported, match="cannot run programs in a guest"):
        await manager.exec("web", ["true"])
    with pytest.raises(Unsupported, match="cannot serve a VM's serial console"):
        manager.open_console("web")


def test_backends_are_chosen_by_registered_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from corral.cli.serve import serve
    from corral.manager import load_manager_config

    with pytest.raises(SpecError) as refused:
        load_manager_config(None, stateDir=str(tmp_path), backend="fake")
    [issue] = refused.value.issues
    assert issue.loc == "backend" and "choose one of embedded, systemd" in issue.reason
    option = next(p for p in serve.params if p.name == "backend")
    assert isinstance(option.type, click.Choice)
    assert "fake" not in option.type.choices

    monkeypatch.setitem(BACKENDS, "fake", f"{__name__}:FakeBackend.from_config")
    assert load_manager_config(None, stateDir=str(tmp_path), backend="fake").backend == "fake"
    assert "fake" in option.type.choices, "the CLI offers what the registry holds"
