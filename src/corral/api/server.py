"""Serving the API inside ``corral serve``: a unix socket (default) and optionally TCP.

* Unix socket: created by us (bind, chmod 0660, chown to the configured group, listen) so it
  is never reachable with looser permissions, not even for a moment. No token: the socket's
  mode and group are the access control, as for docker.sock or libvirt's socket.
* TCP: every request carries ``Authorization: Bearer TOKEN`` (the websocket console may use
  ``?access_token=`` since browsers cannot set headers on a websocket) or a local user's
  session cookie (:mod:`corral.api.auth`); without one it is 401 before any handler runs.
  Only ``/healthz``, ``/readyz`` and the login are open (they say nothing but "up"), and the
  web pages' code under ``/ui`` (it holds no data). TLS with ``--tls-cert``/``--tls-key``.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import os
import socket
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import uvicorn
from fastapi import APIRouter
from starlette.types import ASGIApp

from corral.api.app import create_app
from corral.api.auth import Authenticate, TokenFile
from corral.api.session import Access
from corral.api.users import UsersFile
from corral.errors import FieldIssue, HostError, SpecError
from corral.manager import Manager, ManagerConfig

__all__ = ["DEFAULT_SOCKET", "ApiOptions", "BearerAuth", "api_service", "service_from_config"]

DEFAULT_SOCKET = Path("/run/corral/corral.sock")
_OPEN_PATHS = ("/healthz", "/readyz", "/", "/ui")
_OPEN_PREFIXES = ("/ui/",)  # the web pages' code (corral.web): no data in it, the login page
RouteFactory = Callable[[Manager], APIRouter]
"""Routes another service adds to the API's app (the web pages: same origin, same auth)."""


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: the daemon owns SIGTERM/SIGINT (they mean
    'stop the daemon, leave the VMs'), and stops the servers itself."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


@dataclass(frozen=True)
class ApiOptions:
    socket: Path | None = DEFAULT_SOCKET
    socket_group: str | None = None
    listen: str | None = None  # HOST:PORT
    tokens_file: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    routes: Sequence[RouteFactory] = ()
    users_file: Path | None = None
    metrics_on_loopback: bool = False

    def tcp_address(self) -> tuple[str, int] | None:
        if self.listen is None:
            return None
        host, sep, port = self.listen.rpartition(":")
        if not sep or not port.isdigit() or not 0 < int(port) < 65536:
            raise SpecError.single("listen", f"{self.listen!r} is not HOST:PORT")
        return host.strip("[]") or "127.0.0.1", int(port)


class BearerAuth(Authenticate):
    """The TCP listener's :class:`~corral.api.auth.Authenticate`: bearer tokens and session
    cookies; the probes, the login and the pages' code are open."""

    def __init__(
        self, app: ASGIApp, access: Access | TokenFile, *, metrics_on_loopback: bool = False
    ) -> None:
        super().__init__(app, access, open_paths=_OPEN_PATHS, open_prefixes=_OPEN_PREFIXES,
                         metrics_on_loopback=metrics_on_loopback)  # fmt: skip


def _unix_listener(path: Path, group: str | None) -> socket.socket:
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        if path.is_socket():
            path.unlink()  # a stale socket: the daemon lock says no one else serves it
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        sock.bind(str(path))
    except OSError as exc:
        sock.close()
        raise HostError(f"cannot bind the API socket {path}: {exc}") from exc
    finally:
        os.umask(old)
    if group is not None:
        try:
            os.chown(path, -1, grp.getgrnam(group).gr_gid)
        except (KeyError, OSError) as exc:
            sock.close()
            raise HostError(f"cannot give the API socket to group {group!r}: {exc}") from exc
    os.chmod(path, 0o660)
    sock.listen(128)
    return sock


_GRACE_SECONDS = 2
"""How long a stopping daemon lets requests in flight finish before it cancels them: a
``stop --wait``, a ``restart`` or an event stream could otherwise hold SIGTERM for a whole
powerdown timeout (the VMs are not affected: a stop in flight resumes in the next daemon)."""


def _server(app: ASGIApp, **config: Any) -> _Server:
    """uvicorn with no logging set-up of its own: its ``uvicorn.error`` and ``uvicorn.access``
    records go to whatever handler the process has (``corral serve``: the daemon's log, in its
    format, secrets redacted; none configured: warnings only, and no access lines)."""
    cfg = uvicorn.Config(
        app, log_config=None, log_level=None, access_log=True, lifespan="off",
        ws="websockets-sansio", timeout_graceful_shutdown=_GRACE_SECONDS, **config,
    )  # fmt: skip
    return _Server(cfg)


def api_service(options: ApiOptions) -> Callable[[Manager], AbstractAsyncContextManager[object]]:
    """A daemon service (see :func:`corral.manager.daemon.serve`) serving the API."""
    tcp = options.tcp_address()
    tokens = TokenFile.load(options.tokens_file) if options.tokens_file else None
    users = UsersFile.load(options.users_file) if options.users_file else None
    if tcp is not None and tokens is None and users is None:
        raise SpecError.single(
            "tokensFile", "a TCP listener needs a tokens file (--tokens) or users (--users)"
        )
    access = Access(tokens=tokens, users=users)
    if (options.tls_cert is None) != (options.tls_key is None):
        raise SpecError.single("tls", "give both --tls-cert and --tls-key")

    @contextlib.asynccontextmanager
    async def run(manager: Manager) -> AsyncIterator[object]:
        app = create_app(manager, access)
        for routes in options.routes:
            app.include_router(routes(manager))
        servers: list[tuple[_Server, list[socket.socket] | None]] = []
        if options.socket is not None:
            sock = _unix_listener(options.socket, options.socket_group)
            servers.append((_server(app), [sock]))
        if tcp is not None:
            tls: dict[str, Any] = {}
            if options.tls_cert is not None:
                tls = {"ssl_certfile": str(options.tls_cert), "ssl_keyfile": str(options.tls_key)}
            guarded = BearerAuth(app, access, metrics_on_loopback=options.metrics_on_loopback)
            servers.append((_server(guarded, host=tcp[0], port=tcp[1], **tls), None))
        tasks = [asyncio.ensure_future(s.serve(sockets=socks)) for s, socks in servers]
        try:
            for server, _ in servers:
                while not server.started:
                    if any(t.done() for t in tasks):
                        for t in tasks:
                            if t.done() and t.exception() is not None:
                                raise HostError(f"the API server failed: {t.exception()}")
                        raise HostError("the API server stopped while starting")
                    await asyncio.sleep(0.01)
            yield app
        finally:
            for server, _ in servers:
                server.should_exit = True
            await asyncio.gather(*tasks, return_exceptions=True)
            if options.socket is not None:
                with contextlib.suppress(OSError):
                    options.socket.unlink()

    return run


def _path(options: Mapping[str, object], key: str) -> Path | None:
    value = options.get(key)
    return Path(str(value)) if value else None


def service_from_config(
    config: ManagerConfig, options: Mapping[str, object]
) -> Callable[[Manager], AbstractAsyncContextManager[object]]:
    """The ``api`` entry of :data:`corral.services.SERVICES`: the API on ``options``'s
    ``socket`` (None: no socket), ``socketGroup``, ``listen``, ``tokensFile``, ``tlsCert``,
    ``tlsKey``, ``routes`` (route factories of other services: the web pages), ``usersFile``
    (default: the config's ``users``), ``metricsOnLoopback``; an unknown option is a
    SpecError naming it."""
    known = {"socket", "socketGroup", "listen", "tokensFile", "tlsCert", "tlsKey", "routes",
             "usersFile", "metricsOnLoopback"}  # fmt: skip
    for key in options:
        if key not in known:
            reason = f"is not an option; one of {', '.join(sorted(known))}"
            raise SpecError("invalid API service options", [FieldIssue(f"api.{key}", reason)])
    group, listen = options.get("socketGroup"), options.get("listen")
    return api_service(
        ApiOptions(
            socket=_path(options, "socket"),
            socket_group=None if group is None else str(group),
            listen=None if listen is None else str(listen),
            tokens_file=_path(options, "tokensFile"),
            tls_cert=_path(options, "tlsCert"),
            tls_key=_path(options, "tlsKey"),
            routes=cast(Sequence[RouteFactory], options.get("routes") or ()),
            users_file=_path(options, "usersFile") or config.users,
            metrics_on_loopback=bool(options.get("metricsOnLoopback")),
        )
    )
