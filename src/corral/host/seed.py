"""The cloud-init NoCloud seed: a small vfat image labelled ``CIDATA``.

cloud-init's NoCloud datasource looks for a filesystem labelled ``cidata``/``CIDATA`` holding
``meta-data`` and ``user-data`` (and optionally ``network-config``). cloud-init acts on new
data only when the ``instance-id`` changes, so the default instance-id is derived from the
content (``iid-`` + 16 hex digits of a sha256): changing the document's ``cloudInit`` makes
the guest treat its next boot as a new instance and apply it; an unchanged document keeps the
id, so a reboot does not re-run first-boot modules. A user-given ``instance-id`` always wins.

The image is rebuilt only when its content changes. The content's hash is kept next to the
image in ``<image>.sha256``; the image is built under a temporary name and renamed into place
(a running qemu keeps reading the old one), and the hash file is written after it, so a crash
between the two only costs one needless rebuild. The image is 0600: user-data often carries
password hashes and keys.

Tools: ``mkfs.vfat`` (dosfstools) and ``mcopy`` (mtools); no mount, no root.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import yaml

from corral.errors import HostError
from corral.host.atomic import ensure_private_dir, publish_replace, temp_sibling
from corral.host.process import run_tool
from corral.spec.models import CloudInit

__all__ = ["SEED_LABEL", "default_instance_id", "ensure_seed", "seed_digest", "seed_files"]

SEED_LABEL = "CIDATA"
_FORMAT_VERSION = b"corral-seed-1"
# Headers cloud-init recognises at the start of user-data (scripts, #cloud-config,
# #include, #cloud-boothook, "## template: jinja", ...) and MIME multipart messages.
_USER_DATA_HEADERS = ("#", "content-type:", "mime-version:")


def _canonical_json(value: object) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _yaml(value: object) -> str:
    return yaml.safe_dump(
        value, sort_keys=False, default_flow_style=False, allow_unicode=True, width=1_000_000
    )


def default_instance_id(cloud_init: CloudInit, vm_name: str) -> str:
    """The instance-id used when ``metaData`` has none: stable for the same VM name and
    ``cloudInit`` content, different as soon as either changes."""
    content = cloud_init.model_dump(mode="json", by_alias=True)
    digest = hashlib.sha256(_canonical_json({"vm": vm_name, "cloudInit": content}))
    return f"iid-{digest.hexdigest()[:16]}"


def _user_data(value: dict[str, object] | str | None) -> bytes:
    if value is None:
        return b"#cloud-config\n"
    if isinstance(value, str):
        if value.lower().startswith(_USER_DATA_HEADERS):
            return value.encode()
        return ("#cloud-config\n" + value).encode()
    return ("#cloud-config\n" + _yaml(value)).encode()


def seed_files(cloud_init: CloudInit, vm_name: str) -> dict[str, bytes]:
    """The seed's files by name: ``meta-data``, ``user-data`` and, when given,
    ``network-config``.

    ``meta-data`` defaults ``instance-id`` (see :func:`default_instance_id`) and
    ``local-hostname`` (the VM's name); the document's values win. ``user-data`` given as a
    mapping becomes ``#cloud-config`` YAML; a string is written as is when it starts with a
    header cloud-init knows (``#...`` such as ``#!`` or ``#cloud-config``, or a MIME
    ``Content-Type:``/``MIME-Version:``), else it is taken for cloud-config YAML and gets the
    ``#cloud-config`` line cloud-init needs to act on it.
    """
    dumped = cloud_init.model_dump(mode="json", by_alias=True)
    meta: dict[str, object] = {
        "instance-id": default_instance_id(cloud_init, vm_name),
        "local-hostname": vm_name,
    }
    meta.update(dumped.get("metaData") or {})
    files = {
        "meta-data": _yaml(meta).encode(),
        "user-data": _user_data(dumped.get("userData")),
    }
    network = dumped.get("networkConfig")
    if network is not None:
        files["network-config"] = _yaml(network).encode()
    return files


def seed_digest(files: dict[str, bytes]) -> str:
    """The sha256 (hex) that identifies a seed's content, as kept in ``<image>.sha256``."""
    digest = hashlib.sha256(_FORMAT_VERSION + b"\0" + SEED_LABEL.encode())
    for name in sorted(files):
        content = files[name]
        digest.update(b"\0" + name.encode() + b"\0" + str(len(content)).encode() + b"\0")
        digest.update(content)
    return digest.hexdigest()


def _image_kib(files: dict[str, bytes]) -> int:
    # FAT12 metadata, a cluster per file and room for the content twice over; 64 KiB steps.
    total = sum(len(c) for c in files.values())
    kib = 256 + 2 * ((total + 1023) // 1024) + 4 * len(files)
    return (kib + 63) // 64 * 64


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _stored_digest(path: Path) -> str | None:
    try:
        return _sidecar(path).read_text(encoding="ascii").strip() or None
    except (OSError, UnicodeDecodeError):
        return None


async def ensure_seed(path: Path, cloud_init: CloudInit, vm_name: str) -> bool:
    """Make ``path`` the NoCloud seed image for ``cloud_init``; rebuild only on change.

    Returns True if the image was (re)built now, False if ``path`` already held this content.
    The parent directory is created (0700) when missing.
    """
    files = seed_files(cloud_init, vm_name)
    digest = seed_digest(files)
    if path.is_file() and _stored_digest(path) == digest:
        return False
    target = Path(os.path.abspath(path))
    ensure_private_dir(target.parent)
    try:
        workdir = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    except OSError as exc:
        raise HostError(f"cannot build seed {path}: {exc}") from exc
    try:
        sources: list[str] = []
        for name, content in files.items():
            source = workdir / name
            source.write_bytes(content)
            sources.append(str(source))
        image = workdir / "cidata.img"
        await run_tool(
            [
                "mkfs.vfat", "-n", SEED_LABEL, "-i", digest[:8], "-C", str(image),
                str(_image_kib(files)),
            ],
            what=f"format seed image {path}",
        )  # fmt: skip
        await run_tool(
            ["mcopy", "-i", str(image), *sources, "::/"],
            what=f"copy cloud-init files into seed image {path}",
            env={"MTOOLS_SKIP_CHECK": "1"},
        )
        os.chmod(image, 0o600)
        publish_replace(image, target)
        hash_tmp = temp_sibling(_sidecar(target))
        hash_tmp.write_text(digest + "\n", encoding="ascii")
        os.chmod(hash_tmp, 0o600)
        publish_replace(hash_tmp, _sidecar(target))
    except OSError as exc:
        raise HostError(f"cannot build seed {path}: {exc}") from exc
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return True
