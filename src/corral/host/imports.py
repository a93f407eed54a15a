"""Moving an image import's bytes into the store's temporary file, and checking them before
the publish: the same path for every source (a file or URL read in a worker thread by
:func:`fetch`, an upload read on the loop by :func:`receive`), hashed on the way, zero runs
left as holes, progress carried to the loop, then :func:`verify` (checksum, header, qemu-img).

Any failure removes nothing but what it made: :func:`fetch` removes the temporary file
itself (the awaiting task may have given up); for :func:`receive` the caller does.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import http.client
import os
import re
import threading
import time
from collections.abc import AsyncIterable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar

from corral.errors import HostError
from corral.host.chain import ChainError, probe_format, read_qcow2
from corral.host.overlay import ImageInfo, image_info
from corral.host.sources import Source, import_error, open_source

__all__ = [
    "CHECKSUM_ALGORITHMS",
    "Fetched",
    "Progress",
    "Reporter",
    "Stopped",
    "fetch",
    "in_worker",
    "parse_checksum",
    "receive",
    "verify",
]

Progress = Callable[[int, int | None], None]
"""``progress(done_bytes, total_bytes_or_None)``, called on the event loop's thread."""

CHECKSUM_ALGORITHMS: dict[str, int] = {"sha256": 64, "sha512": 128, "md5": 32}
"""Accepted ``checksum`` algorithms (as in Nomad's artifact checksums) -> hex digest length."""

_CHUNK = 1024 * 1024
_REPORT_EVERY_BYTES = 1024 * 1024
_REPORT_EVERY_SECONDS = 0.2
_CANCEL_GRACE = 5.0

_T = TypeVar("_T")


def parse_checksum(checksum: str) -> tuple[str, str]:
    """``"sha256:HEX"`` -> ``("sha256", "hex")``; anything malformed is a SpecError."""
    algorithm, sep, digest = checksum.partition(":")
    algorithm = algorithm.strip().lower()
    digest = digest.strip().lower()
    length = CHECKSUM_ALGORITHMS.get(algorithm)
    if not sep or length is None:
        names = ", ".join(f"{a}:HEX" for a in CHECKSUM_ALGORITHMS)
        raise import_error("checksum", f"must be one of {names}")
    if len(digest) != length or re.fullmatch(r"[0-9a-f]+", digest) is None:
        raise import_error("checksum", f"a {algorithm} digest is {length} hex digits")
    return algorithm, digest


class _Hasher(Protocol):
    def update(self, data: bytes, /) -> None: ...
    def hexdigest(self) -> str: ...


@dataclass(frozen=True)
class Fetched:
    size: int
    digests: dict[str, str]


class Reporter:
    """Carries progress from the worker thread to the event loop, throttled.

    The callback runs on the loop (callers need no locking). If it raises, the transfer
    stops and the import fails with that exception.
    """

    def __init__(
        self, loop: asyncio.AbstractEventLoop, callback: Progress | None, stop: threading.Event
    ) -> None:
        self._loop = loop
        self._callback = callback
        self._stop = stop
        self._last_bytes = -1
        self._last_time = 0.0
        self.error: Exception | None = None

    def report(self, done: int, total: int | None, *, final: bool = False) -> None:
        if self._callback is None or done == self._last_bytes:
            return
        now = time.monotonic()
        throttled = (
            done - self._last_bytes < _REPORT_EVERY_BYTES
            and now - self._last_time < _REPORT_EVERY_SECONDS
        )
        if throttled and not final and self._last_bytes >= 0:
            return
        self._last_bytes = done
        self._last_time = now
        try:
            self._loop.call_soon_threadsafe(self._deliver, done, total)
        except RuntimeError:  # the loop is closed: nobody is waiting for this import
            self._stop.set()

    def _deliver(self, done: int, total: int | None) -> None:
        if self.error is not None or self._callback is None:
            return
        try:
            self._callback(done, total)
        except Exception as exc:
            self.error = exc
            self._stop.set()


class Stopped(Exception):
    """The worker was asked to stop (cancellation or a failing progress callback)."""


class _SparseWriter:
    """Writes a stream to ``fd`` from offset 0, leaving aligned all-zero blocks as holes.

    Blocks are aligned to file offsets (not to however the reads happened to be cut), so a
    zero run in a raw image becomes holes whatever the network delivered.
    """

    _BLOCK = 64 * 1024
    _ZEROS = bytes(_BLOCK)

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._pending = bytearray()
        self._size = 0

    def add(self, data: bytes) -> None:
        self._pending += data
        whole = len(self._pending) - len(self._pending) % self._BLOCK
        if whole:
            self._flush(whole)

    def finish(self) -> None:
        self._flush(len(self._pending))
        os.ftruncate(self._fd, self._size)

    def _flush(self, length: int) -> None:
        view = memoryview(bytes(self._pending[:length]))
        del self._pending[:length]
        start = 0
        for offset in range(0, length, self._BLOCK):
            block = view[offset : offset + self._BLOCK]
            if block == self._ZEROS[: len(block)]:
                self._write(view[start:offset])
                os.lseek(self._fd, len(block), os.SEEK_CUR)
                start = offset + len(block)
        self._write(view[start:])
        self._size += length

    def _write(self, data: memoryview) -> None:
        while data:
            data = data[os.write(self._fd, data) :]


class _Sink:
    """The new file ``tmp`` being filled: hashed on the way, zero runs left as holes.

    Shared by every source (file, URL, upload), so they are hashed and stored alike.
    """

    def __init__(self, tmp: Path, algorithms: Sequence[str]) -> None:
        self._hashers: dict[str, _Hasher] = {a: hashlib.new(a) for a in {"sha256", *algorithms}}
        # the import created ``tmp`` (O_EXCL) and holds its flock (ImageStore._claim)
        self.fd = os.open(tmp, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        self._writer = _SparseWriter(self.fd)
        self.size = 0

    def add(self, chunk: bytes) -> None:
        for hasher in self._hashers.values():
            hasher.update(chunk)
        self._writer.add(chunk)
        self.size += len(chunk)

    def finish(self) -> Fetched:
        """Write what is pending and fsync; the file is complete."""
        self._writer.finish()
        os.fsync(self.fd)
        digests = {a: h.hexdigest() for a, h in self._hashers.items()}
        return Fetched(size=self.size, digests=digests)

    def close(self) -> None:
        os.close(self.fd)


def fetch(
    source: Source,
    tmp: Path,
    algorithms: Sequence[str],
    reporter: Reporter,
    stop: threading.Event,
    roots: Sequence[str] | None = None,
) -> Fetched:
    """Stream ``source`` into the new file ``tmp``, hashing it; fsync it. Worker thread.

    Runs of zero bytes become holes. ``tmp`` is removed by this function on any failure, so
    nothing is left even when the awaiting task gave up waiting for it.
    """
    try:
        if stop.is_set():
            raise Stopped
        with open_source(source, roots) as (stream, total):
            sink = _Sink(tmp, algorithms)
            try:
                reporter.report(0, total, final=True)
                read: Callable[[int], bytes] = getattr(stream, "read1", stream.read)
                while True:
                    if stop.is_set():
                        raise Stopped
                    try:
                        chunk = read(_CHUNK)
                    except (http.client.HTTPException, OSError, ValueError) as exc:
                        raise HostError(f"cannot read {source.display}: {exc}") from exc
                    if not chunk:
                        break
                    sink.add(chunk)
                    reporter.report(sink.size, total)
                if total is not None and sink.size != total:
                    raise HostError(
                        f"cannot read {source.display}: got {sink.size} of {total} bytes"
                    )
                fetched = sink.finish()
            finally:
                sink.close()
        reporter.report(fetched.size, total, final=True)
        return fetched
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise HostError(f"cannot write {tmp}: {exc}") from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


async def in_worker(func: Callable[[], _T], stop: threading.Event) -> _T:
    """Run ``func`` in a thread; on cancellation tell it to stop and wait for it a little.

    The worker checks ``stop`` between reads, so it normally ends at once; a stalled server
    can hold it until the read timeout, and then it cleans up after itself.
    """
    loop = asyncio.get_running_loop()
    future = loop.run_in_executor(None, func)
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        stop.set()
        future.add_done_callback(_consume)
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait({future}, timeout=_CANCEL_GRACE)
        raise


def _consume(future: asyncio.Future[_T]) -> None:
    if not future.cancelled():
        future.exception()


async def _to_end(func: Callable[[], _T]) -> _T:
    """Run ``func`` in a thread and wait for it to end even when cancelled (it uses a file
    descriptor the caller closes next; a write must not land on a reused number). The
    cancellation is raised once the thread is done."""
    future = asyncio.get_running_loop().run_in_executor(None, func)
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        while not future.done():
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait({future})
        _consume(future)
        raise


async def receive(
    chunks: AsyncIterable[bytes],
    tmp: Path,
    algorithms: Sequence[str],
    total: int | None,
    reporter: Reporter,
    display: str,
) -> Fetched:
    """Write a byte stream (an upload) into the new file ``tmp`` like :func:`fetch` does.

    The stream is read on the loop; hashing and writing run in a thread, a megabyte at a
    time. The caller removes ``tmp`` on failure.
    """
    try:
        sink = _Sink(tmp, algorithms)
    except OSError as exc:
        raise HostError(f"cannot write {tmp}: {exc}") from exc

    async def store(func: Callable[[], _T]) -> _T:
        try:
            return await _to_end(func)
        except OSError as exc:  # the disk's; the stream's own errors pass through as they are
            raise HostError(f"cannot write {tmp}: {exc}") from exc

    try:
        reporter.report(0, total, final=True)
        pending = bytearray()
        received = 0
        async for chunk in chunks:
            pending += chunk
            received += len(chunk)
            if total is not None and received > total:
                raise import_error("body", f"{display}: more than the {total} bytes announced")
            if len(pending) >= _CHUNK:
                await store(functools.partial(sink.add, bytes(pending)))
                pending.clear()
                reporter.report(sink.size, total)
            if reporter.error is not None:
                raise reporter.error
        if pending:
            await store(functools.partial(sink.add, bytes(pending)))
        if total is not None and sink.size != total:
            raise import_error("body", f"{display}: got {sink.size} of {total} bytes")
        fetched = await store(sink.finish)
    finally:
        sink.close()
    reporter.report(fetched.size, total, final=True)
    return fetched


async def verify(
    tmp: Path, fetched: Fetched, expected: tuple[str, str] | None, display: str
) -> ImageInfo:
    """Check the complete file ``tmp`` before it is published: the requested checksum, then
    the header (corral's own read: qcow2 without a backing or data file, else raw), and only
    then ``qemu-img``, which measures it. A failed check is a :class:`SpecError` at
    ``checksum`` or ``source``."""
    if expected is not None:
        algorithm, digest = expected
        actual = fetched.digests[algorithm]
        if actual != digest:
            # SpecError, not HostError: the content arrived complete (length checked)
            # and does not match the request's `checksum` field. Either the field is
            # wrong or the source serves something else; the field path tells the
            # REST client which value to look at (422).
            raise import_error(
                "checksum",
                f"{display} has {algorithm}:{actual}, expected {algorithm}:{digest}",
            )
    # corral reads the header itself first: qemu-img, as root, would follow what an
    # untrusted image names (a vmdk extent, a data file) before anything was refused
    try:
        head = read_qcow2(str(tmp))
        if head is None:
            with open(tmp, "rb") as f:
                probe_format(f.read(4096))
    except ChainError as exc:
        raise import_error("source", f"{display}: {exc}") from exc
    if head is not None and (head.backing is not None or head.data_file):
        what = "a backing file" if head.backing is not None else "an external data file"
        raise import_error("source", f"{display} has {what}; a base image must not")
    # the format is corral's (qcow2 by magic, else raw), and backing and data files were
    # refused above from the header: qemu-img only measures what is left
    return await image_info(tmp, "qcow2" if head is not None else "raw")
