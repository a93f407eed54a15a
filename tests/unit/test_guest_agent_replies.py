"""What a guest agent says is checked and bounded (issue 9, item 11b).

The guest here is a fake: :class:`FakeGuestAgent` is a unix-socket server speaking the QEMU
guest agent's JSON protocol as qemu's virtio-serial chardev carries it (``guest-sync-delimited``
answered after a 0xFF byte, ``guest-sync``, ``guest-ping``, ``guest-get-vcpus``,
``guest-network-get-interfaces``, ``guest-exec``/``guest-exec-status``), answering from a
script: what a malicious guest's agent could send. The real :class:`GuestAgent` client and the
supervisor's real agent loop run against it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from corral.qemu.agent import (
    MAX_ADDRESSES,
    MAX_INTERFACES,
    AgentError,
    AgentReplyError,
    GuestAgent,
)
from corral.runner import watchers as watchers_module
from corral.runner.config import resolve_paths
from corral.runner.status import Condition
from corral.runner.supervisor import VmSupervisor
from corral.spec import HostPolicy, parse_document


def _reply(value: object) -> bytes:
    return json.dumps({"return": value}).encode() + b"\n"


def flood(interfaces: int = 100, per_interface: int = 200) -> bytes:
    """20k addresses in one reply (100 interfaces x 200), as the attack in issue 9 sent."""
    return _reply(
        [
            {
                "name": f"eth{i}",
                "hardware-address": "52:54:00:12:34:56",
                "ip-addresses": [
                    {"ip-address-type": "ipv4", "ip-address": f"10.{i}.{j // 256}.{j % 256}",
                     "prefix": 8}
                    for j in range(per_interface)
                ],
            }
            for i in range(interfaces)
        ]
    )  # fmt: skip


GOOD = _reply(
    [
        {"name": "lo", "ip-addresses": [{"ip-address": "127.0.0.1"}, {"ip-address": "::1"}]},
        {
            "name": "eth0",
            "hardware-address": "52:54:00:12:34:56",
            "ip-addresses": [
                {"ip-address-type": "ipv4", "ip-address": "10.0.2.15", "prefix": 24},
                {"ip-address-type": "ipv6", "ip-address": "fe80::5054:ff:fe12:3456", "prefix": 64},
                {"ip-address-type": "ipv6", "ip-address": "fd00::15", "prefix": 64},
            ],
        },
    ]
)
NOT_A_LIST = _reply({"eth0": "10.0.2.15"})
GARBAGE = b"\x00\x01this is not JSON at all{{{\n"
BAD_ADDRESS = _reply([{"name": "eth0", "ip-addresses": [{"ip-address": "10.0.0.999"}]}])
NOT_A_STRING = _reply([{"name": "eth0", "ip-addresses": [{"ip-address": ["10.0.0.1"] * 9}]}])
NAMELESS = _reply([{"name": 42, "ip-addresses": []}])
NESTED = b"[" * 100_000 + b"]" * 100_000 + b"\n"
NO_RETURN = json.dumps({"surprise": True}).encode() + b"\n"


class FakeGuestAgent:
    """A fake of the guest's agent (see the module docstring). ``interfaces`` are the raw
    lines it answers ``guest-network-get-interfaces`` with, in turn (the last one repeats);
    ``exec_status`` the line for ``guest-exec-status``."""

    def __init__(self, path: Path, interfaces: list[bytes], exec_status: bytes = b"") -> None:
        self.path = path
        self.interfaces = list(interfaces)
        self.exec_status = exec_status or _reply(
            {"exited": True, "exitcode": 0, "out-data": "aGk="}
        )
        self.commands: list[str] = []
        self._server: asyncio.AbstractServer | None = None
        self._sessions: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> FakeGuestAgent:
        self._server = await asyncio.start_unix_server(self._serve, path=str(self.path))
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()
        for session in self._sessions:
            session.cancel()
        await asyncio.gather(*self._sessions, return_exceptions=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        session = asyncio.current_task()
        assert session is not None
        self._sessions.add(session)
        try:
            while line := await reader.readline():
                message = json.loads(line.strip(b"\xff \r\n"))
                command = message["execute"]
                self.commands.append(command)
                args = message.get("arguments") or {}
                if command == "guest-sync-delimited":
                    writer.write(b"\xff" + _reply(args["id"]))
                elif command == "guest-sync":
                    writer.write(_reply(args["id"]))
                elif command == "guest-ping":
                    writer.write(_reply({}))
                elif command == "guest-get-vcpus":
                    writer.write(_reply([{"logical-id": 0, "online": True, "can-offline": False}]))
                elif command == "guest-network-get-interfaces":
                    answer = self.interfaces.pop(0) if len(self.interfaces) > 1 else None
                    writer.write(answer or self.interfaces[0])
                elif command == "guest-exec":
                    writer.write(_reply({"pid": 7}))
                elif command == "guest-exec-status":
                    writer.write(self.exec_status)
                else:
                    writer.write(json.dumps({"error": {"desc": f"no {command}"}}).encode() + b"\n")
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass
        finally:
            writer.close()
            self._sessions.discard(session)


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """Unix socket paths must stay below 108 bytes: pytest's tmp_path may be longer."""
    path = Path(tempfile.mkdtemp(prefix="cqga-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
async def agent(short_dir: Path) -> AsyncIterator[GuestAgent]:
    client = GuestAgent(short_dir / "qga.sock")
    try:
        yield client
    finally:
        await client.close()


async def test_twenty_thousand_addresses_are_cut_to_the_bounds(
    short_dir: Path, agent: GuestAgent
) -> None:
    async with FakeGuestAgent(short_dir / "qga.sock", [flood()]):
        interfaces = await agent.interfaces()
        ips = await agent.ips()
    assert len(interfaces) == MAX_INTERFACES
    assert all(len(i.addresses) == MAX_ADDRESSES for i in interfaces)
    assert len(ips) == MAX_INTERFACES * MAX_ADDRESSES == 256
    assert ips[:2] == ["10.0.0.0", "10.0.0.1"]


async def test_addresses_are_checked_and_loopback_and_link_local_left_out(
    short_dir: Path, agent: GuestAgent
) -> None:
    async with FakeGuestAgent(short_dir / "qga.sock", [GOOD]):
        assert await agent.ips() == ["10.0.2.15", "fd00::15"]


@pytest.mark.parametrize(
    ("reply", "says"),
    [
        (NOT_A_LIST, "expected list, got dict"),
        (GARBAGE, "not a JSON object"),
        (BAD_ADDRESS, "'10.0.0.999' is no IP address"),
        (NOT_A_STRING, "expected str, got list"),
        (NAMELESS, "name: expected str, got int"),
        (NESTED, "not a JSON object"),
        (NO_RETURN, "neither return nor error"),
    ],
    ids=["not-a-list", "garbage", "bad-address", "not-a-string", "nameless", "nested", "empty"],
)
async def test_a_malformed_reply_is_an_agent_reply_error_and_the_next_call_works(
    short_dir: Path, agent: GuestAgent, reply: bytes, says: str
) -> None:
    async with FakeGuestAgent(short_dir / "qga.sock", [reply, GOOD]):
        with pytest.raises(AgentReplyError, match=says) as err:
            await agent.ips()
        assert len(str(err.value)) < 300  # the guest's text is never quoted at length
        assert await agent.ips() == ["10.0.2.15", "fd00::15"]  # re-synced, lined up again


async def test_a_reply_over_the_reader_limit_is_an_agent_reply_error(
    short_dir: Path, agent: GuestAgent
) -> None:
    huge = b'{"return": "' + b"x" * (17 * 1024 * 1024) + b'"}\n'
    async with FakeGuestAgent(short_dir / "qga.sock", [huge, GOOD]):
        with pytest.raises(AgentReplyError, match="limit"):
            await agent.ips()
        assert await agent.ips() == ["10.0.2.15", "fd00::15"]


@pytest.mark.parametrize(
    ("status", "says"),
    [
        (_reply({"exited": True, "exitcode": 0, "out-data": "%%% not base64"}), "not base64"),
        (_reply({"exited": "yes"}), "exited: expected bool"),
        (_reply({"exited": True, "exitcode": "0"}), "exitcode: expected int"),
        (_reply(["not", "a", "dict"]), "expected dict"),
    ],
)
async def test_exec_replies_are_checked(
    short_dir: Path, agent: GuestAgent, status: bytes, says: str
) -> None:
    async with FakeGuestAgent(short_dir / "qga.sock", [GOOD], exec_status=status):
        with pytest.raises(AgentReplyError, match=says):
            await agent.exec(["/bin/true"])
    async with FakeGuestAgent(short_dir / "qga2.sock", [GOOD]):
        other = GuestAgent(short_dir / "qga2.sock")
        try:
            assert (await other.exec(["/bin/echo"])).stdout == b"hi"
        finally:
            await other.close()


def test_an_agent_reply_error_is_an_agent_error() -> None:
    """Callers that handle AgentError (the manager's exec, the runner's loop) handle it."""
    assert issubclass(AgentReplyError, AgentError)


@pytest.mark.slow
async def test_the_supervisor_agent_loop_survives_and_stores_only_the_bound(
    short_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The runner's own agent loop against the fake guest: 20k addresses, a non-list reply,
    garbage, a bad address, then a good answer. The loop lives through all of it, the status
    and the events hold at most the bound, and the refusals are one rate-limited event."""
    monkeypatch.setattr(watchers_module, "_AGENT_POLL", 0.0)  # poll addresses every round
    doc = parse_document({"metadata": {"name": "fake"}, "spec": {"vm": {"guestAgent": True}}})
    paths = resolve_paths(doc, data_dir=str(short_dir / "data"), runtime_dir=str(short_dir / "run"))
    (short_dir / "run").mkdir(mode=0o700)
    events: list[dict[str, Any]] = []
    sup = VmSupervisor(doc, paths, HostPolicy(), events=events.append)
    script = [flood(), NOT_A_LIST, GARBAGE, BAD_ADDRESS, NESTED, GOOD]
    async with FakeGuestAgent(sup.files.qga, script) as guest:
        sup._agent = GuestAgent(sup.files.qga)
        loop = asyncio.ensure_future(sup._agent_loop())
        seen: list[int] = []
        try:
            for _ in range(150):
                await asyncio.sleep(0.1)
                seen.append(len(sup.status.ips))
                if sup.status.ips == ["10.0.2.15", "fd00::15"]:
                    break
            assert not loop.done(), loop.exception() if loop.done() else None
        finally:
            loop.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await loop
            await sup._agent.close()
    assert guest.commands.count("guest-network-get-interfaces") >= len(script)
    assert sup.status.ips == ["10.0.2.15", "fd00::15"]
    assert max(seen) == 256  # the flood, cut to 16 x 16
    assert sup.status.condition(Condition.AGENT_CONNECTED)
    addresses = [e for e in events if e["event"] == "GuestAddresses"]
    assert [len(e["ips"]) for e in addresses] == [256, 2]
    assert all(len(json.dumps(e)) < 16 * 1024 for e in events)
    refused = [e for e in events if e["event"] == "GuestAgentReplyInvalid"]
    assert len(refused) == 1, refused  # rate-limited: one a minute
    assert "expected list" in refused[0]["error"]
    assert not any(e["event"] == "InternalError" for e in events)
    assert os.path.getsize(paths.status_file) < 16 * 1024
