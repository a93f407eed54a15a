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

Sources are a local file (copied), an ``http://``/``https://`` URL (downloaded with urllib in
a worker thread) or a byte stream (:meth:`ImageStore.import_stream`: an upload); all three go
through the same hashing, checks and publish. Untrusted strings never reach a shell. A local
path is a host file the caller names: the daemon passes ``local_roots`` (its policy's
``imagePaths``) and the store checks the file it actually opened, so a symlink swapped in
after a check does not escape. A URL redirect is followed only within the URL's origin
(scheme, host and port), so a public URL cannot bounce the download to a loopback or internal
service; any other scheme (``file:``, ``ftp:``) is refused.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import fcntl
import functools
import hashlib
import http.client
import json
import os
import re
import stat
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Protocol, TypeVar

from corral import __version__
from corral.errors import Conflict, FieldIssue, Forbidden, HostError, NotFound, SpecError
from corral.host.atomic import ensure_private_dir, publish_new, publish_replace, temp_sibling
from corral.host.chain import ChainError, probe_format, read_qcow2
from corral.host.overlay import image_info
from corral.spec.policy import path_within

__all__ = ["CHECKSUM_ALGORITHMS", "ImageRecord", "ImageStore", "Progress", "host_path"]

Progress = Callable[[int, int | None], None]
"""``progress(done_bytes, total_bytes_or_None)``, called on the event loop's thread."""

CHECKSUM_ALGORITHMS: dict[str, int] = {"sha256": 64, "sha512": 128, "md5": 32}
"""Accepted ``checksum`` algorithms (as in Nomad's artifact checksums) -> hex digest length."""

_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")
_LEFTOVER = re.compile(r"\..+\.[0-9a-f]{12}\.tmp")
_URL_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://|(?i:file):")
_CHUNK = 1024 * 1024
_REPORT_EVERY_BYTES = 1024 * 1024
_REPORT_EVERY_SECONDS = 0.2
_READ_TIMEOUT = 60.0
_CANCEL_GRACE = 5.0
_LOCK_POLL = 0.01
_SIDECAR_VERSION = 1
_USER_AGENT = f"corral/{__version__}"

_T = TypeVar("_T")


def _import_error(loc: str, reason: str) -> SpecError:
    return SpecError("invalid image import", [FieldIssue(loc, reason)])


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


def _check_name(name: str) -> None:
    if not isinstance(name, str) or _NAME.fullmatch(name) is None:
        raise _import_error(
            "name",
            "must be 1-128 letters, digits, '.', '_' or '-', not starting with '.'",
        )


def _parse_checksum(checksum: str) -> tuple[str, str]:
    """``"sha256:HEX"`` -> ``("sha256", "hex")``; anything malformed is a SpecError."""
    algorithm, sep, digest = checksum.partition(":")
    algorithm = algorithm.strip().lower()
    digest = digest.strip().lower()
    length = CHECKSUM_ALGORITHMS.get(algorithm)
    if not sep or length is None:
        names = ", ".join(f"{a}:HEX" for a in CHECKSUM_ALGORITHMS)
        raise _import_error("checksum", f"must be one of {names}")
    if len(digest) != length or re.fullmatch(r"[0-9a-f]+", digest) is None:
        raise _import_error("checksum", f"a {algorithm} digest is {length} hex digits")
    return algorithm, digest


@dataclass(frozen=True)
class _Source:
    url: str | None
    path: Path | None

    @property
    def display(self) -> str:
        return self.url if self.url is not None else str(self.path)


def _parse_source(source: str) -> _Source:
    if not source:
        raise _import_error("source", "must be a file path or an http(s):// URL")
    if _URL_SCHEME.match(source) is None:
        return _Source(url=None, path=Path(os.path.abspath(source)))
    parts = urllib.parse.urlsplit(source)
    if parts.scheme.lower() not in ("http", "https"):
        raise _import_error("source", f"URL scheme {parts.scheme!r} is not http or https")
    if not parts.hostname:
        raise _import_error("source", "URL has no host")
    if parts.username is not None or parts.password is not None:
        # They would end up in the sidecar and in error messages.
        raise _import_error("source", "credentials in the URL are not supported")
    try:
        _ = parts.port
    except ValueError as exc:
        raise _import_error("source", f"bad port in URL: {exc}") from exc
    return _Source(url=source, path=None)


def host_path(source: str) -> Path | None:
    """The absolute host path an import ``source`` names, None if it is an http(s) URL.

    The one place that tells the two apart (the store's own rule), so a caller enforcing a
    policy on host paths classifies a source exactly as the import will: a string that merely
    contains ``://`` somewhere is still a path. A malformed source is a :class:`SpecError`.
    """
    return _parse_source(source).path


class _Hasher(Protocol):
    def update(self, data: bytes, /) -> None: ...
    def hexdigest(self) -> str: ...


@dataclass(frozen=True)
class _Fetched:
    size: int
    digests: dict[str, str]


class _Reporter:
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


class _Stopped(Exception):
    """The worker was asked to stop (cancellation or a failing progress callback)."""


def _origin(url: str) -> tuple[str, str, int] | None:
    """(scheme, host, port) of an http(s) URL, the port defaulted; None for anything else."""
    try:
        parts = urllib.parse.urlsplit(url)
        scheme = parts.scheme.lower()
        port = parts.port
    except ValueError:
        return None
    if scheme not in ("http", "https") or not parts.hostname:
        return None
    return scheme, parts.hostname.lower(), port or (443 if scheme == "https" else 80)


def _without_credentials(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    return parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()


class _SameOriginRedirects(urllib.request.HTTPRedirectHandler):
    """Follows a redirect only to the scheme, host and port of the URL being fetched.

    A server answering for a public name could otherwise point the daemon at a loopback port,
    a link-local metadata service or a ``file:`` URL (server-side request forgery). The error
    names the target, so a user who trusts it can import that URL directly.
    """

    @staticmethod
    def _check(req: urllib.request.Request, fp: IO[bytes], code: int, target: str) -> None:
        if _origin(target) is None or _origin(target) != _origin(req.full_url):
            fp.close()
            raise _import_error(
                "source",
                f"{_without_credentials(req.full_url)} redirects ({code}) to "
                f"{_without_credentials(target)}, another scheme, host or port; corral "
                "follows redirects only within the URL's origin (import the target URL "
                "directly if you trust it)",
            )

    def http_error_302(
        self,
        req: urllib.request.Request,
        fp: IO[bytes],
        code: int,
        msg: str,
        headers: http.client.HTTPMessage,
    ) -> IO[bytes] | None:
        # Checked here first, so a file: or ftp: target gets this error, not urllib's own.
        location = headers.get("location") or headers.get("uri")
        if location is not None:
            self._check(req, fp, code, urllib.parse.urljoin(req.full_url, location.strip()))
        result: IO[bytes] | None = super().http_error_302(req, fp, code, msg, headers)
        return result

    http_error_301 = http_error_303 = http_error_307 = http_error_308 = http_error_302

    def redirect_request(
        self,
        req: urllib.request.Request,
        fp: IO[bytes],
        code: int,
        msg: str,
        headers: http.client.HTTPMessage,
        newurl: str,
    ) -> urllib.request.Request | None:
        # And here on the URL urllib will actually request (after its own quoting).
        self._check(req, fp, code, newurl)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _opener() -> urllib.request.OpenerDirector:
    """urllib for http and https only: unlike ``urlopen``, a redirect to another scheme, host
    or port fails instead of being followed. Proxies come from the environment."""
    opener = urllib.request.OpenerDirector()
    for handler in (
        urllib.request.ProxyHandler(),
        urllib.request.HTTPHandler(),
        urllib.request.HTTPSHandler(),
        _SameOriginRedirects(),
        urllib.request.HTTPDefaultErrorHandler(),
        urllib.request.HTTPErrorProcessor(),
    ):
        opener.add_handler(handler)
    return opener


def _open_local(path: Path, roots: Sequence[str] | None) -> IO[bytes]:
    """Open a local source for reading; with ``roots``, the opened file must lie inside one.

    Opened non-blocking (a FIFO or a device never stalls the worker) and checked on the file
    descriptor: what ``/proc/self/fd`` says was opened is what counts, not the name, which a
    symlink could re-point between a check and the open.
    """
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
    try:
        fd = os.open(path, flags)
    except FileNotFoundError as exc:
        raise _import_error("source", f"no such file: {path}") from exc
    except OSError as exc:
        raise HostError(f"cannot read {path}: {exc}") from exc
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise _import_error("source", f"not a regular file: {path}")
        if roots is not None:
            opened = os.readlink(f"/proc/self/fd/{fd}")
            if not path_within(opened, list(roots)):
                raise Forbidden(
                    "refused by host policy",
                    [FieldIssue("source", f"{path} (opened: {opened}) is outside the allowed "
                                f"image paths {list(roots)}")],
                )  # fmt: skip
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


@contextlib.contextmanager
def _open_source(
    source: _Source, roots: Sequence[str] | None
) -> Iterator[tuple[IO[bytes], int | None]]:
    """The source as a binary stream and its size if known. Runs in the worker thread."""
    if source.path is not None:
        with _open_local(source.path, roots) as stream:
            yield stream, os.fstat(stream.fileno()).st_size
        return
    assert source.url is not None
    # _parse_source let only http(s) URLs through, and _opener follows redirects to no other.
    request = urllib.request.Request(source.url, headers={"User-Agent": _USER_AGENT})  # noqa: S310
    try:
        response = _opener().open(request, timeout=_READ_TIMEOUT)
    except urllib.error.HTTPError as exc:
        exc.close()  # it holds the response body, maybe a socket
        reason = f"HTTP {exc.code} {exc.reason} from {source.url}"
        if 400 <= exc.code < 500:
            raise _import_error("source", reason) from exc
        raise HostError(f"cannot download image: {reason}") from exc
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as exc:
        raise HostError(f"cannot download {source.url}: {exc}") from exc
    with response:
        length = response.headers.get("Content-Length")
        total = int(length) if length is not None and length.strip().isdigit() else None
        yield response, total


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

    def finish(self) -> _Fetched:
        """Write what is pending and fsync; the file is complete."""
        self._writer.finish()
        os.fsync(self.fd)
        digests = {a: h.hexdigest() for a, h in self._hashers.items()}
        return _Fetched(size=self.size, digests=digests)

    def close(self) -> None:
        os.close(self.fd)


def _fetch(
    source: _Source,
    tmp: Path,
    algorithms: Sequence[str],
    reporter: _Reporter,
    stop: threading.Event,
    roots: Sequence[str] | None = None,
) -> _Fetched:
    """Stream ``source`` into the new file ``tmp``, hashing it; fsync it. Worker thread.

    Runs of zero bytes become holes. ``tmp`` is removed by this function on any failure, so
    nothing is left even when the awaiting task gave up waiting for it.
    """
    try:
        if stop.is_set():
            raise _Stopped
        with _open_source(source, roots) as (stream, total):
            sink = _Sink(tmp, algorithms)
            try:
                reporter.report(0, total, final=True)
                read: Callable[[int], bytes] = getattr(stream, "read1", stream.read)
                while True:
                    if stop.is_set():
                        raise _Stopped
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


async def _in_worker(func: Callable[[], _T], stop: threading.Event) -> _T:
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


async def _receive(
    chunks: AsyncIterable[bytes],
    tmp: Path,
    algorithms: Sequence[str],
    total: int | None,
    reporter: _Reporter,
    display: str,
) -> _Fetched:
    """Write a byte stream (an upload) into the new file ``tmp`` like :func:`_fetch` does.

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
                raise _import_error("body", f"{display}: more than the {total} bytes announced")
            if len(pending) >= _CHUNK:
                await store(functools.partial(sink.add, bytes(pending)))
                pending.clear()
                reporter.report(sink.size, total)
            if reporter.error is not None:
                raise reporter.error
        if pending:
            await store(functools.partial(sink.add, bytes(pending)))
        if total is not None and sink.size != total:
            raise _import_error("body", f"{display}: got {sink.size} of {total} bytes")
        fetched = await store(sink.finish)
    finally:
        sink.close()
    reporter.report(fetched.size, total, final=True)
    return fetched


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
        sidecar = self._sidecar(name)
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
            name=name,
            path=self._image(name),
            format=str(fields["format"]),
            virtual_size=int(sizes["virtualSize"]),
            actual_size=int(sizes["actualSize"]),
            sha256=str(fields["sha256"]),
            created=str(fields["created"]),
            source=str(fields["source"]),
        )

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
        expected = _parse_checksum(checksum) if checksum is not None else None
        src = _parse_source(source)
        self._check_free(name, replace=replace, users=users)
        ensure_private_dir(self.root)
        tmp = temp_sibling(self._image(name))
        claim = await self._claim(tmp)
        stop = threading.Event()
        reporter = _Reporter(asyncio.get_running_loop(), progress, stop)
        algorithms = [expected[0]] if expected is not None else []
        try:
            try:
                fetched = await _in_worker(
                    functools.partial(_fetch, src, tmp, algorithms, reporter, stop, local_roots),
                    stop,
                )
            except _Stopped:
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
        expected = _parse_checksum(checksum) if checksum is not None else None
        self._check_free(name, replace=replace, users=users)
        ensure_private_dir(self.root)
        tmp = temp_sibling(self._image(name))
        claim = await self._claim(tmp)
        reporter = _Reporter(asyncio.get_running_loop(), progress, threading.Event())
        algorithms = [expected[0]] if expected is not None else []
        try:
            fetched = await _receive(chunks, tmp, algorithms, total, reporter, source)
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
        fetched: _Fetched,
        expected: tuple[str, str] | None,
        display: str,
        *,
        replace: bool,
        users: Sequence[str],
    ) -> ImageRecord:
        """Verify the complete file ``tmp`` (checksum, probe) and publish it as ``name``."""
        if expected is not None:
            algorithm, digest = expected
            actual = fetched.digests[algorithm]
            if actual != digest:
                # SpecError, not HostError: the content arrived complete (length checked)
                # and does not match the request's `checksum` field. Either the field is
                # wrong or the source serves something else; the field path tells the
                # REST client which value to look at (422).
                raise _import_error(
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
            raise _import_error("source", f"{display}: {exc}") from exc
        if head is not None and (head.backing is not None or head.data_file):
            what = "a backing file" if head.backing is not None else "an external data file"
            raise _import_error("source", f"{display} has {what}; a base image must not")
        # the format is corral's (qcow2 by magic, else raw), and backing and data files were
        # refused above from the header: qemu-img only measures what is left
        info = await image_info(tmp, "qcow2" if head is not None else "raw")
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
        body = {k: v for k, v in record.to_json().items() if k not in ("name", "path")}
        body["version"] = _SIDECAR_VERSION
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
