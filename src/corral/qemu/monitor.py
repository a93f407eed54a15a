"""QMP for one qemu, on top of the ``qemu.qmp`` library (asyncio).

``qemu.qmp`` does the protocol (greeting, capabilities negotiation, ids routing replies,
event queues); this facade adds what the supervisor needs: connecting to a socket that qemu
may not have created yet, error translation into :class:`~corral.errors.QemuError`, one
event stream for the supervisor, and a way to notice that qemu went away.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any, cast

from qemu.qmp import EventListener, ExecuteError, QMPClient, QMPError
from qemu.qmp.protocol import Runstate

from corral.errors import QemuError

__all__ = ["JsonObject", "Monitor", "QmpEvent"]

JsonObject = dict[str, object]
QmpEvent = Mapping[str, object]

# qemu.qmp logs every disconnect of a peer that died as an error with a traceback; a qemu
# that exits is normal life for a supervisor, and the supervisor reports it itself.
logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)


class Monitor:
    """A QMP connection. Create with :meth:`connect`; close with :meth:`close`."""

    def __init__(self, client: QMPClient, listener: EventListener) -> None:
        self._client = client
        self._listener = listener

    @classmethod
    async def connect(
        cls,
        path: Path | str,
        *,
        timeout: float = 30.0,
        alive: asyncio.Future[Any] | None = None,
        name: str = "corral",
    ) -> Monitor:
        """Connect to qemu's QMP socket, retrying until it exists and answers.

        ``alive`` is a future that completes when qemu exits: connecting stops at once then,
        instead of waiting out the timeout.
        """
        deadline = time.monotonic() + timeout
        last: BaseException | None = None
        while True:
            if alive is not None and alive.done():
                raise QemuError(f"qemu exited before its QMP socket {path} answered")
            client = QMPClient(name)
            listener = EventListener()
            client.register_listener(listener)
            try:
                await asyncio.wait_for(client.connect(str(path)), timeout=5)
            except (OSError, QMPError, TimeoutError) as exc:
                last = exc
                with contextlib.suppress(Exception):
                    await client.disconnect()
            else:
                return cls(client, listener)
            if time.monotonic() >= deadline:
                raise QemuError(f"cannot connect to QMP at {path}: {last}") from last
            await asyncio.sleep(0.05)

    @property
    def connected(self) -> bool:
        return self._client.runstate is Runstate.RUNNING

    async def execute(
        self, command: str, arguments: Mapping[str, object] | None = None, *, timeout: float = 30
    ) -> object:
        """Run one QMP command; qemu's error becomes a QemuError with its class and text."""
        try:
            return await asyncio.wait_for(
                self._client.execute(command, dict(arguments) if arguments else None),
                timeout=timeout,
            )
        except ExecuteError as exc:
            raise QemuError(f"{command}: {exc} ({exc.error_class})") from exc
        except (QMPError, OSError, TimeoutError) as exc:
            raise QemuError(f"{command}: QMP connection failed: {exc!r}") from exc

    async def add_fd(self, fd: int, opaque: str = "") -> int:
        """Hand qemu an open file (SCM_RIGHTS + ``add-fd``); returns the fdset id, so qemu
        opens ``/dev/fdset/ID``. qemu runs unprivileged (``-runas``) and cannot open the
        host files a running VM needs later (a CD inserted live) by itself."""
        try:
            self._client.send_fd_scm(fd)
        except (QMPError, OSError) as exc:
            raise QemuError(f"add-fd: cannot pass a file to qemu: {exc!r}") from exc
        result = await self.execute("add-fd", {"opaque": opaque} if opaque else None)
        fdset = result.get("fdset-id") if isinstance(result, dict) else None
        if not isinstance(fdset, int):
            raise QemuError(f"add-fd: unexpected answer {result!r}")
        return fdset

    async def query(self, command: str, arguments: Mapping[str, object] | None = None) -> object:
        return await self.execute(command, arguments)

    async def query_dict(self, command: str) -> JsonObject:
        result = await self.execute(command)
        if not isinstance(result, dict):
            raise QemuError(f"{command}: expected an object, got {result!r}")
        return cast(JsonObject, result)

    async def query_list(self, command: str) -> list[JsonObject]:
        result = await self.execute(command)
        if not isinstance(result, list):
            raise QemuError(f"{command}: expected a list, got {result!r}")
        return [cast(JsonObject, item) for item in result if isinstance(item, dict)]

    async def events(self) -> AsyncIterator[QmpEvent]:
        """Every event qemu sends, in order, until the connection ends."""
        while self.connected or not self._listener.empty():
            getter = asyncio.ensure_future(self._listener.get())
            state = asyncio.ensure_future(self._client.runstate_changed())
            try:
                done, _ = await asyncio.wait({getter, state}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                state.cancel()
                if not getter.done():
                    getter.cancel()
            if getter in done:
                yield cast(QmpEvent, getter.result())

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            self._client.remove_listener(self._listener)
        with contextlib.suppress(Exception):
            await self._client.disconnect()
