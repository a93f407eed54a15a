"""Publishing files atomically: a file appears at its final name complete, or not at all.

Every file ``corral.host`` makes (overlays, blank disks, OVMF vars, the cloud-init seed) is
built under a temporary name in the destination directory and then published:

* :func:`publish_new` for files that must be made *once* and never replaced (an overlay or a
  vars file holds the guest's data): a hard link to the final name, which fails if the name
  exists, so two runners racing for the same file cannot clobber each other; where hard links
  are not supported, ``renameat2(RENAME_NOREPLACE)`` does the same.
* :func:`publish_replace` for files that are regenerated (the seed): ``rename`` over the old
  one. A running qemu keeps the old inode open and is not disturbed.
* :func:`write_atomic` (and :func:`write_file`, its :class:`HostError` form) for small files
  written whole from memory (a runner's status and started files, a pidfile, a unit file, a
  VM document): the one atomic write of corral; readers see the old file or the new one.

Both fsync the file and the directory, so a power cut leaves the old state or the new one.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import secrets
import stat
from pathlib import Path

from corral.errors import HostError

__all__ = [
    "ensure_private_dir",
    "publish_new",
    "publish_replace",
    "temp_sibling",
    "write_atomic",
    "write_file",
]

_AT_FDCWD = -100
_RENAME_NOREPLACE = 1
_NO_LINKS = {errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK, errno.ENOSYS}


def temp_sibling(final: Path, tag: str = "tmp") -> Path:
    """A fresh hidden name next to ``final`` (same directory, so same filesystem)."""
    return final.parent / f".{final.name}.{secrets.token_hex(6)}.{tag}"


def ensure_private_dir(directory: Path, *, tighten: bool = False) -> None:
    """Create ``directory`` with mode 0700 if missing (missing parents get the umask's mode,
    as ``mkdir -p`` gives them); leave an existing one be, unless ``tighten``: then it is made
    0700 too (a dir corral owns, such as the manager's state dir, created by an older
    corral with 0755)."""
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        if tighten and stat.S_IMODE(directory.stat().st_mode) != 0o700:
            os.chmod(directory, 0o700)
    except OSError as exc:
        raise HostError(f"cannot create directory {directory}: {exc}") from exc


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on directories; the rename is still atomic
    finally:
        os.close(fd)


def _rename_noreplace(src: Path, dst: Path) -> None:
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    renameat2 = libc.renameat2
    renameat2.argtypes = [
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_uint,
    ]
    renameat2.restype = ctypes.c_int
    result = renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE)
    if result != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), str(dst))


def publish_new(tmp: Path, final: Path) -> bool:
    """Give the complete file ``tmp`` the name ``final`` unless ``final`` already exists.

    Returns True if ``tmp`` became ``final``; False if another file was there first (it is
    left untouched). ``tmp`` is gone afterwards either way.
    """
    try:
        _fsync_file(tmp)
        try:
            os.link(tmp, final)
        except FileExistsError:
            return False
        except OSError as exc:
            if exc.errno not in _NO_LINKS:
                raise
            try:
                _rename_noreplace(tmp, final)
            except FileExistsError:
                return False
        _fsync_dir(final.parent)
        return True
    except OSError as exc:
        raise HostError(f"cannot create {final}: {exc}") from exc
    finally:
        tmp.unlink(missing_ok=True)


def publish_replace(tmp: Path, final: Path) -> None:
    """Give the complete file ``tmp`` the name ``final``, replacing what was there."""
    try:
        _fsync_file(tmp)
        os.replace(tmp, final)
        _fsync_dir(final.parent)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise HostError(f"cannot write {final}: {exc}") from exc


def write_atomic(path: Path, data: bytes, mode: int = 0o644, *, parents: bool = True) -> None:
    """Replace ``path`` with ``data`` so that readers see the old or the new file, whole.

    The temporary file is created with ``mode`` already (a 0600 secret is never readable by
    others, not even briefly), fsynced, renamed over ``path``, and the directory fsynced.
    ``parents``: create missing parent directories. Raises ``OSError`` (see
    :func:`write_file` for a :class:`HostError`).
    """
    if parents:
        path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(path)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)  # the umask may have narrowed it
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def write_file(path: Path, data: bytes, mode: int = 0o644, *, parents: bool = False) -> None:
    """:func:`write_atomic`, failing with a :class:`HostError` that names ``path``."""
    try:
        write_atomic(path, data, mode, parents=parents)
    except OSError as exc:
        raise HostError(f"cannot write {path}: {exc}") from exc
