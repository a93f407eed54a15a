"""The manager's image API: the image store and retained disks, with the events they record."""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterable, Awaitable, Callable
from pathlib import Path

from corral.errors import CorralError, FieldIssue, Forbidden, NotFound, SpecError
from corral.host.images import ImageRecord, Progress, host_path
from corral.manager.admission import Admission
from corral.manager.retained import RetainedSet
from corral.manager.store import StoredEvent
from corral.runner.status import now_iso
from corral.spec.policy import DEFAULT_POLICY_FILE, path_within

__all__ = ["ImagesFacade"]


class ImagesFacade(Admission):
    """Base images (imported, uploaded, listed, deleted while no disk overlays them) and the
    retained data dirs of deleted VMs."""

    def image_users(self) -> dict[str, list[str]]:
        """{image path: [VM names whose disks overlay it, and ``disk/<id>`` for retained
        disks that do: deleting the image would take their data]}."""
        users: dict[str, list[str]] = {}
        for record in self.store.all():
            for disk in record.document.vm.disks:
                if disk.file is not None and disk.file.image is not None:
                    path = str(self._image_path(disk.file.image))
                    users.setdefault(path, []).append(record.name)
        for found in self.retained.all():
            for overlay in found.disks:
                if overlay.backing_file is not None:
                    users.setdefault(overlay.backing_file, []).append(f"disk/{found.id}")
        return users

    async def import_image(
        self,
        name: str,
        source: str,
        *,
        checksum: str | None = None,
        progress: Callable[[int, int | None], None] | None = None,
        replace: bool = False,
    ) -> ImageRecord:
        """Import an http(s) URL, or a path on this host inside the policy's ``imagePaths``.

        Whoever calls this (an API client, maybe over TCP) names a file the daemon would
        read, so a host path is :class:`Forbidden` unless the host offers it: with no
        ``imagePaths`` every path is refused; a client sends its own file's bytes with
        :meth:`upload_image` instead.
        """
        path = host_path(source)
        roots = self._import_roots(source, path) if path is not None else None
        return await self._importing(
            name, progress, replace,
            lambda report, users: self.images.import_image(
                name, source, checksum=checksum, progress=report, replace=replace, users=users,
                local_roots=roots,
            ),
        )  # fmt: skip

    async def upload_image(
        self,
        name: str,
        chunks: AsyncIterable[bytes],
        *,
        total: int | None = None,
        filename: str | None = None,
        checksum: str | None = None,
        progress: Callable[[int, int | None], None] | None = None,
        replace: bool = False,
    ) -> ImageRecord:
        """Import the bytes a client sends (``total``: their announced length) as ``name``:
        verified, probed and published like any import; the record's source is
        ``upload:FILENAME``."""
        source = f"upload:{filename}" if filename else "upload"
        return await self._importing(
            name, progress, replace,
            lambda report, users: self.images.import_stream(
                name, chunks, total=total, source=source, checksum=checksum, progress=report,
                replace=replace, users=users,
            ),
        )  # fmt: skip

    def _import_roots(self, source: str, path: Path) -> list[str]:
        """The policy's ``imagePaths`` if ``source`` (host path ``path``) may be imported;
        else raise. The store checks the file it opens against them again."""
        allowed = self.policy.image_paths
        policy_file = self.config.policy_file or DEFAULT_POLICY_FILE
        if allowed is None:
            raise Forbidden(
                "refused by host policy",
                [FieldIssue("source", f"{source} is a path on the daemon's host, and this host "
                            "allows no host-path imports; set imagePaths in "
                            f"{policy_file} to the directories images may be imported from, "
                            "or upload the file (`corral image import NAME ./file` does)")],
            )  # fmt: skip
        if not os.path.isabs(source):
            raise SpecError(
                "invalid image import",
                [FieldIssue("source", f"{source!r} must be an absolute path on the daemon's host")],
            )
        if not path_within(str(path), allowed):
            raise Forbidden(
                "refused by host policy",
                [FieldIssue("source", f"{source} (resolved: {os.path.realpath(path)}) is "
                            f"outside the host's imagePaths {allowed} ({policy_file})")],
            )  # fmt: skip
        return allowed

    async def _importing(
        self,
        name: str,
        progress: Callable[[int, int | None], None] | None,
        replace: bool,
        run: Callable[[Progress, list[str]], Awaitable[ImageRecord]],
    ) -> ImageRecord:
        """An import's shared part: the VMs a replace must not pull the base from under,
        progress events, and the ImageImported/ImageImportFailed record."""
        users: list[str] = []
        if replace:
            with contextlib.suppress(NotFound):
                users = self.image_users().get(str(self.images.path(name)), [])

        def report(done: int, total: int | None) -> None:
            self._publish(
                StoredEvent(0, "", now_iso(), "ImageImportProgress",
                            {"image": name, "bytes": done, "total": total})
            )  # fmt: skip
            if progress is not None:
                progress(done, total)

        try:
            record = await run(report, users)
        except CorralError as exc:
            self._record_event("", "ImageImportFailed", {"image": name, "error": str(exc)})
            raise
        self._record_event("", "ImageImported", record.to_json())
        return record

    def list_images(self) -> list[tuple[ImageRecord, list[str]]]:
        users = self.image_users()
        return [(img, users.get(str(img.path), [])) for img in self.images.list()]

    async def delete_image(self, name: str) -> None:
        users = self.image_users().get(str(self.images.path(name)), [])
        await self.images.delete(name, users=users)

    # --- retained disks (data dirs of deleted VMs) -----------------------------------------

    def list_retained(self) -> list[RetainedSet]:
        return self.retained.all()

    async def delete_retained(self, ref: str) -> RetainedSet:
        """Delete a retained set (by id, or by the name of the VM that left only one)."""
        removed = await self.retained.delete(ref)
        self._record_event("", "RetainedDisksDeleted", {"id": removed.id})
        return removed
