"""The manager's base-image store: named, verified, read-only images VMs overlay.

Layout: one directory, ``ROOT/<name>`` is the image (mode 0444: base images are never
written) and ``ROOT/.<name>.json`` its metadata sidecar (:class:`ImageRecord` without the
path). Image names never start with a dot, so sidecars and temporary files (also hidden)
never collide with an image.

The contract a crash or a failure keeps:

* An image is in the store when its file *and* its sidecar exist; the sidecar is the commit
  record. An import downloads or copies into a hidden temporary file in ``ROOT``, hashes it
  on the way, verifies the checksum, probes it with ``qemu-img info``, fsyncs it, and only
  then publishes the file (:mod:`.atomic`: a link or a rename, never a partial file under
  the final name) and after it the sidecar. Deleting and replacing remove the sidecar
  *first*, so a crash in between leaves at worst an orphan: a complete file without a
  sidecar. It is not listed, blocks its name (:class:`Conflict`) until it is deleted or
  imported over with ``replace=True``.
* Any failure (bad source, HTTP error, checksum mismatch, an unusable image, cancellation)
  removes the temporary file; nothing else was written yet. The publish step has no await
  in it, so a cancellation lands before it (nothing published) or after it (import done).
* Publishing and deleting hold an exclusive ``flock`` on ``ROOT`` itself, so two managers
  (or processes) sharing a store cannot interleave a file with someone else's sidecar.
* A process killed mid-import cannot remove its temporary file. Each import holds an
  ``flock`` on its temporary file for as long as it runs; :meth:`ImageStore.remove_leftovers`
  (the manager runs it when it opens) removes the hidden ``.*.tmp`` files nobody holds.

Only ``qcow2`` and ``raw`` images are accepted (the VM document's disk formats), and never
one with a backing file or an external data file: a downloaded image naming
``/dev/sda`` or ``/etc/shadow`` as its backing file would hand host data to a guest.

Where the bytes come from is :mod:`.sources` (a file, a URL); how they are hashed, written
and checked before the publish is :mod:`.imports`.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import fcntl
import functools
import json
import os
import re
import threading
from collections.abc import AsyncIterable, AsyncIterator, Sequence
from datetime import UTC, datetime
from pathlib import Path

from corral.errors import Conflict, HostError, NotFound
from corral.host.atomic import ensure_private_dir, publish_new, publish_replace, temp_sibling
from corral.host.imports import (
    CHECKSUM_ALGORITHMS,
    Fetched,
    Progress,
    Reporter,
    Stopped,
    fetch,
    in_worker,
    parse_checksum,
    receive,
    verify,
)
from corral.host.sidecar import ImageRecord, read_sidecar, sidecar_body
from corral.host.sources import host_path, import_error, parse_source

__all__ = ["CHECKSUM_ALGORITHMS", "ImageRecord", "ImageStore", "Progress", "host_path"]

_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")
_LEFTOVER = re.compile(r"\..+\.[0-9a-f]{12}\.tmp")
_LOCK_POLL = 0.01


def _check_name(name: str) -> None:
    if not isinstance(name, str) or _NAME.fullmatch(name) is None:
        raise import_error(
            "name",
            "must be 1-128 letters, digits, '.', '_' or '-', not starting with '.'",
        )


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class ImageStore:
    """Base images under one directory (created 0700 on first import).

    ``list``, ``get`` and ``path`` only read; ``import_image`` and ``delete`` publish under
    a lock on the directory. See the module docstring for what a crash can leave.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(os.path.abspath(root))

    # --- reading ---------------------------------------------------------------------------

    def _image(self, name: str) -> Path:
        return self.root / name

    def _sidecar(self, name: str) -> Path:
        return self.root / f".{name}.json"

    def _read(self, name: str) -> ImageRecord | None:
        """The committed record of ``name``, None if it is not (or not fully) in the store."""
        if not self._image(name).is_file():
            return None
        return read_sidecar(self._sidecar(name), self._image(name))

    def list(self) -> builtins.list[ImageRecord]:
        """Every image in the store, sorted by name (orphans and temporary files left out).

        A sidecar that cannot be parsed (only hand edits make one) is a :class:`HostError`
        naming it, here and in :meth:`get`, rather than an image silently missing.
        """
        try:
            names = sorted(entry.name for entry in os.scandir(self.root))
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise HostError(f"cannot list images in {self.root}: {exc}") from exc
        records: builtins.list[ImageRecord] = []
        for name in names:
            if _NAME.fullmatch(name) is None:
                continue
            record = self._read(name)
            if record is not None:
                records.append(record)
        return records

    def get(self, name: str) -> ImageRecord:
        """The record of image ``name``; :class:`NotFound` if it is not in the store."""
        _check_name(name)
        record = self._read(name)
        if record is None:
            raise NotFound(f"image {name!r} not found")
        return record

    def path(self, name: str) -> Path:
        """The absolute path of image ``name`` (what overlays use as their base)."""
        return self.get(name).path

    # --- writing ---------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _locked(self) -> AsyncIterator[None]:
        """An exclusive flock on the store directory, polled so the loop never blocks."""
        fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    await asyncio.sleep(_LOCK_POLL)
            yield
        finally:
            os.close(fd)

    async def _claim(self, tmp: Path) -> int:
        """Create the import's temporary file and hold an flock on it until the import ends
        (the returned fd): :meth:`remove_leftovers` removes only files nobody holds. Created
        under the directory lock, so a cleaner never sees it unclaimed."""
        async with self._locked():
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            except OSError as exc:
                raise HostError(f"cannot write {tmp}: {exc}") from exc
            fcntl.flock(fd, fcntl.LOCK_EX)
        return fd

    async def remove_leftovers(self) -> builtins.list[str]:
        """Remove the temporary files of imports that died with their process (a daemon
        killed mid-download): hidden ``.*.tmp`` files whose flock no live import holds.
        Returns the names removed. Run when a manager opens the store."""
        if not self.root.is_dir():
            return []
        removed: builtins.list[str] = []
        async with self._locked():  # a publish writing its sidecar's temp file holds it too
            for entry in os.scandir(self.root):
                if _LEFTOVER.fullmatch(entry.name) is None:
                    continue
                try:
                    fd = os.open(entry.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
                except OSError:
                    continue
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # a live import (maybe another process sharing the store)
                else:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(entry.path)
                        removed.append(entry.name)
                finally:
                    os.close(fd)
        return removed

    async def import_image(
        self,
        name: str,
        source: str,
        *,
        checksum: str | None = None,
        progress: Progress | None = None,
        replace: bool = False,
        users: Sequence[str] = (),
        local_roots: Sequence[str] | None = None,
    ) -> ImageRecord:
        """Import ``source`` (a file path or an http(s) URL) as image ``name``.

        ``checksum`` (``sha256:HEX``, ``sha512:HEX`` or ``md5:HEX``) is checked before the
        image is published. ``progress(done, total)`` is called on the loop with increasing
        byte counts, first ``(0, total)``, last ``(size, total)``; ``total`` is None when the
        server sends no length. An existing image is a :class:`Conflict` unless ``replace``;
        replacing is refused too while ``users`` (the VMs whose overlays sit on the image)
        is non-empty, because swapping a base under an overlay corrupts the guest's disk.
        ``local_roots`` (the daemon passes its policy's ``imagePaths``) bounds a file path
        source: the file opened must lie inside one of them; None allows any path (a caller
        importing its own files).

        Raises :class:`SpecError` for a bad ``name``, ``checksum`` or ``source`` (no such
        file, an HTTP 4xx, a redirect off the URL's origin, an image that is not qcow2/raw or
        names other files) and for a checksum mismatch; :class:`Forbidden` for a path outside
        ``local_roots``; :class:`HostError` for network, server (5xx) and disk trouble.
        On any failure, cancellation included, nothing is left in the store.
        """
        _check_name(name)
        expected = parse_checksum(checksum) if checksum is not None else None
        src = parse_source(source)
        self._check_free(name, replace=replace, users=users)
        ensure_private_dir(self.root)
        tmp = temp_sibling(self._image(name))
        claim = await self._claim(tmp)
        stop = threading.Event()
        reporter = Reporter(asyncio.get_running_loop(), progress, stop)
        algorithms = [expected[0]] if expected is not None else []
        try:
            try:
                fetched = await in_worker(
                    functools.partial(fetch, src, tmp, algorithms, reporter, stop, local_roots),
                    stop,
                )
            except Stopped:
                if reporter.error is not None:
                    raise reporter.error from None
                raise
            if reporter.error is not None:
                raise reporter.error
            return await self._commit(
                name, tmp, fetched, expected, src.display, replace=replace, users=users
            )
        finally:
            tmp.unlink(missing_ok=True)
            os.close(claim)

    async def import_stream(
        self,
        name: str,
        chunks: AsyncIterable[bytes],
        *,
        total: int | None = None,
        source: str = "upload",
        checksum: str | None = None,
        progress: Progress | None = None,
        replace: bool = False,
        users: Sequence[str] = (),
    ) -> ImageRecord:
        """Import the bytes of ``chunks`` (an upload) as image ``name``.

        The same contract as :meth:`import_image` (checksum, ``qemu-img`` probe, no backing
        or data file, atomic publish, nothing left on any failure), without the store ever
        opening a host path: the caller hands over the content. ``total`` is the announced
        length (a stream that ends short of it or runs past it is a :class:`SpecError` at
        ``body``); ``source`` is what the record shows as its origin.
        """
        _check_name(name)
        expected = parse_checksum(checksum) if checksum is not None else None
        self._check_free(name, replace=replace, users=users)
        ensure_private_dir(self.root)
        tmp = temp_sibling(self._image(name))
        claim = await self._claim(tmp)
        reporter = Reporter(asyncio.get_running_loop(), progress, threading.Event())
        algorithms = [expected[0]] if expected is not None else []
        try:
            fetched = await receive(chunks, tmp, algorithms, total, reporter, source)
            await asyncio.sleep(0)  # deliver the last progress report
            if reporter.error is not None:
                raise reporter.error
            return await self._commit(
                name, tmp, fetched, expected, source, replace=replace, users=users
            )
        finally:
            tmp.unlink(missing_ok=True)
            os.close(claim)

    async def _commit(
        self,
        name: str,
        tmp: Path,
        fetched: Fetched,
        expected: tuple[str, str] | None,
        display: str,
        *,
        replace: bool,
        users: Sequence[str],
    ) -> ImageRecord:
        """Verify the complete file ``tmp`` (checksum, probe) and publish it as ``name``."""
        info = await verify(tmp, fetched, expected, display)
        os.chmod(tmp, 0o444)
        st = os.stat(tmp)
        record = ImageRecord(
            name=name,
            path=self._image(name),
            format=info.format,
            virtual_size=info.virtual_size,
            actual_size=st.st_blocks * 512,
            sha256=fetched.digests["sha256"],
            created=datetime.now(UTC).isoformat(timespec="seconds"),
            source=display,
        )
        async with self._locked():
            # No await from here on: cancellation lands before or after the publish.
            self._publish(record, tmp, replace=replace, users=users)
        return record

    def _check_free(self, name: str, *, replace: bool, users: Sequence[str]) -> None:
        image, sidecar = self._image(name), self._sidecar(name)
        exists = os.path.lexists(image) or os.path.lexists(sidecar)
        if not exists:
            return
        if not replace:
            if not os.path.lexists(sidecar):
                raise Conflict(
                    f"image {name!r}: a file without metadata is there (an interrupted "
                    "import?); delete the image or import with replace"
                )
            raise Conflict(f"image {name!r} already exists")
        if users:
            raise Conflict(f"image {name!r} is used by {', '.join(sorted(users))}")

    def _publish(
        self, record: ImageRecord, tmp: Path, *, replace: bool, users: Sequence[str]
    ) -> None:
        """Publish ``tmp`` as the image, then its sidecar. Holds the lock, never awaits."""
        name = record.name
        self._check_free(name, replace=replace, users=users)
        image, sidecar = self._image(name), self._sidecar(name)
        if replace and os.path.lexists(sidecar):
            try:
                sidecar.unlink()
            except OSError as exc:
                raise HostError(f"cannot replace image {name!r}: {exc}") from exc
            _fsync_dir(self.root)
        if replace:
            publish_replace(tmp, image)
        elif not publish_new(tmp, image):
            raise Conflict(f"image {name!r} already exists")
        body = sidecar_body(record)
        sidecar_tmp = temp_sibling(sidecar)
        try:
            fd = os.open(sidecar_tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as out:
                json.dump(body, out, indent=2, sort_keys=True)
                out.write("\n")
            publish_replace(sidecar_tmp, sidecar)
        except BaseException as exc:
            sidecar_tmp.unlink(missing_ok=True)
            image.unlink(missing_ok=True)
            _fsync_dir(self.root)
            if isinstance(exc, OSError):
                raise HostError(f"cannot write image metadata {sidecar}: {exc}") from exc
            raise

    async def delete(self, name: str, users: Sequence[str] = ()) -> None:
        """Remove image ``name`` and its metadata.

        Refused with :class:`Conflict` naming ``users`` (the VMs whose overlays sit on the
        image) when there are any; :class:`NotFound` when there is no such image. An orphan
        (a file left without metadata by a crash) is removed too. Running qemu processes
        keep their open file; the name is gone at once.
        """
        _check_name(name)
        image, sidecar = self._image(name), self._sidecar(name)
        if not (os.path.lexists(image) or os.path.lexists(sidecar)):
            raise NotFound(f"image {name!r} not found")
        if users:
            raise Conflict(f"image {name!r} is used by {', '.join(sorted(users))}")
        async with self._locked():
            if not (os.path.lexists(image) or os.path.lexists(sidecar)):
                raise NotFound(f"image {name!r} not found")
            try:
                sidecar.unlink(missing_ok=True)
                _fsync_dir(self.root)
                image.unlink(missing_ok=True)
                _fsync_dir(self.root)
            except OSError as exc:
                raise HostError(f"cannot delete image {name!r}: {exc}") from exc
