"""The serial console over a websocket: bytes from the guest's serial port go out as binary
messages, whatever the client sends (binary or text) goes in as keystrokes.

qemu serves the console's unix socket to one client at a time (a second one waits in the
listen queue until the first leaves), which is the semantics of a serial line: whoever holds
it types. The session ends when either side closes or qemu goes away.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

from starlette.websockets import WebSocket, WebSocketDisconnect

__all__ = ["proxy_console"]

_CHUNK = 65536


async def proxy_console(websocket: WebSocket, path: Path, *, connect_timeout: float = 5.0) -> None:
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_unix_connection(str(path)), connect_timeout
        )
    except (OSError, TimeoutError) as exc:
        await websocket.close(code=1011, reason=f"console unavailable: {exc}"[:120])
        return
    await websocket.accept()

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
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        # the client may be gone already (it left): closing then is no error to log
        with contextlib.suppress(RuntimeError, OSError, WebSocketDisconnect):
            await websocket.close()
