"""The host files behind every disk a VM opens: the whole qcow2 backing chain, read safely.

A disk at an allowed path may name a backing file (or an external ``data_file``) anywhere on
the host; qemu follows it, so a guest could read ``/etc/shadow`` through a backing file or
write into a host file through a data file. Like libvirt's storage_file walk, every link of
every chain is found here and checked against the host's ``imagePaths`` before anything
opens the image (``qemu-img`` included: it would follow an ``nbd://`` backing file).

The qcow2 header is parsed here rather than with ``qemu-img info --backing-chain``, because
qemu-img opens each backing file to describe it: a network backing file would already have
been fetched, and a FIFO would block. Files are opened ``O_NONBLOCK`` and only regular files
and block devices are read.

Rules: a chain link is a plain file path (no ``json:``, no ``proto:``); its format is
recorded in the image (qemu never guesses it) and is ``qcow2`` or ``raw``; external data
files are refused; chains are at most :data:`MAX_DEPTH` long and never loop.
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from corral.errors import FieldIssue
from corral.spec import HostPolicy, VmDocument
from corral.spec.models import is_remote_image
from corral.spec.policy import path_within

__all__ = [
    "MAX_DEPTH",
    "ChainError",
    "ChainLink",
    "Qcow2Header",
    "chain_issues",
    "image_chain",
    "open_file",
    "probe_format",
    "read_qcow2",
]

MAX_DEPTH = 16
_QCOW2_MAGIC = b"QFI\xfb"
_EXT_END = 0
_EXT_BACKING_FORMAT = 0xE2792ACA
_EXT_DATA_FILE = 0x44415441
_INCOMPAT_DATA_FILE = 1 << 2
_HEADER_MAX = 64 * 1024
# formats qemu would detect by probing: never opened by corral (their files can name others)
_OTHER_MAGICS = (
    (b"KDMV", "vmdk"),
    (b"# Disk DescriptorFile", "vmdk"),
    (b"QED\x00", "qed"),
    (b"vhdxfile", "vhdx"),
    (b"conectix", "vpc"),
    (b"LUKS\xba\xbe", "luks"),
    (b"WithoutFreeSpace", "parallels"),
    (b"WithouFreSpacExt", "parallels"),
)
_PROTOCOL = re.compile(r"^[A-Za-z0-9+._-]+:")


class ChainError(Exception):
    """A link of a chain that qemu must not open; the message says why."""


@dataclass(frozen=True)
class ChainLink:
    """One file of a chain: as named (``path``), resolved (``real``), and its format."""

    path: str
    real: str
    format: str


def open_file(path: str, *, block_devices: bool = True) -> int | None:
    """An fd open for reading on ``path`` if it is a regular file (or a block device); None
    if it does not exist. The path is first opened ``O_PATH`` and checked, so a FIFO, a
    character device (``/dev/watchdog`` arms on open) or a socket is never really opened."""
    try:
        probe = os.open(path, os.O_PATH | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise ChainError(f"cannot open {path}: {getattr(exc, 'strerror', exc)}") from exc
    try:
        mode = os.fstat(probe).st_mode
        if not (stat.S_ISREG(mode) or (block_devices and stat.S_ISBLK(mode))):
            kind = "a regular file or a block device" if block_devices else "a regular file"
            raise ChainError(f"{path} is not {kind}")
        try:
            return os.open(
                f"/proc/self/fd/{probe}", os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
            )
        except OSError as exc:
            raise ChainError(f"cannot open {path}: {exc.strerror}") from exc
    finally:
        os.close(probe)


def _read_head(path: str) -> bytes | None:
    """The first bytes of a regular file or block device; None if it does not exist."""
    fd = open_file(path)
    if fd is None:
        return None
    try:
        return os.pread(fd, _HEADER_MAX, 0)
    finally:
        os.close(fd)


def probe_format(head: bytes) -> str:
    """``qcow2`` or ``raw``; another recognised format raises :class:`ChainError`."""
    if head.startswith(_QCOW2_MAGIC):
        return "qcow2"
    for magic, name in _OTHER_MAGICS:
        if head.startswith(magic):
            raise ChainError(f"is a {name} image; only qcow2 and raw are allowed")
    return "raw"


@dataclass(frozen=True)
class Qcow2Header:
    """What a qcow2 header says about the files behind it, and the guest-visible size."""

    virtual_size: int
    backing: str | None
    backing_format: str | None
    data_file: bool


def read_qcow2(path: str) -> Qcow2Header | None:
    """The header of a qcow2 file (read without blocking, see :func:`_read_head`); None if
    ``path`` is missing or not a qcow2 image. Raises :class:`ChainError` if it cannot be read
    safely or the header is broken."""
    head = _read_head(path)
    if head is None or not head.startswith(_QCOW2_MAGIC):
        return None
    return _parse_qcow2(head)


def _parse_qcow2(head: bytes) -> Qcow2Header:
    """The header as qemu's qcow2 driver reads it: header extensions lie between the header's
    end and the backing file name (or the end of the first cluster), and nowhere else; a
    layout qemu would read differently from this is refused, never guessed at."""
    if len(head) < 72:
        raise ChainError("truncated qcow2 header")
    version, backing_offset, backing_size, cluster_bits = struct.unpack_from(">IQII", head, 4)
    (virtual_size,) = struct.unpack_from(">Q", head, 24)
    if version not in (2, 3) or not 9 <= cluster_bits <= 21:
        raise ChainError(f"unsupported qcow2 header (version {version})")
    cluster_size = 1 << cluster_bits
    header_length = 72
    data_file = False
    if version >= 3:
        if len(head) < 104:
            raise ChainError("truncated qcow2 v3 header")
        (incompatible,) = struct.unpack_from(">Q", head, 72)
        data_file = bool(incompatible & _INCOMPAT_DATA_FILE)
        (header_length,) = struct.unpack_from(">I", head, 100)
    backing = None
    if backing_offset:
        if (
            backing_size > 1023
            or backing_offset < header_length
            or backing_offset + backing_size > min(cluster_size, len(head))
        ):
            raise ChainError("qcow2 backing file name lies outside where qemu reads it")
        raw_name = head[backing_offset : backing_offset + backing_size]
        try:
            backing = raw_name.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ChainError("qcow2 backing file name is not UTF-8") from exc
        if "\x00" in backing:
            raise ChainError("qcow2 backing file name contains NUL")
    ext_end = backing_offset or cluster_size
    backing_format: str | None = None
    ext_at = header_length
    while True:
        if ext_at + 8 > ext_end:
            break  # qemu stops here too: no room for another extension
        if ext_at + 8 > len(head):
            raise ChainError("qcow2 header extensions run past what corral reads")
        kind, length = struct.unpack_from(">II", head, ext_at)
        if kind == _EXT_END:
            break
        if length > ext_end - ext_at - 8 or ext_at + 8 + length > len(head):
            raise ChainError("qcow2 header extension too large")
        data = head[ext_at + 8 : ext_at + 8 + length]
        if kind == _EXT_BACKING_FORMAT:
            backing_format = data.decode("ascii", errors="replace")
        elif kind == _EXT_DATA_FILE:
            data_file = True
        ext_at += 8 + ((length + 7) & ~7)
    return Qcow2Header(virtual_size, backing, backing_format, data_file)


def image_chain(path: str, fmt: str | None = None) -> list[ChainLink]:
    """``path`` and every backing file behind it, in order. ``fmt`` is the format the
    document gives (None: detected, for a base image). A missing first file gives ``[]``
    (created at start); a missing backing file is an error."""
    links: list[ChainLink] = []
    seen: set[str] = set()
    current, current_fmt = path, fmt
    while True:
        head = _read_head(current)
        if head is None:
            if links:
                raise ChainError(f"backing file {current} does not exist")
            return links
        detected = probe_format(head)
        use = current_fmt or detected
        if use not in ("qcow2", "raw"):
            raise ChainError(f"{current}: format {use} is not allowed (qcow2 or raw)")
        real = os.path.realpath(current)
        if real in seen:
            raise ChainError(f"{current}: the backing chain loops")
        seen.add(real)
        links.append(ChainLink(current, real, use))
        if use == "raw":
            return links
        if detected != "qcow2":
            raise ChainError(f"{current} is not a qcow2 image")
        header = _parse_qcow2(head)
        if header.data_file:
            raise ChainError(
                f"{current} has an external data file (data_file); corral refuses those"
            )
        if header.backing is None:
            return links
        if len(links) >= MAX_DEPTH:
            raise ChainError(f"backing chain of {path} is longer than {MAX_DEPTH}")
        backing = header.backing
        if backing.startswith("json:") or _PROTOCOL.match(backing):
            raise ChainError(
                f"{current} names backing file {backing!r}: only plain file paths are allowed"
            )
        if header.backing_format not in ("qcow2", "raw"):
            raise ChainError(
                f"{current} does not record its backing file's format as qcow2 or raw "
                f"(found {header.backing_format!r}); qemu would guess it "
                "(fix: qemu-img rebase -u -F qcow2|raw)"
            )
        current = os.path.join(os.path.dirname(current), backing)
        current_fmt = header.backing_format


def _document_files(doc: VmDocument) -> list[tuple[str, str, str | None, bool]]:
    """(field path, host path, format or None to detect, is a chain) of every file qemu
    opens for this document."""
    files: list[tuple[str, str, str | None, bool]] = []
    for i, disk in enumerate(doc.vm.disks):
        where = f"spec.vm.disks[{i}]"
        if disk.file is not None:
            if disk.file.path is not None:
                files.append((f"{where}.file.path", disk.file.path, disk.file.format.value, True))
            if disk.file.image is not None and os.path.isabs(disk.file.image):
                files.append((f"{where}.file.image", disk.file.image, None, True))
        if disk.device is not None:
            files.append((f"{where}.device.path", disk.device.path, "raw", False))
        if disk.cdrom is not None and disk.cdrom.image and not is_remote_image(disk.cdrom.image):
            files.append((f"{where}.cdrom.image", disk.cdrom.image, "raw", False))
    for field, value in (("spec.vm.kernel", doc.vm.kernel), ("spec.vm.initrd", doc.vm.initrd)):
        if value is not None:
            files.append((field, value, "raw", False))
    return files


def chain_issues(
    doc: VmDocument,
    policy: HostPolicy,
    *,
    forbidden: Sequence[str] = (),
    read_only_ok: Sequence[str] = (),
) -> list[FieldIssue]:
    """Every file of every disk chain, CD, kernel and initrd: readable safely, within the
    host's ``imagePaths``, and outside ``forbidden`` dirs (the manager's own state), except
    backing files inside ``read_only_ok`` dirs (the image store: qemu opens backing files
    read-only). Returns the issues (empty: all good)."""
    issues: list[FieldIssue] = []
    allowed = policy.image_paths
    for loc, path, fmt, is_chain in _document_files(doc):
        if not os.path.isabs(path):
            continue  # check_policy reports relative paths
        try:
            links = image_chain(path, fmt) if is_chain else _single(path, fmt)
        except ChainError as exc:
            issues.append(FieldIssue(loc, str(exc)))
            continue
        for n, link in enumerate(links):
            what = path if n == 0 else f"backing file {link.path} (resolved: {link.real})"
            if allowed is not None and not path_within(link.real, allowed):
                if n:  # the first one is reported by check_policy already
                    issues.append(
                        FieldIssue(
                            loc, f"{what} is outside the allowed image paths {list(allowed)}"
                        )
                    )
                break
            inside = [root for root in forbidden if path_within(link.real, [root])]
            store = bool(read_only_ok) and path_within(link.real, list(read_only_ok))
            # the store's images: as backing files, a disk's file.image (an overlay on top) or a
            # CD's cdrom.image (qemu opens CD media read-only)
            via_store = n > 0 or loc.endswith((".file.image", ".cdrom.image"))
            if inside and not (store and via_store):
                issues.append(
                    FieldIssue(
                        loc,
                        f"{what} lies in the manager's own files ({inside[0]}): base images are "
                        "used through file.image (an overlay) or cdrom.image, other VMs' disks "
                        "never",
                    )
                )
                break
    return issues


def _single(path: str, fmt: str | None) -> list[ChainLink]:
    head = _read_head(path)
    if head is None:
        return []
    with contextlib.suppress(ChainError):
        probe_format(head)  # a CD or kernel is opened raw: a vmdk header inside is just data
    return [ChainLink(path, os.path.realpath(path), fmt or "raw")]
