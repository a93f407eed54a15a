"""Running host tools and recognising processes we left running.

Two concerns share this module because every other ``corral.host`` module needs both:

* :func:`run_tool` runs a host tool (``qemu-img``, ``mkfs.vfat``, ``mcopy``, ``swtpm``) from an
  argv list, never through a shell. A missing binary becomes a :class:`~corral.errors.HostError`
  that names the Debian package to install; a failing one a ``HostError`` carrying its stderr,
  with a :class:`subprocess.CalledProcessError` chained as the cause.
* :func:`read_pidfile`, :func:`pid_alive`, :func:`process_exe_name` and
  :func:`process_start_time` let a restarted runner re-attach to detached processes (qemu,
  swtpm) without being fooled by a reused pid or a zombie nobody reaps (in containers, pid 1
  often does not reap orphans, and ``kill(pid, 0)`` succeeds on a zombie).
* :func:`find_qemu` finds a VM's qemu by what its argv names (its ``-pidfile``, or its
  ``-uuid`` together with its ``-name guest=``), not by a pidfile that may be gone: a lost
  runtime dir must never lead to a second qemu for the same VM.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

from corral.errors import HostError

__all__ = [
    "TOOL_PACKAGES",
    "find_qemu",
    "find_tool",
    "pid_alive",
    "process_age",
    "process_cmdline",
    "process_exe_name",
    "process_start_time",
    "read_pidfile",
    "run_tool",
]

TOOL_PACKAGES: Mapping[str, str] = {
    "qemu-system-x86_64": "qemu-system-x86",
    "qemu-img": "qemu-utils",
    "qemu-io": "qemu-utils",
    "mkfs.vfat": "dosfstools",
    "mcopy": "mtools",
    "mdir": "mtools",
    "mtype": "mtools",
    "mlabel": "mtools",
    "swtpm": "swtpm",
    "swtpm_setup": "swtpm-tools",
    "swtpm_ioctl": "swtpm-tools",
}
"""Host tool -> the Debian package that provides it (for "apt-get install" hints)."""

# Non-root users on Debian do not have the sbin directories on PATH, yet mkfs.vfat lives there.
_SBIN_DIRS = ("/usr/local/sbin", "/usr/sbin", "/sbin")
_STDERR_TAIL = 2000


def _install_hint(tool: str) -> str:
    package = TOOL_PACKAGES.get(os.path.basename(tool))
    return f"apt-get install {package}" if package else "install it"


def find_tool(name: str) -> str:
    """The absolute path of host tool ``name``: on PATH, else in the sbin directories.

    Raises :class:`HostError` naming the Debian package when it is nowhere.
    """
    if os.path.isabs(name):
        if os.access(name, os.X_OK):
            return name
    else:
        found = shutil.which(name)
        if found is None:
            found = shutil.which(name, path=os.pathsep.join(_SBIN_DIRS))
        if found is not None:
            return found
    raise HostError(f"{name} not found: {_install_hint(name)}")


async def run_tool(
    argv: Sequence[str],
    *,
    what: str,
    env: Mapping[str, str] | None = None,
    timeout: float = 120.0,
) -> str:
    """Run ``argv`` (no shell), wait for it and return its stdout (decoded, errors replaced).

    ``what`` says what the run was for ("create the overlay x.qcow2"); it starts every error
    message. ``env`` adds to (does not replace) this process's environment. A run that takes
    longer than ``timeout`` seconds, or whose awaiting task is cancelled, is killed: no tool
    outlives the call that started it.
    """
    if not argv:
        raise ValueError("run_tool needs a non-empty argv")
    try:
        program = find_tool(argv[0])
    except HostError as exc:
        raise HostError(f"cannot {what}: {exc}") from exc
    full_env = {**os.environ, **env} if env is not None else None
    try:
        proc = await asyncio.create_subprocess_exec(
            program,
            *argv[1:],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=full_env,
        )
    except FileNotFoundError as exc:
        raise HostError(f"cannot {what}: {argv[0]} not found: {_install_hint(argv[0])}") from exc
    except OSError as exc:
        raise HostError(f"cannot {what}: cannot run {program}: {exc}") from exc
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError as exc:
        await _kill(proc)
        raise HostError(f"cannot {what}: {argv[0]} did not finish in {timeout:g} s") from exc
    except BaseException:
        await _kill(proc)
        raise
    stdout = out.decode(errors="replace")
    if proc.returncode != 0:
        stderr = err.decode(errors="replace").strip()
        cause = subprocess.CalledProcessError(proc.returncode or 0, list(argv), stdout, stderr)
        detail = stderr[-_STDERR_TAIL:] or "no error output"
        raise HostError(
            f"cannot {what}: {argv[0]} exited with {proc.returncode}: {detail}"
        ) from cause
    return stdout


async def _kill(proc: asyncio.subprocess.Process) -> None:
    with contextlib.suppress(ProcessLookupError):
        proc.kill()
    with contextlib.suppress(Exception):
        await asyncio.shield(proc.wait())


def read_pidfile(path: Path) -> int | None:
    """The positive pid written in ``path``, or None if it is missing, empty or garbage."""
    try:
        text = path.read_text(encoding="ascii", errors="replace").strip()
    except OSError:
        return None
    try:
        pid = int(text)
    except ValueError:
        return None
    return pid if pid > 0 else None


def _stat_fields(pid: int) -> list[str] | None:
    """``/proc/PID/stat`` from field 3 (state) on; the command name may hold spaces and ')'."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text(errors="replace")
    except OSError:
        return None
    _, sep, rest = raw.rpartition(")")
    return rest.split() if sep else None


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie (exited, waiting to be reaped).

    A pid we cannot signal (another user's) still counts as alive. ``pid <= 0`` is never
    alive: ``kill(0, ...)`` would address our own process group.
    """
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    fields = _stat_fields(pid)
    if fields is None:
        # Gone between the two looks, unless there is no /proc to look in at all.
        return not Path("/proc/self").exists()
    return fields[0] not in ("Z", "X", "x")


def process_exe_name(pid: int) -> str | None:
    """The executable's base name (``swtpm``, ``qemu-system-x86_64``), or None if unknown.

    ``/proc/PID/exe`` is the truth (it survives ``argv[0]`` games); when it cannot be read
    (another user's process) ``/proc/PID/comm`` stands in, which the kernel cuts at 15 bytes.
    """
    try:
        target = os.readlink(f"/proc/{pid}/exe")
    except OSError:
        pass
    else:
        target = target.removesuffix(" (deleted)")
        return os.path.basename(target) or None
    try:
        comm = Path(f"/proc/{pid}/comm").read_text(errors="replace").strip()
    except OSError:
        return None
    return comm or None


def process_cmdline(pid: int) -> list[str] | None:
    """The process's argv, or None if it is gone (or a kernel thread without one)."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    if not raw:
        return None
    return [part.decode(errors="replace") for part in raw.rstrip(b"\0").split(b"\0")]


def process_start_time(pid: int) -> int | None:
    """When ``pid`` started, in clock ticks since boot (``/proc/PID/stat`` field 22).

    Together with the pid it names one process for the life of the host: a pid reused by a
    later process has a later start time.
    """
    fields = _stat_fields(pid)
    if fields is None or len(fields) < 20:
        return None
    try:
        return int(fields[19])
    except ValueError:
        return None


def process_age(pid: int) -> float | None:
    """Seconds since ``pid`` started (None if it is gone)."""
    ticks = process_start_time(pid)
    if ticks is None:
        return None
    try:
        uptime = float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return max(0.0, uptime - ticks / os.sysconf("SC_CLK_TCK"))


def _arg_after(argv: list[str], flag: str) -> str | None:
    try:
        return argv[argv.index(flag) + 1]
    except (ValueError, IndexError):
        return None


def find_qemu(pidfile: Path, *, uuid: str | None = None, name: str | None = None) -> list[int]:
    """Live qemu processes that belong to one VM, found by their argv (``/proc/PID/cmdline``,
    readable by root even for qemu running as another user): ``-pidfile`` is ``pidfile``
    (the VM's runtime dir, even if that dir was deleted since), or ``-uuid`` is ``uuid`` and
    ``-name`` has ``guest=<name>``. Zombies do not count. Sorted by pid.
    """
    wanted_pidfile = os.path.abspath(pidfile)
    found: list[int] = []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return found
    for entry in entries:
        if not entry.isdigit():
            continue
        pid = int(entry)
        argv = process_cmdline(pid)
        if not argv or "qemu" not in os.path.basename(argv[0]):
            continue
        ours = _arg_after(argv, "-pidfile") == wanted_pidfile
        if not ours and uuid is not None and name is not None:
            guest = (_arg_after(argv, "-name") or "").split(",")
            ours = _arg_after(argv, "-uuid") == uuid and f"guest={name}" in guest
        if ours and pid_alive(pid):
            found.append(pid)
    return sorted(found)
