"""A client for the QEMU guest agent (qemu-ga) over qemu's virtio-serial chardev socket.

Written here rather than taken from ``qemu.qmp``: the agent speaks a different dialect
(no greeting, no capabilities negotiation, no ids, and a stream that may hold stale replies
from before the guest rebooted), which ``QMPClient`` refuses. The contract:

* :meth:`GuestAgent.sync` sends ``guest-sync-delimited`` with a fresh random id and discards
  everything up to the 0xFF delimiter and the matching reply: after it, replies line up.
* Any timeout or garbled reply marks the session out of sync; the next call syncs again.
* One command at a time (a lock): the agent has no ids to route replies by.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

from corral.errors import QemuError

__all__ = ["AgentError", "ExecResult", "GuestAgent", "GuestInterface"]


class AgentError(QemuError):
    """The guest agent did not answer, or answered with an error."""


@dataclass(frozen=True)
class ExecResult:
    exit_code: int | None
    signal: int | None
    stdout: bytes
    stderr: bytes
    truncated: bool = False


@dataclass(frozen=True)
class GuestInterface:
    name: str
    mac: str | None
    addresses: tuple[str, ...] = field(default_factory=tuple)


class GuestAgent:
    def __init__(self, path: Path | str) -> None:
        self.path = str(path)
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._synced = False
        self._lock = asyncio.Lock()

    async def _open(self) -> None:
        if self._writer is None or self._writer.is_closing():
            try:
                self._reader, self._writer = await asyncio.open_unix_connection(
                    self.path, limit=16 * 1024 * 1024
                )
            except OSError as exc:
                raise AgentError(f"cannot connect to the guest agent socket: {exc}") from exc
            self._synced = False

    async def close(self) -> None:
        writer, self._writer, self._reader = self._writer, None, None
        self._synced = False
        if writer is not None:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _send(self, message: Mapping[str, object]) -> None:
        assert self._writer is not None
        self._writer.write(json.dumps(message).encode() + b"\n")
        await self._writer.drain()

    async def _read_reply(self, deadline: float) -> dict[str, object]:
        assert self._reader is not None
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            line = await asyncio.wait_for(self._reader.readline(), remaining)
            if not line:
                raise AgentError("the guest agent socket closed")
            line = line.strip(b"\xff \r\n")
            if not line:
                continue
            try:
                reply = json.loads(line)
            except ValueError:
                continue
            if isinstance(reply, dict):
                return cast(dict[str, object], reply)

    async def _sync(self, timeout: float) -> None:
        assert self._reader is not None
        token = random.randint(1, 2**31 - 1)  # noqa: S311 - a sync id, not a secret
        deadline = time.monotonic() + timeout
        await self._send({"execute": "guest-sync-delimited", "arguments": {"id": token}})
        # Everything before the delimiter is stale; the reply follows it.
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            chunk = await asyncio.wait_for(self._reader.readuntil(b"\xff"), remaining)
            del chunk
            reply = await self._read_reply(deadline)
            if reply.get("return") == token:
                self._synced = True
                return

    async def sync(self, timeout: float = 5.0) -> None:
        async with self._lock:
            await self._ensure_synced(timeout)

    async def _ensure_synced(self, timeout: float) -> None:
        await self._open()
        if self._synced:
            return
        try:
            await self._sync(timeout)
        except (TimeoutError, asyncio.IncompleteReadError, OSError) as exc:
            await self.close()
            raise AgentError(f"the guest agent did not answer within {timeout:g}s") from exc

    async def execute(
        self,
        command: str,
        arguments: Mapping[str, object] | None = None,
        *,
        timeout: float = 10.0,
    ) -> object:
        """Run one agent command (syncing first when needed) and return its ``return``."""
        async with self._lock:
            await self._ensure_synced(timeout)
            message: dict[str, object] = {"execute": command}
            if arguments:
                message["arguments"] = dict(arguments)
            try:
                await self._send(message)
                reply = await self._read_reply(time.monotonic() + timeout)
            except (TimeoutError, OSError, asyncio.IncompleteReadError) as exc:
                await self.close()
                raise AgentError(f"{command}: no answer from the guest agent") from exc
            if "error" in reply:
                err = reply["error"]
                desc = err.get("desc") if isinstance(err, dict) else err
                raise AgentError(f"{command}: {desc}")
            return reply.get("return")

    async def ping(self, timeout: float = 5.0) -> None:
        await self.execute("guest-ping", timeout=timeout)

    async def interfaces(self) -> list[GuestInterface]:
        result = await self.execute("guest-network-get-interfaces")
        found: list[GuestInterface] = []
        for item in cast(list[dict[str, object]], result or []):
            addrs = cast(list[dict[str, object]], item.get("ip-addresses") or [])
            found.append(
                GuestInterface(
                    name=str(item.get("name")),
                    mac=cast(str | None, item.get("hardware-address")),
                    addresses=tuple(str(a.get("ip-address")) for a in addrs),
                )
            )
        return found

    async def ips(self) -> list[str]:
        """The guest's addresses except loopback and IPv6 link-local ones."""
        return [
            a
            for iface in await self.interfaces()
            if iface.name != "lo"
            for a in iface.addresses
            if not a.startswith(("127.", "::1", "fe80:"))
        ]

    async def vcpus(self) -> list[dict[str, object]]:
        return cast(list[dict[str, object]], await self.execute("guest-get-vcpus"))

    async def online_all_vcpus(self) -> int:
        """Bring every offline, hot-pluggable vCPU online; returns how many were changed."""
        offline = [
            {"logical-id": c["logical-id"], "online": True}
            for c in await self.vcpus()
            if not c.get("online") and c.get("can-offline", True)
        ]
        if not offline:
            return 0
        return int(cast(int, await self.execute("guest-set-vcpus", {"vcpus": offline})))

    async def exec(
        self,
        argv: Sequence[str],
        *,
        stdin: bytes | None = None,
        timeout: float = 60.0,
        env: Sequence[str] | None = None,
    ) -> ExecResult:
        """Run a program in the guest (``guest-exec``) and wait for its exit status."""
        if not argv:
            raise AgentError("exec: no command given")
        args: dict[str, object] = {
            "path": argv[0],
            "arg": list(argv[1:]),
            "capture-output": True,
        }
        if stdin is not None:
            args["input-data"] = base64.b64encode(stdin).decode()
        if env:
            args["env"] = list(env)
        started = cast(dict[str, object], await self.execute("guest-exec", args))
        pid = started["pid"]
        deadline = time.monotonic() + timeout
        delay = 0.02
        while True:
            status = cast(dict[str, object], await self.execute("guest-exec-status", {"pid": pid}))
            if status.get("exited"):
                return ExecResult(
                    exit_code=cast(int | None, status.get("exitcode")),
                    signal=cast(int | None, status.get("signal")),
                    stdout=base64.b64decode(cast(str, status.get("out-data", ""))),
                    stderr=base64.b64decode(cast(str, status.get("err-data", ""))),
                    truncated=bool(status.get("out-truncated") or status.get("err-truncated")),
                )
            if time.monotonic() > deadline:
                raise AgentError(f"exec {argv[0]}: still running after {timeout:g}s")
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.5)

    async def read_file(self, path: str, *, limit: int = 16 * 1024 * 1024) -> bytes:
        """Read a whole file from the guest (``guest-file-open/read/close``)."""
        handle = await self.execute("guest-file-open", {"path": path, "mode": "r"})
        data = bytearray()
        try:
            while len(data) < limit:
                chunk = cast(
                    dict[str, object],
                    await self.execute("guest-file-read", {"handle": handle, "count": 65536}),
                )
                data += base64.b64decode(cast(str, chunk.get("buf-b64", "")))
                if chunk.get("eof"):
                    break
        finally:
            with contextlib.suppress(AgentError):
                await self.execute("guest-file-close", {"handle": handle})
        return bytes(data)
