"""The daemon's log format (corral.manager.daemonlog) and its sd_notify client
(corral.manager.sdnotify), each against real objects: log records through the real handler
into a stream; datagrams on real AF_UNIX sockets, a path and an abstract name."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from corral.manager.daemonlog import configure_logging, redact
from corral.manager.sdnotify import notify

TOKEN = "crl_" + "S3cr3t-t0ken_value"
MASK = "***"


@pytest.fixture
def log_stream() -> Iterator[io.StringIO]:
    """The daemon's handler on a StringIO; the root logger and levels restored afterwards."""
    root = logging.getLogger()
    saved = (
        root.level,
        list(root.handlers),
        {n: logging.getLogger(n).level for n in ("corral", "uvicorn")},
    )
    stream = io.StringIO()
    try:
        yield stream
    finally:
        for handler in [h for h in root.handlers if h not in saved[1]]:
            root.removeHandler(handler)
        root.setLevel(saved[0])
        for name, level in saved[2].items():
            logging.getLogger(name).setLevel(level)
        logging.captureWarnings(False)


def lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_json_lines_with_levels_fields_and_uvicorn_access_parts(log_stream: io.StringIO) -> None:
    configure_logging("json", "info", log_stream)
    logging.getLogger("corral.daemon").info("DaemonReady", extra={"fields": {"pid": 42}})
    logging.getLogger("corral.events").warning(
        "ReconcileFailed", extra={"fields": {"vm": "web1", "error": "x"}}
    )
    logging.getLogger("uvicorn.access").info(
        '%s - "%s %s HTTP/%s" %d',
        "127.0.0.1:5000",
        "GET",
        f"/v1/vms/web1/console?access_token={TOKEN}",
        "1.1",
        101,
    )
    logging.getLogger("uvicorn.error").info("Started server process [%d]", 42)
    logging.getLogger("corral.daemon").debug("not at info")
    logging.getLogger("httpx").info("a library's info: below warning, not logged")
    logging.getLogger("httpx").warning("a library's warning")
    got = lines(log_stream)
    assert [(g["level"], g["logger"], g["message"]) for g in got] == [
        ("info", "corral.daemon", "DaemonReady"),
        ("warning", "corral.events", "ReconcileFailed"),
        (
            "info",
            "uvicorn.access",
            '127.0.0.1:5000 - "GET /v1/vms/web1/console?access_token=*** HTTP/1.1" 101',
        ),
        ("info", "uvicorn.error", "Started server process [42]"),
        ("warning", "httpx", "a library's warning"),
    ]
    assert all(str(g["time"]).endswith("Z") and "T" in str(g["time"]) for g in got)
    assert got[0]["pid"] == 42 and got[1]["vm"] == "web1"
    access = got[2]
    assert (access["method"], access["status"], access["client"]) == ("GET", 101, "127.0.0.1:5000")
    assert access["path"] == "/v1/vms/web1/console?access_token=***"
    assert TOKEN not in log_stream.getvalue()
    # the same prefix older tooling looked for in the daemon's JSON lines
    assert '"DaemonReady", "pid": 42' in log_stream.getvalue()


def test_secrets_never_reach_the_log(log_stream: io.StringIO) -> None:
    configure_logging("json", "debug", log_stream)
    log = logging.getLogger("corral.test")
    log.info("header Authorization: Bearer %s", TOKEN)
    log.info("import https://user:hunter2@example.org/a.qcow2?token=abc&x=1 failed")
    log.info(
        "fields",
        extra={
            "fields": {
                "password": "hunter2",
                "userData": "#cloud-config",
                "nested": {"apiToken": TOKEN},
                "url": "/x?secret=s",
            }
        },
    )
    try:
        raise ValueError(f"bad token {TOKEN}")
    except ValueError:
        log.exception("failed")
    text = log_stream.getvalue()
    for secret in (TOKEN, "hunter2", "#cloud-config", "token=abc", "secret=s"):
        assert secret not in text, secret
    got = lines(log_stream)
    assert got[0]["message"] == "header Authorization: Bearer ***"
    assert got[1]["message"] == "import https://user:***@example.org/a.qcow2?token=***&x=1 failed"
    assert got[2]["password"] == MASK and got[2]["userData"] == MASK
    assert got[2]["nested"] == {"apiToken": "***"} and got[2]["url"] == "/x?secret=***"
    assert "ValueError: bad token crl_***" in str(got[3]["exception"])
    assert redact("nothing secret here") == "nothing secret here"


def test_text_format_and_auto(log_stream: io.StringIO) -> None:
    configure_logging("text", "info", log_stream)
    logging.getLogger("corral.daemon").info("DaemonReady", extra={"fields": {"pid": 7}})
    line = log_stream.getvalue().rstrip("\n")
    assert line.endswith(" INFO    corral.daemon: DaemonReady pid=7"), line
    auto = io.StringIO()  # not a terminal: auto means json
    configure_logging("auto", "info", auto)
    logging.getLogger("corral.daemon").info("again")
    assert json.loads(auto.getvalue())["message"] == "again"
    assert log_stream.getvalue().count("\n") == 1, "the second configure replaced the handler"


CONSOLE_TEXT = "root password: Zq9-cloud-init-generated"  # what a console can show
QEMU_WORDS = "qemu-system-x86_64: -drive file=/srv/secret-name.qcow2: Could not open"


async def test_events_are_logged_without_what_a_guest_or_qemu_wrote(
    log_stream: io.StringIO, tmp_path: Path
) -> None:
    """A runner's events (the backend's callback, as a runner sends them) reach the log with
    their kind, VM and short fields, never the console's or qemu's text: the journal is read
    by more people (group adm) than the root-only console log."""
    from corral.manager import Manager, ManagerConfig
    from corral.spec import HostPolicy

    configure_logging("json", "info", log_stream)
    doc = {"metadata": {"name": "a"}, "spec": {"vm": {"maximumRam": "256Mi", "state": "Stopped"}}}
    async with Manager(ManagerConfig(state_dir=tmp_path / "state"), policy=HostPolicy()) as m:
        await m.create(doc)
        m._on_event("a", {"event": "BootTimeout", "timeout": 15, "consoleTail": CONSOLE_TEXT})
        m._on_event(
            "a",
            {
                "event": "StartFailed",
                "error": f"qemu did not start (exit code 1); qemu said:\n{QEMU_WORDS}",
                "type": "QemuError",
                "stderr": QEMU_WORDS,
            },
        )
        m._on_event(
            "a",
            {
                "event": "StateChanged",
                "state": "Stopped",
                "previous": "Running",
                "exit": {"code": 1, "stderr": f"{QEMU_WORDS}\n{CONSOLE_TEXT}"},
            },
        )
        said = f"x failed; qemu said:\n{CONSOLE_TEXT}"
        m._on_event("a", {"event": "Noted", "message": CONSOLE_TEXT, "errors": [said]})
        for _ in range(100):  # the store is written off the event loop
            stored = {e.kind: e.data for e in m.events("a")}
            if "Noted" in stored:
                break
            await asyncio.sleep(0.05)
    text = log_stream.getvalue()
    for words in ("Zq9-cloud-init-generated", "secret-name.qcow2"):
        assert words not in text, text
    got = {str(r["message"]): r for r in lines(log_stream) if r["logger"] == "corral.events"}
    assert got["BootTimeout"]["vm"] == "a" and got["BootTimeout"]["timeout"] == 15
    assert "consoleTail" not in got["BootTimeout"]
    failed = got["StartFailed"]
    assert failed["error"] == "qemu did not start (exit code 1); qemu said: [...]"
    assert (failed["type"], failed["level"]) == ("QemuError", "warning")
    assert got["StateChanged"]["exit"] == {"code": 1}
    assert got["StateChanged"]["state"] == "Stopped"
    assert got["Noted"]["errors"] == ["x failed; qemu said: [...]"]
    # the events themselves keep every word (corral events, GET /v1/events)
    assert stored["BootTimeout"]["consoleTail"] == CONSOLE_TEXT
    assert stored["StartFailed"]["stderr"] == QEMU_WORDS


@pytest.mark.parametrize("fmt", ["json", "text"])
def test_no_control_character_reaches_a_terminal(log_stream: io.StringIO, fmt: str) -> None:
    """C0/C1 controls and bidi overrides in a message, a field or an exception (uvicorn logs
    request paths, libraries log what they were given) are escaped or shown, never sent."""
    configure_logging(fmt, "info", log_stream)  # type: ignore[arg-type]
    nasty = "a\x1b]0;owned\x07b\u009b2Jc\u202ed\u0085e"
    log = logging.getLogger("corral.test")
    log.info("path %s", nasty, extra={"fields": {"detail": nasty}})
    try:
        raise ValueError(nasty)
    except ValueError:
        log.exception("boom")
    text = log_stream.getvalue()
    for char in ("\x1b", "\x07", "\u009b", "\u202e", "\u0085"):
        assert char not in text, (fmt, repr(char))
    if fmt == "json":
        assert text.isascii()
        assert json.loads(text.splitlines()[0])["detail"] == nasty  # escaped, not lost
    else:
        assert "a^[]0;owned^Gb\\x9b2Jc\\u202ed\\x85e" in text, text


def receive(sock: socket.socket) -> list[str]:
    sock.settimeout(5)
    return sock.recv(4096).decode().split("\n")


def test_notify_sends_one_datagram_to_a_path_socket(tmp_path: Path) -> None:
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        assert notify("READY=1", "STATUS=serving 2 VMs", env={"NOTIFY_SOCKET": str(path)})
        assert receive(sock) == ["READY=1", "STATUS=serving 2 VMs"]
        assert notify("STATUS=two\nlines", env={"NOTIFY_SOCKET": str(path)})
        assert receive(sock) == ["STATUS=two lines"]  # a newline cannot forge a second field


def test_notify_to_an_abstract_socket() -> None:
    name = f"corral-test-notify-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(b"\0" + name.encode())
        assert notify("STOPPING=1", env={"NOTIFY_SOCKET": "@" + name})
        assert receive(sock) == ["STOPPING=1"]


def test_notify_without_systemd_or_a_listener_is_a_quiet_false(tmp_path: Path) -> None:
    assert notify("READY=1", env={}) is False
    assert notify("READY=1", env={"NOTIFY_SOCKET": str(tmp_path / "nobody")}) is False
    assert notify("READY=1", env={"NOTIFY_SOCKET": "vsock:2:1234"}) is False
    assert notify("READY=1", env={"NOTIFY_SOCKET": "@corral-test-nobody-listens"}) is False
