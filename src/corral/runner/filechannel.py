"""The file channel: how a runner and a placement that does not share its process (the
systemd backend, ``cat``, a debugging person) talk through files. The writers and the readers
of each file live here, side by side, so no placement re-implements the formats.

The files (their names come from :class:`~corral.runner.config.RunnerPaths`)::

    status.json    the VM's state, conditions and live values (VmStatus.to_json(), camelCase),
                   replaced atomically on every change: a reader sees a whole document
    started.json   what the running qemu was started with: argv, document, startedAt,
                   accelerator (0600: the document may hold secrets); what needs a restart
                   is computed against it
    events.jsonl   the runner's events, one JSON object a line, appended (``corral run
                   --events``); followed by offset, a truncated file is read again from 0

Only two parties ever write ``status.json``: the runner, and a placement that killed the
runner before its last word (:func:`mark_stopped`, in the runner's own format).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from corral.errors import CorralError
from corral.host import pid_alive
from corral.host.atomic import write_atomic
from corral.runner.status import VmState, VmStatus, make_event, now_iso
from corral.spec import VmDocument

__all__ = [
    "QEMU_STATES",
    "STOP_HOW",
    "EventTail",
    "FileStatusSink",
    "JsonLinesSink",
    "StartedRecord",
    "StatusRead",
    "mark_stopped",
    "read_started",
    "read_status",
    "status_bytes",
    "write_started",
    "write_status",
]

QEMU_STATES = frozenset({VmState.STARTING, VmState.RUNNING, VmState.STOPPING})
"""States in which a status says a qemu runs (its ``pid`` must be alive)."""
STOP_HOW = frozenset({"powerdown", "quit", "quit-unbooted", "kill"})
"""The values of ``stoppedBy`` a stop requested from outside can end with."""
_READ_CHUNK = 1 << 20


# --- status.json ---------------------------------------------------------------------------


def status_bytes(status: VmStatus | Mapping[str, object]) -> bytes:
    data = status.to_json() if isinstance(status, VmStatus) else dict(status)
    return json.dumps(data, indent=2, default=str).encode()


def write_status(path: Path, status: VmStatus | Mapping[str, object]) -> None:
    """Replace the status file (0644) with ``status``. Raises ``OSError``."""
    write_atomic(path, status_bytes(status))


class FileStatusSink:
    """A :class:`~corral.runner.contract.StatusSink` writing the status file. Raises
    ``OSError`` (the supervisor reports it as an event and goes on)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __call__(self, status: VmStatus) -> None:
        write_status(self.path, status)


@dataclass(frozen=True)
class StatusRead:
    """A status file as read: ``data`` is its JSON (``state`` normalised), with
    ``statusError`` added when the file was missing its point (unreadable, not JSON, an
    unknown state, a dead qemu). ``found``: the file existed."""

    state: VmState
    data: dict[str, Any]
    found: bool


def read_status(path: Path, *, check_pid: bool = True) -> StatusRead:
    """The runner's last status; Stopped if there is none or it cannot be read.

    With ``check_pid``, a status that says a qemu runs whose pid is gone was left by a runner
    that died without a word (SIGKILL, OOM): that VM is reported Crashed.
    """
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return StatusRead(VmState.STOPPED, {}, False)
    except (OSError, ValueError) as exc:
        return StatusRead(VmState.STOPPED, {"statusError": f"{path}: {exc}"}, True)
    if not isinstance(data, dict):
        return StatusRead(VmState.STOPPED, {"statusError": f"{path}: not JSON"}, True)
    try:
        state = VmState(data.get("state", VmState.STOPPED.value))
    except ValueError:
        data["statusError"] = f"{path}: unknown state {data.get('state')!r}"
        state = VmState.STOPPED
    pid = data.get("pid")
    if check_pid and state in QEMU_STATES and isinstance(pid, int) and not pid_alive(pid):
        state = VmState.CRASHED
        data["statusError"] = f"the runner reported qemu pid {pid}, which is gone"
    data["state"] = state.value
    return StatusRead(state, data, True)


def mark_stopped(
    path: Path,
    name: str,
    how: str,
    *,
    drop: Sequence[str] = ("statusError",),
    on_event: Callable[[dict[str, object]], None] | None = None,
) -> VmState:
    """Write what a SIGKILLed runner could not: VM ``name`` is Stopped (by ``how``), no
    qemu; the rest of its last status is kept, without the keys in ``drop``. If it was not
    Stopped already, ``on_event`` gets the ``StateChanged`` event the runner would have
    sent. Returns the state read before. Raises ``HostError`` if the file cannot be written.
    """
    from corral.host.atomic import write_file

    before = read_status(path)
    status = {k: v for k, v in before.data.items() if k not in drop}
    stamp = now_iso()
    status.update(
        name=name,
        state=VmState.STOPPED.value,
        pid=None,
        stoppedBy=how,
        stoppedAt=stamp,
        updatedAt=stamp,
    )
    write_file(path, status_bytes(status), 0o644)
    if before.state is not VmState.STOPPED and on_event is not None:
        on_event(
            make_event(
                name,
                "StateChanged",
                state=VmState.STOPPED.value,
                previous=before.state.value,
                stoppedBy=how,
            )
        )
    return before.state


# --- started.json --------------------------------------------------------------------------


@dataclass(frozen=True)
class StartedRecord:
    """What the running qemu was started with."""

    document: VmDocument
    argv: list[str]
    started_at: str | None
    accelerator: str | None


def write_started(
    path: Path,
    doc: VmDocument,
    argv: Sequence[str],
    *,
    started_at: str | None,
    accelerator: str | None,
) -> None:
    """Record the start (0600: the document may hold secrets). Raises ``OSError``."""
    data = {
        "argv": list(argv),
        "document": doc.model_dump(mode="json", by_alias=True),
        "startedAt": started_at,
        "accelerator": accelerator,
    }
    write_atomic(path, json.dumps(data).encode(), 0o600)


def read_started(path: Path) -> StartedRecord | None:
    """The start record, or None if there is none or it is unreadable or invalid."""
    from corral.spec import parse_document

    try:
        data = json.loads(path.read_text())
        doc = parse_document(data["document"])
    except (OSError, ValueError, KeyError, TypeError, CorralError):
        return None
    started_at, accel, argv = data.get("startedAt"), data.get("accelerator"), data.get("argv")
    return StartedRecord(
        document=doc,
        argv=[str(a) for a in argv] if isinstance(argv, list) else [],
        started_at=started_at if isinstance(started_at, str) else None,
        accelerator=accel if isinstance(accel, str) else None,
    )


# --- events.jsonl --------------------------------------------------------------------------


class JsonLinesSink:
    """Write each event as one JSON line (to stderr or an events file)."""

    def __init__(self, stream: IO[str]) -> None:
        self._stream = stream

    def __call__(self, event: dict[str, object]) -> None:
        self._stream.write(json.dumps(event, default=str) + "\n")
        self._stream.flush()


class EventTail:
    """Follows one JSON-lines events file by offset; a shrunken file (truncated at start)
    is read again from its beginning. Lines that are not JSON objects are skipped.
    ``from_end``: only events written from now on."""

    def __init__(self, path: Path, *, from_end: bool) -> None:
        self.path = path
        self.offset = 0
        self.partial = b""
        if from_end:
            with contextlib.suppress(OSError):
                self.offset = path.stat().st_size

    def rewind(self) -> None:
        self.offset, self.partial = 0, b""

    def read(self) -> list[dict[str, Any]]:
        """The events appended since the last read (at most 1 MiB of them at a time)."""
        try:
            with self.path.open("rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size < self.offset:
                    self.rewind()
                f.seek(self.offset)
                data = f.read(_READ_CHUNK)
        except OSError:
            return []
        self.offset += len(data)
        *lines, self.partial = (self.partial + data).split(b"\n")
        events = []
        for line in lines:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if isinstance(event, dict):
                events.append(event)
        return events
