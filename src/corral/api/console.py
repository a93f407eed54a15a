"""The serial console over a websocket: bytes from the guest's serial port go out as binary
messages, whatever the client sends (binary or text) goes in as keystrokes.

qemu serves the console's unix socket to one client at a time (a second one waits in the
listen queue until the first leaves), which is the semantics of a serial line: whoever holds
it types. The session ends when either side closes or qemu goes away.
"""

from __future__ import annotations

import asyncio
import contextlib
from contextlib import AbstractAsyncContextManager

from starlette.websockets import WebSocket, WebSocketDisconnect

from corral.errors import CorralError

__all__ = ["proxy_console"]

_CHUNK = 65536


ConsoleStream = AbstractAsyncContextManager[tuple[asyncio.StreamReader, asyncio.StreamWriter]]


async def proxy_console(websocket: WebSocket, stream: ConsoleStream) -> None:
    """``stream``: the backend's console (``Manager.open_console``), opened here."""
    try:
        reader, writer = await stream.__aenter__()
    except (CorralError, OSError, TimeoutError) as exc:
        await websocket.close(code=1011, reason=str(exc)[:120])
        return
    # a client that asks for the "binary" subprotocol (spice-html5, websockify's clients) gets
    # it echoed: a browser drops a handshake that ignores the subprotocol it asked for
    offered = websocket.scope.get("subprotocols") or []
    await websocket.accept(subprotocol="binary" if "binary" in offered else None)

    async def guest_to_client() -> None:
        while True:
            data = await reader.read(_CHUNK)
            if not data:
                return
            await websocket.send_bytes(data)

    async def client_to_guest() -> None:
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                return
            data = message.get("bytes")
            if data is None:
                text = message.get("text")
                data = text.encode() if text else b""
            writer.write(data)
            await writer.drain()

    tasks = {asyncio.ensure_future(guest_to_client()), asyncio.ensure_future(client_to_guest())}
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, OSError, WebSocketDisconnect,
                                     RuntimeError):  # fmt: skip
                await task
        with contextlib.suppress(OSError):
            await stream.__aexit__(None, None, None)
        # the client may be gone already (it left): closing then is no error to log
        with contextlib.suppress(RuntimeError, OSError, WebSocketDisconnect):
            await websocket.close()
