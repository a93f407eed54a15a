"""The backing-chain reader (issue 9, item 2) on real qcow2 files made by qemu-img, and on
files that must never be read (FIFOs, devices) or followed (protocols, JSON, loops)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from corral.host.chain import ChainError, image_chain, open_file


def img(*args: str) -> None:
    subprocess.run(["qemu-img", *args], check=True, capture_output=True)


def test_a_chain_is_followed_with_relative_names(tmp_path: Path) -> None:
    img("create", "-q", "-f", "raw", str(tmp_path / "base.raw"), "1M")
    img("create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", str(tmp_path / "mid.qcow2"))
    img(
        "create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", str(tmp_path / "top.qcow2")
    )
    links = image_chain(str(tmp_path / "top.qcow2"), "qcow2")
    assert [(Path(link.real).name, link.format) for link in links] == [
        ("top.qcow2", "qcow2"),
        ("mid.qcow2", "qcow2"),
        ("base.raw", "raw"),
    ]


def test_a_missing_disk_is_created_later_but_a_missing_backing_file_is_an_error(
    tmp_path: Path,
) -> None:
    assert image_chain(str(tmp_path / "new.qcow2"), "qcow2") == []
    img("create", "-q", "-f", "raw", str(tmp_path / "b.raw"), "1M")
    img("create", "-q", "-f", "qcow2", "-b", "b.raw", "-F", "raw", str(tmp_path / "t.qcow2"))
    (tmp_path / "b.raw").unlink()
    with pytest.raises(ChainError, match="does not exist"):
        image_chain(str(tmp_path / "t.qcow2"), "qcow2")


def test_external_data_files_are_refused(tmp_path: Path) -> None:
    img("create", "-q", "-f", "qcow2", "-o", f"data_file={tmp_path / 'data'}",
        str(tmp_path / "d.qcow2"), "1M")  # fmt: skip
    with pytest.raises(ChainError, match="external data file"):
        image_chain(str(tmp_path / "d.qcow2"), "qcow2")


@pytest.mark.parametrize(
    "backing", ["nbd://127.0.0.1:10809/x", 'json:{"file.filename":"/etc/shadow"}', "a:b"]
)
def test_protocol_backing_files_are_never_followed(tmp_path: Path, backing: str) -> None:
    top = tmp_path / "t.qcow2"
    img("create", "-q", "-f", "qcow2", "-u", "-b", backing, "-F", "raw", str(top), "1M")
    with pytest.raises(ChainError, match="only plain file paths"):
        image_chain(str(top), "qcow2")


def test_unrecorded_backing_format_and_loops_are_refused(tmp_path: Path) -> None:
    img("create", "-q", "-f", "raw", str(tmp_path / "b.raw"), "1M")
    img("create", "-q", "-f", "qcow2", "-b", "b.raw", "-F", "raw", str(tmp_path / "t.qcow2"))
    top = tmp_path / "t.qcow2"  # drop the backing-format extension: an old image without -F
    data = top.read_bytes()
    ext = bytes.fromhex("e2792aca")
    assert ext in data[:4096]
    top.write_bytes(data.replace(ext, bytes.fromhex("12345678"), 1))
    with pytest.raises(ChainError, match="qemu would guess it"):
        image_chain(str(tmp_path / "t.qcow2"), "qcow2")
    img("create", "-q", "-f", "qcow2", str(tmp_path / "x.qcow2"), "1M")
    img("rebase", "-q", "-u", "-f", "qcow2", "-F", "qcow2", "-b", "x.qcow2",
        str(tmp_path / "x.qcow2"))  # fmt: skip
    with pytest.raises(ChainError, match="loops"):
        image_chain(str(tmp_path / "x.qcow2"), "qcow2")


def test_fifos_and_other_formats_are_never_read(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(ChainError, match="not a regular file"):
        image_chain(str(tmp_path / "fifo"), "qcow2")  # returns at once: O_NONBLOCK
    with pytest.raises(ChainError, match="not a regular file"):
        image_chain("/dev/zero", "raw")
    (tmp_path / "v.vmdk").write_text('# Disk DescriptorFile\nRW 8 FLAT "/etc/shadow" 0\n')
    with pytest.raises(ChainError, match="vmdk"):
        image_chain(str(tmp_path / "v.vmdk"), None)


def _relocate_backing_name(top: Path) -> None:
    """An attack on the parser: the backing name moved in front of the header extensions
    (``backing_file_offset < header_length``). qemu reads extensions only between the header
    and the name, so it sees no backing format and would guess it."""
    data = bytearray(top.read_bytes())
    offset = int.from_bytes(data[8:16], "big")
    size = int.from_bytes(data[16:20], "big")
    header_length = int.from_bytes(data[100:104], "big")
    name = bytes(data[offset : offset + size])
    extensions = bytes(data[header_length:offset])
    padded = name + bytes(-len(name) % 8)
    data[header_length : header_length + len(padded) + len(extensions)] = padded + extensions
    data[8:16] = header_length.to_bytes(8, "big")
    data[100:104] = (header_length + len(padded)).to_bytes(4, "big")
    top.write_bytes(bytes(data))


def test_a_backing_name_hiding_the_extensions_is_refused(tmp_path: Path) -> None:
    img("create", "-q", "-f", "raw", str(tmp_path / "b.raw"), "1M")
    top = tmp_path / "t.qcow2"
    img("create", "-q", "-f", "qcow2", "-b", "b.raw", "-F", "raw", str(top))
    _relocate_backing_name(top)
    with pytest.raises(ChainError, match="outside where qemu reads it"):
        image_chain(str(top), "qcow2")


def test_a_nul_in_a_backing_name_is_a_refusal_not_a_crash(tmp_path: Path) -> None:
    img("create", "-q", "-f", "raw", str(tmp_path / "ab.raw"), "1M")
    top = tmp_path / "t.qcow2"
    img("create", "-q", "-f", "qcow2", "-b", "ab.raw", "-F", "raw", str(top))
    data = top.read_bytes()
    top.write_bytes(data.replace(b"ab.raw", b"a\x00.raw", 1))
    with pytest.raises(ChainError, match="NUL"):
        image_chain(str(top), "qcow2")


def test_character_devices_fifos_and_sockets_are_refused_before_a_real_open(
    tmp_path: Path,
) -> None:
    """``/dev/watchdog`` arms on open, a FIFO blocks: the type is checked on an O_PATH handle
    (which opens nothing), and only then is a regular file or block device opened."""
    import socket

    os.mkfifo(tmp_path / "f")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(tmp_path / "s"))
    try:
        for path in ("/dev/null", "/dev/zero", str(tmp_path / "f"), str(tmp_path / "s")):
            with pytest.raises(ChainError, match="not a regular file"):
                open_file(path)
    finally:
        sock.close()
    assert open_file(str(tmp_path / "missing")) is None
    (tmp_path / "r").write_bytes(b"x")
    fd = open_file(str(tmp_path / "r"))
    assert fd is not None and os.read(fd, 1) == b"x"
    os.close(fd)
