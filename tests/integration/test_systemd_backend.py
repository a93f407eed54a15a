"""The systemd backend: generated units checked by the real ``systemd-analyze verify``, the
command-line quoting read back by systemd itself, the systemctl conversation, vm.yaml
rewrites, status files and runner events.

This host has no systemd as PID 1, so nothing here can start a unit: ``systemctl`` can run
(``--version``) but cannot talk to a manager. What systemd *can* do offline is parse unit
files, and that is used for everything about their content; the systemctl conversation is
checked against :class:`RecordingSystemctl`, a test double at exactly that boundary.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from corral.errors import CorralError, HostError, SpecError
from corral.manager import Manager, ManagerConfig, SystemdBackend
from corral.manager.systemd import (
    STOP_MARGIN,
    CommandResult,
    default_corral_command,
    exec_line,
    quote_word,
    render_unit,
    run_command,
    unit_name,
)
from corral.runner.status import (
    Condition,
    JsonLinesSink,
    VmState,
    VmStatus,
    make_event,
    write_atomic,
)
from corral.spec import HostPolicy, VmDocument, parse_document

ANALYZE = shutil.which("systemd-analyze")
SYSTEMCTL = shutil.which("systemctl")
NEEDS_ANALYZE = pytest.mark.skipif(
    ANALYZE is None, reason="systemd-analyze not found: apt-get install systemd"
)
HAVE_SYSTEMCTL = pytest.mark.skipif(
    SYSTEMCTL is None, reason="systemctl not found: apt-get install systemd"
)

# A state dir a user could really have, with everything systemd's parser treats specially.
NASTY = "st ate %n %% $HOME ${X} $$ \"dq\" 'sq' back\\slash ; tab\there ünï"
TRICKY = [
    "a b",
    "50%",
    "%n",
    "%%",
    "$HOME",
    "${X}",
    "$$",
    'say "hi"',
    "it's",
    "back\\slash",
    "trail\\",
    ";",
    "\\;",
    "semi ; colon",
    "tab\there",
    "new\nline",
    "cr\rlf",
    "bell\x07",
    "del\x7f",
    "ünïcödé ✓",
    "raw\udcffbyte",
    "-dash",
    "@at",
    "",
]


def document(name: str = "web-1", **vm: Any) -> VmDocument:
    spec: dict[str, Any] = {"vm": {"state": "Running", "powerdownTimeout": 60, **vm}}
    if "restartPolicy" in vm:
        spec["restartPolicy"] = spec["vm"].pop("restartPolicy")
    return parse_document({"metadata": {"name": name}, "spec": spec})


# --- systemd's reading of a command line, as an independent oracle ---------------------------

_ESCAPES = {"a": 7, "b": 8, "f": 12, "n": 10, "r": 13, "t": 9, "v": 11, "s": 32}


def parse_exec_start(value: str) -> list[str]:
    """What systemd makes of an ``ExecStart=`` value, per systemd.service(5) "Command lines":
    words split on unquoted whitespace, ``"..."``/``'...'`` quoting, C escapes in and out of
    quotes; then per word ``%%`` -> ``%`` (any other ``%x`` is a specifier), and in the
    arguments (not the executable) ``$$`` -> ``$`` (any other ``$`` would expand a variable).
    Raises AssertionError where systemd would do something other than pass the text on."""
    words: list[str] = []
    i, n = 0, len(value)
    while True:
        while i < n and value[i] in " \t":
            i += 1
        if i >= n:
            break
        if value[i] == ";" and (i + 1 == n or value[i + 1] in " \t"):
            raise AssertionError(f"an unquoted ';' separates commands: {value!r}")
        buf, quote = bytearray(), ""
        while i < n:
            c = value[i]
            if not quote and c in " \t":
                break
            if c == "\\":
                esc = value[i + 1]
                if esc == "x":
                    buf.append(int(value[i + 2 : i + 4], 16))
                    i += 4
                    continue
                buf += esc.encode() if esc in "\\\"'" else bytes([_ESCAPES[esc]])
                i += 2
                continue
            if not quote and c in "\"'":
                quote = c
            elif quote == c:
                quote = ""
            else:
                buf += c.encode()
            i += 1
        assert not quote, f"unbalanced quoting in {value!r}"
        words.append(buf.decode("utf-8", "surrogateescape"))
    return [_expand(w, "%", "specifier") for w in words[:1]] + [
        _expand(_expand(w, "%", "specifier"), "$", "variable") for w in words[1:]
    ]


def _expand(word: str, sigil: str, what: str) -> str:
    out, i = [], 0
    while i < len(word):
        if word[i] == sigil:
            assert word[i + 1 : i + 2] == sigil, f"systemd would expand a {what} in {word!r}"
            i += 1
        out.append(word[i])
        i += 1
    return "".join(out)


# --- the systemctl boundary ------------------------------------------------------------------

Hook = Callable[[list[str]], Awaitable[None]]


class RecordingSystemctl:
    """A test double for ``systemctl``: there is no systemd manager on this host to start
    units, so the backend's conversation with it is recorded here instead. It answers from a
    minimal model of unit states (``enable --now`` makes a unit active, ``stop``/``kill``
    inactive), and per-verb ``hooks`` play the runner's part (write its status file, hang
    in a stop) before the answer."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []
        self.states: dict[str, str] = {}
        self.hooks: dict[str, Hook] = {}
        self.fail: dict[str, str] = {}  # verb -> stderr of a failing run

    async def __call__(self, argv: Sequence[str]) -> CommandResult:
        self.calls.append(list(argv))
        args = [a for a in argv[1:] if a != "--user"]
        verb, unit = args[0], args[-1]
        hook = self.hooks.get(verb)
        if hook is not None:
            await hook(args)
        if verb in self.fail:
            return CommandResult(tuple(argv), 1, "", self.fail[verb])
        if verb == "--version":
            return CommandResult(tuple(argv), 0, "systemd 252 (252.38-1~deb12u1)\n+PAM +AUDIT\n")
        state = self.states.get(unit, "inactive")
        if verb == "is-active":
            return CommandResult(tuple(argv), 0 if state == "active" else 3, state + "\n")
        if verb == "show":
            pid = 4242 if state == "active" else 0
            out = f"MainPID={pid}\nExecMainStatus=0\nActiveState={state}\nSubState=running\n"
            return CommandResult(tuple(argv), 0, out)
        if verb == "enable" and "--now" in args:
            self.states[unit] = "active"
        elif verb in ("stop", "kill"):
            self.states[unit] = "inactive"
        return CommandResult(tuple(argv), 0)

    def take(self) -> list[list[str]]:
        """The argvs since the last take, without the leading ``systemctl``."""
        calls, self.calls = self.calls, []
        return [c[1:] for c in calls]


class Events:
    def __init__(self) -> None:
        self.seen: list[tuple[str, dict[str, Any]]] = []

    def __call__(self, name: str, event: dict[str, Any]) -> None:
        self.seen.append((name, event))


@pytest.fixture
def systemctl() -> RecordingSystemctl:
    return RecordingSystemctl()


@pytest.fixture
def events() -> Events:
    return Events()


@pytest.fixture
async def backend(
    tmp_path: Path, systemctl: RecordingSystemctl, events: Events
) -> AsyncIterator[SystemdBackend]:
    root = tmp_path / NASTY
    b = SystemdBackend(
        root / "vms",
        root / "run",
        events,
        unit_dir=tmp_path / "units",
        runner=systemctl,
        systemd_version=252,
        event_poll=3600,  # the tests drain events themselves, deterministically
    )
    yield b
    await b.close()


def write_status(path: Path, status: VmStatus) -> None:
    """Exactly how the runner publishes its status (VmSupervisor._publish)."""
    write_atomic(path, json.dumps(status.to_json(), indent=2, default=str).encode())


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# --- systemd itself: systemctl here, units verified, quoting read back ------------------------


@HAVE_SYSTEMCTL
async def test_systemctl_runs_here_and_reports_its_version() -> None:
    result = await run_command(["systemctl", "--version"])
    assert result.returncode == 0, result.stderr
    expected = int(result.stdout.split()[1])
    b = SystemdBackend(Path("/tmp/v"), Path("/tmp/r"), Events())
    try:
        assert await b.systemd_version() == expected
    finally:
        await b.close()


async def test_a_missing_systemctl_is_a_host_error_that_says_what_to_install() -> None:
    b = SystemdBackend(Path("/tmp/v"), Path("/tmp/r"), Events(), systemctl="/nonexistent/sysctl")
    try:
        with pytest.raises(HostError, match="apt-get install systemd"):
            await b.systemd_version()
    finally:
        await b.close()


def verify(unit: Path, *, user: bool = False, env_root: Path | None = None) -> str:
    """Run the real ``systemd-analyze verify`` on ``unit``; returns what it printed."""
    assert ANALYZE is not None
    env = dict(os.environ)
    if user:
        assert env_root is not None
        runtime = env_root / "xdg-runtime"
        runtime.mkdir(mode=0o700, exist_ok=True)
        env["XDG_RUNTIME_DIR"] = str(runtime)  # a user-mode verify needs one, even offline
    argv = [ANALYZE, *(["--user"] if user else []), "verify", "--man=no", str(unit)]
    proc = subprocess.run(argv, capture_output=True, env=env, check=False)
    return (proc.stdout + proc.stderr).decode(errors="replace") + f"\n[exit {proc.returncode}]"


def assert_verified(unit: Path, output: str) -> None:
    """Clean means exit 0 and not one line about our unit (warnings such as "Unknown key"
    exit 0 too, so the output is checked as well)."""
    about_us = [line for line in output.splitlines() if unit.name in line]
    assert output.rstrip().endswith("[exit 0]") and not about_us, output


@NEEDS_ANALYZE
@pytest.mark.parametrize("user", [False, True], ids=["system", "user"])
def test_generated_units_pass_systemd_analyze_verify(tmp_path: Path, user: bool) -> None:
    root = tmp_path / NASTY
    b = SystemdBackend(
        root / "vms",
        root / "run",
        Events(),
        unit_dir=tmp_path / "units",
        user=user,
        policy_file=root / "host policy.yaml",
        accelerator="tcg",
        systemd_version=252,
    )
    docs = [
        document("web-1"),
        document("db", restartPolicy="Never", powerdownTimeout=0),
        document("a", powerdownTimeout=86400, maximumCpus=8, currentCpus=2),
        document("x" * 63),
    ]
    b.unit_dir.mkdir(parents=True)
    for doc in docs:
        path = b.unit_path(doc.name)
        text = b.unit_text(doc)
        path.write_text(text)
        assert_verified(path, verify(path, user=user, env_root=tmp_path))

        values = dict(line.split("=", 1) for line in text.splitlines() if "=" in line)
        assert values["Type"] == "exec"
        assert values["KillMode"] == "mixed"
        assert values["TimeoutStopSec"] == f"{doc.vm.powerdown_timeout + STOP_MARGIN}s"
        assert values["WantedBy"] == ("default.target" if user else "multi-user.target")
        always = doc.spec.restart_policy == "Always"
        assert values["Restart"] == ("on-failure" if always else "no")
        assert ("RestartSec" in values) is always
        assert "RestartSteps" not in values and "RestartMaxDelaySec" not in values
        assert parse_exec_start(values["ExecStart"]) == b.runner_argv(doc.name)


@NEEDS_ANALYZE
def test_restart_steps_are_only_written_where_systemd_knows_them(tmp_path: Path) -> None:
    """systemd < 254 warns "Unknown key" on RestartSteps=: the version gate is needed, and
    the verify check above would catch a unit that ignored it."""
    argv = [sys.executable, "-m", "corral.cli.main", "run", "-c", "/x/vm.yaml"]
    new = render_unit("n", argv, powerdown_timeout=5, restart_always=True, systemd_version=254)
    assert "RestartSteps=" in new and "RestartMaxDelaySec=" in new
    path = tmp_path / "corral-vm-n.service"
    path.write_text(new)
    output = verify(path)
    version = subprocess.run(
        [ANALYZE or "", "--version"], capture_output=True, text=True, check=True
    ).stdout
    if int(version.split()[1]) < 254:
        assert "Unknown key 'RestartSteps'" in output, output
        with pytest.raises(AssertionError):
            assert_verified(path, output)
    else:
        assert_verified(path, output)


@NEEDS_ANALYZE
@pytest.mark.parametrize("text", [t for t in TRICKY if t])  # "" would make "//" in the path
def test_systemd_reads_every_quoted_word_back_exactly(tmp_path: Path, text: str) -> None:
    """systemd's own parser (the same unquoting and C unescaping for every word of a command
    line, then %-specifiers) names the executable it read in verify's complaint about it."""
    word = f"/nonexistent-corral-probe/{text}/END"
    path = tmp_path / "probe.service"
    unit = f"[Service]\nType=exec\nExecStart={quote_word(word)}\n"
    path.write_bytes(unit.encode(errors="surrogateescape"))
    raw = subprocess.run(
        [ANALYZE or "", "verify", "--man=no", str(path)], capture_output=True, check=False
    ).stderr
    found = re.search(rb"(/nonexistent-corral-probe/.*/END)", raw, re.DOTALL)
    assert found is not None, raw
    # systemd's logger ends a line at CR as at LF, so a CR comes out of verify as LF
    assert found.group(1).decode("utf-8", "surrogateescape") == word.replace("\r", "\n")


@NEEDS_ANALYZE
def test_a_quoted_semicolon_is_a_word_not_a_command_separator(tmp_path: Path) -> None:
    path = tmp_path / "semi.service"
    quoted = exec_line([sys.executable, "-c", "pass", ";", "/nonexistent/second"])
    path.write_text(f"[Service]\nType=exec\nExecStart={quoted}\n")
    assert_verified(path, verify(path))
    control = f'"{sys.executable}" -c pass ; /nonexistent/second'
    path.write_text(f"[Service]\nType=exec\nExecStart={control}\n")
    assert path.name in verify(path)  # unquoted, systemd sees a second command


@NEEDS_ANALYZE
def test_the_executable_may_live_under_spaces_percent_and_dollar(tmp_path: Path) -> None:
    """systemd never expands ``$`` in the executable (only in arguments): a verify that finds
    the file proves exec_line() quoted the path the way systemd reads it."""
    odd = tmp_path / "bin dir %n $HOME" / "python"
    odd.parent.mkdir()
    odd.symlink_to(sys.executable)
    path = tmp_path / "corral-vm-odd.service"
    path.write_text(
        render_unit("odd", [str(odd), "-c", "pass"], powerdown_timeout=1, restart_always=False)
    )
    assert_verified(path, verify(path))


def test_executables_systemd_refuses_are_refused_with_the_reason() -> None:
    with pytest.raises(HostError, match="absolute path"):
        exec_line(["corral", "run"])
    for bad in ('/opt/"q"/corral', "/opt/back\\slash/corral", "/opt/new\nline/corral"):
        with pytest.raises(HostError, match=r"special|quotes"):
            exec_line([bad, "run"])
    with pytest.raises(SpecError, match="NUL"):
        exec_line(["/bin/true", "a\0b"])
    with pytest.raises(SpecError, match="surrogate"):
        exec_line(["/bin/true", "\ud800"])  # not from os.fsdecode: no byte it could stand for


def test_quoting_round_trips_through_systemds_rules() -> None:
    argv = ["/opt/corral %n $X/bin/corral", *TRICKY]
    assert parse_exec_start(exec_line(argv)) == argv


@given(
    st.lists(
        st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\0")), max_size=6
    )
)
def test_quoting_round_trips_for_any_arguments(args: list[str]) -> None:
    argv = ["/usr/bin/corral", *args]
    assert parse_exec_start(exec_line(argv)) == argv


def test_the_default_corral_command_really_runs_corral() -> None:
    argv = default_corral_command()
    assert os.path.isabs(argv[0])
    proc = subprocess.run(  # from / with no PATH, as systemd starts it
        [*argv, "run", "--help"], capture_output=True, text=True, check=False, cwd="/", env={}
    )
    assert proc.returncode == 0 and "--status-file" in proc.stdout, proc.stderr


def test_unit_names_are_dns_labels_only() -> None:
    assert unit_name("web-1") == "corral-vm-web-1.service"
    for bad in ("../etc", "Web", "", "a.b", "x" * 64, "*"):
        with pytest.raises(SpecError, match=r"metadata\.name"):
            unit_name(bad)


# --- the systemctl conversation and the files -----------------------------------------------


async def test_start_writes_the_document_and_unit_then_enables_it(
    backend: SystemdBackend, systemctl: RecordingSystemctl
) -> None:
    doc = document("web-1")
    unit = "corral-vm-web-1.service"
    await backend.start(doc)
    assert systemctl.take() == [["daemon-reload"], ["is-active", unit], ["enable", "--now", unit]]

    vm_yaml = backend.document_path("web-1")
    assert stat.S_IMODE(vm_yaml.stat().st_mode) == 0o600  # cloud-init data may hold secrets
    assert stat.S_IMODE((backend.run_root / "web-1").stat().st_mode) == 0o700
    placed = parse_document(yaml.safe_load(vm_yaml.read_text()))
    assert placed.runner is not None
    assert placed.runner.data_dir == str(backend.vms_root / "web-1")
    assert placed.runner.runtime_dir == str(backend.run_root / "web-1")
    assert placed.runner.status_file == str(backend.status_path("web-1"))
    assert placed.vm == doc.vm

    text = backend.unit_path("web-1").read_text()
    exec_start = next(line for line in text.splitlines() if line.startswith("ExecStart="))
    argv = parse_exec_start(exec_start.removeprefix("ExecStart="))
    assert argv == [
        *default_corral_command(),
        "run",
        "-c",
        str(vm_yaml),
        "--status-file",
        str(backend.status_path("web-1")),
        "--events",
        str(backend.events_path("web-1")),
    ]
    assert NASTY in argv[5]

    await backend.start(doc)  # unit unchanged and active: no reload, enable is idempotent
    assert systemctl.take() == [["is-active", unit], ["enable", "--now", unit]]


async def test_start_failure_is_a_host_error_with_systemctls_words(
    backend: SystemdBackend, systemctl: RecordingSystemctl
) -> None:
    systemctl.fail["enable"] = "Failed to enable unit: Access denied\n"
    with pytest.raises(HostError, match=r"enable --now corral-vm-web-1\.service.*Access denied"):
        await backend.start(document("web-1"))


async def test_user_units_use_systemctl_user(tmp_path: Path, systemctl: RecordingSystemctl) -> None:
    b = SystemdBackend(
        tmp_path / "vms",
        tmp_path / "run",
        Events(),
        user=True,
        unit_dir=tmp_path / "u",
        runner=systemctl,
        systemd_version=252,
        event_poll=3600,
    )
    try:
        await b.start(document("u1"))
        assert all(call[:2] == ["systemctl", "--user"] for call in systemctl.calls)
        assert "WantedBy=default.target" in b.unit_path("u1").read_text()
    finally:
        await b.close()


async def test_stop_disables_then_stops_and_reports_how_the_runner_ended(
    backend: SystemdBackend, systemctl: RecordingSystemctl
) -> None:
    unit = "corral-vm-web-1.service"
    assert await backend.stop("web-1") == "already-stopped"  # never placed: nothing to ask
    assert systemctl.take() == []

    await backend.start(document("web-1"))
    systemctl.take()

    async def runner_powers_down(args: list[str]) -> None:
        status = VmStatus(name="web-1", state=VmState.STOPPED, stopped_by="powerdown")
        write_status(backend.status_path("web-1"), status)

    systemctl.hooks["stop"] = runner_powers_down
    assert await backend.stop("web-1") == "powerdown"
    assert systemctl.take() == [["disable", unit], ["is-active", unit], ["stop", unit]]

    assert await backend.stop("web-1") == "already-stopped"
    assert systemctl.take() == [["disable", unit], ["is-active", unit]]


async def test_stop_with_a_timeout_ends_in_sigkill(
    backend: SystemdBackend, systemctl: RecordingSystemctl, events: Events
) -> None:
    unit = "corral-vm-web-1.service"
    await backend.start(document("web-1"))
    write_status(backend.status_path("web-1"), VmStatus(name="web-1", state=VmState.RUNNING))
    systemctl.take()
    killed = asyncio.Event()

    async def hangs_until_killed(args: list[str]) -> None:
        await killed.wait()

    async def kill(args: list[str]) -> None:
        killed.set()

    systemctl.hooks.update(stop=hangs_until_killed, kill=kill)
    assert await backend.stop("web-1", timeout=0.2) == "kill"
    assert systemctl.take() == [
        ["disable", unit],
        ["is-active", unit],
        ["stop", unit],
        ["kill", "--signal=SIGKILL", unit],
    ]
    observed = backend.observe("web-1")
    assert observed.state is VmState.STOPPED and observed.status["stoppedBy"] == "kill"
    assert events.seen[-1][1]["state"] == "Stopped"


async def test_kill_sigkills_the_unit_and_keeps_restart_from_bringing_it_back(
    backend: SystemdBackend, systemctl: RecordingSystemctl, events: Events
) -> None:
    unit = "corral-vm-web-1.service"
    await backend.start(document("web-1"))
    write_status(
        backend.status_path("web-1"), VmStatus(name="web-1", state=VmState.RUNNING, pid=os.getpid())
    )
    systemctl.take()
    await backend.kill("web-1")
    assert systemctl.take() == [
        ["disable", unit],
        ["is-active", unit],
        ["kill", "--signal=SIGKILL", unit],
        ["stop", unit],
    ]
    observed = backend.observe("web-1")
    assert observed.state is VmState.STOPPED
    assert observed.status["stoppedBy"] == "kill" and observed.status["pid"] is None
    name, event = events.seen[-1]
    assert (name, event["event"], event["previous"]) == ("web-1", "StateChanged", "Running")


async def test_apply_rewrites_vm_yaml_atomically(
    backend: SystemdBackend, systemctl: RecordingSystemctl
) -> None:
    await backend.start(document("web-1", maximumCpus=4, currentCpus=1))
    systemctl.take()
    path = backend.document_path("web-1")
    before = path.stat().st_ino
    with path.open() as old:
        assert await backend.apply(document("web-1", maximumCpus=4, currentCpus=2)) == []
        # replaced by rename: a reader holding the old file still reads it, whole
        assert parse_document(yaml.safe_load(old.read())).vm.current_cpus == 1
    assert path.stat().st_ino != before
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert parse_document(yaml.safe_load(path.read_text())).vm.current_cpus == 2
    assert sorted(p.name for p in path.parent.iterdir()) == ["vm.yaml"]  # no temp files left
    assert systemctl.take() == []  # a live change: nothing for systemd

    # A reader never sees half a document, however often it is replaced.
    seen: list[int] = []
    bad: list[str] = []
    stop = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            try:
                seen.append(parse_document(yaml.safe_load(path.read_text())).vm.cur_cpus)
            except Exception as exc:  # a torn read shows up as any parse error
                bad.append(repr(exc))

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for i in range(60):
            await backend.apply(document("web-1", maximumCpus=4, currentCpus=1 + i % 4))
    finally:
        stop.set()
        thread.join()
    assert not bad and seen


async def test_apply_reports_what_waits_for_a_restart_and_updates_the_unit(
    backend: SystemdBackend, systemctl: RecordingSystemctl
) -> None:
    first = document("web-1", maximumRam="1Gi")
    await backend.start(first)
    started = backend.placed_document(first).model_dump(mode="json", by_alias=True)
    started_json = json.dumps({"document": started}).encode()
    write_atomic(backend.run_root / "web-1" / "started.json", started_json)  # as the runner does
    systemctl.take()

    changed = document("web-1", maximumRam="2Gi", powerdownTimeout=300)
    assert await backend.apply(changed) == ["spec.vm.maximumRam"]
    assert systemctl.take() == [["daemon-reload"]]  # TimeoutStopSec follows powerdownTimeout
    assert f"TimeoutStopSec={300 + STOP_MARGIN}s" in backend.unit_path("web-1").read_text()


async def test_forget_removes_the_unit_and_runtime_files_and_keeps_disks(
    backend: SystemdBackend, systemctl: RecordingSystemctl
) -> None:
    unit = "corral-vm-web-1.service"
    await backend.start(document("web-1"))
    disk = backend.vms_root / "web-1" / "root.qcow2"
    disk.write_bytes(b"disk")
    with pytest.raises(CorralError, match=r"still running \(corral-vm-web-1\.service is active"):
        await backend.forget("web-1", delete_disks=True)
    assert disk.exists()

    systemctl.states[unit] = "failed"
    systemctl.take()
    retained = await backend.forget("web-1", delete_disks=False)
    assert systemctl.take() == [
        ["is-active", unit],
        ["disable", unit],
        ["daemon-reload"],
        ["reset-failed", unit],
    ]
    assert not backend.unit_path("web-1").exists()
    assert not (backend.run_root / "web-1").exists()
    assert not backend.document_path("web-1").exists()
    # the disks are retained, as by the embedded backend: never inherited by a new web-1
    assert retained is not None and retained.vm == "web-1"
    assert not (backend.vms_root / "web-1").exists()
    assert (retained.path / "root.qcow2").read_bytes() == b"disk"
    assert not (retained.path / "vm.yaml").exists()
    assert backend.retained.all() == [retained]

    await backend.start(document("web-1"))
    (backend.vms_root / "web-1" / "root.qcow2").write_bytes(b"disk")
    systemctl.states[unit] = "failed"
    systemctl.take()
    assert await backend.forget("web-1", delete_disks=True) is None
    assert not (backend.vms_root / "web-1").exists()
    assert backend.retained.all() == [retained]
    assert systemctl.take()[0] == ["is-active", unit]


async def test_reset_is_refused_with_a_pointer_to_restart(backend: SystemdBackend) -> None:
    with pytest.raises(CorralError, match=r"not supported by the systemd backend.*use restart"):
        await backend.reset("web-1")


# --- observing: status files as the runner writes them, and its events ------------------------


async def test_observe_reads_the_runners_status_file(backend: SystemdBackend) -> None:
    observed = backend.observe("web-1")
    assert observed.state is VmState.STOPPED and observed.status == {
        "unit": "corral-vm-web-1.service"
    }

    status = VmStatus(name="web-1", state=VmState.RUNNING, pid=os.getpid(), cpus=2)
    status.set_condition(Condition.BOOTED, True, "BootMarker")
    status.pending_restart = ["spec.vm.maximumRam"]
    write_status(backend.status_path("web-1"), status)
    observed = backend.observe("web-1")
    assert observed.state is VmState.RUNNING and observed.active
    assert observed.status["conditions"]["Booted"]["status"] is True
    assert observed.status["pendingRestart"] == ["spec.vm.maximumRam"]
    assert observed.status["pid"] == os.getpid()

    crashed = VmStatus(name="web-1", state=VmState.CRASHED, exit={"code": 1, "signal": None})
    write_status(backend.status_path("web-1"), crashed)
    assert backend.observe("web-1").state is VmState.CRASHED


async def test_observe_sees_through_a_runner_that_died_without_a_word(
    backend: SystemdBackend,
) -> None:
    write_status(
        backend.status_path("web-1"),
        VmStatus(name="web-1", state=VmState.RUNNING, pid=dead_pid()),
    )
    observed = backend.observe("web-1")
    assert observed.state is VmState.CRASHED and "gone" in observed.status["statusError"]

    backend.status_path("web-1").write_text("{not json")
    observed = backend.observe("web-1")
    assert observed.state is VmState.STOPPED and "statusError" in observed.status


async def test_adopt_needs_a_running_status_and_an_active_unit(
    backend: SystemdBackend, systemctl: RecordingSystemctl
) -> None:
    doc = document("web-1")
    unit = "corral-vm-web-1.service"
    assert await backend.adopt(doc) is False  # no status file: nothing to ask systemd
    assert systemctl.take() == []

    await backend.start(doc)
    running = VmStatus(name="web-1", state=VmState.RUNNING, pid=os.getpid())
    write_status(backend.status_path("web-1"), running)
    systemctl.take()
    assert await backend.adopt(doc) is True
    assert systemctl.take() == [["show", "-p", "ActiveState,SubState,MainPID,ExecMainStatus", unit]]

    systemctl.states[unit] = "inactive"
    assert await backend.adopt(doc) is False


async def test_runner_events_reach_on_event_and_a_guest_poweroff_disables_the_unit(
    backend: SystemdBackend, systemctl: RecordingSystemctl, events: Events
) -> None:
    unit = "corral-vm-web-1.service"
    await backend.start(document("web-1"))
    systemctl.take()
    path = backend.events_path("web-1")
    with path.open("a") as stream:
        sink = JsonLinesSink(stream)
        sink(make_event("web-1", "StateChanged", state="Starting", previous="Stopped"))
        sink(make_event("web-1", "StateChanged", state="Running", previous="Starting"))
        stream.write('{"event": "Half')
    assert await backend.poll_events() == 2
    assert [e["state"] for _, e in events.seen] == ["Starting", "Running"]
    assert systemctl.take() == []

    with path.open("a") as stream:
        stream.write('way"}\n')
        poweroff = make_event(
            "web-1", "StateChanged", state="Stopped", previous="Stopping", stoppedBy="guest"
        )
        JsonLinesSink(stream)(poweroff)
    assert await backend.poll_events() == 2
    assert events.seen[-2][1] == {"event": "Halfway"}
    assert systemctl.take() == [["disable", unit]]


async def test_the_manager_places_vms_with_systemd_when_configured(tmp_path: Path) -> None:
    config = ManagerConfig(
        state_dir=tmp_path / "state", backend="systemd", systemd_unit_dir=tmp_path / "units"
    )
    manager = Manager(config, policy=HostPolicy())
    try:
        assert isinstance(manager.backend, SystemdBackend)
        assert manager.backend.name == "systemd"
        assert manager.backend.unit_dir == tmp_path / "units"
        assert manager.backend.run_root == (tmp_path / "state" / "run").absolute()
    finally:
        await manager.close()
