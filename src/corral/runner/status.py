"""What a supervisor reports: the VM's state, conditions and live values.

The status is one JSON document, written atomically (:func:`corral.host.atomic.write_atomic`)
so a reader (the manager, a systemd unit's watcher, ``cat``) never sees half of it. Events are JSON
lines with a timestamp, a type and free fields.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import TYPE_CHECKING

from corral.host.atomic import write_atomic  # re-exported: the one atomic write
from corral.runner.contract import EventSink  # re-exported: its old home

if TYPE_CHECKING:
    from corral.runner.filechannel import JsonLinesSink

__all__ = [
    "Condition",
    "EventSink",
    "JsonLinesSink",
    "VmState",
    "VmStatus",
    "now_iso",
    "write_atomic",
]


class VmState(StrEnum):
    STOPPED = "Stopped"
    STARTING = "Starting"
    RUNNING = "Running"
    STOPPING = "Stopping"
    CRASHED = "Crashed"
    FAILED = "Failed"
    """Set by the manager, never by a runner: the VM's start failed the same way twice in a
    row, so it is not retried until a user starts it again or changes its spec."""


class Condition(StrEnum):
    BOOTED = "Booted"
    AGENT_CONNECTED = "AgentConnected"
    DISPLAY_CONNECTED = "DisplayConnected"
    TPM_AVAILABLE = "TpmAvailable"  # only for VMs with useTpm: False when swtpm died
    QMP_CONNECTED = "QmpConnected"  # only shown False: a qemu found without its QMP socket


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass
class ConditionStatus:
    status: bool
    reason: str
    since: str
    message: str | None = None  # what a person needs to know (BootTimeout: the console tail)


@dataclass
class VmStatus:
    name: str
    state: VmState = VmState.STOPPED
    conditions: dict[str, ConditionStatus] = field(default_factory=dict)
    pid: int | None = None
    swtpm_pid: int | None = None
    accelerator: str | None = None
    cpus: int | None = None
    ram: int | None = None
    cdrom: dict[str, str | None] = field(default_factory=dict)
    cdrom_pending: dict[str, str | None] = field(default_factory=dict)
    ips: list[str] = field(default_factory=list)
    pending_restart: list[str] = field(default_factory=list)
    config_error: str | None = None
    stopped_by: str | None = None
    exit: dict[str, object] | None = None
    restarts: int = 0
    started_at: str | None = None
    booted_at: str | None = None
    stopped_at: str | None = None
    updated_at: str = field(default_factory=now_iso)

    def set_condition(self, condition: Condition, value: bool, reason: str) -> bool:
        """Set a condition; True if it changed."""
        current = self.conditions.get(condition.value)
        if current is not None and current.status == value:
            return False
        self.conditions[condition.value] = ConditionStatus(value, reason, now_iso())
        return True

    def condition(self, condition: Condition) -> bool:
        current = self.conditions.get(condition.value)
        return bool(current and current.status)

    def condition_reason(self, condition: Condition) -> str | None:
        current = self.conditions.get(condition.value)
        return current.reason if current is not None else None

    def report_condition(
        self, condition: Condition, value: bool, reason: str, message: str | None
    ) -> None:
        """Set a condition even if only its reason or message changes (a condition that
        stays False, now for a known reason)."""
        self.conditions[condition.value] = ConditionStatus(value, reason, now_iso(), message)

    def to_json(self) -> dict[str, object]:
        data = asdict(self)
        data["state"] = self.state.value
        for cond in data["conditions"].values():
            if cond.get("message") is None:
                del cond["message"]
        return {_camel(k): v for k, v in data.items()}


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.title() for part in rest)


def __getattr__(name: str) -> type[JsonLinesSink]:
    """``JsonLinesSink`` moved to :mod:`corral.runner.filechannel` (kept importable here)."""
    if name == "JsonLinesSink":
        from corral.runner.filechannel import JsonLinesSink

        return JsonLinesSink
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def make_event(vm: str, kind: str, **fields: object) -> dict[str, object]:
    return {"ts": now_iso(), "t": round(time.time(), 3), "vm": vm, "event": kind, **fields}
