"""Request limits for the REST API: how much body and how deep a JSON document a request may
send, enforced once, in front of every route.

:class:`BodyLimits` reads each HTTP request body itself, up to its route's cap, before the
app sees any of it: a ``Content-Length`` over the cap is refused without reading a byte, a
chunked body (no length) as soon as it passes the cap; nothing larger than the cap is ever
buffered. A JSON body nested deeper than the depth limit is refused before anything parses
it (Python's parser, pydantic and the merge patch all recurse). Routes that stream their
body (an image upload) are declared with no cap and pass through untouched: they consume the
stream themselves. Refusals are ``application/problem+json``: 413 for size, 400 for depth.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["BodyLimits", "RouteLimit", "too_deep"]

RouteLimit = tuple[str, re.Pattern[str], int | None]
"""(method, path pattern (full match), cap in bytes or None for a streamed body)."""

_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.S)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_ONE_KIND = bytes.maketrans(b"{}", b"[]")


def too_deep(body: bytes, limit: int) -> str | None:
    """Why JSON text ``body`` nests too deep for ``limit`` levels, or None if it does not.

    Works on the bracket skeleton (strings removed, ``{}`` read as ``[]``) with C-speed
    bytes operations: each pass removes the innermost level, so a document whose skeleton
    is not empty after ``limit`` passes is deeper, or has unbalanced brackets (never JSON).
    """
    if body.count(b"[") + body.count(b"{") <= limit:
        return None
    shape = _STRING.sub(b"", body).translate(_ONE_KIND, _NOT_BRACKETS)
    for _ in range(limit):
        shape = shape.replace(b"[]", b"")
        if not shape:
            return None
    if shape.replace(b"[]", b"") != shape:
        return f"the body nests arrays and objects deeper than {limit} levels"
    return "the body is not valid JSON: its brackets do not balance"


def _is_json(scope: Scope) -> bool:
    for key, value in scope.get("headers", []):
        if key == b"content-type":
            kind = bytes(value).split(b";")[0].strip().lower()
            return kind in (b"", b"application/json") or kind.endswith(b"+json")
    return True


def _content_length(scope: Scope) -> int | None:
    for key, value in scope.get("headers", []):
        if key == b"content-length":
            text = bytes(value).strip()
            return int(text) if text.isdigit() and len(text) <= 18 else None
    return None


class BodyLimits:
    """ASGI middleware: cap every request body (``max_body``, or its route's own cap) and the
    nesting depth of every JSON body (``max_depth``); see the module docstring. ``problem``
    makes the refusal (the app's own problem+json response)."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        max_body: int,
        max_depth: int,
        problem: Callable[[int, str], Response],
        routes: Sequence[RouteLimit] = (),
    ) -> None:
        self.app = app
        self.max_body = max_body
        self.max_depth = max_depth
        self.problem = problem
        self.routes = tuple(routes)

    def _cap(self, scope: Scope) -> int | None:
        method, path = scope.get("method", ""), scope.get("path", "")
        for route_method, pattern, cap in self.routes:
            if method == route_method and pattern.fullmatch(path):
                return cap
        return self.max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        cap = self._cap(scope) if scope["type"] == "http" else None
        if cap is None:
            await self.app(scope, receive, send)
            return
        announced = _content_length(scope)
        if announced is not None and announced > cap:
            await self.problem(413, f"the body is {announced} bytes; this route takes {cap}")(
                scope, receive, send
            )
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client left; there is no one to answer
            chunk = bytes(message.get("body", b""))
            size += len(chunk)
            if size > cap:
                await self.problem(413, f"the body is larger than {cap} bytes")(
                    scope, receive, send
                )
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        if body and _is_json(scope):
            reason = too_deep(body, self.max_depth)
            if reason is not None:
                await self.problem(400, reason)(scope, receive, send)
                return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()  # only http.disconnect is left to come
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)
