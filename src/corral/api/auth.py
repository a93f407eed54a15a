"""Who is calling the TCP listener: bearer tokens, and session cookies of local users.

:class:`Authenticate` wraps the API app on TCP. A request proves who it is with
``Authorization: Bearer TOKEN`` (a token is an admin; the websocket console may use
``?access_token=`` since browsers cannot set headers on a websocket) or with the
``corral_session`` cookie of a logged-in user (:mod:`corral.api.session`); it then carries a
:class:`~corral.api.users.Principal` that the routes check (:mod:`corral.api.permissions`).
Neither is a 401 before any handler runs; ``/healthz``, ``/readyz`` and the login
(``POST /v1/session``) are open. A cookie is a browser's ambient credential, so a request it
authenticates must also show it was sent by corral's own page: an unsafe method needs the
session's ``X-CSRF-Token`` header, a websocket upgrade (which no CSRF header can ride on) an
``Origin`` equal to the daemon's own, and any ``Origin`` sent must be the daemon's own.

The tokens file holds one ``NAME sha256:HEX`` line per token: only hashes, never a token, and
the file must be private (mode 0600 or stricter, like ssh's keys), else the daemon refuses to
start. ``corral token create NAME --file F`` makes a token, stores its hash and prints the
token once. The unix socket needs no token: its file mode and group are the access control.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs

from starlette.types import ASGIApp, Receive, Scope, Send

from corral.api.session import COOKIE, CSRF_HEADER, PRINCIPAL_KEY, Access, same_origin
from corral.api.users import ANONYMOUS, Principal, read_private
from corral.errors import CorralError, Forbidden, HostError, SpecError, Unauthorized

__all__ = ["OPEN_PATHS", "Authenticate", "TokenFile", "create_token"]

OPEN_PATHS = ("/healthz", "/readyz")
_UNSAFE = frozenset({"POST", "PUT", "PATCH", "DELETE"})
_LOOPBACK = frozenset({"127.0.0.1", "::1"})
_LOOPBACK_SCRAPER = Principal("loopback", ("metrics",), "loopback")

_LINE = re.compile(r"^([A-Za-z0-9_.@-]{1,64})\s+sha256:([0-9a-f]{64})$")
_PREFIX = "crl_"


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class TokenFile:
    path: Path
    hashes: dict[str, str]  # hex digest -> name

    @classmethod
    def load(cls, path: Path) -> TokenFile:
        text = read_private(path, "tokens file")
        hashes: dict[str, str] = {}
        for number, raw in enumerate(text.splitlines(), 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            match = _LINE.match(line)
            if match is None:
                raise SpecError.single(
                    f"{path}:{number}", "expected 'NAME sha256:HEX' (64 hex digits)"
                )
            hashes[match.group(2)] = match.group(1)
        return cls(path, hashes)

    def check(self, token: str) -> str | None:
        """The token's name if it is valid (constant-time compare), else None."""
        digest = _digest(token)
        found = None
        for known, name in self.hashes.items():
            if hmac.compare_digest(known, digest):
                found = name
        return found


def create_token(path: Path, name: str) -> str:
    """Append a new token's hash to ``path`` (created 0600) and return the token."""
    if not re.fullmatch(r"[A-Za-z0-9_.@-]{1,64}", name):
        raise SpecError.single("name", "1-64 letters, digits or . _ @ -")
    if path.exists():
        TokenFile.load(path)  # refuse to append to a broken or public file
    token = _PREFIX + secrets.token_urlsafe(32)
    try:  # a link there (a dangling one passes exists()) must not make us write elsewhere
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    except OSError as exc:
        raise HostError(f"cannot write tokens file {path}: {exc}") from exc
    try:
        os.write(fd, f"{name} sha256:{_digest(token)}\n".encode())
    finally:
        os.close(fd)
    return token


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key == name:
            return bytes(value).decode("latin-1")
    return None


def _loopback_host(host: str | None) -> bool:
    """Whether a Host header names this host by a loopback name: a browser's page from another
    site that rebinds its own name to 127.0.0.1 sends that name (DNS rebinding)."""
    text = (host or "").lower()
    name = text[1:].partition("]")[0] if text.startswith("[") else text.partition(":")[0]
    return name in _LOOPBACK or name == "localhost"


def _cookie(scope: Scope, name: str) -> str | None:
    raw = _header(scope, b"cookie")
    if raw is None:
        return None
    for part in raw.split(";"):
        key, sep, value = part.strip().partition("=")
        if sep and key == name:
            return value.strip('"')
    return None


class Authenticate:
    """ASGI middleware: a :class:`Principal` on every request (scope key
    ``corral.principal``), or a 401/403 problem+json (a websocket: close 4401/4403) before
    the app sees it. ``open_paths``/``open_prefixes``: what anyone may fetch (the probes; the
    pages' static files and login page, which hold no data)."""

    def __init__(
        self,
        app: ASGIApp,
        access: Access | TokenFile,
        open_paths: Iterable[str] = OPEN_PATHS,
        open_prefixes: Iterable[str] = (),
        metrics_on_loopback: bool = False,
    ) -> None:
        self.app = app
        self.access = access if isinstance(access, Access) else Access(tokens=access)
        self.open_paths = frozenset(open_paths)
        self.open_prefixes = tuple(open_prefixes)
        self.metrics_on_loopback = metrics_on_loopback

    def _token(self, scope: Scope) -> str | None:
        header = _header(scope, b"authorization")
        if header is not None:
            kind, _, token = header.partition(" ")
            if kind.lower() == "bearer" and token:
                return token.strip()
        if scope["type"] == "websocket":
            query = parse_qs(bytes(scope.get("query_string", b"")).decode(errors="replace"))
            values = query.get("access_token")
            if values:
                return str(values[0])
        return None

    def _principal(self, scope: Scope) -> Principal:
        token = self._token(scope)
        tokens = self.access.tokens
        if (self.metrics_on_loopback and scope.get("path") == "/metrics" and token is None
                and (scope.get("client") or ("",))[0] in _LOOPBACK
                and _loopback_host(_header(scope, b"host"))):  # fmt: skip
            return _LOOPBACK_SCRAPER
        if token is not None:
            name = tokens.check(token) if tokens is not None else None
            if name is None:
                raise Unauthorized("the token is not valid")
            return Principal.of_token(name)
        session_id = _cookie(scope, COOKIE)
        if session_id is None:
            raise Unauthorized(
                "a bearer token is required" if self.access.users is None
                else "a bearer token or a session (POST /v1/session) is required"
            )  # fmt: skip
        session = self.access.sessions.get(session_id)
        if session is None:
            raise Unauthorized("the session has ended; log in again")
        origin = _header(scope, b"origin")
        if origin is not None and not same_origin(scope, origin):
            raise Forbidden(f"a request from another origin ({origin[:100]}) is refused")
        if scope["type"] == "websocket":
            if origin is None:
                raise Forbidden("a websocket opened with a session cookie must send Origin")
        elif scope.get("method") in _UNSAFE:
            sent = _header(scope, CSRF_HEADER.encode()) or ""
            if not hmac.compare_digest(sent.encode(), session.csrf.encode()):
                raise Forbidden(f"{scope.get('method')} with a session cookie needs the "
                                "session's X-CSRF-Token header")  # fmt: skip
        user = self.access.user(session.user.name)  # the users file may have changed
        if user is None or self.access.password_hash(user.name) != session.password_hash:
            self.access.sessions.drop(session_id)
            raise Unauthorized("the session has ended; log in again")
        return Principal.of_user(user)

    def _open(self, scope: Scope) -> bool:
        path = str(scope.get("path", ""))
        if path in self.open_paths or path.startswith(self.open_prefixes or ("\0",)):
            return True
        return path == "/v1/session" and scope.get("method") == "POST"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        if self._open(scope):
            await self.app({**scope, PRINCIPAL_KEY: ANONYMOUS}, receive, send)
            return
        try:
            principal = self._principal(scope)
        except CorralError as exc:
            await _refuse(scope, send, exc)
            return
        await self.app({**scope, PRINCIPAL_KEY: principal}, receive, send)


async def _refuse(scope: Scope, send: Send, exc: CorralError) -> None:
    """The refusal as problem+json; a websocket handshake gets it as its denial response
    (the server's ``websocket.http.response`` extension), else a close with 4000 + status."""
    prefix = ""
    if scope["type"] == "websocket":
        if "websocket.http.response" not in scope.get("extensions", {}):
            code = 4000 + exc.status
            await send({"type": "websocket.close", "code": code, "reason": exc.message[:120]})
            return
        prefix = "websocket."
    body = json.dumps(exc.to_problem()).encode()
    headers = [
        (b"content-type", b"application/problem+json"),
        (b"content-length", str(len(body)).encode()),
    ]
    if exc.status == 401:
        headers.append((b"www-authenticate", b'Bearer realm="corral"'))
    await send({"type": f"{prefix}http.response.start", "status": exc.status, "headers": headers})
    await send({"type": f"{prefix}http.response.body", "body": body})
