"""An image's record (:class:`ImageRecord`) and its sidecar file ``ROOT/.<name>.json``: the
record without its name and path, plus a format version. The sidecar is the store's commit
record (see :mod:`.images`): an image without one is not in the store.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from corral.errors import HostError

__all__ = ["SIDECAR_VERSION", "ImageRecord", "read_sidecar", "sidecar_body"]

SIDECAR_VERSION = 1


@dataclass(frozen=True)
class ImageRecord:
    """One stored image. ``sha256`` is of the stored file; ``created`` is ISO-8601 (UTC);
    ``source`` is the URL or absolute path it was imported from; ``actual_size`` is the bytes
    it takes on disk (zero runs are stored as holes, so a raw image may take less than its
    size)."""

    name: str
    path: Path
    format: str
    virtual_size: int
    actual_size: int
    sha256: str
    created: str
    source: str

    def to_json(self) -> dict[str, str | int]:
        """The record with camelCase keys, as the REST API and the CLI show it."""
        return {
            "name": self.name,
            "path": str(self.path),
            "format": self.format,
            "virtualSize": self.virtual_size,
            "actualSize": self.actual_size,
            "sha256": self.sha256,
            "created": self.created,
            "source": self.source,
        }


def read_sidecar(sidecar: Path, image: Path) -> ImageRecord | None:
    """The record ``sidecar`` commits for the image file ``image``; None when there is no
    sidecar. One that cannot be parsed (only hand edits make one) is a :class:`HostError`."""
    try:
        raw: object = json.loads(sidecar.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise HostError(f"cannot read image metadata {sidecar}: {exc}") from exc
    try:
        if not isinstance(raw, dict):
            raise TypeError("not an object")
        fields = {
            "format": raw["format"],
            "sha256": raw["sha256"],
            "created": raw["created"],
            "source": raw["source"],
        }
        sizes = {"virtualSize": raw["virtualSize"], "actualSize": raw["actualSize"]}
        if not all(isinstance(v, str) for v in fields.values()) or not all(
            isinstance(v, int) for v in sizes.values()
        ):
            raise TypeError("a field has the wrong type")
    except (KeyError, TypeError) as exc:
        raise HostError(f"cannot read image metadata {sidecar}: {exc}") from exc
    return ImageRecord(
        name=image.name,
        path=image,
        format=str(fields["format"]),
        virtual_size=int(sizes["virtualSize"]),
        actual_size=int(sizes["actualSize"]),
        sha256=str(fields["sha256"]),
        created=str(fields["created"]),
        source=str(fields["source"]),
    )


def sidecar_body(record: ImageRecord) -> dict[str, str | int]:
    """What the sidecar of ``record`` holds (written as JSON)."""
    body = {k: v for k, v in record.to_json().items() if k not in ("name", "path")}
    body["version"] = SIDECAR_VERSION
    return body
