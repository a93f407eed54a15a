"""A VM's own disks: qcow2 overlays on shared base images, and blank disks.

The invariants (DESIGN.md) this module keeps:

* A base image is never written. The overlay is created by ``qemu-img create -b BASE -F FMT``,
  which only reads the base; the VM writes its overlay alone.
* A disk is made once. An existing overlay or disk file is never recreated, truncated or
  touched; it holds the guest's data. Creation happens under a temporary name in the same
  directory and the finished file is published without replacing anything
  (:func:`~corral.host.atomic.publish_new`), so there is never a half-made file at the final
  name and two runners racing for one overlay cannot clobber each other.
* The overlay records the base by its resolved absolute path (symlinks followed): a symlink
  later pointed at a different image cannot swap the data under an existing overlay, and no
  relative path is ever interpreted by qemu against a changing working directory.

Creation cost does not depend on the base's size: ``qemu-img`` writes only the qcow2 header
and tables, and probes the base's format once (``qemu-img info``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from corral.errors import HostError
from corral.host.atomic import ensure_private_dir, publish_new, temp_sibling
from corral.host.chain import ChainError, read_qcow2
from corral.host.process import run_tool

__all__ = ["DISK_FORMATS", "ImageInfo", "ensure_disk", "ensure_overlay", "image_info"]

DISK_FORMATS = ("qcow2", "raw")
"""The formats :func:`ensure_disk` creates (the document's ``DiskFormat`` values)."""


@dataclass(frozen=True)
class ImageInfo:
    """What ``qemu-img info`` says about one image file (not its backing chain).

    ``backing_file`` is the name as recorded in the image (what qemu will open);
    ``actual_size`` is the bytes allocated on the host, None if qemu-img cannot tell.
    """

    format: str
    virtual_size: int
    actual_size: int | None
    backing_file: str | None
    backing_format: str | None


def _absolute(path: Path) -> Path:
    # qemu reads "name:rest" without a slash before the colon as a protocol ("nbd:...");
    # an absolute path always starts with a slash.
    return Path(os.path.abspath(path))


def _optional_str(data: dict[str, object], key: str) -> str | None:
    value = data.get(key)
    return value if isinstance(value, str) else None


def _optional_int(data: dict[str, object], key: str) -> int | None:
    value = data.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


async def image_info(path: Path, fmt: str | None = None) -> ImageInfo:
    """Read ``path``'s format, sizes and backing file with ``qemu-img info --output=json -U``.

    ``-U`` (force-share) lets this work on an image a running qemu holds locked; the answer
    may then be a moment stale, which is fine for sizes and never wrong for format/backing.
    Raises :class:`HostError` if the file is missing or qemu-img cannot read it.
    """
    target = _absolute(path)
    if not target.exists():
        raise HostError(f"image {path} does not exist")
    out = await run_tool(
        ["qemu-img", "info", "--output=json", "-U", *(["-f", fmt] if fmt else []), str(target)],
        what=f"read image {path}",
    )
    try:
        raw: object = json.loads(out)
    except ValueError as exc:
        raise HostError(f"cannot read image {path}: qemu-img printed no JSON") from exc
    if not isinstance(raw, dict):
        raise HostError(f"cannot read image {path}: unexpected qemu-img output")
    data: dict[str, object] = {str(k): v for k, v in raw.items()}
    fmt = _optional_str(data, "format")
    virtual_size = _optional_int(data, "virtual-size")
    if fmt is None or virtual_size is None:
        raise HostError(f"cannot read image {path}: qemu-img gave no format or virtual size")
    return ImageInfo(
        format=fmt,
        virtual_size=virtual_size,
        actual_size=_optional_int(data, "actual-size"),
        backing_file=_optional_str(data, "backing-filename"),
        backing_format=_optional_str(data, "backing-filename-format"),
    )


async def ensure_overlay(base: Path, overlay: Path, *, size: int | None = None) -> bool:
    """Make ``overlay`` a qcow2 overlay on ``base`` unless ``overlay`` already exists.

    Returns True if it was created now, False if a file was already there (it is not opened,
    checked or touched: it is the guest's disk). ``size`` (bytes) grows the guest's disk
    beyond the base's virtual size; smaller than the base is refused with
    :class:`HostError`, because a shrunk overlay would cut off the base's data. The base's
    format is probed (``qemu-img info``) and recorded (``-F``), so qemu never re-probes it at
    boot. The overlay's parent directory is created (0700) when missing; the file is 0600.
    """
    if os.path.lexists(overlay):
        return False
    base_path = _absolute(base)
    if not base_path.exists():
        raise HostError(f"base image {base} for overlay {overlay} does not exist")
    base_path = base_path.resolve()
    # corral decides the format (qcow2 by its magic, else raw): qemu-img never guesses it, as
    # a guessed vmdk descriptor would name any host file as its extent
    try:
        head = read_qcow2(str(base_path))
    except ChainError as exc:
        raise HostError(f"base image {base}: {exc}") from exc
    info = await image_info(base_path, "qcow2" if head is not None else "raw")
    if size is not None and size < info.virtual_size:
        raise HostError(
            f"overlay {overlay}: size {size} bytes is smaller than the virtual size of its "
            f"base image {base} ({info.virtual_size} bytes); an overlay cannot shrink its base"
        )
    target = _absolute(overlay)
    ensure_private_dir(target.parent)
    tmp = temp_sibling(target)
    argv = ["qemu-img", "create", "-q", "-f", "qcow2"]
    argv += ["-b", str(base_path), "-F", info.format, str(tmp)]
    if size is not None:
        argv.append(str(int(size)))
    try:
        await run_tool(argv, what=f"create overlay {overlay} on {base}")
        os.chmod(tmp, 0o600)
        return publish_new(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


async def ensure_disk(path: Path, size: int, fmt: str) -> bool:
    """Create a blank ``fmt`` (qcow2 or raw) disk of ``size`` bytes at ``path`` if missing.

    Returns True if created now, False if a file was there already (never touched, whatever
    its size or format). Raw disks are sparse. Same atomicity as :func:`ensure_overlay`.
    """
    if fmt not in DISK_FORMATS:
        raise ValueError(f"disk format must be one of {', '.join(DISK_FORMATS)}, not {fmt!r}")
    if size <= 0:
        raise ValueError(f"disk size must be positive, not {size}")
    if os.path.lexists(path):
        return False
    target = _absolute(path)
    ensure_private_dir(target.parent)
    tmp = temp_sibling(target)
    try:
        await run_tool(
            ["qemu-img", "create", "-q", "-f", str(fmt), str(tmp), str(int(size))],
            what=f"create disk {path}",
        )
        os.chmod(tmp, 0o600)
        return publish_new(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
