"""A client for the QEMU guest agent (qemu-ga) over qemu's virtio-serial chardev socket.

Written here rather than taken from ``qemu.qmp``: the agent speaks a different dialect
(no greeting, no capabilities negotiation, no ids, and a stream that may hold stale replies
from before the guest rebooted), which ``QMPClient`` refuses. The contract:

* :meth:`GuestAgent.sync` sends ``guest-sync-delimited`` with a fresh random id and discards
  everything up to the 0xFF delimiter and the matching reply: after it, replies line up.
* Any timeout or garbled reply marks the session out of sync; the next call syncs again.
* One command at a time (a lock): the agent has no ids to route replies by.
* Everything the guest answers is the guest's word: checked before use. A reply that is not
  what the protocol says (not JSON, wrong types, an address that does not parse, a line over
  the reader's limit) raises :class:`AgentReplyError` (the session is dropped and re-synced
  by the next call); lists are cut to bounds (:data:`MAX_INTERFACES` interfaces of
  :data:`MAX_ADDRESSES` addresses, :data:`MAX_VCPUS` vCPUs) and strings to lengths, so
  nothing a guest says grows the host's memory, status or store past them. Callers get
  :class:`AgentError` (or a subclass) and nothing else from a guest.

Errors::

    QemuError
     └── AgentError            no answer, the socket closed, or the agent reported an error
          └── AgentReplyError  an answer that is not what the protocol says
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import ipaddress
import json
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar, cast

from corral.errors import QemuError

__all__ = [
    "MAX_ADDRESSES",
    "MAX_INTERFACES",
    "MAX_VCPUS",
    "AgentError",
    "AgentReplyError",
    "ExecResult",
    "GuestAgent",
    "GuestInterface",
]

MAX_INTERFACES = 16
"""Interfaces taken from one ``guest-network-get-interfaces`` reply; the rest is ignored."""
MAX_ADDRESSES = 16
"""Addresses taken per interface; the rest is ignored."""
MAX_VCPUS = 4096
"""vCPUs taken from one ``guest-get-vcpus`` reply (qemu's x86 limit)."""
_MAX_NAME = 64  # interface names, MAC addresses (Linux names have 15 bytes)
_MAX_ADDRESS_TEXT = 64  # an IPv6 address with a scope id is shorter
_MAX_ERROR_TEXT = 200  # the agent's own error descriptions, quoted in ours

_T = TypeVar("_T")


class AgentError(QemuError):
    """The guest agent did not answer, or answered with an error."""


class AgentReplyError(AgentError):
    """The guest agent answered something the protocol does not allow (the guest's fault)."""


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def _expect(value: object, kind: type[_T], what: str) -> _T:
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise AgentReplyError(f"{what}: expected {kind.__name__}, got {type(value).__name__}")
    return value


def _b64(value: object, what: str) -> bytes:
    try:
        return base64.b64decode(_expect(value, str, what), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise AgentReplyError(f"{what}: not base64") from exc


def _address(value: object, what: str) -> str:
    """An address as the guest reported it, checked to be one; normalised, scope id dropped."""
    text = _expect(value, str, what)
    if len(text) > _MAX_ADDRESS_TEXT:
        raise AgentReplyError(f"{what}: {len(text)} characters is no IP address")
    try:
        return str(ipaddress.ip_address(text.partition("%")[0]))
    except ValueError as exc:
        raise AgentReplyError(f"{what}: {_clip(text, 40)!r} is no IP address") from exc


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

    async def _read_reply(self, deadline: float, *, strict: bool = False) -> dict[str, object]:
        """The next JSON object. Before a sync (not ``strict``) anything else is stale and
        skipped; after it, anything else is an :class:`AgentReplyError`. A line over the
        reader's limit raises ``ValueError``."""
        assert self._reader is not None
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            # asyncio.timeout, not wait_for: 3.11's wait_for drops a cancel that lands as the
            # read finishes, and a cancelled agent loop would go on forever
            async with asyncio.timeout(remaining):
                line = await self._reader.readline()
            if not line:
                raise AgentError("the guest agent socket closed")
            line = line.strip(b"\xff \r\n")
            if not line:
                continue
            try:
                reply = json.loads(line)
            except (ValueError, RecursionError):
                reply = None
            if isinstance(reply, dict):
                return cast(dict[str, object], reply)
            if strict:
                raise AgentReplyError(
                    f"not a JSON object ({len(line)} bytes: {_clip(repr(line[:40]), 60)})"
                )

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
            async with asyncio.timeout(remaining):  # see _read_reply
                chunk = await self._reader.readuntil(b"\xff")
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
        except ValueError as exc:  # a line, or stale data, over the reader's limit
            await self.close()
            raise AgentReplyError(f"guest-sync: {exc}") from exc

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
                reply = await self._read_reply(time.monotonic() + timeout, strict=True)
            except (TimeoutError, OSError, asyncio.IncompleteReadError) as exc:
                await self.close()
                raise AgentError(f"{command}: no answer from the guest agent") from exc
            except AgentReplyError as exc:
                await self.close()
                raise AgentReplyError(f"{command}: {exc}") from exc
            except ValueError as exc:  # LimitOverrunError's readline form
                await self.close()
                raise AgentReplyError(f"{command}: reply over the reader's limit") from exc
            if "error" in reply:
                err = reply["error"]
                desc = err.get("desc") if isinstance(err, dict) else err
                raise AgentError(f"{command}: {_clip(str(desc), _MAX_ERROR_TEXT)}")
            if "return" not in reply:
                raise AgentReplyError(f"{command}: a reply with neither return nor error")
            return reply["return"]

    async def ping(self, timeout: float = 5.0) -> None:
        await self.execute("guest-ping", timeout=timeout)

    async def interfaces(self) -> list[GuestInterface]:
        """The guest's interfaces: at most :data:`MAX_INTERFACES`, each with at most
        :data:`MAX_ADDRESSES` addresses, every one checked to be an IP address."""
        return _interfaces(await self.execute("guest-network-get-interfaces"))

    async def ips(self) -> list[str]:
        """The guest's addresses except loopback and IPv6 link-local ones (bounded as
        :meth:`interfaces` is)."""
        found: list[str] = []
        for iface in await self.interfaces():
            if iface.name == "lo":
                continue
            for text in iface.addresses:
                addr = ipaddress.ip_address(text)
                if addr.is_loopback or (addr.version == 6 and addr.is_link_local):
                    continue
                found.append(text)
        return found

    async def vcpus(self) -> list[dict[str, object]]:
        """``guest-get-vcpus``: at most :data:`MAX_VCPUS` entries, each with an int
        ``logical-id`` and bool ``online``/``can-offline`` (when given)."""
        what = "guest-get-vcpus"
        found: list[dict[str, object]] = []
        for item in _expect(await self.execute(what), list, what)[:MAX_VCPUS]:
            cpu = _expect(item, dict, what)
            entry: dict[str, object] = {
                "logical-id": _expect(cpu.get("logical-id"), int, f"{what} logical-id"),
                "online": _expect(cpu.get("online"), bool, f"{what} online"),
            }
            if "can-offline" in cpu:
                entry["can-offline"] = _expect(cpu["can-offline"], bool, f"{what} can-offline")
            found.append(entry)
        return found

    async def online_all_vcpus(self) -> int:
        """Bring every offline, hot-pluggable vCPU online; returns how many were changed."""
        offline = [
            {"logical-id": c["logical-id"], "online": True}
            for c in await self.vcpus()
            if not c["online"] and c.get("can-offline", True)
        ]
        if not offline:
            return 0
        done = await self.execute("guest-set-vcpus", {"vcpus": offline})
        return _expect(done, int, "guest-set-vcpus")

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
        started = _expect(await self.execute("guest-exec", args), dict, "guest-exec")
        pid = _expect(started.get("pid"), int, "guest-exec pid")
        deadline = time.monotonic() + timeout
        delay = 0.02
        while True:
            what = "guest-exec-status"
            status = _expect(await self.execute(what, {"pid": pid}), dict, what)
            if _expect(status.get("exited"), bool, f"{what} exited"):
                code, sig = status.get("exitcode"), status.get("signal")
                return ExecResult(
                    exit_code=None if code is None else _expect(code, int, f"{what} exitcode"),
                    signal=None if sig is None else _expect(sig, int, f"{what} signal"),
                    stdout=_b64(status.get("out-data", ""), f"{what} out-data"),
                    stderr=_b64(status.get("err-data", ""), f"{what} err-data"),
                    truncated=bool(status.get("out-truncated") or status.get("err-truncated")),
                )
            if time.monotonic() > deadline:
                raise AgentError(f"exec {argv[0]}: still running after {timeout:g}s")
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.5)

    async def read_file(self, path: str, *, limit: int = 16 * 1024 * 1024) -> bytes:
        """Read a whole file from the guest (``guest-file-open/read/close``)."""
        what = "guest-file-read"
        handle = _expect(
            await self.execute("guest-file-open", {"path": path, "mode": "r"}),
            int,
            "guest-file-open",
        )
        data = bytearray()
        try:
            while len(data) < limit:
                count = min(65536, limit - len(data))
                args = {"handle": handle, "count": count}
                chunk = _expect(await self.execute(what, args), dict, what)
                data += _b64(chunk.get("buf-b64", ""), f"{what} buf-b64")[:count]
                if chunk.get("eof"):
                    break
        finally:
            with contextlib.suppress(AgentError):
                await self.execute("guest-file-close", {"handle": handle})
        return bytes(data)


def _interfaces(result: object) -> list[GuestInterface]:
    """A ``guest-network-get-interfaces`` reply, checked and cut to bounds."""
    what = "guest-network-get-interfaces"
    found: list[GuestInterface] = []
    for item in _expect(result, list, what)[:MAX_INTERFACES]:
        iface = _expect(item, dict, f"{what} entry")
        name = _expect(iface.get("name"), str, f"{what} name")
        mac = iface.get("hardware-address")
        if mac is not None:
            mac = _clip(_expect(mac, str, f"{what} hardware-address"), _MAX_NAME)
        listed = _expect(iface.get("ip-addresses") or [], list, f"{what} ip-addresses")
        addresses = tuple(
            _address(_expect(a, dict, f"{what} address").get("ip-address"), what)
            for a in listed[:MAX_ADDRESSES]
        )
        found.append(GuestInterface(_clip(name, _MAX_NAME), mac, addresses))
    return found
