"""The message API against a real RabbitMQ broker (tests/e2e/broker.py) and a real daemon
(``corral serve --amqp URL``): aetherscale's client messages, published with pika exactly as
aetherscale's client publishes them (blocking pika, the direct reply-to queue, JSON bodies to
the ``computing`` exchange with the command as routing key), answered in its envelope; real
qemu started, killed and deleted by message (a blank disk image, as aetherscale's
``create-vm`` boots) and the tiny guest booted and powered down by message; corral's own
commands and its events on ``corral.events``; poison messages; a request delivered twice
applied once; a daemon killed holding unacked creates; a broker restart, idle and mid-stream;
the round trip against the REST API's; two daemons sharing creates, passing on what one has no
room for; a daemon on amqps with its URL in a file."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pika
import pytest
import yaml
from pika.adapters.blocking_connection import BlockingChannel

from corral.spec.aetherscale import create_document
from tests.e2e.broker import Broker, rabbitmq
from tests.e2e.test_api_cli import Stack, _env
from tests.integration.test_manager import qemu_pids, tiny
from tests.integration.test_supervisor import _iso

__all__ = ["rabbitmq"]  # the broker fixture, used by this module's fixtures

pytestmark = [pytest.mark.integration, pytest.mark.slow]

HOST = "h1"
FIGURES = Path("/tmp/corral-amqp-figures.txt")  # the figures measured, for docs/benchmarks.md


class AmqpStack(Stack):
    """The e2e daemon (unix socket + TCP API, tests/e2e/test_api_cli.py's) with the message
    API on ``broker`` (``--amqp URL``, the rest from the config's ``amqp:``)."""

    def __init__(self, root: Path, broker: Broker, host: str = HOST, **config: Any) -> None:
        super().__init__(root)
        self.broker = broker
        self.host = host
        amqp = {"host": host, "reconnectSeconds": 0.5, "maxBodyBytes": 65536}
        (root / "corral.yaml").write_text(yaml.safe_dump({"amqp": amqp, **config}))
        self.token = self.ok("token", "create", "ci", "--file", str(self.tokens)).strip()

    def import_blank(self, name: str) -> None:
        """A 1 MiB blank base image ``name`` in the daemon's image store (what creates use)."""
        base = self.root / f"{name}.raw"
        base.write_bytes(b"\0" * 2**20)
        self.ok("image", "import", name, str(base), "--no-progress")

    def start(self) -> None:
        consuming = self.full_log().count("AmqpConsuming")
        with (self.root / "daemon.log").open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "corral.cli.main", "serve", "--state-dir",
                 str(self.root / "state"), "--accel", "tcg", "--resync", "1",
                 "--config", str(self.root / "corral.yaml"),
                 "--policy", str(self.root / "host.yaml"), "--socket", str(self.sock),
                 "--open-policy", "--listen", f"127.0.0.1:{self.port}",
                 "--tokens", str(self.tokens), "--amqp", self.broker.url],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=_env(self.sock),
                start_new_session=True,
            )  # fmt: skip
        proc = self.proc
        self.wait(lambda: proc.poll() is not None
                  or self.full_log().count("AmqpConsuming") > consuming, 60,
                  "the daemon consuming")  # fmt: skip
        assert proc.poll() is None, self.log()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)

    def full_log(self) -> str:
        try:
            return (self.root / "daemon.log").read_text(errors="replace")
        except OSError:
            return ""


def kill_qemus_under(root: Path) -> None:
    """SIGKILL every qemu whose command line names a path under ``root`` (the VMs this
    module's daemon started, whatever their generated names)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if b"qemu-system" in argv.split(b"\0")[0] and str(root).encode() in argv:
            os.kill(int(entry.name), signal.SIGKILL)


class AetherscaleClient:
    """aetherscale's ``ServerCommunication``: a blocking pika connection consuming the direct
    reply-to pseudo-queue, publishing ``json.dumps(data).encode('utf-8')`` to the
    ``computing`` exchange with the command as routing key. Unlike aetherscale's (which waits
    5 s for every host's answer) it stops waiting once ``expect`` replies are in."""

    def __init__(self, url: str) -> None:
        self.connection = pika.BlockingConnection(pika.URLParameters(url))
        self.channel: BlockingChannel = self.connection.channel()
        self.replies: list[tuple[Any, dict[str, Any]]] = []
        self.channel.basic_consume(
            queue="amq.rabbitmq.reply-to", on_message_callback=self._on_response, auto_ack=True
        )

    def _on_response(self, ch: Any, method: Any, properties: Any, body: bytes) -> None:
        self.replies.append((properties, json.loads(body)))

    def publish(self, data: object, *, routing_key: str | None = None, raw: bytes | None = None,
                reply: bool = True, exchange: str = "computing", **props: Any) -> None:  # fmt: skip
        key = routing_key or (data["command"] if isinstance(data, dict) else "list-vms")
        self.channel.basic_publish(
            exchange=exchange,
            routing_key=key,
            properties=pika.BasicProperties(
                reply_to="amq.rabbitmq.reply-to" if reply else None,
                content_type="application/json", **props,
            ),
            body=raw if raw is not None else json.dumps(data).encode("utf-8"),
        )  # fmt: skip

    def collect(self, expect: int = 1, timeout: float = 60) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while len(self.replies) < expect and time.monotonic() < deadline:
            self.connection.process_data_events(time_limit=0.05)
        got, self.replies = self.replies, []
        assert len(got) >= expect, f"{len(got)} of {expect} replies within {timeout}s"
        return [body for _, body in got]

    def gather(self, quiet: float) -> list[dict[str, Any]]:
        """Every reply that arrives until none has for ``quiet`` seconds (aetherscale's
        client takes all it gets within 5 s)."""
        deadline = time.monotonic() + quiet
        while time.monotonic() < deadline:
            seen = len(self.replies)
            self.connection.process_data_events(time_limit=0.05)
            if len(self.replies) > seen:
                deadline = time.monotonic() + quiet
        got, self.replies = self.replies, []
        return [body for _, body in got]

    def send_msg(self, data: dict[str, Any], timeout: float = 60, **props: Any) -> dict[str, Any]:
        self.publish(data, **props)
        (reply,) = self.collect(1, timeout)
        return reply

    def close(self) -> None:
        self.connection.close()


def ok(reply: dict[str, Any], host: str = HOST) -> Any:
    assert reply["execution-info"]["status"] == "success", reply
    assert reply["execution-info"]["host"] == host
    return reply["response"]


def refused(reply: dict[str, Any]) -> dict[str, Any]:
    info: dict[str, Any] = reply["execution-info"]
    assert info["status"] == "error" and "response" not in reply, reply
    assert info["reason"] and info["problem"]["status"] >= 400
    return info


def queue_depth(broker: Broker, queue: str) -> int:
    connection = pika.BlockingConnection(pika.URLParameters(broker.url))
    try:
        declared = connection.channel().queue_declare(queue=queue, passive=True)
        return int(declared.method.message_count)
    finally:
        connection.close()


@contextlib.contextmanager
def running(broker: Broker, host: str = HOST, **config: Any) -> Iterator[AmqpStack]:
    root = Path(os.path.realpath("/tmp")) / f"cq-{os.getpid()}-{time.monotonic_ns() % 10**8}"
    root.mkdir()
    s = AmqpStack(root, broker, host, **config)
    try:
        s.start()
        yield s
    finally:
        s.stop()
        kill_qemus_under(root)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def stack(rabbitmq: Broker, tiny_guest: Any) -> Iterator[AmqpStack]:
    with running(rabbitmq) as s:
        yield s


@pytest.fixture
def client(rabbitmq: Broker, stack: AmqpStack) -> Iterator[AetherscaleClient]:
    c = AetherscaleClient(rabbitmq.url)
    try:
        yield c
    finally:
        c.close()


def states(client: AetherscaleClient) -> dict[str, str]:
    return {vm["vm-id"]: vm["state"] for vm in ok(client.send_msg({"command": "list-vms"}))}


def wait_state(stack: AmqpStack, client: AetherscaleClient, name: str, state: str,
               timeout: float = 120) -> None:  # fmt: skip
    stack.wait(lambda: states(client).get(name) == state, timeout, f"{name} {state}")


def test_aetherscale_round_trip_runs_real_qemu(stack: AmqpStack, client: AetherscaleClient) -> None:
    stack.import_blank("blank")
    assert ok(client.send_msg({"command": "list-vms"})) == []

    created = ok(client.send_msg({"command": "create-vm", "options": {"image": "blank"}}))
    assert created["status"] == "starting" and set(created) == {"status", "vm-id"}
    name = created["vm-id"]
    wait_state(stack, client, name, "Running")
    assert len(qemu_pids(name)) == 1
    again = ok(client.send_msg({"command": "start-vm", "options": {"vm-id": name}}))
    assert again == {
        "status": "starting",
        "vm-id": name,
        "hint": f'VM "{name}" was already started',
    }

    killed = ok(client.send_msg({"command": "stop-vm", "options": {"vm-id": name, "kill": True}}))
    assert killed == {"status": "killed", "vm-id": name}
    wait_state(stack, client, name, "Stopped")
    assert qemu_pids(name) == []
    assert stack.vm(name)["status"]["stoppedBy"] == "kill"
    stopped = ok(client.send_msg({"command": "stop-vm", "options": {"vm-id": name}}))
    assert stopped == {"status": "stopped", "vm-id": name, "hint": f'VM "{name}" was not running'}

    assert ok(client.send_msg({"command": "start-vm", "options": {"vm-id": name}})) == {
        "status": "starting", "vm-id": name}  # fmt: skip
    wait_state(stack, client, name, "Running")
    disk_dir = stack.root / "state" / "vms" / name
    assert disk_dir.is_dir()
    deleted = ok(client.send_msg({"command": "delete-vm", "options": {"vm-id": name}}))
    assert deleted == {"status": "deleted", "vm-id": name}
    assert qemu_pids(name) == [] and not disk_dir.exists()  # its disk goes, as aetherscale's
    assert ok(client.send_msg({"command": "list-vms"})) == []
    info = refused(client.send_msg({"command": "start-vm", "options": {"vm-id": name}}))
    assert info["problem"]["status"] == 404 and info["reason"] == f"VM {name!r} not found"
    stack.ok("image", "delete", "blank")


def test_tiny_guest_booted_and_powered_down_by_message(
    stack: AmqpStack, client: AetherscaleClient, tiny_guest: Any
) -> None:
    doc = tiny(tiny_guest, "amqp-tiny", state="Stopped",
               disks=[{"name": "cd0", "cdrom": {"image": ""}}])  # fmt: skip
    (stack.root / "amqp-tiny.yaml").write_text(yaml.safe_dump(doc))
    stack.ok("apply", "-f", str(stack.root / "amqp-tiny.yaml"))
    assert states(client) == {"amqp-tiny": "Stopped"}
    assert ok(client.send_msg({"command": "start-vm", "options": {"vm-id": "amqp-tiny"}})) == {
        "status": "starting", "vm-id": "amqp-tiny"}  # fmt: skip
    stack.wait(lambda: stack.vm("amqp-tiny")["status"]["conditions"].get("Booted", {})
               .get("status") is True, 180, "the tiny guest booted")  # fmt: skip
    assert stack.guest("amqp-tiny", "echo $((6*7))") == "42"  # the guest itself answers

    # set-cd: the disc goes into the running guest's drive, then out again
    iso = _iso(stack.root / "amqp.iso", "amqp disc")
    read = "mount -t iso9660 -o ro /dev/sr0 /mnt 2>/dev/null && cat /mnt/hello.txt; umount /mnt"
    put = ok(client.send_msg({"command": "set-cd",
                              "options": {"vm-id": "amqp-tiny", "image": str(iso)}}))  # fmt: skip
    assert (put["drive"], put["image"]) == ("cd0", str(iso))
    stack.wait(lambda: stack.guest("amqp-tiny", f"{read} 2>/dev/null; true") == "amqp disc",
               60, "the guest reads the disc")  # fmt: skip
    out = ok(
        client.send_msg({"command": "set-cd", "options": {"vm-id": "amqp-tiny", "image": None}})
    )
    assert out["image"] is None and out["vm"]["spec"]["vm"]["disks"][0]["cdrom"]["image"] == ""
    stack.wait(lambda: stack.guest("amqp-tiny", f"{read} 2>/dev/null; true") == "", 60,
               "the disc ejected in the guest")  # fmt: skip
    assert ok(client.send_msg({"command": "stop-vm", "options": {"vm-id": "amqp-tiny"}})) == {
        "status": "stopped", "vm-id": "amqp-tiny"}  # fmt: skip
    wait_state(stack, client, "amqp-tiny", "Stopped", 120)
    assert stack.vm("amqp-tiny")["status"]["stoppedBy"] == "powerdown"  # ACPI, not a kill
    assert ok(client.send_msg({"command": "delete-vm", "options": {"vm-id": "amqp-tiny"}}))[
        "status"] == "deleted"  # fmt: skip
    assert states(client) == {}


def test_corrals_own_commands_and_events_on_the_topic_exchange(
    stack: AmqpStack, client: AetherscaleClient, rabbitmq: Broker, tiny_guest: Any
) -> None:
    """``create`` with a whole document, ``get``, ``patch`` (errors with REST's field paths),
    and the manager's events on ``corral.events`` as ``<host>.<vm>.<event>``."""
    events: list[tuple[str, dict[str, Any]]] = []
    listener = pika.BlockingConnection(pika.URLParameters(rabbitmq.url))
    try:
        channel = listener.channel()
        queue = channel.queue_declare(queue="", exclusive=True).method.queue
        channel.queue_bind(queue=queue, exchange="corral.events", routing_key=f"{HOST}.doc-vm.*")
        channel.basic_consume(
            queue=queue, auto_ack=True,
            on_message_callback=lambda ch, m, p, b: events.append((m.routing_key, json.loads(b))),
        )  # fmt: skip
        doc = tiny(tiny_guest, "doc-vm", state="Stopped")
        created = ok(client.send_msg({"command": "create", "options": {"document": doc}}))
        assert created["metadata"]["name"] == "doc-vm" and created["metadata"]["generation"] == 1
        patch = {"spec": {"vm": {"currentCpus": 2}}}
        patched = ok(client.send_msg({"command": "patch",
                                      "options": {"vm-id": "doc-vm", "patch": patch}}))  # fmt: skip
        assert patched["metadata"]["generation"] == 2
        got = ok(client.send_msg({"command": "get", "options": {"vm-id": "doc-vm"}}))
        assert got["spec"]["vm"]["currentCpus"] == 2 and got["status"]["state"] == "Stopped"
        bad = {"metadata": {"name": "Bad_Name"}, "spec": {"vm": {"maximumCpus": 0}}}
        info = refused(client.send_msg({"command": "create", "options": {"document": bad}}))
        assert info["problem"]["status"] == 422
        assert {"metadata.name", "spec.vm.maximumCpus"} <= {
            e["loc"] for e in info["problem"]["errors"]}  # fmt: skip
        deadline = time.monotonic() + 30
        while len(events) < 2 and time.monotonic() < deadline:
            listener.process_data_events(time_limit=0.1)
    finally:
        listener.close()
    keys = [key for key, _ in events]
    assert keys[:2] == [f"{HOST}.doc-vm.Created", f"{HOST}.doc-vm.SpecChanged"], keys
    assert events[0][1]["vm"] == "doc-vm" and events[0][1]["event"] == "Created"
    ok(client.send_msg({"command": "delete-vm", "options": {"vm-id": "doc-vm"}}))


def test_poison_messages_get_an_error_reply_and_are_acked(
    stack: AmqpStack, client: AetherscaleClient, rabbitmq: Broker
) -> None:
    poison: list[tuple[str, bytes, str, int]] = [
        ("list-vms", b"{not json", "", 422),
        ("list-vms", b"\xff\xfe\x00", "", 422),
        ("list-vms", b'["list-vms"]', "", 422),
        ("start-vm", b'{"command": "reboot-host"}', "command", 422),
        ("start-vm", b'{"command": "start-vm"}', "options.vm-id", 422),
        ("stop-vm", b'{"command": "stop-vm", "options": {"vm-id": 5}}', "options.vm-id", 422),
        ("set-cd", b'{"command": "set-cd", "options": {"vm-id": "x"}}', "options.image", 422),
        ("create-vm", b'{"command": "create-vm", "options": {}}', "options.image", 422),
        ("create-vm", b'{"command": "create-vm", "options": {"image": "../etc"}}',
         "options.image", 422),
        ("create-vm", json.dumps({"command": "create-vm", "options": {"image": "x" * 70000}})
         .encode(), "", 413),
        # 2 KB of nesting: once a RecursionError left it unacked, holding a prefetch slot
        ("list-vms", b'{"command": "list-vms", "options": {"a": ' + b"[" * 1000 + b"]" * 1000
         + b"}}", "", 422),
        # a create sent with list-vms' routing key would reach every host's own queue
        ("list-vms", b'{"command": "create-vm", "options": {"image": "nope"}}', "command", 422),
        ("stop-vm", json.dumps({"command": "stop-vm", "options": {"vm-id": "v" * 5000}})
         .encode(), "options.vm-id", 422),
    ]  # fmt: skip
    for key, raw, loc, status in poison:
        client.publish(None, routing_key=key, raw=raw)
        info = refused(client.collect(1)[0])
        assert info["problem"]["status"] == status, (raw[:60], info)
        assert [e["loc"] for e in info["problem"].get("errors", [])] == [loc], (raw[:60], info)
    client.publish(None, routing_key="start-vm", raw=b"garbage", reply=False)  # no one to tell
    assert ok(client.send_msg({"command": "list-vms"})) == []  # the consumer is still there
    assert queue_depth(rabbitmq, f"computing-host-{HOST}") == 0  # every one acked
    assert queue_depth(rabbitmq, "computing-competing") == 0
    assert queue_depth(rabbitmq, "computing-vm-commands") == 0
    assert "Traceback" not in stack.full_log()


def test_a_body_over_the_brokers_max_message_size_never_reaches_a_daemon(
    stack: AmqpStack, client: AetherscaleClient, rabbitmq: Broker
) -> None:
    """docs/amqp.md's advice for the body limit (aiormq buffers a delivery whole before the
    daemon sees it): with ``max_message_size = 1048576`` the broker closes the publisher's
    channel and no daemon reads the 2 MiB; the daemon answers on as before."""
    refused_before = stack.full_log().count("AmqpRequestRefused")
    big = pika.BlockingConnection(pika.URLParameters(rabbitmq.url))
    try:
        channel = big.channel()
        body = json.dumps({"command": "create-vm", "options": {"image": "x" * 2**21}}).encode()
        channel.basic_publish(exchange="computing", routing_key="create-vm", body=body)
        deadline = time.monotonic() + 30
        while channel.is_open and time.monotonic() < deadline:
            big.process_data_events(time_limit=0.1)
        assert channel.is_closed  # the broker's 406: "message size ... larger than ... max"
    finally:
        big.close()
    assert ok(client.send_msg({"command": "list-vms"})) == []
    assert stack.full_log().count("AmqpRequestRefused") == refused_before
    assert queue_depth(rabbitmq, "computing-competing") == 0


def test_a_request_delivered_twice_is_applied_once(
    stack: AmqpStack, client: AetherscaleClient
) -> None:
    stack.import_blank("blank2")
    create = {"command": "create-vm", "options": {"image": "blank2"}}
    mid = f"req-{uuid.uuid4()}"
    first = client.send_msg(create, message_id=mid)
    second = client.send_msg(create, message_id=mid)
    assert first == second and ok(first)["status"] == "starting"
    name = ok(first)["vm-id"]
    # the same id for another request is no redelivery: refused, nothing done, no stale reply
    reused = refused(client.send_msg({"command": "delete-vm", "options": {"vm-id": name}},
                                     message_id=mid))  # fmt: skip
    assert reused["problem"]["status"] == 409 and "already used" in reused["reason"], reused
    assert list(states(client)) == [name]
    # a correlation id (with its reply queue) identifies a request too
    kill = {"command": "stop-vm", "options": {"vm-id": name, "kill": True}}
    cid = str(uuid.uuid4())
    assert client.send_msg(kill, correlation_id=cid) == client.send_msg(kill, correlation_id=cid)
    events = stack.ok("events", name, "-o", "json")
    assert events.count('"Killed"') == 1 and events.count('"Created"') == 1
    ok(client.send_msg({"command": "delete-vm", "options": {"vm-id": name}}))
    stack.ok("image", "delete", "blank2")


def test_creates_held_by_a_killed_daemon_are_delivered_again_and_applied_once(
    stack: AmqpStack, rabbitmq: Broker
) -> None:
    """SIGSTOP the daemon, publish creates (each with a message id, one twice), SIGKILL it:
    the broker holds them unacked, then hands them to the restarted daemon."""
    stack.import_blank("blank3")
    assert stack.proc is not None
    client = AetherscaleClient(rabbitmq.url)
    try:
        os.kill(stack.proc.pid, signal.SIGSTOP)
        ids = [f"crash-{i}-{uuid.uuid4()}" for i in range(3)]
        for mid in [*ids, ids[0]]:
            client.publish({"command": "create-vm", "options": {"image": "blank3"}},
                           message_id=mid, delivery_mode=2)  # fmt: skip
        client.connection.process_data_events(time_limit=1)
        os.kill(stack.proc.pid, signal.SIGKILL)
        stack.proc.wait(30)
        stack.wait(lambda: queue_depth(rabbitmq, "computing-competing") == 4, 30,
                   "the four unacked creates back in the queue")  # fmt: skip
        stack.start()
        replies = client.collect(4, 120)
    finally:
        client.close()
    names = {ok(r)["vm-id"] for r in replies}
    assert len(names) == 3  # four deliveries of three requests: three VMs
    listed = json.loads(stack.ok("list", "-o", "json"))["items"]
    assert {v["metadata"]["name"] for v in listed} == names
    for name in names:
        stack.ok("delete", name, "--force", "--delete-disks")
    stack.ok("image", "delete", "blank3")


def test_the_daemon_reconnects_after_a_broker_restart(stack: AmqpStack, rabbitmq: Broker) -> None:
    before = stack.full_log().count("AmqpReconnected")
    rabbitmq.stop()
    time.sleep(1)
    rabbitmq.start()
    stack.wait(lambda: stack.full_log().count("AmqpReconnected") > before, 60, "reconnected")
    client = AetherscaleClient(rabbitmq.url)
    try:
        # the durable exchange, queues and bindings are back, and consumed again
        stack.wait(lambda: ok(client.send_msg({"command": "list-vms"}, timeout=5)) == [], 30,
                   "list-vms answered after the restart")  # fmt: skip
    finally:
        client.close()
    assert stack.proc is not None and stack.proc.poll() is None


def test_a_broker_restart_mid_stream_loses_and_doubles_nothing(
    stack: AmqpStack, rabbitmq: Broker, tiny_guest: Any
) -> None:
    """Persistent creates (with message ids) published while the daemon is paused, some already
    in its hands, unacked; the broker restarts under it; the daemon resumes, reconnects and
    takes them all again: every request applied exactly once."""
    assert stack.proc is not None
    total = 12
    before = stack.full_log().count("AmqpReconnected")
    publisher = AetherscaleClient(rabbitmq.url)
    os.kill(stack.proc.pid, signal.SIGSTOP)
    try:
        for i in range(total):
            doc = tiny(tiny_guest, f"rs-{i}", state="Stopped")
            publisher.publish({"command": "create", "options": {"document": doc}},
                              message_id=f"rs-{i}", delivery_mode=2, reply=False)  # fmt: skip
        publisher.connection.process_data_events(time_limit=1)
        publisher.close()
        rabbitmq.stop()
        rabbitmq.start()
    finally:
        os.kill(stack.proc.pid, signal.SIGCONT)
    stack.wait(lambda: stack.full_log().count("AmqpReconnected") > before, 60, "reconnected")
    wanted = {f"rs-{i}" for i in range(total)}

    def names() -> set[str]:
        items = json.loads(stack.ok("list", "-o", "json"))["items"]
        return {v["metadata"]["name"] for v in items}

    stack.wait(lambda: names() >= wanted, 60, "every create applied")
    stack.wait(lambda: queue_depth(rabbitmq, "computing-competing") == 0, 30, "all acked")
    assert names() == wanted
    events = [json.loads(line) for line in stack.ok("events", "-o", "json").splitlines()]
    created = [e["vm"] for e in events if e["event"] == "Created" and e["vm"] in wanted]
    assert sorted(created) == sorted(wanted)  # once each
    stack.ok("delete", *sorted(wanted))


def test_round_trip_figures_against_rest(stack: AmqpStack, client: AetherscaleClient) -> None:
    """list-vms and create-vm over AMQP and the same over REST (TCP + token) in the same run:
    p50/p99, printed and written to :data:`FIGURES`, and bounded
    generously (2 shared cores). Each create is of a VM to run, as aetherscale's; it is
    killed right after, so few qemus run at once."""
    stack.import_blank("fig")
    figures: dict[str, list[float]] = {"amqp list-vms": [], "rest GET /v1/vms": [],
                                       "amqp create-vm": [], "rest POST /v1/vms": []}  # fmt: skip
    headers = {"Authorization": f"Bearer {stack.token}"}
    made: list[str] = []
    with httpx.Client(base_url=f"http://127.0.0.1:{stack.port}", headers=headers) as rest:
        for _ in range(40):
            t = time.perf_counter()
            ok(client.send_msg({"command": "list-vms"}))
            figures["amqp list-vms"].append(time.perf_counter() - t)
            t = time.perf_counter()
            rest.get("/v1/vms").raise_for_status()
            figures["rest GET /v1/vms"].append(time.perf_counter() - t)
        for i in range(8):
            t = time.perf_counter()
            made.append(ok(client.send_msg({"command": "create-vm",
                                            "options": {"image": "fig"}}))["vm-id"])  # fmt: skip
            figures["amqp create-vm"].append(time.perf_counter() - t)
            doc = create_document("fig", f"fig-{i}")
            t = time.perf_counter()
            rest.post("/v1/vms", json=doc).raise_for_status()
            figures["rest POST /v1/vms"].append(time.perf_counter() - t)
            made.append(f"fig-{i}")
            for name in made[-2:]:
                rest.post(f"/v1/vms/{name}/kill").raise_for_status()
    lines = []
    for what, samples in figures.items():
        p99 = statistics.quantiles(samples, n=100, method="inclusive")[98]
        lines.append(f"{what}: p50 {statistics.median(samples) * 1000:.1f} ms, "
                     f"p99 {p99 * 1000:.1f} ms (n={len(samples)})")  # fmt: skip
    print("\n".join(lines))
    FIGURES.write_text("\n".join(lines) + "\n")
    assert statistics.median(figures["amqp list-vms"]) < 2.0
    assert statistics.median(figures["amqp create-vm"]) < 10.0
    for name in made:
        stack.ok("delete", name, "--force", "--delete-disks")
    stack.ok("image", "delete", "fig")


def test_two_daemons_share_creates_and_pass_on_what_they_have_no_room_for(
    stack: AmqpStack, client: AetherscaleClient, rabbitmq: Broker, tiny_guest: Any
) -> None:
    """A second daemon (host h2, no RAM to run anything: ramOvercommit 0.001) on the same
    broker: creates of stopped VMs spread over both (creates per second measured); creates to
    run end on h1 whatever host took them first; one no host has room for is answered with
    the capacity error after createAttempts hosts."""
    with running(rabbitmq, "h2", ramOvercommit=0.001) as h2:
        total = 40
        t = time.perf_counter()
        for i in range(total):
            doc = tiny(tiny_guest, f"many-{i}", state="Stopped")
            client.publish({"command": "create", "options": {"document": doc}},
                           message_id=f"many-{i}")  # fmt: skip
        replies = client.collect(total, 120)
        rate = total / (time.perf_counter() - t)
        hosts = [r["execution-info"]["host"] for r in replies]
        assert all(r["execution-info"]["status"] == "success" for r in replies), replies
        print(f"creates across two daemons: {rate:.1f}/s ({hosts.count('h1')} on h1, "
              f"{hosts.count('h2')} on h2)")  # fmt: skip
        with FIGURES.open("a") as f:
            f.write(f"creates across two daemons: {rate:.1f}/s (n={total})\n")
        assert hosts.count("h1") > 0 and hosts.count("h2") > 0, hosts
        on_h1 = {v["metadata"]["name"] for v in json.loads(stack.ok("list", "-o", "json"))["items"]}
        on_h2 = {v["metadata"]["name"] for v in json.loads(h2.ok("list", "-o", "json"))["items"]}
        assert on_h1.isdisjoint(on_h2) and len(on_h1 | on_h2) == total

        for i in range(2):
            doc = tiny(tiny_guest, f"room-{i}", state="Running")
            client.publish({"command": "create", "options": {"document": doc}})
        placed = client.collect(2, 120)
        assert {ok(r, "h1")["metadata"]["name"] for r in placed} == {"room-0", "room-1"}
        huge = tiny(tiny_guest, "no-room", state="Running", maximumRam="64Gi")
        info = refused(client.send_msg({"command": "create", "options": {"document": huge}}))
        assert info["problem"]["status"] == 422 and "capacity" in info["reason"]
        assert "AmqpCreatePassedOn" in stack.full_log() + h2.full_log()
        for name in ("room-0", "room-1"):
            stack.ok("delete", name, "--force")
        stack.ok("delete", *sorted(n for n in on_h1 if n.startswith("many-")))
        h2.ok("delete", *sorted(n for n in on_h2 if n.startswith("many-")))


def test_a_daemon_over_tls_with_the_url_in_a_file(
    stack: AmqpStack, rabbitmq: Broker, tmp_path: Path
) -> None:
    """amqps with the broker's CA (``caFile``) and the URL, credentials included, read from
    ``urlFile`` (never on the command line, never in the log)."""
    url_file = tmp_path / "amqp-url"
    url_file.write_text(rabbitmq.tls_url + "\n")
    url_file.chmod(0o600)
    root = Path(os.path.realpath("/tmp")) / f"ct-{os.getpid()}-{time.monotonic_ns() % 10**8}"
    root.mkdir()
    tls = AmqpStack(root, rabbitmq, "h-tls")
    config = {"services": ["api", "amqp"], "amqp": {
        "urlFile": str(url_file), "caFile": str(rabbitmq.cert), "host": "h-tls",
        "reconnectSeconds": 0.5}}  # fmt: skip
    (root / "corral.yaml").write_text(yaml.safe_dump(config))
    log = (root / "daemon.log").open("ab")
    tls.proc = subprocess.Popen(
        [sys.executable, "-m", "corral.cli.main", "serve", "--state-dir", str(root / "state"),
         "--config", str(root / "corral.yaml"), "--socket", str(tls.sock), "--open-policy"],
        stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=_env(tls.sock),
        start_new_session=True,
    )  # fmt: skip
    try:
        tls.wait(lambda: "AmqpConsuming" in tls.full_log(), 60, "the TLS daemon consuming")
        assert f"127.0.0.1:{rabbitmq.tls_port}" in tls.full_log()
        assert "guest:guest" not in tls.full_log()
        client = AetherscaleClient(rabbitmq.url)
        try:
            client.publish({"command": "list-vms"})
            hosts = {r["execution-info"]["host"] for r in client.collect(2, 30)}
        finally:
            client.close()
        assert hosts == {HOST, "h-tls"}  # list-vms reaches every host; h-tls over TLS
    finally:
        log.close()
        tls.stop()
        shutil.rmtree(root, ignore_errors=True)


def quantiles_ms(samples: list[float]) -> str:
    p99 = statistics.quantiles(samples, n=100, method="inclusive")[98]
    return f"p50 {statistics.median(samples) * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms"


def test_per_vm_commands_get_one_reply_from_the_host_that_owns_the_vm(
    stack: AmqpStack, client: AetherscaleClient, rabbitmq: Broker, tiny_guest: Any
) -> None:
    """Two daemons; a VM on each, made through each host's own CLI (the bus learns owners from
    the store, whoever writes it). aetherscale's per-VM commands (routing key = the command)
    get exactly one reply, from the owner; a VM no host has exactly one 404; ``<host>.<cmd>``
    and the VMs exchange address one host; a name another host holds is refused (409)."""
    with running(rabbitmq, "h2") as h2:
        for host, name in ((stack, "own-1"), (h2, "own-2")):
            (host.root / f"{name}.yaml").write_text(
                yaml.safe_dump(tiny(tiny_guest, name, state="Stopped")))  # fmt: skip
            host.ok("apply", "-f", str(host.root / f"{name}.yaml"))
        owners = {"own-1": HOST, "own-2": "h2"}

        def replies(data: dict[str, Any], **kw: Any) -> list[dict[str, Any]]:
            client.publish(data, **kw)
            return client.gather(1.5)

        for name in owners:  # claimed on the bus a moment after the store's write
            stack.wait(lambda n=name: [r["execution-info"]["status"] for r in replies(
                {"command": "get", "options": {"vm-id": n}})] == ["success"], 30,
                f"{name} claimed")  # fmt: skip
        for name, owner in owners.items():
            for data in ({"command": "get", "options": {"vm-id": name}},
                         {"command": "stop-vm", "options": {"vm-id": name}},
                         {"command": "patch", "options": {"vm-id": name, "patch": {
                             "spec": {"vm": {"currentCpus": 1}}}}}):  # fmt: skip
                got = replies(data)
                assert len(got) == 1, (data, got)
                ok(got[0], owner)
            assert ok(got[0], owner)["metadata"]["name"] == name
        (stop,) = replies({"command": "stop-vm", "options": {"vm-id": "own-2"}})
        assert ok(stop, "h2")["hint"] == 'VM "own-2" was not running'

        # no host has it: one 404, from whichever host took the command
        took: list[float] = []
        for i in range(20):
            t = time.perf_counter()
            client.publish({"command": "start-vm", "options": {"vm-id": f"ghost-{i}"}})
            (first,) = client.collect(1, 30)
            took.append(time.perf_counter() - t)
            assert refused(first)["problem"]["status"] == 404
            assert refused(first)["reason"] == f"VM 'ghost-{i}' not found"
        assert client.gather(1.5) == []  # and no second answer
        assert statistics.median(took) < 2.0

        # addressed: <host>.<command> to one host, vm.<name> on the VMs exchange to its owner
        (miss,) = replies({"command": "get", "options": {"vm-id": "own-1"}}, routing_key="h2.get")
        assert refused(miss)["problem"]["status"] == 404 and miss["execution-info"]["host"] == "h2"
        (hit,) = replies({"command": "get", "options": {"vm-id": "own-1"}}, routing_key="h1.get")
        ok(hit, HOST)
        (direct,) = replies({"command": "get", "options": {"vm-id": "own-2"}},
                            exchange="computing-vms", routing_key="vm.own-2")  # fmt: skip
        ok(direct, "h2")
        (wrong,) = replies({"command": "delete-vm", "options": {"vm-id": "own-1"}},
                           exchange="computing-vms", routing_key="vm.own-2")  # fmt: skip
        assert [e["loc"] for e in refused(wrong)["problem"]["errors"]] == ["options.vm-id"]

        # names are unique across hosts: a create of own-2, whichever host takes it, is h2's 409
        taken = tiny(tiny_guest, "own-2", state="Stopped")
        (dup,) = replies({"command": "create", "options": {"document": taken}})
        assert refused(dup)["problem"]["status"] == 409 and dup["execution-info"]["host"] == "h2"
        assert "own-2" not in {v["metadata"]["name"] for v in json.loads(
            stack.ok("list", "-o", "json"))["items"]}  # fmt: skip

        # the round trip of a per-VM command with two hosts (half of them forwarded)
        rtt: list[float] = []
        for i in range(40):
            name = ("own-1", "own-2")[i % 2]
            t = time.perf_counter()
            ok(client.send_msg({"command": "get", "options": {"vm-id": name}}), owners[name])
            rtt.append(time.perf_counter() - t)
        assert client.gather(0.5) == []
        lines = [
            f"per-VM get, two hosts: {quantiles_ms(rtt)} (n={len(rtt)})",
            f"404 for an unknown VM, two hosts: {quantiles_ms(took)} (n={len(took)})",
        ]
        print("\n".join(lines))
        with FIGURES.open("a") as f:
            f.write("\n".join(lines) + "\n")
        assert statistics.median(rtt) < 2.0

        (gone,) = replies({"command": "delete-vm", "options": {"vm-id": "own-2"}})
        assert ok(gone, "h2")["status"] == "deleted"
        (after,) = replies({"command": "get", "options": {"vm-id": "own-2"}})
        assert refused(after)["problem"]["status"] == 404
    (last,) = replies({"command": "delete-vm", "options": {"vm-id": "own-1"}})
    assert ok(last)["status"] == "deleted"


def test_a_create_redelivered_to_another_host_after_its_first_died_is_applied_once(
    stack: AmqpStack, rabbitmq: Broker, tiny_guest: Any
) -> None:
    """h1 takes a create, writes the VM, and is killed before it acks (its request log held
    locked by the test, so the reply is never sent); the broker hands the create to h2,
    which finds the name claimed by h1 on the bus and forwards it there instead of creating
    it; h1, restarted, answers it as the first time. One VM in all."""
    assert stack.proc is not None
    client = AetherscaleClient(rabbitmq.url)
    headers = {"Authorization": f"Bearer {stack.token}"}
    lock = sqlite3.connect(stack.root / "state" / "amqp-requests.db", isolation_level=None)
    try:
        lock.execute("BEGIN EXCLUSIVE")  # h1's write of the reply waits (5 s, then fails)
        doc = tiny(tiny_guest, "once", state="Stopped")
        client.publish({"command": "create", "options": {"document": doc}},
                       message_id=f"once-{uuid.uuid4()}", delivery_mode=2)  # fmt: skip
        with httpx.Client(base_url=f"http://127.0.0.1:{stack.port}", headers=headers) as rest:
            stack.wait(lambda: rest.get("/v1/vms/once").status_code == 200, 4,
                       "h1 wrote the VM")  # fmt: skip
        os.kill(stack.proc.pid, signal.SIGKILL)
        stack.proc.wait(30)
    finally:
        lock.close()
    try:
        stack.wait(lambda: queue_depth(rabbitmq, "computing-competing") == 1, 30,
                   "the unacked create back in the shared queue")  # fmt: skip
        with running(rabbitmq, "h2") as h2:
            stack.wait(lambda: queue_depth(rabbitmq, "computing-competing") == 0, 60,
                       "h2 took the create")  # fmt: skip
            assert json.loads(h2.ok("list", "-o", "json"))["items"] == []  # not applied again
            assert "AmqpForwarded" in h2.full_log()
            assert queue_depth(rabbitmq, f"computing-host-{HOST}") == 1  # waiting for h1
            assert client.gather(1) == []  # no host answered it yet
            stack.start()
            (reply,) = client.collect(1, 60) + client.gather(1.5)
            assert ok(reply, HOST)["metadata"]["name"] == "once"
            assert json.loads(h2.ok("list", "-o", "json"))["items"] == []
        events = [
            json.loads(line) for line in stack.ok("events", "once", "-o", "json").splitlines()
        ]
        assert [e["event"] for e in events].count("Created") == 1
    finally:
        client.close()
        if stack.proc is None or stack.proc.poll() is not None:
            stack.start()
    stack.ok("delete", "once")
