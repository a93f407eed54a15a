"""systemd's side of the systemd backend: unit files (text parsed by systemd's own rules, every
word quoted so a VM name or state dir with spaces, quotes, ``%`` or ``$`` survives) and
``systemctl`` run with an argv list through an injectable :class:`CommandRunner`."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from corral.errors import HostError, SpecError
from corral.spec.models import DNS1123_LABEL

__all__ = [
    "PROGRESSIVE_RESTART_SINCE",
    "RESTART_MAX_DELAY",
    "RESTART_SEC",
    "RESTART_STEPS",
    "STOP_MARGIN",
    "UNIT_PREFIX",
    "CommandResult",
    "CommandRunner",
    "Systemctl",
    "default_corral_command",
    "exec_line",
    "quote_word",
    "render_unit",
    "run_command",
    "unit_name",
]

UNIT_PREFIX = "corral-vm-"
STOP_MARGIN = 30
"""Seconds added to ``powerdownTimeout`` for ``TimeoutStopSec``: the runner's ``quit``
(5 s) and wait (10 s), its SIGKILL wait (5 s), and swtpm teardown, with room to spare."""
RESTART_SEC = 5
RESTART_STEPS = 6
RESTART_MAX_DELAY = 300
PROGRESSIVE_RESTART_SINCE = 254
"""``RestartSteps=``/``RestartMaxDelaySec=`` appeared in systemd 254; 252 (Debian 12)
warns "Unknown key" on them, so older versions get a fixed ``RestartSec=`` only."""

_UNSAFE_EXEC = frozenset("\"'\\\x7f")


# --- systemd's command-line syntax ---------------------------------------------------------


def quote_word(word: str) -> str:
    """One word for a unit file's command line, double-quoted so systemd reads it back as is.

    systemd splits ``ExecStart=`` into words itself (``extract_first_word`` with unquoting and
    C unescaping), then expands ``%`` specifiers in each word. So: backslash and double quote
    are backslash-escaped, control characters become ``\\xNN``, ``%`` becomes ``%%``, and the
    quotes keep spaces, ``;`` and ``'`` inside the word. Lone surrogates (undecodable bytes
    of a file name, as :func:`os.fsdecode` gives them) become the raw byte ``\\xNN``.

    ``$`` is left alone here: the executable path is never environment-expanded, the other
    arguments are (see :func:`exec_line`). A NUL cannot be expressed at all.
    """
    out: list[str] = []
    for ch in word:
        code = ord(ch)
        if ch == "\0":
            raise SpecError(f"a NUL character cannot appear in a systemd command line: {word!r}")
        if ch in '\\"':
            out.append("\\" + ch)
        elif ch == "%":
            out.append("%%")
        elif code < 0x20 or code == 0x7F:
            out.append(f"\\x{code:02x}")
        elif 0xDC80 <= code <= 0xDCFF:
            out.append(f"\\x{code - 0xDC00:02x}")
        elif 0xD800 <= code <= 0xDFFF:
            raise SpecError(f"a lone surrogate is no text a unit file can hold: {word!r}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def exec_line(argv: Sequence[str]) -> str:
    """The value of ``ExecStart=`` that makes systemd execute exactly ``argv``.

    The executable must be an absolute path without quotes, backslashes or control characters
    (systemd refuses those: "Executable name contains special characters"); spaces, ``%`` and
    ``$`` are fine. Arguments get ``$$`` for ``$`` because systemd expands ``$VAR`` in them
    at exec time.
    """
    if not argv:
        raise ValueError("exec_line needs a non-empty argv")
    exe = argv[0]
    if not os.path.isabs(exe):
        raise HostError(f"unit ExecStart: the executable must be an absolute path, not {exe!r}")
    if any(ch in _UNSAFE_EXEC or ord(ch) < 0x20 for ch in exe):
        raise HostError(
            f"unit ExecStart: systemd refuses quotes, backslashes and control characters in "
            f"the executable path {exe!r}; install corral under another path"
        )
    return " ".join([quote_word(exe), *(quote_word(arg.replace("$", "$$")) for arg in argv[1:])])


def unit_name(name: str) -> str:
    """``corral-vm-<name>.service``. VM names are DNS-1123 labels, valid in unit names as they
    are; anything else (a path, a glob) is refused before it reaches a file name or systemctl."""
    if not DNS1123_LABEL.match(name) or len(name) > 63:
        raise SpecError.single("metadata.name", f"{name!r} is not a DNS-1123 label")
    return f"{UNIT_PREFIX}{name}.service"


def render_unit(
    name: str,
    argv: Sequence[str],
    *,
    powerdown_timeout: int,
    restart_always: bool,
    user: bool = False,
    systemd_version: int = 252,
) -> str:
    """The unit file for VM ``name`` running ``argv`` (a ``corral run`` command line).

    ``Type=exec``: the start job succeeds once ``corral run`` is executed (a missing binary
    fails the start, not later); the VM's own progress is in the status file. The restart
    backoff is a fixed ``RestartSec=`` on systemd < 254, progressive on newer ones; the start
    rate limit is off, because restartPolicy Always means always.
    """
    restart = ["Restart=on-failure", f"RestartSec={RESTART_SEC}s"]
    if systemd_version >= PROGRESSIVE_RESTART_SINCE:
        restart += [f"RestartSteps={RESTART_STEPS}", f"RestartMaxDelaySec={RESTART_MAX_DELAY}s"]
    if not restart_always:
        restart = ["Restart=no"]
    # Bridges and taps must exist before qemu opens them. A user manager has no
    # network-online.target (it cannot order against system units), so user units skip it.
    network = [] if user else ["Wants=network-online.target", "After=network-online.target"]
    lines = [
        "# Generated by corral (systemd backend); rewritten on every start and apply.",
        "[Unit]",
        f"Description=corral VM {name}",
        *network,
        "StartLimitIntervalSec=0",
        "",
        "[Service]",
        "Type=exec",
        f"ExecStart={exec_line(argv)}",
        "KillMode=mixed",
        "KillSignal=SIGTERM",
        f"TimeoutStopSec={powerdown_timeout + STOP_MARGIN}s",
        *restart,
        "",
        "[Install]",
        f"WantedBy={'default.target' if user else 'multi-user.target'}",
        "",
    ]
    return "\n".join(lines)


# --- running systemctl ---------------------------------------------------------------------


@dataclass(frozen=True)
class CommandResult:
    argv: tuple[str, ...]
    returncode: int
    stdout: str = ""
    stderr: str = ""


class CommandRunner(Protocol):
    """Runs one argv (no shell) to completion; never raises for a non-zero exit."""

    async def __call__(self, argv: Sequence[str]) -> CommandResult: ...


async def run_command(argv: Sequence[str]) -> CommandResult:
    """The real :class:`CommandRunner`: ``asyncio.create_subprocess_exec``, stdin closed (so
    systemctl never waits for a password prompt). A missing binary is a :class:`HostError`."""
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
    except FileNotFoundError as exc:
        raise HostError(f"{argv[0]} not found: apt-get install systemd") from exc
    except OSError as exc:
        raise HostError(f"cannot run {argv[0]}: {exc}") from exc
    try:
        out, err = await proc.communicate()
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        with contextlib.suppress(Exception):
            await asyncio.shield(proc.wait())
        raise
    return CommandResult(
        tuple(argv),
        proc.returncode if proc.returncode is not None else -1,
        out.decode(errors="replace"),
        err.decode(errors="replace"),
    )


def default_corral_command() -> list[str]:
    """How units start ``corral``: this very interpreter with ``-m corral.cli.main`` (so the
    runner is the same corral as the manager that wrote the unit), else ``corral`` on PATH."""
    exe = sys.executable
    if exe and os.path.isabs(exe) and os.access(exe, os.X_OK):
        return [exe, "-m", "corral.cli.main"]
    found = shutil.which("corral")
    if found is None:
        raise HostError("cannot find the corral executable for systemd units; pass corral_command")
    return [os.path.abspath(found)]


class Systemctl:
    """``systemctl`` for one manager (system or ``--user`` units), through its
    :class:`CommandRunner`; the systemd backend is one."""

    _systemctl_argv: list[str]
    _run: CommandRunner
    _version: int | None

    async def _systemctl(self, *args: str, check: bool = True) -> CommandResult:
        result = await self._run([*self._systemctl_argv, *args])
        if check and result.returncode != 0:
            detail = result.stderr.strip()[-2000:] or result.stdout.strip() or "no error output"
            raise HostError(f"{' '.join(result.argv)} exited with {result.returncode}: {detail}")
        return result

    async def systemd_version(self) -> int:
        """The systemd version (``systemctl --version``), asked once: it decides which unit
        settings may be written."""
        if self._version is None:
            result = await self._systemctl("--version")
            try:
                self._version = int(result.stdout.split()[1])
            except (IndexError, ValueError) as exc:
                raise HostError(
                    f"cannot read the systemd version from {result.stdout[:80]!r}"
                ) from exc
        return self._version

    async def is_active(self, name: str) -> str:
        """The unit's ActiveState word (``active``, ``inactive``, ``failed``, ...); is-active
        exits non-zero for every state but active, so its exit code is no error here."""
        result = await self._systemctl("is-active", unit_name(name), check=False)
        return result.stdout.strip() or "unknown"

    async def unit_state(self, name: str) -> dict[str, str]:
        """``ActiveState``, ``SubState``, ``MainPID``, ``ExecMainStatus`` of VM ``name``'s unit."""
        result = await self._systemctl(
            "show", "-p", "ActiveState,SubState,MainPID,ExecMainStatus", unit_name(name)
        )
        props = {}
        for line in result.stdout.splitlines():
            key, sep, value = line.partition("=")
            if sep:
                props[key] = value
        return props
