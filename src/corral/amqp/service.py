"""The ``amqp`` daemon service: aetherscale's RabbitMQ protocol served by the manager, on
aio-pika's robust connection.

Topology (aetherscale's exchange and keys, so its clients work unchanged)::

    client ──publish(routing key = command)──► exchange "computing" (direct, durable)
        create-vm, create ─────────────► queue "computing-competing" (shared: one daemon each)
        start-vm, stop-vm, delete-vm, ─► queue "computing-vm-commands" (shared: the daemon
        get, patch, set-cd                taking one answers it if it owns the VM, else
                                          forwards it to exchange "computing-vms" as
                                          vm.<name>; returned unrouted: it answers 404)
        list-vms, <host>.<command> ────► queue "computing-host-<host>" (this daemon's), also
                                          bound to "computing-vms" as vm.<name> per VM it owns
    daemon ──reply(correlation_id)──► the request's reply_to (e.g. amq.rabbitmq.reply-to)

The ``vm.<name>`` bindings are the registry of owners on the bus: claimed before a create
writes the store (so a create redelivered to another host after its first died goes to the
first, not applied twice), released when the VM is gone.

Reliability: a message is acknowledged only after the manager has taken the command (it is in
the store), its reply recorded in the request log (:mod:`corral.amqp.requests`) and published
with a publisher confirm; a message the daemon dies holding is delivered again and answered
from the log, not applied twice. A bad message (not JSON, unknown command, missing option, too
big) gets an error reply and is acknowledged: it never stops the consumer or comes back. When
the broker goes away the connection is re-made every ``reconnectSeconds`` and the exchange,
queues, bindings and consumers restored; the daemon's other services never wait for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import ssl
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aio_pika
import aiormq
from aio_pika.abc import (
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustChannel,
    AbstractRobustConnection,
)
from yarl import URL

from corral.amqp.commands import Commands, create_name
from corral.amqp.protocol import (
    COMMANDS,
    MAX_BODY_BYTES,
    Request,
    error_reply,
    parse_request,
    success_reply,
)
from corral.amqp.requests import RequestLog, body_digest, request_key
from corral.errors import (
    CapacityError,
    Conflict,
    CorralError,
    FieldIssue,
    HostError,
    NotFound,
    SpecError,
    StoreUnavailable,
)
from corral.manager import Manager, ManagerConfig
from corral.manager.daemonlog import event_fields

__all__ = ["HOST_COMMANDS", "AmqpOptions", "amqp_service", "service_from_config"]

VM_COMMANDS = ("start-vm", "stop-vm", "delete-vm", "get", "patch", "set-cd")
"""The commands about one VM: published with the command as routing key they reach the shared
route queue, and the daemon taking one answers it if it owns the VM, else forwards it to the
owner through the VMs exchange (``vm.<name>``), else answers 404: one reply, from the owner."""
HOST_COMMANDS = ("list-vms", *VM_COMMANDS)
"""The commands a daemon takes on its own queue: ``list-vms`` (each daemon gets its copy) and
any of them addressed to it as ``<host>.<command>``."""
CREATE_COMMANDS = ("create-vm", "create")
"""The commands on the shared queue: one daemon takes each."""
ATTEMPTS_HEADER = "x-corral-create-attempt"
ID_HEADER = "x-corral-message-id"
"""On a request forwarded to the VM's owner: the message id it was published with (the copy
has its own, so two copies in flight never share a publisher-confirm slot)."""
OWN_QUEUE_ARGUMENTS: dict[str, Any] = {"x-message-ttl": 60_000, "x-expires": 86_400_000}

_log = logging.getLogger("corral.amqp")


def _event(event: str, level: int = logging.INFO, **fields: object) -> None:
    _log.log(level, event, extra={"fields": fields})


@dataclass(frozen=True)
class AmqpOptions:
    """The service's settings (camelCase keys in the daemon config's ``amqp:`` and in
    :func:`service_from_config`)."""

    url: str = field(repr=False)
    host: str = field(default_factory=socket.gethostname)
    exchange: str = "computing"
    create_queue: str = "computing-competing"
    host_queue: str | None = None  # default: computing-host-<host>
    prefetch: int = 8
    reconnect_seconds: float = 2.0
    max_body_bytes: int = MAX_BODY_BYTES
    ca_file: Path | None = None
    events_exchange: str | None = "corral.events"  # "" or None: no events published
    route_queue: str = "computing-vm-commands"  # per-VM commands, shared: one daemon routes each
    vms_exchange: str = "computing-vms"  # direct: each daemon's queue bound as vm.<name> it owns
    create_attempts: int = 3  # hosts a create without room is offered to, in all

    @property
    def own_queue(self) -> str:
        return self.host_queue or f"computing-host-{self.host}"

    def safe_url(self) -> str:
        """The URL without its password (for logs and errors)."""
        url = URL(self.url)
        return str(url.with_password("******")) if url.password else str(url)


_KEYS = {
    "url": "url", "urlFile": "url_file", "host": "host", "exchange": "exchange",
    "createQueue": "create_queue", "hostQueue": "host_queue", "prefetch": "prefetch",
    "reconnectSeconds": "reconnect_seconds", "maxBodyBytes": "max_body_bytes",
    "caFile": "ca_file", "eventsExchange": "events_exchange", "createAttempts": "create_attempts",
    "routeQueue": "route_queue", "vmsExchange": "vms_exchange",
}  # fmt: skip


def _issue(key: str, reason: str) -> SpecError:
    return SpecError("invalid AMQP service options", [FieldIssue(f"amqp.{key}", reason)])


def _read_url_file(path: Path) -> str:
    """The URL (with its credentials) from ``path``: the first non-empty line."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise _issue("urlFile", f"cannot read {path}: {exc.strerror}") from exc
    for line in text.splitlines():
        if line.strip():
            return line.strip()
    raise _issue("urlFile", f"{path} holds no URL")


def parse_options(options: Mapping[str, object]) -> AmqpOptions:
    """:class:`AmqpOptions` from camelCase ``options``; a SpecError at ``amqp.<key>`` for an
    unknown key or a bad value. Exactly one of ``url`` and ``urlFile`` (a file holding the URL
    with its credentials, kept out of the process list and the config) is required."""
    values: dict[str, Any] = {}
    for key, value in options.items():
        if key not in _KEYS:
            raise _issue(key, f"is not an option; one of {', '.join(sorted(_KEYS))}")
        if value is not None:
            values[_KEYS[key]] = value
    url_file = values.pop("url_file", None)
    if url_file is not None and "url" in values:
        raise _issue("url", "give url or urlFile, not both")
    if url_file is not None:
        values["url"] = _read_url_file(Path(str(url_file)))
    if "url" not in values:
        raise _issue("url", "the broker's URL is required (amqp://USER:PASS@HOST:PORT/VHOST)")
    url = str(values["url"])
    try:
        scheme = URL(url).scheme
    except ValueError as exc:
        raise _issue("url", f"not a URL: {exc}") from None
    if scheme not in ("amqp", "amqps"):
        raise _issue("url", "must be an amqp:// or amqps:// URL")
    for key in ("exchange", "create_queue", "host_queue", "host", "route_queue", "vms_exchange"):
        if key in values and (not isinstance(values[key], str) or not values[key]):
            camel = next(k for k, v in _KEYS.items() if v == key)
            raise _issue(camel, "must be a non-empty string")
    for key, low in (("prefetch", 1), ("max_body_bytes", 64), ("create_attempts", 1)):
        if key in values and (
            not isinstance(values[key], int) or isinstance(values[key], bool)
            or values[key] < low
        ):  # fmt: skip
            camel = next(k for k, v in _KEYS.items() if v == key)
            raise _issue(camel, f"must be an integer of at least {low}")
    if "reconnect_seconds" in values:
        seconds = values["reconnect_seconds"]
        if not isinstance(seconds, int | float) or isinstance(seconds, bool) or seconds <= 0:
            raise _issue("reconnectSeconds", "must be a number of seconds above 0")
        values["reconnect_seconds"] = float(seconds)
    if "events_exchange" in values and not isinstance(values["events_exchange"], str):
        raise _issue("eventsExchange", "must be an exchange name, or empty for no events")
    if "ca_file" in values:
        values["ca_file"] = Path(str(values["ca_file"]))
    values["url"] = url
    return AmqpOptions(**values)


def _report_failure(event: str) -> Callable[[asyncio.Future[None]], None]:
    """A done-callback logging ``event`` with the error of a background task that failed."""

    def done(task: asyncio.Future[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            _event(event, logging.ERROR, error=str(task.exception())[:300])

    return done


class Consumer:
    """One daemon's consumer: the connection, its two queues, the handling of each message."""

    def __init__(self, manager: Manager, options: AmqpOptions, requests: RequestLog) -> None:
        self.options = options
        self.manager = manager
        self.commands = Commands(manager, claim=self.claim, release=self.release)
        self._events: asyncio.Task[None] | None = None
        self.requests = requests
        self.connection: AbstractRobustConnection | None = None
        self.channel: AbstractRobustChannel | None = None
        self.consuming = asyncio.Event()
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._queues: list[tuple[AbstractQueue, str]] = []
        self._own: AbstractQueue | None = None
        self._vms: AbstractExchange | None = None
        self._owner: asyncio.Task[None] | None = None

    async def connect(self) -> None:
        """Connect (retrying every ``reconnectSeconds`` until the broker answers), declare
        the exchange, both queues and their bindings, and consume."""
        opts = self.options
        tls: dict[str, Any] = {}
        if opts.ca_file is not None:
            tls["ssl_context"] = ssl.create_default_context(cafile=str(opts.ca_file))
        url = URL(opts.url).update_query(reconnect_interval=opts.reconnect_seconds, fail_fast=0)
        # built here, not by connect_robust(): a daemon stopping while the broker is away
        # must be able to close it (its reconnect loop) before it ever connected
        self.connection = aio_pika.RobustConnection(
            url, client_properties={"connection_name": f"corral {opts.host}"}, **tls
        )
        await self.connection.connect()
        self.connection.reconnect_callbacks.add(self._reconnected)
        self.channel = await self.connection.channel(publisher_confirms=True)
        await self.channel.set_qos(prefetch_count=opts.prefetch)
        exchange = await self.channel.declare_exchange(
            opts.exchange, aio_pika.ExchangeType.DIRECT, durable=True
        )
        self._vms = await self.channel.declare_exchange(
            opts.vms_exchange, aio_pika.ExchangeType.DIRECT, durable=True
        )
        creates = await self.channel.declare_queue(opts.create_queue, durable=True)
        for command in CREATE_COMMANDS:
            await creates.bind(exchange, command)
        route = await self.channel.declare_queue(
            opts.route_queue, durable=True, arguments={"x-message-ttl": 60_000}
        )
        for command in VM_COMMANDS:
            await route.bind(exchange, command)
        # a host's own queue keeps a command a minute (a host that was down does not run a
        # week of old stops and deletes when it comes back) and is gone a day after its host
        # (and with it the bindings that say which VMs it owns)
        own = await self.channel.declare_queue(
            opts.own_queue, durable=True, arguments=OWN_QUEUE_ARGUMENTS
        )
        for command in VM_COMMANDS:  # bound by corral before 13's routing: every host answered
            await own.unbind(exchange, command)
        await own.bind(exchange, "list-vms")
        for command in HOST_COMMANDS:
            await own.bind(exchange, f"{opts.host}.{command}")
        self._own = own
        after = self._last_event_id()
        for record in self.manager.list_vms():
            await self.claim(record.name)
        self._owner = asyncio.ensure_future(self.follow_ownership(after))
        self._owner.add_done_callback(_report_failure("AmqpOwnershipFailed"))
        for queue in (creates, route, own):
            self._queues.append((queue, await queue.consume(self.on_message)))
        if opts.events_exchange:
            self._events = asyncio.ensure_future(self.forward_events(opts.events_exchange))
            self._events.add_done_callback(_report_failure("AmqpEventsFailed"))
        self.consuming.set()
        _event("AmqpConsuming", broker=opts.safe_url(), host=opts.host,
               queues=[opts.create_queue, opts.route_queue, opts.own_queue])  # fmt: skip

    def _last_event_id(self) -> int:
        after = 0
        while page := self.manager.events(None, after):
            after = page[-1].id
        return after

    async def claim(self, name: str) -> None:
        """Bind this host's queue to ``vm.<name>`` on the VMs exchange: the bus's record that
        this host owns (or is creating) VM ``name``, which routes its commands here."""
        if self._own is not None and self._vms is not None:
            await self._own.bind(self._vms, f"vm.{name}")

    async def release(self, name: str) -> None:
        """Undo :meth:`claim` once VM ``name`` is not (or no longer) in this host's store."""
        if self._own is not None and self._vms is not None:
            await self._own.unbind(self._vms, f"vm.{name}")

    async def follow_ownership(self, after: int) -> None:
        """Keep the claims in step with the store whoever changes it (REST, the CLI, this
        service): a VM created is claimed, one deleted released."""
        async for event in self.manager.follow(None, after):
            if event.vm is None or event.kind not in ("Created", "Deleted"):
                continue
            while True:
                try:
                    if self.manager.store.find(event.vm) is not None:
                        await self.claim(event.vm)
                    else:
                        await self.release(event.vm)
                    break
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # the broker is away: again once it is back
                    _event("AmqpOwnershipWaiting", logging.WARNING, error=str(exc)[:200])
                    await asyncio.sleep(self.options.reconnect_seconds)

    async def forward_events(self, name: str) -> None:
        """Publish every manager event to the topic exchange ``name`` with routing key
        ``<host>.<vm>.<event>`` (dots in the host become ``_``), persistent and confirmed, in
        order; the last one published is saved, so a restarted daemon goes on after it (its
        first start begins with the events that happen from then on)."""
        channel = self.channel_or_fail()
        exchange = await channel.declare_exchange(name, aio_pika.ExchangeType.TOPIC, durable=True)
        after = await self.requests.cursor("events")
        if after is None:
            after = self._last_event_id()
            await self.requests.set_cursor("events", after)
        host = self.options.host.replace(".", "_")
        async for event in self.manager.follow(None, after):
            if event.id == 0:
                continue  # ephemeral progress: not an event of the VM's history
            # without what a guest or qemu wrote (a console tail, qemu's stderr): any broker
            # user bound to the exchange reads these, as the daemon log keeps them out too
            body = {"id": event.id, "vm": event.vm, "time": event.ts, "event": event.kind,
                    **event_fields(event.data)}  # fmt: skip
            message = aio_pika.Message(
                json.dumps(body, default=str).encode(), content_type="application/json",
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT, type=event.kind,
                headers={"host": self.options.host},
            )  # fmt: skip
            key = f"{host}.{event.vm or '_'}.{event.kind}"
            while True:
                try:
                    await exchange.publish(message, routing_key=key, mandatory=False)
                    break
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # the broker is away: the same event, once it is back
                    _event("AmqpEventsWaiting", logging.WARNING, error=str(exc)[:200])
                    await asyncio.sleep(self.options.reconnect_seconds)
            await self.requests.set_cursor("events", event.id)

    def _reconnected(self, *_: object) -> None:
        _event("AmqpReconnected", broker=self.options.safe_url())

    async def close(self, grace: float = 10.0) -> None:
        """Stop consuming, let the messages in hand finish (up to ``grace`` seconds: one not
        acked by then is delivered again), close the connection."""
        for task in (self._events, self._owner):
            if task is not None:
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
        for queue, tag in self._queues:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(queue.cancel(tag), 5)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), grace)
        if self.connection is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.connection.close(), 10)

    async def on_message(self, message: AbstractIncomingMessage) -> None:
        self._in_flight += 1
        self._idle.clear()
        try:
            await self.handle(message)
        except Exception:  # the consumer must outlive any one message
            _event("AmqpMessageFailed", logging.ERROR, messageId=message.message_id,
                   redelivered=message.redelivered)  # fmt: skip
            _log.debug("handling failed", exc_info=True)
            # never left unacked (it would hold a prefetch slot for good): one more try,
            # then it is dropped; a message that fails twice would fail forever
            with contextlib.suppress(Exception):
                await message.reject(requeue=not message.redelivered)
        finally:
            self._in_flight -= 1
            if self._in_flight == 0:
                self._idle.set()

    async def handle(self, message: AbstractIncomingMessage) -> None:
        """Answer ``message`` (from the request log if it was answered before) or forward it
        to the host that owns its VM, then ack it; a reply or an ack lost to a broken
        connection leaves it to be delivered again."""
        host = self.options.host
        forwarded_id = (message.headers or {}).get(ID_HEADER)
        message_id = forwarded_id if isinstance(forwarded_id, str) else message.message_id
        key = request_key(message_id, message.correlation_id, message.reply_to)
        command = "?"
        try:
            request = parse_request(message.body, self.options.max_body_bytes)
        except CorralError as exc:
            reply = error_reply(exc, host)
            _event("AmqpRequestRefused", logging.WARNING, reason=str(exc)[:200])
        else:
            command = request.command
            digest = body_digest(message.body)
            recorded = await self.requests.get(key) if key is not None else None
            if recorded is not None and recorded[1] not in ("", digest):
                reply = error_reply(Conflict(
                    "this message id (or correlation id and reply queue) was already used for "
                    "another request: give each request its own id"), host)  # fmt: skip
                _event("AmqpRequestIdReused", logging.WARNING, command=command)
            elif recorded is not None:
                reply = recorded[0]
                _event("AmqpRequestReplayed", command=command, redelivered=message.redelivered)
            elif (misrouted := self._misrouted(message, request)) is not None:
                reply = error_reply(misrouted, host)
            else:
                try:
                    if await self._forward(message, request, key):
                        await message.ack()
                        return
                    reply, final = await self._run(request, key)
                except CapacityError as exc:
                    if await self._pass_on(message, exc):
                        return
                    reply, final = error_reply(exc, host), True
                except NotFound as exc:  # no host has the VM: this one says so, once
                    reply, final = error_reply(exc, host), True
                if key is not None and final and command not in ("list-vms", "get"):
                    await self.requests.put(key, command, reply, digest)
        if message.reply_to:
            try:
                await self.channel_or_fail().default_exchange.publish(
                    aio_pika.Message(
                        json.dumps(reply).encode(), content_type="application/json",
                        correlation_id=message.correlation_id,
                    ),
                    routing_key=message.reply_to,
                    mandatory=False,
                )  # fmt: skip
            except Exception as exc:
                _event("AmqpReplyLost", logging.WARNING, command=command, error=str(exc)[:200])
                if self.channel is None or self.channel.is_closed:
                    return  # not acked: it comes back and is answered from the log
        await message.ack()

    def _addressed_here(self, message: AbstractIncomingMessage) -> bool:
        """Whether ``message`` came to this host by name: through the VMs exchange (its
        owner's claim), as ``<host>.<command>``, or straight to its queue."""
        key = message.routing_key or ""
        return (
            message.exchange == self.options.vms_exchange
            or key.startswith(f"{self.options.host}.")
            or key == self.options.own_queue
        )

    def _misrouted(self, message: AbstractIncomingMessage, request: Request) -> SpecError | None:
        """A body that does not match the key it was routed by: a create sent as list-vms
        would reach every host, a stop sent as ``vm.web`` would stop another VM than ``web``."""
        key, command = message.routing_key or "", request.command
        if message.exchange == self.options.vms_exchange:
            if command in VM_COMMANDS and key != f"vm.{request.text('vm-id')}":
                return SpecError.single(
                    "options.vm-id", f"must be the VM the routing key {key[:80]!r} names"
                )
            return None
        if message.exchange != self.options.exchange:
            return None  # published straight to a queue
        host = f"{self.options.host}."
        wanted = key[len(host) :] if key.startswith(host) else key
        if wanted in COMMANDS and wanted != command:
            return SpecError.single("command", f"must be {wanted!r}, the message's routing key")
        return None

    async def _forward(
        self, message: AbstractIncomingMessage, request: Request, key: str | None
    ) -> bool:
        """Whether ``message`` went on to the host that owns its VM (which answers it). A
        per-VM command for a VM this host does not have goes to the host whose queue claims
        ``vm.<name>``; when none does, it is :class:`NotFound` here. A create whose name
        another host claims goes there (it answers as it did the first time, or 409): a create
        redelivered after its first host died is not applied by a second one."""
        if self._addressed_here(message):
            return False
        if request.command in VM_COMMANDS:
            name: str | None = request.text("vm-id")
        elif request.command in CREATE_COMMANDS:
            name = create_name(request, key)
        else:
            return False
        if name is None or self.manager.store.find(name) is not None:
            return False
        headers = dict(message.headers or {})
        if message.message_id and ID_HEADER not in headers:
            headers[ID_HEADER] = message.message_id
        copy = aio_pika.Message(
            message.body, headers=headers, content_type=message.content_type,
            correlation_id=message.correlation_id, reply_to=message.reply_to,
            delivery_mode=message.delivery_mode,
        )  # fmt: skip
        if self._vms is None:
            raise HostError("the AMQP channel is not open")
        result = await self._vms.publish(copy, routing_key=f"vm.{name}", mandatory=True)
        if isinstance(result, aiormq.spec.Basic.Ack):  # routed; a return is no Ack
            _event("AmqpForwarded", command=request.command, vm=name)
            return True
        if request.command in VM_COMMANDS:
            raise NotFound(f"VM {name!r} not found")
        return False

    async def _run(self, request: Request, key: str | None) -> tuple[dict[str, Any], bool]:
        """The reply to ``request``, and whether it is final (worth recording: not a store
        that could not be written, which changed nothing and may take a retry)."""
        host = self.options.host
        try:
            response = await self.commands.run(request, key)
        except CapacityError as exc:
            if request.command in CREATE_COMMANDS:
                raise  # another host may have room: handle() passes it on
            return error_reply(exc, host), True
        except StoreUnavailable as exc:
            return error_reply(exc, host), False
        except CorralError as exc:
            return error_reply(exc, host), True
        except Exception as exc:
            _log.exception("AmqpCommandFailed")
            error = CorralError(f"{request.command} failed: {type(exc).__name__}")
            return error_reply(error, host), False
        _event("AmqpRequest", command=request.command)
        return success_reply(response, host), True

    async def _pass_on(self, message: AbstractIncomingMessage, error: CapacityError) -> bool:
        """A create this host has no room for goes back to the shared queue for another host
        (a copy counting the attempts in a header, published with a confirm, then the original
        acked), at most ``createAttempts`` times in all; False once they are used up (then
        the capacity error is the answer)."""
        headers = dict(message.headers or {})
        raw = headers.get(ATTEMPTS_HEADER, 1)
        if not isinstance(raw, int) or isinstance(raw, bool):
            raw = 1
        # a publisher sets this header too: clamped, so no header makes a create bounce on
        attempts = min(max(raw, 1), self.options.create_attempts) + 1
        if attempts > self.options.create_attempts:
            return False
        headers[ATTEMPTS_HEADER] = attempts
        await asyncio.sleep(min(0.25 * attempts, 2.0))  # let a host with room take it first
        copy = aio_pika.Message(
            message.body, headers=headers, content_type=message.content_type,
            correlation_id=message.correlation_id, message_id=message.message_id,
            reply_to=message.reply_to, delivery_mode=message.delivery_mode,
        )  # fmt: skip
        await self.channel_or_fail().default_exchange.publish(
            copy, routing_key=self.options.create_queue, mandatory=False
        )
        await message.ack()
        _event("AmqpCreatePassedOn", attempt=attempts, reason=str(error)[:200])
        return True

    def channel_or_fail(self) -> AbstractRobustChannel:
        if self.channel is None:
            raise HostError("the AMQP channel is not open")
        return self.channel


Service = Callable[[Manager], AbstractAsyncContextManager[object]]


def amqp_service(options: AmqpOptions, state_dir: Path) -> Service:
    """A daemon service consuming aetherscale's queues for the manager (see the module)."""

    @contextlib.asynccontextmanager
    async def run(manager: Manager) -> AsyncIterator[object]:
        requests = RequestLog(state_dir / "amqp-requests.db")
        consumer = Consumer(manager, options, requests)
        connecting = asyncio.ensure_future(consumer.connect())
        connecting.add_done_callback(_report_failure("AmqpFailed"))
        try:
            yield consumer
        finally:
            if not connecting.done():
                connecting.cancel()
            with contextlib.suppress(BaseException):
                await connecting
            await consumer.close()
            requests.close()
            _event("AmqpStopped")

    return run


def service_from_config(config: ManagerConfig, options: Mapping[str, object]) -> Service:
    """The ``amqp`` entry of :data:`corral.services.SERVICES`: the daemon config's ``amqp:``
    section with ``options`` (flags: ``corral serve --amqp URL``) on top."""
    merged: dict[str, object] = dict(config.amqp or {})
    merged.update({k: v for k, v in options.items() if v is not None})
    if "url" in options and options["url"] is not None:
        merged.pop("urlFile", None)  # the flag wins over the config's file
    return amqp_service(parse_options(merged), config.state_dir)
