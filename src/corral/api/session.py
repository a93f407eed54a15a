"""Browser sessions: ``/v1/session`` logs a user in with a password and hands out a cookie.

``POST /v1/session {username, password}`` sets the cookie ``corral_session`` (a random id;
HttpOnly, SameSite=Strict, Path=/, Secure over TLS) and answers ``{user, roles, csrfToken}``;
``GET /v1/session`` answers the same (401 without a session); ``DELETE /v1/session`` logs
out. Sessions live in the daemon's memory (a restart logs everyone out) and end after
``idle_seconds`` without a request, or ``max_seconds`` after login whatever happens.

A refused login is the same 401 for an unknown user and a wrong password, checked at the same
cost (:meth:`UsersFile.verify`). Failures are counted per (user, client address): after
``max_failures`` within ``window_seconds`` the pair gets 429 with ``Retry-After`` until the
window has passed, whether or not the user exists; one client gets at most four times that
many failures across all names (password spraying).

Every unsafe request (POST, PUT, PATCH, DELETE) authenticated by the cookie must carry the
header ``X-CSRF-Token`` with the session's token, and websocket upgrades must come from the
daemon's own origin (:class:`corral.api.auth.Authenticate` checks both).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import HTTPConnection

from corral.api.problems import problem_response
from corral.api.users import LOCAL, Principal, User, UsersFile
from corral.errors import CorralError, Unauthorized

if TYPE_CHECKING:
    from corral.api.auth import TokenFile

__all__ = [
    "COOKIE", "CSRF_HEADER", "PRINCIPAL_KEY", "Access", "LoginLimiter", "Session", "SessionStore",
    "principal_of", "same_origin", "session_routes",
]  # fmt: skip

_log = logging.getLogger("corral.api.session")
COOKIE = "corral_session"
CSRF_HEADER = "x-csrf-token"
PRINCIPAL_KEY = "corral.principal"
_MAX_SESSIONS = 10_000
_MAX_TRACKED = 10_000


@dataclass
class Session:
    id: str
    user: User
    csrf: str
    created: float
    seen: float
    password_hash: bytes = b""  # the user's at login: a changed password ends the session


class SessionStore:
    """The daemon's sessions, in memory; at most ``_MAX_SESSIONS`` (the oldest go first)."""

    def __init__(
        self,
        idle_seconds: float = 1800,
        max_seconds: float = 12 * 3600,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.idle = idle_seconds
        self.max = max_seconds
        self.clock = clock
        self._sessions: dict[str, Session] = {}

    def create(self, user: User, password_hash: bytes = b"") -> Session:
        now = self.clock()
        while len(self._sessions) >= _MAX_SESSIONS:
            self._sessions.pop(next(iter(self._sessions)))
        session = Session(
            secrets.token_urlsafe(32), user, secrets.token_urlsafe(32), now, now, password_hash
        )
        self._sessions[session.id] = session
        return session

    def get(self, session_id: str) -> Session | None:
        """The live session ``session_id`` names (its idle clock restarted), else None."""
        session = self._sessions.get(session_id)
        if session is None:
            return None
        now = self.clock()
        if now - session.seen > self.idle or now - session.created > self.max:
            self._sessions.pop(session_id, None)
            return None
        session.seen = now
        return session

    def drop(self, session_id: str) -> None:
        self._sessions.pop(session_id, None)

    def drop_user(self, name: str) -> None:
        for sid in [s.id for s in self._sessions.values() if s.user.name == name]:
            self._sessions.pop(sid, None)


@dataclass
class LoginLimiter:
    max_failures: int = 5
    window_seconds: float = 60.0
    clock: Callable[[], float] = time.monotonic
    _failures: dict[tuple[str, str], deque[float]] = field(default_factory=dict)

    def _recent(self, key: tuple[str, str]) -> deque[float]:
        times = self._failures.get(key)
        if times is None:
            return deque()
        cutoff = self.clock() - self.window_seconds
        while times and times[0] <= cutoff:
            times.popleft()
        return times

    def retry_after(self, user: str, client: str) -> float | None:
        """Seconds until ``user`` may try again from ``client``, or None: it may now."""
        for key, limit in (((user, client), self.max_failures),
                           (("", client), 4 * self.max_failures)):  # fmt: skip
            times = self._recent(key)
            if len(times) >= limit:
                return max(1.0, times[0] + self.window_seconds - self.clock())
        return None

    def failed(self, user: str, client: str) -> None:
        if len(self._failures) > _MAX_TRACKED:
            for key in list(self._failures):
                if not self._recent(key):
                    del self._failures[key]
        now = self.clock()
        for key in ((user, client), ("", client)):
            self._failures.setdefault(key, deque()).append(now)

    def succeeded(self, user: str, client: str) -> None:
        """A login that passed: its user's failures from ``client`` are forgotten, and the
        attempt counted for it before the check is taken back from the client's count."""
        self._failures.pop((user, client), None)
        times = self._failures.get(("", client))
        if times:
            times.pop()


@dataclass
class Access:
    """Who may use a listener: bearer tokens (admins), local users with sessions.

    The users file is read again when it changes (``corral user add`` while the daemon runs):
    a new user can log in at once, and a session whose user was removed ends at its next
    request; a changed role applies to it at once. A file that stops loading (broken, made
    public) keeps the users last read, and says so in the log."""

    tokens: TokenFile | None = None
    users: UsersFile | None = None
    sessions: SessionStore = field(default_factory=SessionStore)
    limiter: LoginLimiter = field(default_factory=LoginLimiter)
    _stamp: tuple[int, int, int] | None = None

    def current_users(self) -> UsersFile | None:
        if self.users is None:
            return None
        try:
            st = self.users.path.stat()
        except OSError:
            return self.users
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        if self._stamp is None:
            self._stamp = stamp
        elif stamp != self._stamp:
            self._stamp = stamp
            try:
                self.users = UsersFile.load(self.users.path)
            except CorralError as exc:
                _log.warning("kept the users read before: %s", exc)
        return self.users

    def user(self, name: str) -> User | None:
        """``name`` as the users file says now (None: no longer a user)."""
        users = self.current_users()
        entry = users.entries.get(name) if users is not None else None
        return entry.user if entry is not None else None

    def password_hash(self, name: str) -> bytes | None:
        """``name``'s password hash as the users file says now."""
        users = self.current_users()
        entry = users.entries.get(name) if users is not None else None
        return entry.password_hash if entry is not None else None


def principal_of(conn: HTTPConnection) -> Principal:
    """The principal :class:`~corral.api.auth.Authenticate` put on the request; none there
    means no authentication layer wraps the app (the unix socket, an in-process client)."""
    found = conn.scope.get(PRINCIPAL_KEY)
    return found if isinstance(found, Principal) else LOCAL


def same_origin(scope: Mapping[str, Any], origin: str) -> bool:
    """``origin`` (an Origin header) is the origin the request was sent to."""
    scheme = str(scope.get("scheme", "http")).replace("ws", "http", 1)
    host = ""
    for key, value in scope.get("headers", []):
        if key == b"host":
            host = bytes(value).decode("latin-1")
    return bool(host) and origin.lower() == f"{scheme}://{host}".lower()


class LoginRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    username: Annotated[str, Field(min_length=1, max_length=64)]
    password: Annotated[str, Field(min_length=1, max_length=1024)]


def _session_body(principal: Principal, csrf: str | None) -> dict[str, Any]:
    return {"user": principal.name, "roles": list(principal.roles), "csrfToken": csrf}


def session_routes(access: Access) -> APIRouter:
    router = APIRouter(prefix="/v1/session", tags=["session"])

    @router.post("", responses={401: {}, 429: {}})
    async def login(body: LoginRequest, request: Request) -> Response:
        origin = request.headers.get("origin")
        if origin is not None and not same_origin(request.scope, origin):
            return problem_response(403, "a login from another origin is refused")
        users = access.current_users()
        if users is None:
            raise Unauthorized("this daemon has no users (corral serve --users FILE)")
        client = request.client.host if request.client else ""
        wait = access.limiter.retry_after(body.username, client)
        if wait is not None:
            return problem_response(
                429, "too many failed logins; try again later",
                headers={"Retry-After": str(int(wait + 0.999))},
            )  # fmt: skip
        # counted as a failure before the (slow) check, so that guesses sent in parallel
        # cannot all pass the limit before the first of them has failed
        access.limiter.failed(body.username, client)
        user = await asyncio.to_thread(users.verify, body.username, body.password)
        if user is None:
            raise Unauthorized("wrong username or password")
        access.limiter.succeeded(body.username, client)
        session = access.sessions.create(user, users.entries[user.name].password_hash)
        response = JSONResponse(_session_body(Principal.of_user(user), session.csrf))
        response.set_cookie(
            COOKIE, session.id, httponly=True, samesite="strict", path="/",
            secure=request.url.scheme in ("https", "wss"),
        )  # fmt: skip
        return response

    @router.get("", responses={401: {}})
    async def whoami(request: Request) -> dict[str, Any]:
        principal = principal_of(request)
        csrf = None
        if principal.via == "session":
            session = access.sessions.get(request.cookies.get(COOKIE, ""))
            if session is None:  # logged out by a request in between
                raise Unauthorized("the session has ended; log in again")
            csrf = session.csrf
        return _session_body(principal, csrf)

    @router.delete("", status_code=204)
    async def logout(request: Request) -> Response:
        with contextlib.suppress(KeyError):
            access.sessions.drop(request.cookies[COOKIE])
        response = Response(status_code=204)
        response.delete_cookie(COOKIE, path="/", httponly=True, samesite="strict")
        return response

    return router
