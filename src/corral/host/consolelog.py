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
Nothing here reads a whole log into memory.
"""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path

from corral.host.atomic import temp_sibling

__all__ = [
    "DEFAULT_MAX_BYTES",
    "LogFollower",
    "needs_rotation",
    "rotate",
    "rotated_path",
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
