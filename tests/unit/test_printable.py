"""Text others wrote, made safe for a terminal (issue 11, "Failures 3"): the console a guest
writes and qemu's stderr are shown, never obeyed; and qemu's last words in a start error are
this run's only, bounded (pure: files in a temp dir, no process)."""

from __future__ import annotations

from pathlib import Path

from corral.printable import PrintableDecoder, printable
from corral.runner.config import resolve_paths
from corral.runner.supervisor import VmSupervisor
from corral.spec import HostPolicy, parse_document


def test_control_characters_are_shown_not_obeyed() -> None:
    text = "a\tb\nclear\x1b[2J title\x1b]0;x\x07 csi\x9b1m nul\x00 del\x7f bidi\u202e end\r\n"
    assert printable(text) == (
        "a\tb\nclear^[[2J title^[]0;x^G csi\\x9b1m nul^@ del^? bidi\\u202e end\n"
    )
    assert printable(printable(text)) == printable(text)  # shown once, shown the same again
    assert printable("ünïcödé ✓ 日本") == "ünïcödé ✓ 日本"


def test_the_decoder_joins_utf8_split_between_pieces_and_replaces_bad_bytes() -> None:
    data = "é\x1b[31m✓".encode()
    decoder = PrintableDecoder()
    pieces = [decoder.feed(data[i : i + 1]) for i in range(len(data))]
    assert "".join(pieces) + decoder.feed(b"", final=True) == "é^[[31m✓"
    assert PrintableDecoder().feed(b"bad \xff\xc2 end", final=True) == "bad \ufffd\ufffd end"
    assert PrintableDecoder().feed("\x9b".encode(), final=True) == "\\x9b"  # C1 as UTF-8


def _supervisor(tmp_path: Path) -> VmSupervisor:
    doc = parse_document({"metadata": {"name": "said"}, "spec": {"vm": {}}})
    paths = resolve_paths(doc, data_dir=str(tmp_path / "data"), runtime_dir=str(tmp_path / "run"))
    paths.runtime_dir.mkdir()
    return VmSupervisor(doc, paths, HostPolicy())


def test_qemus_last_words_are_this_runs_bounded_and_printable(tmp_path: Path) -> None:
    sup = _supervisor(tmp_path)
    log = sup.files.stderr
    assert log == tmp_path / "run" / "qemu.log"
    assert sup._stderr_tail() == ""  # no log yet
    log.write_bytes(
        b"--- 2025-01-01T00:00:00.000Z starting qemu\n"
        b"qemu-system-x86_64: an earlier run's error\n"
        b"--- 2025-01-01T00:01:00.000Z starting qemu\n"
        b"qemu-system-x86_64: -device x: \x1b[2Jno such device\n"
    )
    assert sup._stderr_tail() == "qemu-system-x86_64: -device x: ^[[2Jno such device"
    with log.open("ab") as f:
        f.write(b"--- 2025-01-01T00:02:00.000Z starting qemu\n")
        f.write(b"".join(b"warning %d\n" % i for i in range(100)))
    tail = sup._stderr_tail()
    assert tail.splitlines() == [f"warning {i}" for i in range(80, 100)]  # the last 20 lines
    with log.open("ab") as f:
        f.write(b"--- 2025-01-01T00:03:00.000Z starting qemu\n" + b"x" * 10000 + b"\nlast\n")
    tail = sup._stderr_tail()
    assert len(tail.encode()) <= 4096 + 3 and tail == "…" + "x" * (4096 - 6) + "\nlast"
    assert "starting qemu" not in tail
