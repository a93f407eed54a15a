"""The integration harness: the project's test guests, ``corral render`` as a subprocess, and
qemu started from the argv it prints.

The guest builder and testkit live in ``guests/`` as plain files whose module names are
generic (``build`` is a PyPI name too), so they are imported here once under unique names and
shared by every integration test (fixtures in ``conftest.py``).

Nothing here skips: a missing host component fails the test with the ``apt-get install`` line
that fixes it, because CI must not go green by testing less.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType, TracebackType
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
GUESTS_DIR = REPO / "guests"
MARKER = "CORRAL-GUEST-READY"
POWERDOWN_MARKER = "CORRAL-POWERDOWN"

# command -> Debian package, for "what to install" failures
QEMU_TOOLS = {"qemu-system-x86_64": "qemu-system-x86", "qemu-img": "qemu-utils"}
SWTPM_TOOLS = {"swtpm": "swtpm"}


def _load(name: str, filename: str) -> ModuleType:
    """Import ``guests/<filename>`` as ``name`` (once per process)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, GUESTS_DIR / filename)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


guest_build: Any = _load("corral_guests_build", "build.py")
tk: Any = _load("corral_guests_testkit", "testkit.py")


def require_tools(tools: Mapping[str, str]) -> None:
    """Fail (never skip) naming the packages to install when a command is missing."""
    missing = [
        f"{cmd} (apt-get install {pkg})" for cmd, pkg in tools.items() if not shutil.which(cmd)
    ]
    if missing:
        pytest.fail("missing host components, install: " + ", ".join(missing), pytrace=False)


def require_ovmf(kind: str = "uefi") -> tuple[Path, Path]:
    """The host's OVMF (code, vars template) for ``kind``; fails if ovmf is not installed."""
    from corral.qemu.fingerprint import find_firmware

    found = find_firmware(kind)
    if found is None:
        pytest.fail(f"no OVMF files for {kind}: apt-get install ovmf", pytrace=False)
    return Path(found[0]), Path(found[1])


def build_guest(kind: str) -> Any:
    """Build (or reuse from the cache) the ``tiny`` or ``debian`` guest."""
    require_tools(QEMU_TOOLS)
    builder = guest_build.build_tiny if kind == "tiny" else guest_build.build_debian
    try:
        return builder()
    except guest_build.BuildError as exc:
        pytest.fail(f"building the {kind} guest failed: {exc}", pytrace=False)


# --------------------------------------------------------------------------------------------
# directories and `corral render`


@dataclass(frozen=True)
class VmDirs:
    """One test VM's directories. ``root`` is short (under /tmp): unix socket paths must stay
    below 108 bytes, and the runtime dir holds qmp.sock, console.sock, qga.sock, swtpm.sock."""

    root: Path
    data: Path
    runtime: Path

    @classmethod
    def create(cls, data_name: str = "data", runtime_name: str = "run") -> VmDirs:
        root = Path(tempfile.mkdtemp(prefix="crb-", dir="/tmp"))
        dirs = cls(root, root / data_name, root / runtime_name)
        dirs.data.mkdir(mode=0o700)
        dirs.runtime.mkdir(mode=0o700)
        return dirs

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

    @property
    def console_log(self) -> Path:
        return self.runtime / "console.log"

    @property
    def qmp_socket(self) -> Path:
        return self.runtime / "qmp.sock"

    @property
    def agent_socket(self) -> Path:
        return self.runtime / "qga.sock"

    @property
    def swtpm_socket(self) -> Path:
        return self.runtime / "swtpm.sock"

    @property
    def efivars(self) -> Path:
        return self.data / "efivars.fd"


def tiny_document(guest: Any, name: str = "tiny", **vm: Any) -> dict[str, Any]:
    """A VM document booting the tiny guest directly from its kernel and initrd."""
    spec_vm: dict[str, Any] = {
        "machine": "q35",
        "firmware": "bios",
        "maximumCpus": 1,
        "maximumRam": "256Mi",
        "kernel": str(guest.kernel),
        "initrd": str(guest.initrd),
        "cmdline": guest.cmdline,
        "guestAgent": True,
    }
    spec_vm.update(vm)
    return {"metadata": {"name": name}, "spec": {"vm": spec_vm}}


def run_corral(args: Sequence[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """The ``corral`` CLI of this checkout as a separate process (``python -m``, so it is the
    interpreter running the tests whatever console scripts are on PATH)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(REPO / "src"), env.get("PYTHONPATH", "")) if p
    )
    env.pop("CORRAL_DEBUG", None)
    return subprocess.run(
        [sys.executable, "-m", "corral.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env=env,
        cwd=cwd,
    )


@dataclass(frozen=True)
class RenderResult:
    returncode: int
    stdout: str
    stderr: str
    config: Path


def run_render(
    doc: Mapping[str, Any],
    dirs: VmDirs,
    *,
    policy: Mapping[str, Any] | None = None,
    accel: str = "tcg",
    standalone: bool = True,
) -> RenderResult:
    """Write ``doc`` (and a policy file: ``policy`` or an empty one, so that the host's
    /etc/corral/host.yaml never leaks in) next to the dirs and run ``corral render --json``
    as a separate process, exactly as a user would."""
    config = dirs.root / "vm.yaml"
    config.write_text(yaml.safe_dump(dict(doc), sort_keys=False))
    policy_file = dirs.root / "host.yaml"
    policy_file.write_text(yaml.safe_dump(dict(policy or {})))
    argv = [
        "render", "-c", str(config), "--json", "--accel", accel,
        "--data-dir", str(dirs.data), "--runtime-dir", str(dirs.runtime),
        "--policy", str(policy_file),
    ]  # fmt: skip
    if standalone:
        argv.append("--no-pause")
    proc = run_corral(argv, cwd=dirs.root)
    return RenderResult(proc.returncode, proc.stdout, proc.stderr, config)


def render_argv(doc: Mapping[str, Any], dirs: VmDirs, **kwargs: Any) -> list[str]:
    """``corral render --json`` for ``doc``; the argv it printed (asserted to succeed)."""
    result = run_render(doc, dirs, **kwargs)
    assert result.returncode == 0, f"corral render failed ({result.returncode}): {result.stderr}"
    argv = json.loads(result.stdout)
    assert isinstance(argv, list) and all(isinstance(a, str) for a in argv), argv
    assert os.path.isabs(argv[0]) and os.access(argv[0], os.X_OK), argv[0]
    return argv


def option_after(argv: Sequence[str], flag: str) -> list[str]:
    """Every value that follows ``flag`` in ``argv``."""
    return [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == flag]


# --------------------------------------------------------------------------------------------
# qemu from a rendered argv


class RenderedVm:
    """qemu started from a rendered argv, with the channels the template configured: the
    serial console log file, QMP and (lazily) the guest agent. Always killed on exit."""

    def __init__(self, argv: Sequence[str], dirs: VmDirs) -> None:
        self.argv = list(argv)
        self.dirs = dirs
        self.vm: Any = None
        self._qmp: Any = None
        self._agent: Any = None
        self.started = 0.0

    def __enter__(self) -> RenderedVm:
        self.started = time.monotonic()
        self.vm = tk.QemuProcess(self.argv, self.dirs.root / "qemu.log")
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for client in (self._agent, self._qmp):
            if client is not None:
                client.close()
        if self.vm is not None:
            self.vm.kill()

    def console(self) -> str:
        try:
            return self.dirs.console_log.read_text(errors="replace")
        except OSError:
            return ""

    def wait_console(self, pattern: str | re.Pattern[str], timeout: float) -> re.Match[str]:
        """Wait until ``pattern`` appears in the console log file the template configured."""
        regex = pattern if isinstance(pattern, re.Pattern) else re.compile(re.escape(pattern))
        deadline = time.monotonic() + timeout
        while True:
            match = regex.search(self.console())
            if match:
                return match
            if self.vm.poll() is not None:
                raise AssertionError(
                    f"qemu exited ({self.vm.poll()}) before {regex.pattern!r}; "
                    f"qemu log:\n{self.vm.log_tail()}\nconsole:\n{self.console()[-3000:]}"
                )
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{regex.pattern!r} not on the console within {timeout}s; "
                    f"console tail:\n{self.console()[-3000:]}\nqemu log:\n{self.vm.log_tail()}"
                )
            time.sleep(0.1)

    def wait_marker(self, timeout: float) -> float:
        """Seconds from qemu's start until the guest printed the ready marker."""
        self.wait_console(MARKER, timeout)
        return time.monotonic() - self.started

    @property
    def qmp(self) -> Any:
        if self._qmp is None:
            self._qmp = tk.QmpClient.connect(self.dirs.qmp_socket, self.vm)
        return self._qmp

    def agent(self, timeout: float = 60) -> Any:
        """The guest agent over the socket the template configured, synced."""
        if self._agent is None:
            self._agent = tk.QgaClient.connect(self.dirs.agent_socket, self.vm)
            self._agent.sync(timeout=timeout)
        return self._agent

    def powerdown(self, timeout: float) -> float:
        """ACPI powerdown over QMP; seconds until qemu exited by itself (asserted: exit 0)."""
        started = time.monotonic()
        self.qmp.execute("system_powerdown")
        try:
            rc = self.vm.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"qemu still running {timeout}s after system_powerdown; console tail:\n"
                f"{self.console()[-3000:]}"
            ) from None
        elapsed = time.monotonic() - started
        assert rc == 0, f"qemu exited with {rc} after powerdown: {self.vm.log_tail()}"
        return elapsed
