"""The runner contract's protocols: where a runner's VM document comes from, and where its
state and events go. Every placement plugs into these; the runner program
(:mod:`corral.runner.program`) and :class:`~corral.runner.supervisor.VmSupervisor` know
nothing else of their placement.

* :class:`DocumentSource`: the VM document, and a way to wait for it to change. A file
  (:class:`FileDocumentSource`, ``corral run -c``); later a Kubernetes object.
* :class:`StatusSink`: each new :class:`~corral.runner.status.VmStatus`. A file
  (:class:`~corral.runner.filechannel.FileStatusSink`), a callback (the embedded backend);
  later a Kubernetes status patch.
* :class:`EventSink`: each event (a dict: ``ts``, ``vm``, ``event`` and free fields). A
  JSON-lines stream (:class:`~corral.runner.filechannel.JsonLinesSink`), a callback.

Any plain callable of the right shape is a sink.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from corral.runner.status import VmStatus
    from corral.spec import VmDocument

__all__ = [
    "DocumentSource",
    "EventSink",
    "FileDocumentSource",
    "StatusSink",
    "file_stamp",
    "tree_stamp",
]


class EventSink(Protocol):
    def __call__(self, event: dict[str, object], /) -> None: ...


class StatusSink(Protocol):
    def __call__(self, status: VmStatus, /) -> None: ...


class DocumentSource(Protocol):
    """The VM document a runner keeps its VM matching."""

    def current(self) -> VmDocument:
        """The last good document (the first one is read when the source is made)."""
        ...

    async def wait_change(self, timeout: float) -> VmDocument | None:
        """Wait up to ``timeout`` seconds for the document to change; the new document, or
        None if it did not change. Raises :class:`~corral.errors.CorralError` when the new
        document cannot be read or is invalid: :meth:`current` stays the last good one, and
        the same bad document is not reported again until it changes."""
        ...

    def reload(self) -> None:
        """Re-read the document at once (the next :meth:`wait_change` returns without
        waiting), even if it seems unchanged (``SIGHUP``)."""
        ...


def file_stamp(path: Path | None) -> tuple[int, int, int] | None:
    """What tells a changed file from the same one: mtime, size, inode (a rename over it
    changes the inode even within one mtime tick). None: no file."""
    if path is None:
        return None
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


def tree_stamp(path: Path | None) -> object:
    """:func:`file_stamp` of a file, or of every entry of a directory (a mounted secret)."""
    if path is not None and path.is_dir():
        return tuple(file_stamp(p) for p in sorted(path.iterdir()))
    return file_stamp(path)


class FileDocumentSource:
    """The document in a YAML file, polled for changes (mtime, size, inode).

    Raises :class:`~corral.errors.CorralError` at construction if the file cannot be read or
    is invalid (a runner with no good document has nothing to run).
    """

    def __init__(self, path: Path) -> None:
        from corral.spec import load_document_file

        self.path = path
        self._stamp = file_stamp(path)
        self._doc = load_document_file(path)
        self._reload = asyncio.Event()

    def current(self) -> VmDocument:
        return self._doc

    def reload(self) -> None:
        self._reload.set()

    async def wait_change(self, timeout: float) -> VmDocument | None:
        from corral.spec import load_document_file

        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._reload.wait(), timeout)
        forced = self._reload.is_set()
        self._reload.clear()
        stamp = file_stamp(self.path)
        if not forced and stamp == self._stamp:
            return None
        self._stamp = stamp
        self._doc = load_document_file(self.path)  # raises: the last good one stays
        return self._doc
