"""What a wait waits for: ``state=Stopped``, ``condition=Booted`` (``kubectl wait --for``).

A :class:`WaitTarget` is parsed once from the text a user gives (``corral wait --for``, the
API's ``?for=``) and then judged against a VM's status document (``status.state``,
``status.conditions.<name>.status``), the one the manager stores and the API returns. The
manager's waits are event-driven: each status write wakes them (see ``Manager.wait``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from corral.errors import FieldIssue, SpecError
from corral.runner.status import Condition, VmState

__all__ = ["WaitTarget"]

_STATES = {s.value.lower(): s.value for s in VmState}
_CONDITIONS = {c.value.lower(): c.value for c in Condition}


@dataclass(frozen=True)
class WaitTarget:
    """``kind=name`` (and, for a condition, the status wanted: ``condition=Booted=false``)."""

    kind: Literal["state", "condition"]
    name: str
    value: bool = True

    @classmethod
    def parse(cls, text: str, field: str = "for") -> WaitTarget:
        """``state=NAME`` or ``condition=NAME[=true|false]``; names are case-insensitive.
        Anything else is a :class:`SpecError` at ``field`` that lists what is accepted."""
        kind, _, rest = text.strip().partition("=")
        name, _, value = rest.partition("=")
        kind = kind.lower()
        if kind == "state" and name.lower() in _STATES and not value:
            return cls("state", _STATES[name.lower()])
        if kind == "condition" and name.lower() in _CONDITIONS:
            if value.lower() in ("", "true"):
                return cls("condition", _CONDITIONS[name.lower()])
            if value.lower() == "false":
                return cls("condition", _CONDITIONS[name.lower()], False)
        raise SpecError(
            "invalid wait",
            [
                FieldIssue(
                    field,
                    f"{text!r} is not state=STATE ({', '.join(_STATES.values())}) or "
                    f"condition=CONDITION[=false] ({', '.join(_CONDITIONS.values())})",
                )
            ],
        )

    def met(self, status: Mapping[str, object]) -> bool:
        if self.kind == "state":
            return status.get("state", VmState.STOPPED.value) == self.name
        return _condition(status, self.name) is self.value

    def describe(self, status: Mapping[str, object]) -> str:
        """Where the VM is, for a timeout's message: ``Running, Booted false (Starting)``."""
        state = str(status.get("state", VmState.STOPPED.value))
        if self.kind == "state":
            return state
        conditions = status.get("conditions")
        entry = conditions.get(self.name) if isinstance(conditions, Mapping) else None
        if not isinstance(entry, Mapping):
            return f"{state}, no {self.name} condition"
        flag = "true" if entry.get("status") is True else "false"
        reason = f" ({entry['reason']})" if entry.get("reason") else ""
        return f"{state}, {self.name} {flag}{reason}"

    def __str__(self) -> str:
        return f"{self.kind}={self.name}" + ("" if self.value else "=false")


def _condition(status: Mapping[str, object], name: str) -> bool:
    conditions = status.get("conditions")
    entry = conditions.get(name) if isinstance(conditions, Mapping) else None
    return isinstance(entry, Mapping) and entry.get("status") is True
