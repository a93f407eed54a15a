"""Helpers for booting the corral test guests with raw QEMU (stdlib only, synchronous).

Typical use (see tests/integration/test_guest_images.py)::

    with short_tmpdir() as tmp, QemuProcess(tiny_argv(guest, tmp), tmp / "qemu.log") as vm:
        console = SerialConsole.connect(tmp / "serial.sock", vm)   # qemu waits for this
        console.wait_for(READY_MARKER, timeout=120)
        qmp = QmpClient.connect(tmp / "qmp.sock", vm)
        qga = QgaClient.connect(tmp / "qga.sock", vm)
        qga.sync(timeout=60); qga.execute("guest-ping")
        qmp.execute("system_powerdown")
        assert vm.wait(timeout=60) == 0

Sockets live in a short /tmp directory because unix socket paths are limited to 107 bytes.
The serial chardev uses ``server=on,wait=on`` so QEMU does not start the guest before the
console is connected (no output can be lost); QMP and the guest agent use ``wait=off``.
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Final

READY_MARKER: Final = "CORRAL-GUEST-READY"
POWERDOWN_MARKER: Final = "CORRAL-POWERDOWN"
QGA_PORT_NAME: Final = "org.qemu.guest_agent.0"

# command -> Debian package, for "what to install" messages
QEMU_TOOLS: Final = {
    "qemu-system-x86_64": "qemu-system-x86",
    "qemu-img": "qemu-utils",
}
SEED_TOOLS: Final = {"mkfs.vfat": "dosfstools", "mcopy": "mtools"}
ISO_TOOLS: Final = {"genisoimage": "genisoimage"}
TPM_TOOLS: Final = {"swtpm": "swtpm"}


class GuestError(RuntimeError):
    """The guest or QEMU did not behave as expected (message includes recent output)."""


def missing_tools(tools: Mapping[str, str]) -> list[str]:
    """Human-readable list of missing commands and the packages that provide them."""
    return [f"{cmd} (apt-get install {pkg})" for cmd, pkg in tools.items() if not shutil.which(cmd)]


def host_tsc_khz() -> int | None:
    """The host TSC frequency in kHz, for the microvm cmdline ``tsc_early_khz=``.

    Under TCG the guest's rdtsc runs at the host TSC rate. Prefers the exact kernel value
    (``tsc_freq_khz`` where exposed) and falls back to /proc/cpuinfo's "cpu MHz".
    """
    exact = Path("/sys/devices/system/cpu/cpu0/tsc_freq_khz")
    with contextlib.suppress(OSError, ValueError):
        return int(exact.read_text().strip())
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("cpu MHz"):
                return round(float(line.split(":", 1)[1]) * 1000)
    return None


@contextlib.contextmanager
def short_tmpdir(prefix: str = "corral-") -> Iterator[Path]:
    """A private temporary directory with a short path (for unix sockets); removed after."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# QEMU process


class QemuProcess:
    """A QEMU child process that is always killed when the context exits."""

    def __init__(self, argv: Sequence[str], log_path: Path) -> None:
        self.argv = list(argv)
        self.log_path = log_path
        self.started = time.monotonic()
        self._log = log_path.open("wb")
        self.proc = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def __enter__(self) -> QemuProcess:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.kill()

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def poll(self) -> int | None:
        return self.proc.poll()

    def wait(self, timeout: float) -> int:
        """Wait for QEMU to exit; raise GuestError (QEMU keeps running) on timeout."""
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise GuestError(
                f"qemu did not exit within {timeout}s; log:\n{self.log_tail()}"
            ) from None

    def kill(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    self.proc.kill()
                self.proc.wait(timeout=10)
        self._log.close()

    def log_tail(self, limit: int = 4000) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")[-limit:]
        return ""

    def check_alive(self) -> None:
        rc = self.proc.poll()
        if rc is not None:
            raise GuestError(f"qemu exited with {rc}; log:\n{self.log_tail()}")


def _connect_unix(path: Path, vm: QemuProcess | None, timeout: float) -> socket.socket:
    deadline = time.monotonic() + timeout
    while True:
        if vm is not None:
            vm.check_alive()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(str(path))
            return sock
        except OSError:
            sock.close()
            if time.monotonic() > deadline:
                raise GuestError(f"could not connect to {path} within {timeout}s") from None
            time.sleep(0.02)


# --------------------------------------------------------------------------------------------
# serial console


class SerialConsole:
    """The guest's serial console over a QEMU unix-socket chardev.

    A background thread collects everything the guest prints; ``wait_for`` searches it.
    """

    def __init__(self, sock: socket.socket, vm: QemuProcess | None = None) -> None:
        self._sock = sock
        self._vm = vm
        self._buf = bytearray()
        self._cond = threading.Condition()
        self._closed = False
        self._pos = 0  # search start for wait_for
        self._seq = itertools.count(1)
        self._thread = threading.Thread(target=self._reader, daemon=True)
        self._thread.start()

    @classmethod
    def connect(
        cls, path: Path, vm: QemuProcess | None = None, timeout: float = 30
    ) -> SerialConsole:
        return cls(_connect_unix(path, vm, timeout), vm)

    def _reader(self) -> None:
        while True:
            try:
                data = self._sock.recv(65536)
            except OSError:
                data = b""
            with self._cond:
                if not data:
                    self._closed = True
                    self._cond.notify_all()
                    return
                self._buf += data
                self._cond.notify_all()

    @property
    def output(self) -> str:
        with self._cond:
            return self._buf.decode(errors="replace")

    def wait_for(
        self, pattern: str | re.Pattern[str], timeout: float, *, anywhere: bool = False
    ) -> re.Match[str]:
        """Wait until ``pattern`` (literal string or compiled regex) appears in new output.

        Returns the match; later calls only search output after it. ``anywhere=True`` also
        searches output that earlier calls already consumed.
        """
        regex = pattern if isinstance(pattern, re.Pattern) else re.compile(re.escape(pattern))
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                text = self._buf.decode(errors="replace")
                m = regex.search(text, 0 if anywhere else self._pos)
                if m:
                    self._pos = max(self._pos, m.end())
                    return m
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._closed:
                    why = "console closed" if self._closed else f"not seen within {timeout}s"
                    vm_log = self._vm.log_tail() if self._vm else ""
                    raise GuestError(
                        f"{regex.pattern!r} {why}; console tail:\n{text[-3000:]}\n"
                        f"qemu log:\n{vm_log}"
                    )
                self._cond.wait(min(remaining, 0.5))

    def send(self, text: str) -> None:
        self._sock.sendall(text.encode())

    def run(self, command: str, timeout: float = 30) -> tuple[int, str]:
        """Type a shell command on the console; return (exit status, output)."""
        n = next(self._seq)
        begin, end = f"__CORRAL_B{n}__", f"__CORRAL_E{n}"
        # The markers are built by the shell so the echoed command line never matches them.
        self.send(f"echo __CORRAL_B{n}_''_; {command}; echo __CORRAL_E{n}_''_$?_\n")
        self.wait_for(re.compile(re.escape(begin) + r"\r?\n"), timeout)
        start = self._pos
        m = self.wait_for(re.compile(re.escape(end) + r"__(\d+)_"), timeout)
        with self._cond:
            body = self._buf.decode(errors="replace")[start : m.start()]
        return int(m.group(1)), body.replace("\r\n", "\n")

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()


# --------------------------------------------------------------------------------------------
# QMP and guest agent (tiny synchronous JSON clients)


class _JsonStream:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""

    def send(self, obj: Mapping[str, Any]) -> None:
        self.sock.sendall(json.dumps(obj).encode() + b"\n")

    def recv_line(self, timeout: float) -> bytes:
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            self.sock.settimeout(remaining)
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                raise TimeoutError from None
            if not chunk:
                raise GuestError("connection closed by qemu")
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return line


class QmpClient:
    """Minimal QMP client: greeting + qmp_capabilities, execute(), collected events."""

    def __init__(self, sock: socket.socket) -> None:
        self._stream = _JsonStream(sock)
        self.events: list[dict[str, Any]] = []
        greeting = json.loads(self._stream.recv_line(30))
        if "QMP" not in greeting:
            raise GuestError(f"not a QMP greeting: {greeting}")
        self.execute("qmp_capabilities")

    @classmethod
    def connect(cls, path: Path, vm: QemuProcess | None = None, timeout: float = 30) -> QmpClient:
        return cls(_connect_unix(path, vm, timeout))

    def execute(
        self, command: str, arguments: Mapping[str, Any] | None = None, timeout: float = 30
    ) -> Any:
        msg: dict[str, Any] = {"execute": command}
        if arguments:
            msg["arguments"] = dict(arguments)
        self._stream.send(msg)
        deadline = time.monotonic() + timeout
        while True:
            reply = json.loads(self._stream.recv_line(max(0.01, deadline - time.monotonic())))
            if "event" in reply:
                self.events.append(reply)
                continue
            if "error" in reply:
                raise GuestError(f"QMP {command} failed: {reply['error']}")
            return reply.get("return")

    def wait_event(self, name: str, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            for ev in self.events:
                if ev["event"] == name:
                    self.events.remove(ev)
                    return ev
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise GuestError(f"QMP event {name} not seen within {timeout}s")
            try:
                reply = json.loads(self._stream.recv_line(remaining))
            except TimeoutError:
                continue
            if "event" in reply:
                self.events.append(reply)

    def close(self) -> None:
        self._stream.sock.close()


class QgaClient:
    """Minimal qemu-guest-agent client over the host side of the virtserialport chardev."""

    def __init__(self, sock: socket.socket) -> None:
        self._stream = _JsonStream(sock)

    @classmethod
    def connect(cls, path: Path, vm: QemuProcess | None = None, timeout: float = 30) -> QgaClient:
        return cls(_connect_unix(path, vm, timeout))

    def sync(self, timeout: float) -> None:
        """guest-sync-delimited until the agent answers (it may not be running yet)."""
        deadline = time.monotonic() + timeout
        token = int.from_bytes(os.urandom(4), "big") >> 1
        while time.monotonic() < deadline:
            # 0xFF tells the agent to drop any partial input before the request.
            self._stream.sock.sendall(b"\xff")
            self._stream.send({"execute": "guest-sync-delimited", "arguments": {"id": token}})
            try:
                end = time.monotonic() + 2
                while time.monotonic() < end:
                    line = self._stream.recv_line(end - time.monotonic())
                    line = line.rsplit(b"\xff", 1)[-1].strip()
                    if not line:
                        continue
                    with contextlib.suppress(ValueError):
                        if json.loads(line).get("return") == token:
                            return
            except TimeoutError:
                continue
        raise GuestError(f"guest agent did not answer guest-sync within {timeout}s")

    def execute(
        self, command: str, arguments: Mapping[str, Any] | None = None, timeout: float = 30
    ) -> Any:
        msg: dict[str, Any] = {"execute": command}
        if arguments:
            msg["arguments"] = dict(arguments)
        self._stream.send(msg)
        reply = json.loads(self._stream.recv_line(timeout))
        if "error" in reply:
            raise GuestError(f"guest agent {command} failed: {reply['error']}")
        return reply.get("return")

    def exec(
        self, path: str, args: Sequence[str] = (), timeout: float = 60
    ) -> tuple[int, str, str]:
        """guest-exec + guest-exec-status polling; returns (exit code, stdout, stderr)."""
        started = self.execute(
            "guest-exec", {"path": path, "arg": list(args), "capture-output": True}
        )
        pid = started["pid"]
        deadline = time.monotonic() + timeout
        while True:
            status = self.execute("guest-exec-status", {"pid": pid})
            if status.get("exited"):
                out = base64.b64decode(status.get("out-data", "")).decode(errors="replace")
                err = base64.b64decode(status.get("err-data", "")).decode(errors="replace")
                return int(status.get("exitcode", -1)), out, err
            if time.monotonic() > deadline:
                raise GuestError(f"guest-exec {path} {list(args)} still running after {timeout}s")
            time.sleep(0.1)

    def close(self) -> None:
        self._stream.sock.close()


# --------------------------------------------------------------------------------------------
# argv builders and disk helpers


def base_argv(
    sockdir: Path,
    *,
    machine: str = "q35",
    memory_mb: int = 128,
    smp: str = "1",
    qga: bool = True,
) -> list[str]:
    """QEMU argv shared by the test guests: TCG, no defaults, serial/QMP/QGA unix sockets.

    ``machine`` is ``q35`` or ``microvm`` (virtio-mmio devices, no PCI).
    """
    mmio = machine == "microvm"
    machine_opt = "microvm,acpi=on,rtc=on,pit=on,pic=on" if mmio else "q35"
    # fmt: off
    argv = [
        "qemu-system-x86_64",
        "-accel", "tcg",
        "-M", machine_opt,
        "-m", str(memory_mb),
        "-smp", smp,
        "-nodefaults",
        "-no-user-config",
        "-display", "none",
        "-chardev", f"socket,id=ser0,path={sockdir / 'serial.sock'},server=on,wait=on",
        "-serial", "chardev:ser0",
        "-chardev", f"socket,id=qmp0,path={sockdir / 'qmp.sock'},server=on,wait=off",
        "-mon", "chardev=qmp0,mode=control",
    ]
    if qga:
        argv += [
            "-chardev", f"socket,id=qga0,path={sockdir / 'qga.sock'},server=on,wait=off",
            "-device", "virtio-serial-device" if mmio else "virtio-serial-pci",
            "-device", f"virtserialport,chardev=qga0,name={QGA_PORT_NAME}",
        ]
    # fmt: on
    return argv


def tiny_argv(
    kernel: Path,
    initrd: Path,
    sockdir: Path,
    *,
    machine: str = "q35",
    memory_mb: int = 128,
    smp: str = "1",
    cmdline: str = "console=ttyS0 panic=-1 no_timer_check cryptomgr.notests quiet",
    extra: Sequence[str] = (),
) -> list[str]:
    """argv to boot the tiny guest (``-no-reboot``: a guest panic/reboot ends QEMU)."""
    if machine == "microvm":
        khz = host_tsc_khz()
        if khz:
            cmdline += f" tsc_early_khz={khz}"
    # fmt: off
    return [
        *base_argv(sockdir, machine=machine, memory_mb=memory_mb, smp=smp),
        "-no-reboot",
        "-kernel", str(kernel),
        "-initrd", str(initrd),
        "-append", cmdline,
        *extra,
    ]
    # fmt: on


def debian_argv(
    kernel: Path,
    initrd: Path,
    disk: Path,
    sockdir: Path,
    *,
    seed: Path | None = None,
    memory_mb: int = 1024,
    smp: str = "2",
    cmdline: str = "root=/dev/vda rw console=ttyS0 panic=-1",
    extra: Sequence[str] = (),
) -> list[str]:
    """argv to boot the Debian guest on q35: ``disk`` as /dev/vda, optional seed as /dev/vdb."""
    # fmt: off
    argv = [
        *base_argv(sockdir, machine="q35", memory_mb=memory_mb, smp=smp),
        "-no-reboot",
        "-kernel", str(kernel),
        "-initrd", str(initrd),
        "-append", cmdline,
        "-drive", f"file={disk},format=qcow2,if=none,id=disk0,cache=unsafe",
        "-device", "virtio-blk-pci,drive=disk0",
    ]
    if seed is not None:
        argv += [
            "-drive", f"file={seed},format=raw,if=none,id=seed0,readonly=on",
            "-device", "virtio-blk-pci,drive=seed0",
        ]
    # fmt: on
    return [*argv, *extra]


def make_overlay(base: Path, overlay: Path) -> Path:
    """A qcow2 overlay backed by ``base`` (the cached image itself stays untouched)."""
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(overlay)],
        check=True,
    )
    return overlay


def make_cidata(
    path: Path,
    user_data: str,
    meta_data: str,
    network_config: str | None = None,
    size_kib: int = 2048,
) -> Path:
    """A NoCloud seed: vfat image labelled CIDATA holding user-data/meta-data."""
    staging = path.parent / (path.name + ".d")
    staging.mkdir(parents=True, exist_ok=True)
    files = {"user-data": user_data, "meta-data": meta_data}
    if network_config is not None:
        files["network-config"] = network_config
    with path.open("wb") as fh:
        fh.truncate(size_kib * 1024)
    subprocess.run(["mkfs.vfat", "-n", "CIDATA", str(path)], check=True, capture_output=True)
    for name, text in files.items():
        (staging / name).write_text(text)
        subprocess.run(
            ["mcopy", "-i", str(path), str(staging / name), f"::{name}"],
            check=True,
            capture_output=True,
        )
    shutil.rmtree(staging, ignore_errors=True)
    return path


def make_iso(path: Path, files: Mapping[str, str], label: str = "CORRALTEST") -> Path:
    """An ISO9660 (Joliet + Rock Ridge) image holding ``files`` (name -> text)."""
    staging = path.parent / (path.name + ".d")
    staging.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (staging / name).write_text(text)
    subprocess.run(
        ["genisoimage", "-quiet", "-J", "-r", "-V", label, "-o", str(path), str(staging)],
        check=True,
    )
    shutil.rmtree(staging, ignore_errors=True)
    return path


class Swtpm:
    """An swtpm TPM 2.0 emulator on a unix control socket (killed on exit)."""

    def __init__(self, statedir: Path, ctrl_socket: Path, log_path: Path) -> None:
        statedir.mkdir(parents=True, exist_ok=True)
        self.ctrl_socket = ctrl_socket
        self._log = log_path.open("wb")
        self.proc = subprocess.Popen(
            [
                "swtpm",
                "socket",
                "--tpm2",
                "--tpmstate",
                f"dir={statedir}",
                "--ctrl",
                f"type=unixio,path={ctrl_socket}",
                "--flags",
                "not-need-init",
                "--terminate",
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + 10
        while not ctrl_socket.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise GuestError(f"swtpm did not create {ctrl_socket}: {log_path.read_text()}")
            time.sleep(0.02)

    def qemu_args(self, model: str = "tpm-crb") -> list[str]:
        # fmt: off
        return [
            "-chardev", f"socket,id=chrtpm,path={self.ctrl_socket}",
            "-tpmdev", "emulator,id=tpm0,chardev=chrtpm",
            "-device", f"{model},tpmdev=tpm0",
        ]
        # fmt: on

    def __enter__(self) -> Swtpm:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self._log.close()
