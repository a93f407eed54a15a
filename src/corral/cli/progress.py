"""What a command that waits for VMs shows on a terminal: one line per VM with a spinner and
its phase (``Starting → Running → Booted``), and while a stop waits for the guest, the ACPI
presses so far and the seconds left before qemu is quit.

The lines follow the daemon's event stream (``GET /v1/events?follow=true``: ``StateChanged``,
``ConditionChanged``, ``PowerdownRequested``, ``PowerdownRepeated``...), never a polling loop;
the command's own requests (which the daemon answers once the VM gets there) decide when it
ends and what it prints. When stdout is not a terminal (or ``TERM=dumb``) nothing is shown:
no spinner, no carriage returns, no escape codes.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import IO, TYPE_CHECKING, Any

from corral.errors import CorralError

if TYPE_CHECKING:
    from rich.console import RenderableType
    from rich.live import Live
    from rich.spinner import Spinner

    from corral.client import Client, EventStream

__all__ = ["Progress", "interactive"]

_OPEN_WAIT = 5.0  # seconds to wait for the event stream to open before acting anyway


def interactive(file: IO[str] | None = None) -> bool:
    """Whether ``file`` (stdout) is a terminal that can show a live display."""
    out = file if file is not None else sys.stdout
    try:
        tty = out.isatty()
    except (AttributeError, ValueError):
        return False
    return tty and os.environ.get("TERM", "") not in ("dumb", "unknown")


@dataclass
class _Phase:
    """One VM as its events tell it."""

    state: str = "Stopped"
    booted: bool = False
    agent: bool = False
    quit_at: float | None = None  # time.monotonic() the stop quits qemu
    presses: int = 0
    note: str = ""
    seen_event: bool = False

    def from_status(self, status: dict[str, Any]) -> None:
        conditions = status.get("conditions") or {}
        self.state = str(status.get("state") or "Stopped")
        self.booted = (conditions.get("Booted") or {}).get("status") is True
        self.agent = (conditions.get("AgentConnected") or {}).get("status") is True

    def on_event(self, event: dict[str, Any]) -> None:
        kind = event.get("event")
        self.seen_event = True
        if kind == "StateChanged":
            self.state = str(event.get("state"))
            if self.state != "Stopping":
                self.quit_at, self.presses, self.note = None, 0, ""
        elif kind == "ConditionChanged":
            if event.get("condition") == "Booted":
                self.booted = event.get("status") is True
            elif event.get("condition") == "AgentConnected":
                self.agent = event.get("status") is True
        elif kind == "PowerdownRequested":
            timeout = event.get("timeout")
            if isinstance(timeout, int | float):
                self.quit_at = time.monotonic() + float(timeout)
            self.presses = 1
        elif kind == "PowerdownRepeated":
            self.presses = int(event.get("attempt") or self.presses + 1)
        elif kind == "PowerdownTimeout":
            self.quit_at, self.note = None, "the guest did not power off: quit"
        elif kind == "StopAborted":
            self.quit_at, self.note = None, "killed"

    def text(self, now: float) -> str:
        if self.state == "Stopping":
            if self.note:
                return f"Stopping: {self.note}"
            if self.quit_at is not None:
                pressed = f" (pressed {self.presses}x)" if self.presses > 1 else ""
                left = max(0, round(self.quit_at - now))
                return f"Stopping: ACPI powerdown{pressed}, quit in {left}s"
            return "Stopping"
        if self.state == "Running" and self.booted:
            return "Booted" + (", agent connected" if self.agent else "")
        return self.state


class Progress:
    """A live display of ``names`` while the caller waits for them (a context manager).

    Disabled (``enabled=False``, or stdout not a terminal) it does nothing at all. Enabled, it
    follows the daemon's events in a thread, shows a spinner line per VM until
    :meth:`finish` removes it, and leaves nothing on the screen when it ends; :meth:`say` prints
    a line above the display (the command's result lines)."""

    def __init__(
        self,
        client: Client,
        names: Sequence[str],
        *,
        enabled: bool = True,
        file: IO[str] | None = None,
    ) -> None:
        self._client = client
        self._names = list(dict.fromkeys(names))
        self._file = file
        self.enabled = enabled and interactive(file)
        self._lock = threading.Lock()
        self._phases: dict[str, _Phase] = {}
        self._spinners: dict[str, Spinner] = {}
        self._finished: set[str] = set()
        self._errors: list[str] = []  # stderr lines held while the display owns the terminal
        self._stream: EventStream | None = None
        self._thread: threading.Thread | None = None
        self._live: Live | None = None

    def __enter__(self) -> Progress:
        if not self.enabled:
            return self
        from rich.console import Console
        from rich.live import Live

        self._stream = self._client.follow_events()
        self._thread = threading.Thread(target=self._follow, name="corral-progress", daemon=True)
        self._thread.start()
        self._stream.opened.wait(_OPEN_WAIT)
        for name in self._names:
            try:
                status = self._client.get_vm(name).get("status") or {}
            except CorralError:
                continue  # the command reports it (not found...)
            with self._lock:
                phase = self._phases.setdefault(name, _Phase())
                if not phase.seen_event:
                    phase.from_status(status)
        console = Console(file=self._file or sys.stdout)
        self._live = Live(
            console=console,
            transient=True,
            refresh_per_second=8,
            get_renderable=self._render,
        )
        self._live.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None
        if self._stream is not None:
            self._stream.close()
        if self._thread is not None:
            self._thread.join(timeout=2)
        for line in self._errors:
            self.say(line, err=True)
        self._errors.clear()

    def finish(self, name: str) -> None:
        """``name`` is done: its line goes."""
        with self._lock:
            self._finished.add(name)
            self._phases.pop(name, None)
            self._spinners.pop(name, None)
        if self._live is not None:
            self._live.refresh()  # a line printed next must not redraw the old frame

    def say(self, line: str, *, err: bool = False) -> None:
        """Print one line (stderr with ``err``): a result above the live display while it
        runs; an error once the display is gone (stderr stays stderr)."""
        if self._live is not None and err:
            self._errors.append(line)
            return
        if self._live is not None:
            self._live.console.print(line, markup=False, highlight=False, soft_wrap=True)
            return
        stream = sys.stderr if err else (self._file or sys.stdout)
        stream.write(line + "\n")
        stream.flush()

    def _follow(self) -> None:
        stream = self._stream
        assert stream is not None
        try:
            for event in stream:
                name = event.get("vm")
                with self._lock:
                    if not isinstance(name, str) or name not in self._names:
                        continue
                    if name not in self._finished:
                        self._phases.setdefault(name, _Phase()).on_event(event)
        except CorralError:
            pass  # only the display is lost; the command's own requests report errors

    def _render(self) -> RenderableType:
        from rich.console import Group
        from rich.spinner import Spinner
        from rich.text import Text

        from corral.printable import printable

        now = time.monotonic()
        width = max((len(n) for n in self._names), default=0)
        lines = []
        with self._lock:
            for name in self._names:
                phase = self._phases.get(name)
                if phase is None:
                    continue
                text = Text(printable(f"{name:<{width}}  {phase.text(now)}"))  # no markup
                spinner = self._spinners.get(name)
                if spinner is None:
                    spinner = self._spinners[name] = Spinner("dots", text)
                else:
                    spinner.update(text=text)
                lines.append(spinner)
        return Group(*lines)


def run_each(
    names: Sequence[str],
    one: Callable[[str], dict[str, Any]],
    done: Callable[[str, dict[str, Any]], str],
    progress: Progress,
) -> list[str]:
    """``one(name)`` for every name at once (at most 16 at a time), carrying on past errors:
    each result is printed as it comes (``done(name, vm)``; an error as ``error: ...`` on
    stderr). Returns the names that failed. The workers are daemon threads, so Ctrl-C ends
    the command at once instead of waiting out the requests in flight."""
    import queue

    unique = list(dict.fromkeys(names))
    todo: queue.SimpleQueue[str] = queue.SimpleQueue()
    for name in unique:
        todo.put(name)
    results: queue.SimpleQueue[tuple[str, dict[str, Any] | BaseException]] = queue.SimpleQueue()

    def work() -> None:
        while True:
            try:
                name = todo.get_nowait()
            except queue.Empty:
                return
            try:
                results.put((name, one(name)))
            except BaseException as exc:  # handed to the main thread
                results.put((name, exc))

    for _ in range(min(len(unique), 16)):
        threading.Thread(target=work, name="corral-each", daemon=True).start()
    failed: list[str] = []
    for _ in unique:
        name, got = results.get()
        progress.finish(name)
        if isinstance(got, CorralError):
            failed.append(name)
            progress.say(error_text(got), err=True)
        elif isinstance(got, BaseException):
            raise got  # not a corral error: a bug, with its traceback
        else:
            progress.say(done(name, got))
    return failed


def error_text(exc: CorralError) -> str:
    """The CLI's one-error form: ``error: message`` and an indented line per field issue,
    printable (as :mod:`corral.cli.main` prints an error): an error may quote qemu or a guest."""
    from corral.printable import printable

    lines = [f"error: {exc.message}", *(f"  {issue}" for issue in exc.issues)]
    return "\n".join(printable(line) for line in lines)
