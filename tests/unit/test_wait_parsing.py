"""What ``corral wait --for``, ``?for=`` and ``start --wait[=booted]`` accept, and what the
progress lines say (pure: no daemon; the e2e tests in tests/e2e/test_wait_stop.py run them)."""

from __future__ import annotations

import io

import pytest

from corral.cli.progress import Progress, _Phase, run_each
from corral.cli.vm.lifecycle import restart, start, stop
from corral.errors import FieldIssue, NotFound, QemuError, SpecError
from corral.manager.waits import WaitTarget


@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        ("condition=Booted", WaitTarget("condition", "Booted")),
        ("condition=agentconnected", WaitTarget("condition", "AgentConnected")),
        ("condition=Booted=false", WaitTarget("condition", "Booted", False)),
        ("state=Stopped", WaitTarget("state", "Stopped")),
        ("STATE=running", WaitTarget("state", "Running")),
    ],
)
def test_wait_targets(text: str, parsed: WaitTarget) -> None:
    assert WaitTarget.parse(text) == parsed


@pytest.mark.parametrize(
    "text", ["Booted", "condition=Bogus", "state=Booted", "state=Running=false", "condition=", ""]
)
def test_bad_wait_targets_name_the_field_and_what_is_accepted(text: str) -> None:
    with pytest.raises(SpecError) as caught:
        WaitTarget.parse(text)
    (issue,) = caught.value.issues
    assert issue.loc == "for"
    assert "state=STATE (Stopped, Starting, Running, Stopping, Crashed, Failed)" in issue.reason
    assert "condition=CONDITION[=false] (Booted, AgentConnected" in issue.reason


def test_wait_targets_judge_a_status_document() -> None:
    booting = {"state": "Running", "conditions": {"Booted": {"status": False,
                                                              "reason": "Starting"}}}  # fmt: skip
    booted = {"state": "Running", "conditions": {"Booted": {"status": True, "reason": "x"}}}
    target = WaitTarget.parse("condition=Booted")
    assert not target.met(booting) and target.met(booted) and not target.met({})
    assert target.describe(booting) == "Running, Booted false (Starting)"
    assert target.describe({}) == "Stopped, no Booted condition"
    assert WaitTarget.parse("condition=Booted=false").met(booting)
    assert WaitTarget.parse("state=Stopped").met({}) and str(target) == "condition=Booted"


@pytest.mark.parametrize(
    ("args", "names", "wait"),
    [
        (["web1"], ("web1",), None),
        (["web1", "--wait"], ("web1",), "running"),
        (["--wait", "web1", "web2"], ("web1", "web2"), "running"),  # as before --wait=VALUE
        (["web1", "--wait=booted"], ("web1",), "booted"),
        (["--wait", "booted", "web1"], ("web1",), "booted"),
        (["--wait=Booted", "--", "--wait"], ("--wait",), "booted"),
    ],
)
def test_start_wait_takes_an_optional_value(
    args: list[str], names: tuple[str, ...], wait: str | None
) -> None:
    for command in (start, restart):
        ctx = command.make_context(command.name, list(args))
        assert (ctx.params["names"], ctx.params["wait"]) == (names, wait)


def test_stop_wait_stays_a_flag() -> None:
    ctx = stop.make_context("stop", ["a", "b", "c", "--wait"])
    assert ctx.params["names"] == ("a", "b", "c") and ctx.params["wait"] is True


def test_no_display_without_a_terminal() -> None:
    assert Progress(None, ["web1"], file=io.StringIO()).enabled is False  # type: ignore[arg-type]


def test_phase_lines() -> None:
    phase = _Phase()
    phase.on_event({"event": "StateChanged", "state": "Starting"})
    assert phase.text(0) == "Starting"
    phase.on_event({"event": "StateChanged", "state": "Running"})
    phase.on_event({"event": "ConditionChanged", "condition": "Booted", "status": True})
    assert phase.text(0) == "Booted"
    phase.on_event({"event": "StateChanged", "state": "Stopping"})
    phase.on_event({"event": "PowerdownRequested", "timeout": 120})
    assert phase.quit_at is not None
    assert phase.text(phase.quit_at - 57.4) == "Stopping: ACPI powerdown, quit in 57s"
    phase.on_event({"event": "PowerdownRepeated", "attempt": 2})
    assert phase.text(phase.quit_at - 47) == "Stopping: ACPI powerdown (pressed 2x), quit in 47s"
    phase.on_event({"event": "PowerdownTimeout"})
    assert phase.text(0) == "Stopping: the guest did not power off: quit"
    phase.on_event({"event": "StateChanged", "state": "Stopped"})
    assert phase.text(0) == "Stopped"


def test_each_vm_is_acted_on_and_reported_past_one_error(
    capsys: pytest.CaptureFixture[str],
) -> None:
    def one(name: str) -> dict[str, object]:
        if name == "b":
            raise NotFound(f"VM {name!r} not found")
        return {"status": {"state": "Stopped"}}

    progress = Progress(None, ["a", "b", "c"], enabled=False)  # type: ignore[arg-type]
    failed = run_each(["a", "b", "c", "a"], one, lambda name, vm: f"vm/{name} ok", progress)
    out, err = capsys.readouterr()
    assert failed == ["b"]
    assert sorted(out.splitlines()) == ["vm/a ok", "vm/c ok"]
    assert err == "error: VM 'b' not found\n"


QEMU_ERROR = (
    "qemu did not start; qemu said:\n\x1b]52;c;cm0gLXJmIH4=\x07\x1b[2J\u009b6n\u202etxt.exe"
)


def test_parallel_errors_are_shown_not_obeyed(capsys: pytest.CaptureFixture[str]) -> None:
    """An error of a parallel start/stop/wait quotes qemu or a guest: printed as the CLI's own
    ``error:`` line is (corral.printable), never as escape sequences a terminal obeys."""

    def one(name: str) -> dict[str, object]:
        raise QemuError(QEMU_ERROR, [FieldIssue("spec.vm", "bad\x1b[31m \u0085")])

    progress = Progress(None, ["a"], enabled=False)  # type: ignore[arg-type]
    assert run_each(["a"], one, lambda name, vm: f"vm/{name} ok", progress) == ["a"]
    err = capsys.readouterr().err
    assert err == (
        "error: qemu did not start; qemu said:\n^[]52;c;cm0gLXJmIH4=^G^[[2J\\x9b6n\\u202etxt.exe\n"
        "  spec.vm: bad^[[31m \\x85\n"
    )


def test_the_phase_display_shows_the_daemons_words_as_text() -> None:
    """A state the daemon reports goes on a spinner line as plain text: no rich markup (a
    ``[link=...]`` would become an OSC 8 hyperlink) and no control character."""
    from rich.console import Console

    progress = Progress(None, ["web1"], enabled=False)  # type: ignore[arg-type]
    phase = progress._phases["web1"] = _Phase()
    phase.on_event(
        {"event": "StateChanged", "state": "[link=http://x.test]Running[/link]\x1b]0;t\x07"}
    )
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=200)
    console.print(progress._render())
    progress._phases["web1"].on_event({"event": "StateChanged", "state": "[b]again\u009b[/b]"})
    console.print(progress._render())  # the spinner is updated, not made anew
    text = out.getvalue()
    assert "[link=http://x.test]Running[/link]^[]0;t^G" in text, repr(text)
    assert "[b]again\\x9b[/b]" in text, repr(text)
    assert "\x1b]8;" not in text and "\x1b]0;" not in text and "\u009b" not in text
