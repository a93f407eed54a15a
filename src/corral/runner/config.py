"""Where a VM's files live and how its argv is rendered: shared by ``corral run``,
``corral render`` and (later) the manager and the Kubernetes operator.

Directory defaults follow VM-Operator's runner: data (overlays, firmware vars, TPM state, the
persisted UUID) under ``$XDG_DATA_HOME/corral/<name>`` (``/var/lib/corral/vms/<name>`` for
root), runtime files (sockets, pidfile, console log) under ``$XDG_RUNTIME_DIR/corral/<name>``
(``/run/corral/<name>`` for root). The document's ``runner:`` section overrides the defaults;
explicit arguments (CLI flags) override the document.
"""

from __future__ import annotations

import os
import pwd
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from corral.errors import FieldIssue, PolicyError, SpecError
from corral.host.chain import chain_issues
from corral.qemu.argv import RenderContext, render_argv
from corral.qemu.fingerprint import (
    find_emulator,
    firmware_for,
    host_tsc_khz,
    resolve_accelerator,
    supports_option,
)
from corral.spec import HostPolicy, VmDocument, check_policy
from corral.spec.models import MachineType, uefi_kernel_ram
from corral.spec.sizes import format_size

__all__ = [
    "LOG_SOURCES",
    "LogSource",
    "RunnerPaths",
    "boot_ram_issues",
    "check_host",
    "needs_bridge_helper",
    "render_for_host",
    "resolve_paths",
    "resolve_run_as",
    "sandbox_options",
]

_SANDBOX: dict[str, str | bool] = {
    "obsolete": "deny",
    # qemu's -runas is itself a setuid/setgid call; once dropped, nothing can go back to root
    "elevateprivileges": "allow",
    "spawn": "deny",
    "resourcecontrol": "deny",
}


LogSource = Literal["console", "qemu"]
LOG_SOURCES: dict[LogSource, str] = {"console": "console.log", "qemu": "qemu.log"}
"""A VM's log files by source, under its runtime dir."""
STATUS_FILE = "status.json"
STARTED_FILE = "started.json"
EVENTS_FILE = "events.jsonl"


@dataclass(frozen=True)
class RunnerPaths:
    """Every file of one VM, in one place: the runner contract's layout.

    The runner writes these, qemu's argv points at them (:func:`render_for_host`), and every
    placement (embedded, systemd, later Kubernetes) finds a VM's files here instead of
    spelling the layout again. Data files (kept across runs) live under ``data_dir``; runtime
    files (sockets, pidfiles, logs, the file channel) under ``runtime_dir`` (mode 0700).
    ``status_file`` and ``display_secret_file`` may be placed elsewhere by the document or
    flags.
    """

    data_dir: Path
    runtime_dir: Path
    status_file: Path
    display_secret_file: Path | None
    emulator: str

    @classmethod
    def placed(
        cls,
        data_dir: Path,
        runtime_dir: Path,
        *,
        status_file: Path | None = None,
        display_secret_file: Path | None = None,
        emulator: str = "qemu-system-x86_64",
    ) -> RunnerPaths:
        """The paths of a VM whose placement chose its two dirs (a manager backend): the
        status file defaults to ``status.json`` in the runtime dir, as :func:`resolve_paths`
        makes it."""
        return cls(
            data_dir=data_dir,
            runtime_dir=runtime_dir,
            status_file=status_file if status_file is not None else runtime_dir / STATUS_FILE,
            display_secret_file=display_secret_file,
            emulator=emulator,
        )

    # --- data dir --------------------------------------------------------------------------

    @property
    def uuid_file(self) -> Path:
        return self.data_dir / "uuid"

    @property
    def efivars(self) -> Path:
        return self.data_dir / "efivars.fd"

    @property
    def seed_image(self) -> Path:
        return self.data_dir / "cidata.img"

    @property
    def tpm_state(self) -> Path:
        """swtpm's state directory (the guest's TPM: keys, sealed secrets)."""
        return self.data_dir / "tpm"

    @property
    def display_secret_default(self) -> Path:
        """Where a manager backend keeps a VM's display secret (``runner.displaySecretFile``)."""
        return self.data_dir / "display-secret"

    def overlay(self, disk: str) -> Path:
        """The qcow2 overlay (or blank image) the runner makes for disk ``disk`` when the
        document gives it no path."""
        return self.data_dir / f"{disk}.qcow2"

    # --- runtime dir -----------------------------------------------------------------------

    @property
    def pidfile(self) -> Path:
        return self.runtime_dir / "qemu.pid"

    @property
    def qmp(self) -> Path:
        return self.runtime_dir / "qmp.sock"

    @property
    def qga(self) -> Path:
        return self.runtime_dir / "qga.sock"

    @property
    def console(self) -> Path:
        """The serial console socket qemu serves (one client at a time)."""
        return self.runtime_dir / "console.sock"

    @property
    def console_log(self) -> Path:
        return self.log_file("console")

    @property
    def stderr(self) -> Path:
        """qemu's log: its stdout and stderr, and the runner's start lines."""
        return self.log_file("qemu")

    @property
    def swtpm_sock(self) -> Path:
        return self.runtime_dir / "swtpm.sock"

    @property
    def swtpm_pid(self) -> Path:
        return self.runtime_dir / "swtpm.pid"

    @property
    def swtpm_log(self) -> Path:
        return self.runtime_dir / "swtpm.log"

    @property
    def started(self) -> Path:
        """What the running qemu was started with (:mod:`corral.runner.filechannel`)."""
        return self.runtime_dir / STARTED_FILE

    @property
    def events_file(self) -> Path:
        """Where a placement that follows events from a file (systemd) has them written
        (``corral run --events``); events go to stderr unless asked."""
        return self.runtime_dir / EVENTS_FILE

    def log_file(self, source: LogSource) -> Path:
        """The VM's console log (what the guest printed on its serial console) or qemu's log
        (its stderr and stdout), in the runtime dir; rotated copies end in ``.1``."""
        return self.runtime_dir / LOG_SOURCES[source]


def _default_base(env: str, root_default: str, home_fallback: str) -> Path:
    value = os.environ.get(env)
    if value:
        return Path(value) / "corral"
    if os.geteuid() == 0:
        return Path(root_default)
    return Path.home() / home_fallback / "corral"


def resolve_paths(
    doc: VmDocument,
    *,
    data_dir: str | None = None,
    runtime_dir: str | None = None,
    status_file: str | None = None,
    display_secret_file: str | None = None,
    emulator: str | None = None,
) -> RunnerPaths:
    settings = doc.runner
    data = data_dir or (settings.data_dir if settings else None)
    runtime = runtime_dir or (settings.runtime_dir if settings else None)
    data_path = (
        Path(data)
        if data
        else _default_base("XDG_DATA_HOME", "/var/lib/corral/vms", ".local/share") / doc.name
    )
    if runtime:
        runtime_path = Path(runtime)
    elif os.environ.get("XDG_RUNTIME_DIR") or os.geteuid() == 0:
        runtime_path = _default_base("XDG_RUNTIME_DIR", "/run/corral", ".cache") / doc.name
    else:
        runtime_path = Path(f"/tmp/corral-{os.getuid()}") / doc.name
    status = status_file or (settings.status_file if settings else None)
    secret = display_secret_file or (settings.display_secret_file if settings else None)
    chosen_emulator = emulator or (settings.emulator if settings else None) or "qemu-system-x86_64"
    return RunnerPaths.placed(
        data_path,
        runtime_path,
        status_file=Path(status) if status else None,
        display_secret_file=Path(secret) if secret else None,
        emulator=chosen_emulator,
    )


def machine_uuid(doc: VmDocument, paths: RunnerPaths) -> uuid.UUID | None:
    """The spec's UUID, else the one persisted in the data dir (if any)."""
    if doc.vm.machine_uuid is not None:
        return doc.vm.machine_uuid
    try:
        return uuid.UUID(paths.uuid_file.read_text().strip())
    except (OSError, ValueError):
        return None


def check_host(
    doc: VmDocument,
    policy: HostPolicy,
    emulator: str | None = None,
    *,
    forbidden: Sequence[str] = (),
    read_only_ok: Sequence[str] = (),
) -> None:
    """The host policy, then every file behind every disk (backing chains, data files):
    raises one :class:`PolicyError` listing every issue. Run at admission and again right
    before anything opens a disk (files change between the two). Once the policy allows the
    files, :func:`boot_ram_issues` (a :class:`SpecError`): RAM the guest cannot boot with."""
    issues: list[FieldIssue] = []
    try:
        check_policy(doc, policy, emulator=emulator)
    except PolicyError as exc:
        issues += exc.issues
    issues += chain_issues(doc, policy, forbidden=forbidden, read_only_ok=read_only_ok)
    if issues:
        raise PolicyError.of(issues)
    ram = boot_ram_issues(doc)
    if ram:
        raise SpecError("invalid VM document", ram)


def boot_ram_issues(doc: VmDocument) -> list[FieldIssue]:
    """``maximumRam`` too small for OVMF to boot this VM's ``kernel`` and ``initrd`` directly
    (:func:`~corral.spec.models.uefi_kernel_ram`: it depends on their sizes, so it is checked
    here, with the files, not by the document's own validation). Only files the policy
    allowed are looked at; a missing one is left to qemu to report."""
    vm = doc.vm
    if vm.kernel is None or not vm.firmware.is_uefi or vm.machine is MachineType.MICROVM:
        return []
    sizes = []
    for path in (vm.kernel, vm.initrd):
        try:
            sizes.append(os.stat(path).st_size if path is not None else 0)
        except OSError:
            return []
    need = uefi_kernel_ram(*sizes)
    if vm.maximum_ram >= need:
        return []
    loaded = f"{(sizes[0] + sizes[1]) / 1024**2:.1f} MiB"
    return [
        FieldIssue(
            "spec.vm.maximumRam",
            f"{format_size(vm.maximum_ram)} is too small to boot this kernel and initrd "
            f"({loaded}) through firmware {vm.firmware.value}: OVMF needs at least "
            f"{format_size(need)} (128Mi + 3 x their size) or the guest never boots; "
            "raise maximumRam, or use firmware: bios",
        )
    ]


def resolve_run_as(name: str | None) -> str | None:
    """The user qemu drops to: the policy's user, else ``nobody``; None when this process is
    not root (it has nothing to drop) or the policy says to stay root."""
    if name is None or os.geteuid() != 0:
        return None
    for candidate in (name, "nobody"):
        try:
            pwd.getpwnam(candidate)
        except KeyError:
            continue
        return candidate
    return None


def needs_bridge_helper(doc: VmDocument) -> bool:
    """Whether qemu runs the setuid bridge helper for this VM (a tap on a bridge)."""
    return any(
        n.bridge is not None or (n.tap is not None and n.tap.ifname is None)
        for n in doc.vm.networks
    )


def sandbox_options(
    doc: VmDocument, policy: HostPolicy, emulator: str, *, taps_passed: bool = False
) -> dict[str, str | bool]:
    """qemu's seccomp sandbox options for this VM; empty when it is off.

    Off when the policy says so, when this qemu has no ``-sandbox`` (built without seccomp),
    or when qemu itself must run the bridge helper (``corral render`` of a VM with a bridge
    network: ``spawn=deny`` forbids it). The runner opens the taps itself
    (``taps_passed``), so a started VM keeps its sandbox.
    """
    helper_in_qemu = needs_bridge_helper(doc) and not taps_passed
    if not policy.sandbox or helper_in_qemu or not supports_option(emulator, "-sandbox"):
        return {}
    return dict(_SANDBOX)


def render_for_host(
    doc: VmDocument,
    paths: RunnerPaths,
    policy: HostPolicy,
    *,
    accelerator: str | None = None,
    paused: bool = True,
    no_shutdown: bool = True,
    tap_fds: Mapping[int, int] | None = None,
) -> list[str]:
    """Check the host policy, resolve the accelerator and firmware, and render the argv.

    Raises ``PolicyError`` before anything else if the policy refuses the document or a file
    behind one of its disks.
    """
    check_host(doc, policy, paths.emulator)
    emulator = find_emulator(paths.emulator)
    accel = accelerator or resolve_accelerator(doc.vm.accelerator.value, emulator)
    firmware = (
        firmware_for(doc.vm.firmware.value, str(paths.efivars)) if doc.vm.firmware.is_uefi else None
    )
    ctx = RenderContext(
        files=paths,
        accelerator=accel,
        machine_uuid=machine_uuid(doc, paths),
        firmware=firmware,
        seed_image=str(paths.seed_image) if doc.spec.cloud_init is not None else None,
        paused=paused,
        no_shutdown=no_shutdown,
        tsc_khz=host_tsc_khz(),
        template_dirs=tuple(policy.template_dirs),
        bridge_helper=policy.bridge_helper,
        sandbox=sandbox_options(doc, policy, emulator, taps_passed=tap_fds is not None) or None,
        tap_fds=dict(tap_fds or {}),
        run_as=resolve_run_as(policy.run_as),
        tcg_tb_size=policy.tcg_tb_size,
    )
    return render_argv(doc, ctx, emulator=emulator)
