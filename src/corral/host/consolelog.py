"""Log files another process appends to (qemu's serial console log, its stderr): capped and
rotated, and read back in bounded pieces across rotations.

A guest writes to its serial console as fast as it likes (0.44 MiB/s under TCG, 37 GiB a
day), and qemu appends all of it to ``console.log``. libvirt's virtlogd rotates such logs at
2 MiB and keeps one old file; corral does the same without owning qemu's file descriptor:
qemu opened the log with ``O_APPEND`` (``logappend=on``), so the file can be rotated under it
by *copy and truncate*:

1. the current content is copied to ``console.log.1`` (a new 0600 file that replaces the
   previous old one; a console log holds whatever the guest printed),
2. ``console.log`` is truncated in place; qemu's next write lands at offset 0.

At most about twice the cap is on disk, plus what the guest writes between two checks.
Bytes appended between the end of the copy and the truncate are lost (logrotate's
``copytruncate`` has the same window); the copy catches up with the writer until it reaches
the end, so that window is one system call.

:class:`LogFollower` reads what is appended to such a log, a bounded chunk at a time, and
follows it across a rotation (what it had not read yet is in ``.1``, at the same offsets).
:func:`tail_spans` finds where the last lines of the log (``.1`` then the file itself) begin,
reading backwards a chunk at a time, and :func:`read_spans` reads them back in chunks (``corral
logs --tail``). Nothing here reads a whole log into memory.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterator
from pathlib import Path

from corral.host.atomic import temp_sibling

__all__ = [
    "DEFAULT_MAX_BYTES",
    "LogFollower",
    "LogSpan",
    "log_exists",
    "needs_rotation",
    "read_spans",
    "rotate",
    "rotated_path",
    "tail_spans",
]

DEFAULT_MAX_BYTES = 2 * 1024 * 1024
"""virtlogd's default ``max_size``."""

_COPY_CHUNK = 1024 * 1024
_READ_CHUNK = 64 * 1024


def rotated_path(path: Path) -> Path:
    """The one old file kept: ``console.log`` -> ``console.log.1``."""
    return path.with_name(path.name + ".1")


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def needs_rotation(path: Path, max_bytes: int) -> bool:
    """Whether ``path`` has reached ``max_bytes`` (one ``stat``; a missing file has not)."""
    return _size(path) >= max_bytes


def rotate(path: Path) -> int:
    """Copy ``path`` to ``path.1`` (replacing it), then truncate ``path`` to 0 in place.

    Returns the number of bytes moved to ``path.1`` (0 if ``path`` does not exist). Blocking
    file I/O of about the cap's size: call it from a thread. Raises ``OSError``.
    """
    try:
        src = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return 0
    old = rotated_path(path)
    tmp = temp_sibling(old, "rotate")
    try:
        if not stat.S_ISREG(os.fstat(src).st_mode):
            raise OSError(f"{path} is not a regular file")
        dst = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        copied = 0
        try:
            while chunk := os.pread(src, _COPY_CHUNK, copied):
                view = memoryview(chunk)
                while view:
                    view = view[os.write(dst, view) :]
                copied += len(chunk)
        finally:
            os.close(dst)
        os.replace(tmp, old)
        os.ftruncate(src, 0)
        return copied
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    finally:
        os.close(src)


def _read_at(path: Path, offset: int, limit: int) -> bytes:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return b""
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return b""
        return os.pread(fd, limit, offset)
    except OSError:
        return b""
    finally:
        os.close(fd)


class LogFollower:
    """What is appended to ``path`` after ``offset``, a bounded chunk at a time, across
    copy-and-truncate rotations: when the file is shorter than what was read, it was rotated,
    and the unread rest is in ``path.1`` at the same offsets; then reading goes on from the
    start of ``path``. (A file rotated and grown past the old offset again between two reads
    is taken for the same file: at serial-console speeds and megabyte caps, reads are far more
    frequent than that.)"""

    def __init__(self, path: Path, offset: int | None = None) -> None:
        self.path = path
        self.offset = _size(path) if offset is None else offset
        self._in_old = False

    def read(self, limit: int = _READ_CHUNK) -> bytes:
        """Up to ``limit`` new bytes; empty when there is nothing new (or no file)."""
        if not self._in_old and _size(self.path) < self.offset:
            self._in_old = True
        if self._in_old:
            chunk = _read_at(rotated_path(self.path), self.offset, limit)
            if chunk:
                self.offset += len(chunk)
                return chunk
            self._in_old = False
            self.offset = 0
        chunk = _read_at(self.path, self.offset, limit)
        self.offset += len(chunk)
        return chunk


LogSpan = tuple[Path, int, int]
"""Bytes ``[start, end)`` of one file."""


def log_exists(path: Path) -> bool:
    """Whether the log or its rotated copy is there (a VM that never ran has neither)."""
    return any(os.path.isfile(p) for p in (path, rotated_path(path)))


def tail_spans(path: Path, lines: int | None = None) -> tuple[list[LogSpan], int]:
    """Where the last ``lines`` lines (``None``: all) of the log are, over ``path.1`` and
    ``path``, and the size of ``path`` when looked at: where following it starts (a
    :class:`LogFollower` from there). An unfinished last line counts as a line, as with
    ``tail -n``. Reads backwards a chunk at a time: a cost of the lines' length, not the
    log's. Blocking file I/O: call it from a thread."""
    old = rotated_path(path)
    files = [(old, _size(old)), (path, _size(path))]
    end = files[1][1]
    begin = (0, 0)  # (index in files, offset): where the wanted lines start
    if lines is not None:
        begin = _tail_start(files, lines)
    spans: list[LogSpan] = []
    for index, (file, size) in enumerate(files):
        start = begin[1] if index == begin[0] else 0
        if index >= begin[0] and start < size:
            spans.append((file, start, size))
    return spans, end


def _tail_start(files: list[tuple[Path, int]], lines: int) -> tuple[int, int]:
    if lines <= 0:
        return len(files) - 1, files[-1][1]
    found = 0
    last_byte = True  # the log's very last byte is next: a newline there ends no new line
    for index in range(len(files) - 1, -1, -1):
        file, pos = files[index]
        while pos > 0:
            start = max(0, pos - _READ_CHUNK)
            chunk = _read_at(file, start, pos - start)
            if len(chunk) != pos - start:  # rotated while read: start where it is whole
                return index, pos
            cut = len(chunk)
            if last_byte and chunk.endswith(b"\n"):
                cut -= 1
            last_byte = False
            while (cut := chunk.rfind(b"\n", 0, cut)) >= 0:
                found += 1
                if found == lines:
                    return index, start + cut + 1
            pos = start
    return 0, 0


def read_spans(spans: list[LogSpan], limit: int = _READ_CHUNK) -> Iterator[bytes]:
    """The bytes of ``spans``, at most ``limit`` at a time (less if a file shrank)."""
    for file, start, end in spans:
        pos = start
        while pos < end:
            chunk = _read_at(file, pos, min(limit, end - pos))
            if not chunk:
                break
            pos += len(chunk)
            yield chunk
