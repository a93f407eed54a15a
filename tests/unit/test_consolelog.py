"""Console log rotation (issue 9, item 11a): copy-and-truncate under a writer that appends,
one old file, bounded reads that follow the log across rotations."""

from __future__ import annotations

import os
import re
import stat
import threading
from pathlib import Path

import pytest
from pydantic import ValidationError

from corral.host.consolelog import (
    DEFAULT_MAX_BYTES,
    LogFollower,
    log_exists,
    needs_rotation,
    read_spans,
    rotate,
    rotated_path,
    tail_spans,
)
from corral.spec import HostPolicy


def _appender(path: Path) -> int:
    """A writer like qemu's chardev log: O_APPEND, kept open across rotations."""
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)


_LINE = re.compile(rb"line (\d{8})")


def _size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


def test_rotate_moves_the_content_to_one_old_file_and_truncates_in_place(tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    fd = _appender(log)
    try:
        os.write(fd, b"first boot\n" * 100)
        inode = log.stat().st_ino
        assert rotate(log) == 1100
        old = rotated_path(log)
        assert old == tmp_path / "console.log.1"
        assert old.read_bytes() == b"first boot\n" * 100
        assert stat.S_IMODE(old.stat().st_mode) == 0o600  # whatever the guest printed
        assert log.stat().st_size == 0 and log.stat().st_ino == inode  # qemu keeps its fd

        os.write(fd, b"after\n")
        assert log.read_bytes() == b"after\n"  # at offset 0: no hole where the old bytes were

        assert rotate(log) == 6
        assert old.read_bytes() == b"after\n"  # only one old file: the previous one is gone
        assert sorted(p.name for p in tmp_path.iterdir()) == ["console.log", "console.log.1"]
    finally:
        os.close(fd)


def test_rotate_of_a_missing_file_does_nothing(tmp_path: Path) -> None:
    assert rotate(tmp_path / "console.log") == 0
    assert list(tmp_path.iterdir()) == []


def test_rotate_refuses_what_is_not_a_regular_file(tmp_path: Path) -> None:
    fifo = tmp_path / "console.log"
    os.mkfifo(fifo)
    with pytest.raises(OSError, match="not a regular file"):
        rotate(fifo)
    (tmp_path / "x").write_text("x")
    link = tmp_path / "qemu.log"
    link.symlink_to(tmp_path / "x")
    with pytest.raises(OSError):
        rotate(link)
    assert (tmp_path / "x").read_text() == "x"
    assert not rotated_path(fifo).exists() and not rotated_path(link).exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp left


def test_needs_rotation_at_the_cap(tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    assert not needs_rotation(log, 10)
    log.write_bytes(b"x" * 9)
    assert not needs_rotation(log, 10)
    log.write_bytes(b"x" * 10)
    assert needs_rotation(log, 10)


def test_follower_reads_bounded_chunks_from_its_offset(tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    log.write_bytes(b"before start\n")
    follower = LogFollower(log)  # from the current end, as a fresh qemu start
    assert follower.read() == b""
    with log.open("ab") as f:
        f.write(b"a" * 100)
    assert follower.read(limit=30) == b"a" * 30
    assert follower.read(limit=1000) == b"a" * 70
    assert follower.read() == b""
    assert LogFollower(tmp_path / "missing").read() == b""


def test_follower_continues_across_a_rotation(tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    fd = _appender(log)
    try:
        os.write(fd, b"0123456789")
        follower = LogFollower(log, 0)
        assert follower.read(limit=4) == b"0123"
        os.write(fd, b"ABC")
        rotate(log)
        os.write(fd, b"new")
        # the unread rest from the old file, at the same offsets, then the new file
        assert follower.read(limit=4) == b"4567"
        assert follower.read() == b"89ABC"
        assert follower.read() == b"new"
        assert follower.read() == b""
    finally:
        os.close(fd)


def test_a_fast_writer_stays_bounded_and_is_read_in_order(tmp_path: Path) -> None:
    """A writer appending as fast as it can while the log is rotated at a small cap: the disk
    holds about two caps, and a follower sees the lines in order, none twice (a line being
    written while it was copied may be cut, as with logrotate's copytruncate)."""
    log = tmp_path / "console.log"
    cap = 64 * 1024
    fd = _appender(log)
    stop = threading.Event()
    written = [0]

    def write() -> None:
        n = 0
        while not stop.is_set() and n < 60_000:
            os.write(fd, f"line {n:08d}\n".encode())
            n += 1
        written[0] = n

    follower = LogFollower(log, 0)
    seen: list[int] = []
    partial = b""
    worst = 0
    writer = threading.Thread(target=write)
    writer.start()
    try:
        while writer.is_alive():
            if needs_rotation(log, cap):
                rotate(log)
            worst = max(worst, _size(log) + _size(rotated_path(log)))
            chunk = partial + follower.read()
            *lines, partial = chunk.split(b"\n")
            # a line cut by the copy (it was being written) joins the next one: skip it
            seen += [int(m[1]) for m in map(_LINE.fullmatch, lines) if m]
    finally:
        stop.set()
        writer.join()
        os.close(fd)
    assert written[0] > 10 * cap // 14  # the writer really went past the cap many times
    assert worst < 2 * cap + 256 * 1024, worst
    assert seen and seen == sorted(set(seen))


def test_the_cap_is_host_policy() -> None:
    assert HostPolicy().console_log_max_size == DEFAULT_MAX_BYTES == 2 * 1024 * 1024
    policy = HostPolicy.model_validate({"consoleLogMaxSize": "256Ki"})
    assert policy.console_log_max_size == 256 * 1024
    with pytest.raises(ValidationError):
        HostPolicy.model_validate({"consoleLogMaxSize": 100})


def _tail(log: Path, lines: int | None) -> bytes:
    spans, _ = tail_spans(log, lines)
    return b"".join(read_spans(spans, limit=3))  # small reads: pieces join whole


def test_tail_reads_the_last_lines_across_the_rotated_copy(tmp_path: Path) -> None:
    """``corral logs --tail N`` (issue 11, "Failures 3"): the last N lines of ``.1`` and the
    log, an unfinished last line counting as one, as ``tail -n`` counts them."""
    log = tmp_path / "console.log"
    assert not log_exists(log)
    assert tail_spans(log, 5) == ([], 0)
    log.write_bytes(b"one\ntwo\nthree\n")
    rotate(log)
    assert log_exists(log) and log.stat().st_size == 0
    log.write_bytes(b"four\nfive")
    assert _tail(log, None) == b"one\ntwo\nthree\nfour\nfive"
    assert _tail(log, 0) == b""
    assert _tail(log, 1) == b"five"
    assert _tail(log, 2) == b"four\nfive"
    assert _tail(log, 3) == b"three\nfour\nfive"
    assert _tail(log, 99) == b"one\ntwo\nthree\nfour\nfive"
    with log.open("ab") as f:
        f.write(b"\n")
    assert _tail(log, 1) == b"five\n"
    assert tail_spans(log, 1)[1] == log.stat().st_size  # following starts at the end


def test_tail_reads_back_only_what_it_needs(tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    log.write_bytes(b"".join(b"line %08d\n" % i for i in range(200_000)))  # 2.8 MB
    spans, _ = tail_spans(log, 3)
    assert spans == [(log, log.stat().st_size - 42, log.stat().st_size)]
    assert b"".join(read_spans(spans)) == b"line 00199997\nline 00199998\nline 00199999\n"
