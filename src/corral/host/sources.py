"""Where an image import's bytes come from: a local file or an http(s) URL, opened in a worker
thread, and the rule that tells the two apart (:func:`host_path`).

Sources are a local file (copied), an ``http://``/``https://`` URL (downloaded with urllib in
a worker thread) or a byte stream (``ImageStore.import_stream``: an upload, which needs nothing
from here); all three go through the same hashing, checks and publish (:mod:`.imports`).
Untrusted strings never reach a shell. A local path is a host file the caller names: the
daemon passes ``local_roots`` (its policy's ``imagePaths``) and the store checks the file it
actually opened, so a symlink swapped in after a check does not escape. A URL redirect is
followed only within the URL's origin (scheme, host and port), so a public URL cannot bounce
the download to a loopback or internal service; any other scheme (``file:``, ``ftp:``) is
refused.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import re
import stat
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from corral import __version__
from corral.errors import FieldIssue, Forbidden, HostError, SpecError
from corral.spec.policy import path_within

__all__ = ["Source", "host_path", "import_error", "open_source", "parse_source"]

_URL_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://|(?i:file):")
_READ_TIMEOUT = 60.0
_USER_AGENT = f"corral/{__version__}"


def import_error(loc: str, reason: str) -> SpecError:
    return SpecError("invalid image import", [FieldIssue(loc, reason)])


@dataclass(frozen=True)
class Source:
    url: str | None
    path: Path | None

    @property
    def display(self) -> str:
        return self.url if self.url is not None else str(self.path)


def parse_source(source: str) -> Source:
    if not source:
        raise import_error("source", "must be a file path or an http(s):// URL")
    if _URL_SCHEME.match(source) is None:
        return Source(url=None, path=Path(os.path.abspath(source)))
    parts = urllib.parse.urlsplit(source)
    if parts.scheme.lower() not in ("http", "https"):
        raise import_error("source", f"URL scheme {parts.scheme!r} is not http or https")
    if not parts.hostname:
        raise import_error("source", "URL has no host")
    if parts.username is not None or parts.password is not None:
        # They would end up in the sidecar and in error messages.
        raise import_error("source", "credentials in the URL are not supported")
    try:
        _ = parts.port
    except ValueError as exc:
        raise import_error("source", f"bad port in URL: {exc}") from exc
    return Source(url=source, path=None)


def host_path(source: str) -> Path | None:
    """The absolute host path an import ``source`` names, None if it is an http(s) URL.

    The one place that tells the two apart (the store's own rule), so a caller enforcing a
    policy on host paths classifies a source exactly as the import will: a string that merely
    contains ``://`` somewhere is still a path. A malformed source is a :class:`SpecError`.
    """
    return parse_source(source).path


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
            raise import_error(
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
        raise import_error("source", f"no such file: {path}") from exc
    except OSError as exc:
        raise HostError(f"cannot read {path}: {exc}") from exc
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise import_error("source", f"not a regular file: {path}")
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
def open_source(
    source: Source, roots: Sequence[str] | None
) -> Iterator[tuple[IO[bytes], int | None]]:
    """The source as a binary stream and its size if known. Runs in the worker thread."""
    if source.path is not None:
        with _open_local(source.path, roots) as stream:
            yield stream, os.fstat(stream.fileno()).st_size
        return
    assert source.url is not None
    # parse_source let only http(s) URLs through, and _opener follows redirects to no other.
    request = urllib.request.Request(source.url, headers={"User-Agent": _USER_AGENT})  # noqa: S310
    try:
        response = _opener().open(request, timeout=_READ_TIMEOUT)
    except urllib.error.HTTPError as exc:
        exc.close()  # it holds the response body, maybe a socket
        reason = f"HTTP {exc.code} {exc.reason} from {source.url}"
        if 400 <= exc.code < 500:
            raise import_error("source", reason) from exc
        raise HostError(f"cannot download image: {reason}") from exc
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as exc:
        raise HostError(f"cannot download {source.url}: {exc}") from exc
    with response:
        length = response.headers.get("Content-Length")
        total = int(length) if length is not None and length.strip().isdigit() else None
        yield response, total
