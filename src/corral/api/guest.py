"""``/v1/vms/{name}/...`` that reach into a VM: exec (guest agent), a display password, the
serial console (websocket) and the console/qemu logs."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, WebSocket
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from corral.api.console import proxy_console
from corral.api.problems import problem_response
from corral.errors import CorralError
from corral.manager import Manager
from corral.printable import PrintableDecoder

__all__ = ["ExecRequest", "ExecResponse", "guest_routes"]

_MAX_TAIL = 1_000_000
Follow = Annotated[bool, Query(description="keep the stream open for new events")]
LogSourceQuery = Annotated[
    Literal["console", "qemu"],
    Query(description="console: what the guest printed on its serial console; qemu: its stderr"),
]
Tail = Annotated[int | None, Query(ge=0, le=_MAX_TAIL, description="only the last N lines")]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", alias_generator=to_camel, populate_by_name=True)


class ExecRequest(_Model):
    command: list[Annotated[str, Field(max_length=65536)]] = Field(min_length=1, max_length=4096)
    stdin: str | None = Field(default=None, max_length=16 * 1024 * 1024)
    timeout: float = Field(default=60.0, gt=0, le=3600)


class ExecResponse(_Model):
    exit_code: int | None
    signal: int | None
    stdout: str
    stderr: str
    truncated: bool


def guest_routes(manager: Manager) -> APIRouter:
    router = APIRouter(prefix="/v1/vms/{name}", tags=["guest"])

    @router.post("/exec")
    async def exec_vm(name: str, body: ExecRequest) -> ExecResponse:
        result = await manager.exec(
            name,
            body.command,
            stdin=body.stdin.encode() if body.stdin is not None else None,
            timeout=body.timeout,
        )
        return ExecResponse(
            exit_code=result.exit_code,
            signal=result.signal,
            stdout=result.stdout.decode(errors="replace"),
            stderr=result.stderr.decode(errors="replace"),
            truncated=result.truncated,
        )

    @router.post("/display")
    async def display_vm(
        name: str, expiry: Annotated[int, Query(ge=1, le=86400)] = 30
    ) -> dict[str, Any]:
        """A fresh display password valid ``expiry`` seconds, with the URLs to use it."""
        return await manager.display(name, expiry)

    @router.websocket("/console")
    async def console(websocket: WebSocket, name: str) -> None:
        """A missing VM is a 404 and one that is not running a 409, as a problem+json
        denial of the handshake (the client reads why), not a bare 403."""
        try:
            stream = manager.open_console(name)
        except CorralError as exc:
            problem = problem_response(exc.status, exc.message, type_=exc.problem_type)
            try:
                await websocket.send_denial_response(problem)
            except RuntimeError:  # a server without the denial-response extension
                # 4000 + the HTTP status (4404, 4409, 4501: the backend has no console)
                await websocket.close(code=4000 + exc.status, reason=exc.message[:120])
            return
        await proxy_console(websocket, stream)

    @router.get(
        "/logs",
        response_class=StreamingResponse,
        responses={200: {"content": {"text/plain": {}, "application/octet-stream": {}}}},
    )
    async def vm_logs(
        name: str,
        source: LogSourceQuery = "console",
        tail: Tail = None,
        follow: Follow = False,
        raw: Annotated[bool, Query(description="the bytes as written, not printable")] = False,
    ) -> StreamingResponse:
        """A VM's log: text with every control character but newline and tab shown, not
        obeyed (``^[`` for ESC), so no guest drives a reader's terminal; ``raw=true``: the
        bytes as written. 404 for an unknown VM, 409 for one without such a log yet."""
        chunks = manager.logs(name, source, tail=tail, follow=follow)

        async def body() -> AsyncIterator[bytes]:
            decoder = None if raw else PrintableDecoder()
            async with contextlib.aclosing(chunks):
                async for chunk in chunks:
                    text = chunk if decoder is None else decoder.feed(chunk).encode()
                    if text:
                        yield text
            if decoder is not None and (rest := decoder.feed(b"", final=True)):
                yield rest.encode()

        return StreamingResponse(
            body(),
            media_type="application/octet-stream" if raw else "text/plain; charset=utf-8",
            headers={"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"},
        )

    return router
