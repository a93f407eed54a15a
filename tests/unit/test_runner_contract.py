"""The runner contract (issue 10, item 1): one ``RunnerPaths`` that every path comes from
(the argv included), the file channel's writers and readers side by side (status, started
record, events), one atomic write, and the file document source ``corral run`` watches.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest
import yaml

from corral.errors import CorralError
from corral.host.atomic import write_atomic
from corral.qemu.argv import RenderContext, render_argv
from corral.runner import status as status_module
from corral.runner.config import RunnerPaths, resolve_paths
from corral.runner.contract import FileDocumentSource
from corral.runner.filechannel import (
    EventTail,
    JsonLinesSink,
    mark_stopped,
    read_started,
    read_status,
    write_started,
    write_status,
)
from corral.runner.status import VmState, VmStatus
from corral.spec import parse_document

GONE_PID = 999_999_999  # above any pid_max: never a live process


def _doc(name: str = "vm1", **vm: Any) -> dict[str, Any]:
    return {
        "metadata": {"name": name},
        "spec": {
            "vm": {
                "firmware": "bios",
                "maximumRam": "256Mi",
                "guestAgent": True,
                "useTpm": True,
                **vm,
            }
        },
    }


def test_every_runtime_path_of_the_argv_comes_from_runner_paths(tmp_path: Path) -> None:
    doc = parse_document(_doc(disks=[{"file": {"image": "/img/base.qcow2"}, "name": "root"}]))
    paths = RunnerPaths.placed(tmp_path / "data", tmp_path / "run")
    argv = "\n".join(render_argv(doc, RenderContext(files=paths)))
    for path in (
        paths.qmp,
        paths.qga,
        paths.console,
        paths.console_log,
        paths.pidfile,
        paths.swtpm_sock,
        paths.overlay("root"),
    ):
        assert str(path) in argv
    assert str(tmp_path / "run") in argv and "/run/corral" not in argv


def test_resolved_and_placed_paths_agree(tmp_path: Path) -> None:
    doc = parse_document(_doc())
    resolved = resolve_paths(doc, data_dir=str(tmp_path / "d"), runtime_dir=str(tmp_path / "r"))
    assert resolved == RunnerPaths.placed(tmp_path / "d", tmp_path / "r")
    assert resolved.status_file == tmp_path / "r" / "status.json"
    assert resolved.started.parent == resolved.events_file.parent == tmp_path / "r"


def test_write_atomic_creates_with_mode_and_leaves_no_temp_file(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "secret.json"
    write_atomic(target, b"one", 0o600)
    write_atomic(target, b"two", 0o600)
    assert target.read_bytes() == b"two"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert os.listdir(target.parent) == ["secret.json"]
    assert status_module.write_atomic is write_atomic  # the old name is the one write


def test_status_written_by_the_runner_reads_back(tmp_path: Path) -> None:
    path = tmp_path / "status.json"
    assert read_status(path) == read_status(path) and not read_status(path).found
    status = VmStatus(name="vm1", state=VmState.RUNNING, pid=os.getpid(), cpus=2)
    write_status(path, status)
    got = read_status(path)
    assert got.found and got.state is VmState.RUNNING
    assert got.data["pid"] == os.getpid() and got.data["cpus"] == 2
    assert "statusError" not in got.data


def test_status_of_a_runner_that_died_with_its_qemu_reads_crashed(tmp_path: Path) -> None:
    path = tmp_path / "status.json"
    write_status(path, VmStatus(name="vm1", state=VmState.RUNNING, pid=GONE_PID))
    got = read_status(path)
    assert got.state is VmState.CRASHED and str(GONE_PID) in got.data["statusError"]
    assert read_status(path, check_pid=False).state is VmState.RUNNING


@pytest.mark.parametrize(
    ("text", "needle"),
    [("{not json", "status.json"), ("[1]", "not JSON"), ('{"state": "Odd"}', "Odd")],
)
def test_unreadable_status_reads_stopped_and_says_why(
    tmp_path: Path, text: str, needle: str
) -> None:
    path = tmp_path / "status.json"
    path.write_text(text)
    got = read_status(path)
    assert got.state is VmState.STOPPED and needle in got.data["statusError"]


def test_mark_stopped_keeps_the_runners_fields_and_reports_once(tmp_path: Path) -> None:
    path = tmp_path / "status.json"
    write_status(path, VmStatus(name="vm1", state=VmState.RUNNING, pid=os.getpid(), cpus=3))
    events: list[dict[str, object]] = []
    assert mark_stopped(path, "vm1", "kill", on_event=events.append) is VmState.RUNNING
    data = json.loads(path.read_text())
    assert data["state"] == "Stopped" and data["stoppedBy"] == "kill" and data["pid"] is None
    assert data["cpus"] == 3 and data["stoppedAt"] == data["updatedAt"]
    assert [(e["event"], e["previous"]) for e in events] == [("StateChanged", "Running")]
    mark_stopped(path, "vm1", "kill", on_event=events.append)
    assert len(events) == 1  # already Stopped: no second event


def test_started_record_round_trips_and_is_private(tmp_path: Path) -> None:
    path = tmp_path / "started.json"
    assert read_started(path) is None
    doc = parse_document(_doc(currentCpus=1, maximumCpus=2))
    write_started(path, doc, ["qemu", "-S"], started_at="2026-01-01T00:00:00Z", accelerator="tcg")
    record = read_started(path)
    assert record is not None
    assert record.document.vm.maximum_cpus == 2 and record.argv == ["qemu", "-S"]
    assert (record.started_at, record.accelerator) == ("2026-01-01T00:00:00Z", "tcg")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    path.write_text('{"document": {"metadata": {}}}')
    assert read_started(path) is None  # an invalid document is no record


def test_event_tail_reads_whole_lines_and_restarts_after_truncation(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    path.write_text('{"event": "old"}\n')
    tail = EventTail(path, from_end=True)
    with path.open("a") as stream:
        JsonLinesSink(stream)({"event": "A"})
        stream.write('not json\n{"event": "B"')
    assert [e["event"] for e in tail.read()] == ["A"]
    with path.open("a") as stream:
        stream.write("}\n")
    assert [e["event"] for e in tail.read()] == ["B"]
    path.write_text('{"event": "C"}\n')  # rotated: shorter than the offset
    assert [e["event"] for e in tail.read()] == ["C"]


async def test_file_document_source_reports_changes_and_keeps_the_last_good(
    tmp_path: Path,
) -> None:
    path = tmp_path / "vm.yaml"
    path.write_text(yaml.safe_dump(_doc(currentCpus=1, maximumCpus=4)))
    source = FileDocumentSource(path)
    assert source.current().vm.cur_cpus == 1
    assert await source.wait_change(0.01) is None
    path.write_text(yaml.safe_dump(_doc(currentCpus=2, maximumCpus=4)))
    changed = await source.wait_change(0.01)
    assert changed is not None and changed.vm.cur_cpus == 2
    path.write_text("spec: {vm: {maximumRam: lots}}\n")
    with pytest.raises(CorralError):
        await source.wait_change(0.01)
    assert source.current().vm.cur_cpus == 2  # the last good document
    assert await source.wait_change(0.01) is None  # the same bad file is not re-reported
    source.reload()
    with pytest.raises(CorralError):
        await source.wait_change(5.0)  # forced: read again at once


async def test_lifecycle_methods_are_guarded_by_state(tmp_path: Path) -> None:
    from corral.errors import QemuError
    from corral.runner.supervisor import VmSupervisor
    from corral.spec import HostPolicy

    doc = parse_document(_doc())
    paths = RunnerPaths.placed(tmp_path / "d", tmp_path / "r")
    sup = VmSupervisor(doc, paths, HostPolicy())
    with pytest.raises(QemuError, match=r"vm1 is Stopped; cannot reset \(it must be Running\)"):
        await sup.reset()
    sup.status.state = VmState.RUNNING  # as if started: start, attach, retarget refuse
    for call in (sup.start, sup.attach):
        with pytest.raises(QemuError, match="vm1 is Running; cannot"):
            await call()
    with pytest.raises(QemuError, match="cannot retarget"):
        sup.retarget(doc, paths, HostPolicy())
    assert not paths.runtime_dir.exists()  # refused before anything was touched


def test_status_sinks_replace_the_status_file(tmp_path: Path) -> None:
    """A placement that reports elsewhere (a Kubernetes status patch) gives its own sinks:
    no status file is written then; by default the file channel gets each status, and a
    sink that cannot write is an event, not a dead supervisor."""
    from corral.runner.supervisor import VmSupervisor
    from corral.spec import HostPolicy

    doc = parse_document(_doc())
    got: list[str] = []
    events: list[dict[str, object]] = []
    paths = RunnerPaths.placed(tmp_path / "d", tmp_path / "r")
    paths.runtime_dir.mkdir(parents=True)
    sup = VmSupervisor(
        doc, paths, HostPolicy(), events=events.append,
        status_sinks=[lambda s: got.append(s.state.value)],
        on_status=lambda s: got.append("callback"),
    )  # fmt: skip
    sup._set_state(VmState.STARTING)
    assert got == ["Starting", "callback"]
    assert not paths.status_file.exists()

    default = VmSupervisor(doc, paths, HostPolicy(), events=events.append)
    default._set_state(VmState.STARTING)
    assert read_status(paths.status_file, check_pid=False).state is VmState.STARTING

    def broken(_: VmStatus) -> None:
        raise OSError(28, "No space left on device")

    failing = VmSupervisor(doc, paths, HostPolicy(), events=events.append, status_sinks=[broken])
    failing._set_state(VmState.STARTING)
    assert [e["event"] for e in events if e["event"] == "StatusWriteFailed"] == [
        "StatusWriteFailed"
    ]
