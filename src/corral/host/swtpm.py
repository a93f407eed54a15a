"""One VM's software TPM 2.0: a detached ``swtpm socket`` process qemu talks to.

Lifecycle (methods are guarded by state)::

    NEW --start--> STARTING --> RUNNING --stop--> STOPPING --> STOPPED --start--> ...
                       \\--(failure)--> STOPPED
    attach(pidfile, socket) --> RUNNING  (a swtpm found alive after a runner restart)

Choices, and why:

* **Detached.** swtpm runs with ``--daemon`` (it forks, calls ``setsid`` and the launcher
  exits), started from a launcher in a new session. So it is never the runner's child: it
  survives the runner's death and restart exactly like qemu does (DESIGN.md: restarting the
  manager never restarts a running VM), and a started and a re-attached swtpm are handled the
  same way (by pidfile, with ``/proc`` checks), with no child to reap.
* **--terminate.** swtpm exits when its data connection (qemu) goes away. That is what we
  want: swtpm only serves the qemu it was started for, a crashed qemu leaves no orphan
  swtpm behind, and a new qemu start always gets a fresh swtpm (qemu's TPM backend expects to
  initialise the TPM itself). It does not fire before qemu connects, nor when a client of the
  *control* channel disconnects (readiness here is the socket file appearing; nothing
  connects). The runner still calls :meth:`Swtpm.stop` after qemu is gone; finding it already
  gone is the normal case then, and stop also covers a qemu that never connected.
* **No swtpm_setup.** Plain swtpm manufactures a TPM 2.0 (fresh seeds, the ``tpm2-00.permall``
  state file) on first initialisation, which qemu's TPM backend sends at startup; that is
  what a guest (Windows 11 included) needs. ``swtpm_setup`` would add EK and platform
  certificates, which needs a local CA configuration and, as root, a ``tss`` user owning the
  state. Guests can create EKs themselves; certificates can be added later without changing
  this interface.
* **Identity.** A pid in a pidfile can be reused. A Swtpm is only taken as alive when the pid
  is not a zombie, its executable is ``swtpm``, its command line names *this* control
  socket, and (once seen) its start time is unchanged.

State files are 0600 in a 0700 directory; the control socket is 0600.

* **Commas.** swtpm's option parser splits on commas and has no escape. When a path has a
  comma, swtpm is given the same files through an alias: a private 0700 directory under the
  temp dir, named after the control socket, whose symlinks point at the real directories.
  The alias name is derived from the real socket path, so a re-attach finds it again. File
  names must still be comma-free (swtpm opens them with O_NOFOLLOW).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import signal
import stat
import subprocess
import tempfile
import time
from enum import StrEnum
from pathlib import Path

from corral.errors import Conflict, HostError
from corral.host.atomic import ensure_private_dir
from corral.host.process import (
    find_tool,
    pid_alive,
    process_cmdline,
    process_exe_name,
    process_start_time,
    read_pidfile,
)

__all__ = ["Swtpm", "SwtpmState"]

_SUN_PATH_MAX = 107  # bytes of a unix socket path, without the terminating NUL
_POLL = 0.01
_LOG_TAIL = 2000


class SwtpmState(StrEnum):
    NEW = "new"
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"


def _absolute(path: Path) -> Path:
    return Path(os.path.abspath(path))


def _log_tail(log_file: Path | None) -> str:
    if log_file is None:
        return ""
    try:
        with open(log_file, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - _LOG_TAIL))
            text = f.read().decode(errors="replace").strip()
    except OSError:
        return ""
    return f"; swtpm log {log_file}: {text}" if text else f"; swtpm log {log_file} is empty"


def _is_socket(path: Path) -> bool:
    try:
        return stat.S_ISSOCK(os.stat(path).st_mode)
    except OSError:
        return False


def _alias_dir(ctrl_socket: Path) -> Path:
    digest = hashlib.sha256(os.fsencode(ctrl_socket)).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"corral-swtpm-{os.getuid()}" / digest


def _aliases(state_dir: Path, ctrl_socket: Path, pidfile: Path, log_file: Path) -> list[Path]:
    """The paths swtpm is given: the real ones, or comma-free aliases of them (see above)."""
    real = [state_dir, ctrl_socket, pidfile, log_file]
    if not any("," in str(p) for p in real):
        return real
    alias = _alias_dir(ctrl_socket)
    if "," in str(alias):
        raise HostError(f"swtpm cannot use the path {ctrl_socket}: it contains a comma")
    ensure_private_dir(alias.parent)
    ensure_private_dir(alias)
    if alias.stat().st_uid != os.getuid():
        raise HostError(f"swtpm alias dir {alias} belongs to another user")
    for path in (ctrl_socket, pidfile, log_file):
        # bind() and swtpm's O_NOFOLLOW opens do not go through a symlinked file: only the
        # directories are aliased, so the file names themselves must be comma-free
        if "," in path.name:
            raise HostError(f"swtpm cannot use the file name {path.name!r}: it contains a comma")
    targets = {"s": state_dir, "c": ctrl_socket.parent, "p": pidfile.parent, "l": log_file.parent}
    for name, target in targets.items():
        link = alias / name
        with contextlib.suppress(FileNotFoundError):
            link.unlink()
        link.symlink_to(target)
    return [alias / "s", alias / "c" / ctrl_socket.name, alias / "p" / pidfile.name,
            alias / "l" / log_file.name]  # fmt: skip


def _serves(pid: int, ctrl_socket: Path) -> bool:
    """Whether ``pid`` is a live swtpm whose control channel is ``ctrl_socket``."""
    if not pid_alive(pid):
        return False
    if process_exe_name(pid) != "swtpm":
        return False
    argv = process_cmdline(pid)
    if argv is None:
        return True  # cmdline unreadable (hidepid): the executable's name has to do
    wanted = {f"path={ctrl_socket}", f"path={_alias_dir(ctrl_socket) / 'c' / ctrl_socket.name}"}
    return any(not wanted.isdisjoint(arg.split(",")) for arg in argv)


class Swtpm:
    """A swtpm process serving one VM: :meth:`start` a new one or :meth:`attach` to one."""

    def __init__(self, binary: str = "swtpm") -> None:
        self._binary = binary
        self._state = SwtpmState.NEW
        self._pid: int | None = None
        self._start_time: int | None = None
        self._ctrl_socket: Path | None = None
        self._pidfile: Path | None = None
        self._log_file: Path | None = None

    def __repr__(self) -> str:
        return f"<Swtpm {self._state.value} pid={self._pid} ctrl={self._ctrl_socket}>"

    @property
    def state(self) -> SwtpmState:
        return self._state

    @property
    def pid(self) -> int | None:
        return self._pid

    @property
    def ctrl_socket(self) -> Path | None:
        """What qemu's ``-chardev socket,path=`` for ``-tpmdev emulator`` must point at."""
        return self._ctrl_socket

    def _require(self, *states: SwtpmState) -> None:
        if self._state not in states:
            allowed = ", ".join(s.value for s in states)
            raise RuntimeError(f"swtpm is {self._state.value}; this needs {allowed}")

    async def start(
        self,
        state_dir: Path,
        ctrl_socket: Path,
        pidfile: Path,
        log_file: Path,
        *,
        timeout: float = 10.0,
    ) -> int:
        """Start a detached swtpm and return its pid once its control socket exists.

        ``state_dir`` (the TPM's persistent state, part of the VM's data) is created 0700.
        The other paths' directories are created 0700 when missing; a stale socket or pidfile
        from a dead swtpm is removed first. Raises :class:`Conflict` if a swtpm is already
        serving ``ctrl_socket`` (attach to it instead), :class:`HostError` if swtpm is missing
        or does not come up within ``timeout`` seconds (the message ends with its log).
        """
        self._require(SwtpmState.NEW, SwtpmState.STOPPED)
        state_dir, ctrl_socket = _absolute(state_dir), _absolute(ctrl_socket)
        pidfile, log_file = _absolute(pidfile), _absolute(log_file)
        if len(os.fsencode(ctrl_socket)) > _SUN_PATH_MAX:
            raise HostError(
                f"swtpm control socket path {ctrl_socket} is longer than {_SUN_PATH_MAX} bytes"
            )
        running = read_pidfile(pidfile)
        if running is not None and _serves(running, ctrl_socket):
            raise Conflict(f"swtpm (pid {running}) already serves {ctrl_socket}")
        binary = find_tool(self._binary)
        ensure_private_dir(state_dir)
        try:
            os.chmod(state_dir, 0o700)
        except OSError as exc:
            raise HostError(f"cannot make TPM state dir {state_dir} private: {exc}") from exc
        for path in (ctrl_socket, pidfile, log_file):
            ensure_private_dir(path.parent)
        try:
            ctrl_socket.unlink(missing_ok=True)
            pidfile.unlink(missing_ok=True)
        except OSError as exc:
            raise HostError(f"cannot remove a stale swtpm file: {exc}") from exc

        self._state = SwtpmState.STARTING
        self._ctrl_socket, self._pidfile, self._log_file = ctrl_socket, pidfile, log_file
        paths = (ctrl_socket, pidfile, log_file)
        try:
            pid = await self._launch(binary, _aliases(state_dir, *paths), timeout)
        except BaseException:
            self._kill_failed_start()
            self._state = SwtpmState.STOPPED
            raise
        self._pid, self._start_time = pid, process_start_time(pid)
        self._state = SwtpmState.RUNNING
        return pid

    async def _launch(self, binary: str, given: list[Path], timeout: float) -> int:
        """Run swtpm on ``given`` (state dir, ctrl socket, pidfile, log: real or aliases)."""
        assert self._ctrl_socket and self._pidfile and self._log_file
        state_dir, ctrl_socket, pidfile, log_file = given
        argv = [
            binary, "socket", "--tpm2",
            "--tpmstate", f"dir={state_dir},mode=0600",
            "--ctrl", f"type=unixio,path={ctrl_socket},mode=0600",
            "--pid", f"file={pidfile}",
            "--log", f"file={log_file},level=5",
            "--terminate", "--daemon",
        ]  # fmt: skip
        deadline = time.monotonic() + timeout
        try:
            # The launcher's own complaints (bad options) land in the same log as swtpm's.
            log_fd = os.open(
                self._log_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600
            )
        except OSError as exc:
            raise HostError(f"cannot open swtpm log {self._log_file}: {exc}") from exc
        try:
            launcher = await asyncio.create_subprocess_exec(
                *argv,
                stdin=subprocess.DEVNULL,
                stdout=log_fd,
                stderr=log_fd,
                start_new_session=True,
            )
        except OSError as exc:
            raise HostError(f"cannot run {binary}: {exc} (apt-get install swtpm)") from exc
        finally:
            os.close(log_fd)
        try:
            code = await asyncio.wait_for(launcher.wait(), timeout)
        except TimeoutError as exc:
            launcher.kill()
            await launcher.wait()
            raise HostError(
                f"swtpm did not daemonize within {timeout:g} s{_log_tail(self._log_file)}"
            ) from exc
        if code != 0:
            raise HostError(f"swtpm failed to start (exit {code}){_log_tail(self._log_file)}")
        while True:
            pid = read_pidfile(self._pidfile)
            if pid is not None:
                if not pid_alive(pid):
                    raise HostError(
                        f"swtpm (pid {pid}) exited right after starting{_log_tail(self._log_file)}"
                    )
                if _is_socket(self._ctrl_socket):
                    return pid
            if time.monotonic() >= deadline:
                raise HostError(
                    f"swtpm did not create its control socket {self._ctrl_socket} within "
                    f"{timeout:g} s{_log_tail(self._log_file)}"
                )
            await asyncio.sleep(_POLL)

    def _kill_failed_start(self) -> None:
        if self._pidfile is None or self._ctrl_socket is None:
            return
        pid = read_pidfile(self._pidfile)
        if pid is not None and _serves(pid, self._ctrl_socket):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self._ctrl_socket.unlink(missing_ok=True)
        self._pidfile.unlink(missing_ok=True)

    @classmethod
    def attach(cls, pidfile: Path, ctrl_socket: Path) -> Swtpm | None:
        """The swtpm named by ``pidfile`` if it is alive and serves ``ctrl_socket``, else None.

        None also for a dead pid, a zombie, or a pid now used by another program or by the
        swtpm of another VM: the caller then starts a new one.
        """
        pidfile, ctrl_socket = _absolute(pidfile), _absolute(ctrl_socket)
        pid = read_pidfile(pidfile)
        if pid is None or not _serves(pid, ctrl_socket):
            return None
        found = cls()
        found._pid, found._start_time = pid, process_start_time(pid)
        found._ctrl_socket, found._pidfile = ctrl_socket, pidfile
        found._state = SwtpmState.RUNNING
        return found

    def is_alive(self) -> bool:
        """Whether the very process started or attached (not a reuse of its pid) still runs."""
        if self._pid is None or self._ctrl_socket is None:
            return False
        if self._state not in (SwtpmState.RUNNING, SwtpmState.STOPPING):
            return False
        if self._start_time is not None and process_start_time(self._pid) != self._start_time:
            return False
        return _serves(self._pid, self._ctrl_socket)

    async def _wait_gone(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self.is_alive():
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(_POLL)
        return True

    async def stop(self, timeout: float = 5.0) -> None:
        """Stop swtpm: SIGTERM, then SIGKILL after ``timeout`` seconds; remove its socket
        and pidfile. A no-op when it never ran or is already stopped; an swtpm that already
        exited (``--terminate`` after qemu went away) only has its files cleaned up.
        """
        if self._state in (SwtpmState.NEW, SwtpmState.STOPPED):
            return
        self._require(SwtpmState.RUNNING)
        self._state = SwtpmState.STOPPING
        assert self._pid is not None
        try:
            for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
                if not self.is_alive():
                    break
                try:
                    os.kill(self._pid, sig)
                except ProcessLookupError:
                    break
                if await self._wait_gone(wait):
                    break
            else:
                raise HostError(f"swtpm (pid {self._pid}) did not exit after SIGKILL")
        except BaseException:
            self._state = SwtpmState.RUNNING
            raise
        if self._ctrl_socket is not None:
            self._ctrl_socket.unlink(missing_ok=True)
        if self._pidfile is not None and read_pidfile(self._pidfile) == self._pid:
            self._pidfile.unlink(missing_ok=True)
        self._state = SwtpmState.STOPPED
