"""``-o table|wide|json|yaml|name``, formatted in one place (corral.cli.output): what each
format prints, plain kubectl-like tables when stdout is not a terminal and rich ones on a real
pseudo-terminal; ``render -o ...`` through the CLI; the aetherscale aliases hidden from
``--help`` but working; completion silent and quick without a daemon."""

from __future__ import annotations

import io
import json
import os
import pty
import re
import time
from pathlib import Path
from typing import Any

import yaml
from click.testing import CliRunner

from corral.cli.main import cli
from corral.cli.output import (
    VM_COLUMNS,
    Column,
    details,
    show_items,
    show_object,
    show_stream,
    table,
    vm_name,
)

BOX = re.compile(r"[\u2500-\u257f]")  # box drawing: rules, corners, lines

VMS: list[dict[str, Any]] = [
    {
        "metadata": {
            "name": "web1",
            "labels": {"tier": "web", "env": "prod"},
            "creationTimestamp": "2020-01-01T00:00:00Z",
        },
        "spec": {"vm": {"state": "Running", "currentCpus": 2, "maximumRam": "1Gi"}},
        "status": {
            "state": "Running",
            "cpus": 2,
            "ram": 2**30,
            "pid": 4242,
            "accelerator": "tcg",
            "restarts": 1,
            "ips": ["10.0.2.15", "fe80::5054:ff:fe12:3456"],
            "startedAt": "2020-01-01T00:00:00Z",
        },
    },
    {
        "metadata": {"name": "db", "creationTimestamp": "2020-01-01T00:00:00Z"},
        "spec": {"vm": {"state": "Stopped", "currentCpus": 1, "maximumRam": "512Mi"}},
        "status": {"state": "Stopped"},
    },
]


def printed(fn: Any, *args: Any, **kw: Any) -> str:
    out = io.StringIO()
    fn(*args, **kw, file=out)
    return out.getvalue()


def vms(output: str) -> str:
    return printed(show_items, VMS, output, columns=VM_COLUMNS, name=vm_name)


def test_plain_table_when_not_a_terminal_parses_with_split() -> None:
    text = vms("table")
    assert not BOX.search(text) and "\x1b[" not in text, text
    lines = text.splitlines()
    assert lines[0].split() == ["NAME", "STATE", "CPUS", "RAM", "IPS", "UPTIME"]
    rows = [line.split() for line in lines[1:]]
    assert [r[0] for r in rows] == ["web1", "db"]
    assert all(len(r) == 6 for r in rows), rows  # a list cell has no spaces, empty is "-"
    assert rows[0][1:5] == ["Running", "2", "1Gi", "10.0.2.15,fe80::5054:ff:fe12:3456"]
    assert rows[1][1:] == ["Stopped", "1", "512Mi", "-", "-"]
    # columns line up: each header starts where its cells start
    starts = [m.start() for m in re.finditer(r"\S+", lines[0])]
    for line in lines[1:]:
        assert [m.start() for m in re.finditer(r"\S+", line)] == starts


def test_wide_adds_columns_after_the_default_ones() -> None:
    lines = vms("wide").splitlines()
    assert lines[0].split() == [
        "NAME",
        "STATE",
        "CPUS",
        "RAM",
        "IPS",
        "UPTIME",
        "PID",
        "ACCEL",
        "RESTARTS",
        "AGE",
        "LABELS",
    ]
    web1 = lines[1].split()
    assert web1[6:9] == ["4242", "tcg", "1"] and web1[10] == "env=prod,tier=web"
    assert re.fullmatch(r"\d+d", web1[9])
    assert lines[2].split()[6:] == ["-", "-", "0", web1[9], "-"]


def test_json_and_yaml_print_the_document_and_name_one_name_per_line() -> None:
    assert json.loads(vms("json")) == {"items": VMS}
    assert yaml.safe_load(vms("yaml")) == {"items": VMS}
    assert vms("name") == "web1\ndb\n"
    assert printed(show_items, [], "name", columns=VM_COLUMNS, name=vm_name) == ""
    # an empty list still has its header, so a script sees the columns
    assert printed(show_items, [], "table", columns=VM_COLUMNS, name=vm_name).split() == [
        "NAME",
        "STATE",
        "CPUS",
        "RAM",
        "IPS",
        "UPTIME",
    ]


def test_show_object_formats() -> None:
    obj = {"name": "web1", "ips": ["10.0.2.15"]}

    def text(wide: bool) -> list[str]:
        return details([("Name", "web1"), ("IPs", "10.0.2.15"), *([("Extra", "")] if wide else [])])

    assert printed(show_object, obj, "table", name="web1", text=text) == (
        "Name: web1\nIPs:  10.0.2.15\n"
    )
    assert printed(show_object, obj, "wide", name="web1", text=text).endswith("Extra: -\n")
    assert json.loads(printed(show_object, obj, "json", name="web1", text=text)) == obj
    assert yaml.safe_load(printed(show_object, obj, "yaml", name="web1", text=text)) == obj
    assert printed(show_object, obj, "name", name="web1", text=text) == "web1\n"
    assert printed(show_object, obj, "name", name=["a", "b"], text=text) == "a\nb\n"


EVENTS = [
    {"id": 7, "time": "2020-01-01T00:00:00.000Z", "vm": "web1", "event": "Started", "pid": 1},
    {"id": 8, "time": "2020-01-01T00:00:01.000Z", "vm": "", "event": "ImageImported"},
]
EVENT_COLUMNS: list[Column[dict[str, Any]]] = [
    Column("ID", lambda e: e["id"], wide=True, width=4),
    Column("VM", lambda e: e["vm"], width=8),
    Column("EVENT", lambda e: e["event"], width=14),
]


def test_a_stream_prints_as_it_comes() -> None:
    def stream(output: str) -> str:
        return printed(
            show_stream, iter(EVENTS), output, columns=EVENT_COLUMNS, name=lambda e: e["event"]
        )

    assert [json.loads(line) for line in stream("json").splitlines()] == EVENTS
    assert list(yaml.safe_load_all(stream("yaml"))) == EVENTS
    assert stream("name") == "Started\nImageImported\n"
    lines = stream("table").splitlines()
    assert [line.split() for line in lines] == [
        ["VM", "EVENT"],
        ["web1", "Started"],
        ["-", "ImageImported"],
    ]
    assert not BOX.search(stream("table"))
    assert stream("wide").splitlines()[1].split() == ["7", "web1", "Started"]


def read_pty(write: Any, until: bytes = b"end") -> str:
    """What ``write(tty)`` puts on a pseudo-terminal (os.openpty), read until ``until``."""
    master, slave = pty.openpty()
    try:
        with open(slave, "w", encoding="utf-8", closefd=False) as tty:
            write(tty)
        os.set_blocking(master, False)
        got = b""
        deadline = time.monotonic() + 5
        while until not in got and time.monotonic() < deadline:
            try:
                got += os.read(master, 65536)
            except BlockingIOError:
                time.sleep(0.01)
    finally:
        os.close(slave)
        os.close(master)
    return got.decode()


def test_rich_table_only_on_a_real_terminal() -> None:
    """A pseudo-terminal (os.openpty): the same rows come out as a rich table with a rule."""

    def write(tty: Any) -> None:
        assert tty.isatty()
        table(["NAME", "STATE"], [["web1", "Running"]], file=tty)

    text = read_pty(write, until=b"Running")
    assert "web1" in text and "Running" in text
    assert BOX.search(text), text  # the rule under the header
    plain = printed(table, ["NAME", "STATE"], [["web1", "Running"]])
    assert plain == "NAME   STATE\nweb1   Running\n"


NASTY = "x\x1b]0;owned\x07\u009b2J\u202egnp.exe\u0085y"  # OSC, C1 CSI, bidi, NEL
SHOWN = "x^[]0;owned^G\\x9b2J\\u202egnp.exe\\x85y"


def test_the_daemons_text_is_shown_not_obeyed_in_every_format() -> None:
    """Cells, stream rows, names and show lines may quote a guest or qemu (an event's error,
    a condition's message): control characters are shown (corral.printable); JSON and YAML
    escape them and keep the value."""
    item = {"id": 1, "vm": "web1", "event": NASTY}
    cols: list[Column[dict[str, Any]]] = [Column("EVENT", lambda e: e["event"], width=8)]
    assert printed(table, ["EVENT"], [[NASTY]]).splitlines()[1] == SHOWN
    assert printed(show_items, [item], "name", columns=cols, name=lambda e: e["event"]) == (
        SHOWN + "\n"
    )
    assert printed(show_stream, iter([item]), "table", columns=cols, name=str).splitlines()[1] == (
        SHOWN
    )
    assert printed(show_stream, iter([item]), "name", columns=cols, name=lambda e: e["event"]) == (
        SHOWN + "\n"
    )
    assert printed(show_object, item, "table", name="web1", text=lambda w: [NASTY]) == SHOWN + "\n"
    assert printed(show_object, item, "name", name=[NASTY], text=lambda w: []) == SHOWN + "\n"
    for output in ("json", "yaml"):
        listed = printed(show_items, [item], output, columns=cols, name=str)
        streamed = printed(show_stream, iter([item]), output, columns=cols, name=str)
        shown = printed(show_object, item, output, name="web1", text=lambda w: [])
        for text in (listed, streamed, shown):
            assert text.isascii(), (output, text)  # every control escaped, none sent
        assert yaml.safe_load(listed) == {"items": [item]}  # YAML reads JSON too
        assert yaml.safe_load(streamed) == item and yaml.safe_load(shown) == item
    # YAML keeps text that is only non-ASCII as it is written
    assert "café" in printed(show_object, {"d": "café"}, "yaml", name="x", text=lambda w: [])


def test_a_rich_table_reads_no_markup_or_escapes_from_a_cell() -> None:
    """On a terminal a cell's ``[link=...]`` stays text (rich would make it an OSC 8
    hyperlink) and its escape sequences are shown (rich passes an OSC through)."""
    cell = "[link=http://x.test]click[/link]" + NASTY
    text = read_pty(lambda tty: table(["EVENT"], [[cell], ["end"]], file=tty))
    assert "[link=http://x.test]click[/link]x^[]0;owned^G" in text, repr(text)
    for sent in ("\x1b]8;", "\x1b]0;", "\x07", "\u009b", "\u202e", "\u0085"):
        assert sent not in text, (sent, repr(text))


# --- through the CLI ---------------------------------------------------------------------------

DOC = """\
metadata: {name: out-vm}
spec:
  vm:
    firmware: bios
    machine: pc
    maximumCpus: 1
    maximumRam: 128Mi
    disks: [{cdrom: {image: ""}}]
"""


def invoke(*args: str, env: dict[str, str] | None = None) -> Any:
    return CliRunner().invoke(cli, list(args), prog_name="corral", env=env)


def test_render_output_formats(tmp_path: Path) -> None:
    (tmp_path / "vm.yaml").write_text(DOC)
    (tmp_path / "host.yaml").write_text("{}\n")
    base = [
        "render",
        "-c",
        str(tmp_path / "vm.yaml"),
        "--policy",
        str(tmp_path / "host.yaml"),
        "--data-dir",
        str(tmp_path / "d"),
        "--runtime-dir",
        str(tmp_path / "r"),
    ]
    lines = invoke(*base).stdout.splitlines()
    assert "-uuid" in lines
    assert json.loads(invoke(*base, "-o", "json").stdout) == lines
    assert json.loads(invoke(*base, "--json").stdout) == lines  # the older flag still works
    assert yaml.safe_load(invoke(*base, "-o", "yaml").stdout) == lines
    assert invoke(*base, "-o", "name").stdout == "out-vm\n"
    assert invoke(*base, "-o", "wide").stdout.splitlines() == lines
    assert invoke(*base, "-o", "xml").exit_code == 2


ALIASES = ("create-vm", "start-vm", "stop-vm", "delete-vm", "list-vms")


def test_aetherscale_aliases_are_hidden_from_help_but_work() -> None:
    helped = invoke("--help").stdout
    assert re.search(r"^\s+list\s", helped, re.M)
    for alias in ALIASES:
        assert alias not in helped
        assert invoke(alias, "--help").exit_code == 0


def test_every_command_that_prints_data_takes_every_format() -> None:
    for path in (
        ["list"],
        ["show"],
        ["events"],
        ["image", "list"],
        ["disk", "list"],
        ["display"],
        ["ip"],
        ["render"],
        ["host", "info"],
        ["host", "shutdown"],
    ):
        helped = invoke(*path, "--help").stdout
        assert "-o, --output [table|wide|json|yaml|name]" in helped, (path, helped)


def test_completion_without_a_daemon_is_quick_and_silent() -> None:
    env = {
        "_CORRAL_COMPLETE": "bash_complete",
        "COMP_WORDS": "corral show d",
        "COMP_CWORD": "2",
        "CORRAL_SOCKET": "/nonexistent/corral.sock",
    }
    started = time.monotonic()
    done = invoke(env=env)
    assert done.exit_code == 0 and done.stdout.strip() == "" and done.stderr == ""
    assert time.monotonic() - started < 5
    commands = invoke(env={**env, "COMP_WORDS": "corral sh", "COMP_CWORD": "1"}).stdout
    assert "plain,show" in commands.splitlines()
