"""The message API without a broker: aetherscale's request shapes parsed (and every bad one
refused with the field that is wrong), its reply envelope with errors from
``CorralError.to_problem()``, its commands on a real Manager over a temp state dir (no VM is
started: the manager does not reconcile), the request log that makes a redelivered request
apply once, and the ``amqp`` service's options (config section, ``--amqp``, ``urlFile``)."""

from __future__ import annotations

import asyncio
import json
import socket
import stat
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from corral.amqp.commands import REQUEST_ANNOTATION, Commands, vm_name_for
from corral.amqp.protocol import (
    PayloadTooLarge,
    Request,
    error_reply,
    parse_request,
    success_reply,
)
from corral.amqp.requests import RequestLog, request_key
from corral.amqp.service import Consumer, parse_options, service_from_config
from corral.errors import NotFound, PolicyError, SpecError
from corral.manager import Manager, ManagerConfig
from corral.services import SERVICES, build_services
from corral.spec import HostPolicy


def body(data: object) -> bytes:
    """What aetherscale's client publishes: ``json.dumps(data).encode('utf-8')``."""
    return json.dumps(data).encode("utf-8")


def issue_locs(exc: pytest.ExceptionInfo[SpecError]) -> list[str]:
    return [i.loc for i in exc.value.issues]


# --- requests ---------------------------------------------------------------------------


def test_aetherscale_client_shapes_parse() -> None:
    assert parse_request(body({"command": "list-vms"})) == Request("list-vms", {})
    create = parse_request(body({"command": "create-vm", "options": {"image": "debian"}}))
    assert create.command == "create-vm" and create.text("image") == "debian"
    stop = parse_request(body({"command": "stop-vm", "options": {"vm-id": "abc", "kill": True}}))
    assert stop.text("vm-id") == "abc" and stop.flag("kill") is True
    for verb in ("start-vm", "delete-vm"):
        assert (
            parse_request(body({"command": verb, "options": {"vm-id": "x"}})).flag("kill") is False
        )


@pytest.mark.parametrize(
    ("raw", "loc", "words"),
    [
        (b"not json {", "", "not a JSON document"),
        (b"\xff\xfe", "", "not a JSON document"),
        (body(["list-vms"]), "", "must be a JSON object"),
        (body({"options": {}}), "command", "must be a command name"),
        (body({"command": "format-disk"}), "command", "'format-disk' is not a command"),
        (body({"command": "create-vm"}), "options.image", "must be a non-empty string"),
        (body({"command": "create-vm", "options": {"image": 7}}), "options.image", "non-empty"),
        (body({"command": "start-vm", "options": []}), "options", "must be a JSON object"),
        (body({"command": "stop-vm", "options": {}}), "options.vm-id", "non-empty string"),
        (
            b'{"command": "list-vms", "options": {"a": ' + b"[" * 5000 + b"]" * 5000 + b"}}",
            "",
            "not a JSON document",
        ),  # deep nesting: a RecursionError inside json
        (
            body({"command": "stop-vm", "options": {"vm-id": "v" * 254}}),
            "options.vm-id",
            "at most 253 characters",
        ),
    ],
)
def test_bad_requests_name_the_field(raw: bytes, loc: str, words: str) -> None:
    with pytest.raises(SpecError) as exc:
        parse_request(raw)
    assert issue_locs(exc) == [loc]
    assert words in exc.value.issues[0].reason
    assert exc.value.to_problem()["status"] == 422


def test_a_huge_body_is_refused_unread() -> None:
    huge = body({"command": "create-vm", "options": {"image": "x" * 200}})
    with pytest.raises(PayloadTooLarge) as exc:
        parse_request(huge, limit=100)
    assert exc.value.to_problem()["status"] == 413
    assert f"{len(huge)} bytes; the limit is 100" in str(exc.value)
    assert parse_request(huge, limit=len(huge)).command == "create-vm"


@pytest.mark.parametrize(
    ("kill", "expected"),
    [(True, True), ("y", True), ("no", True), (1, True), ([0], True), ({"a": 1}, True),
     (False, False), (0, False), ("", False), (None, False), ([], False), ({}, False)],
)  # fmt: skip
def test_kill_is_the_json_values_truthiness_as_aetherscale_reads_it(
    kill: object, expected: bool
) -> None:
    """aetherscale's stop_vm: ``bool(options.get('kill', False))``."""
    request = parse_request(body({"command": "stop-vm", "options": {"vm-id": "a", "kill": kill}}))
    assert request.flag("kill") is expected


@pytest.mark.parametrize(
    ("options", "loc"),
    [({"vm-id": "a"}, "options.image"), ({"vm-id": "a", "image": 5}, "options.image"),
     ({"vm-id": "a", "image": "x" * 4097}, "options.image"),
     ({"vm-id": "a", "image": "i", "drive": ""}, "options.drive"),
     ({"vm-id": "a", "image": "i", "drive": ["cd"]}, "options.drive"),
     ({"image": "i"}, "options.vm-id")],
)  # fmt: skip
def test_set_cd_options_are_checked_as_rests_media_request(
    options: dict[str, Any], loc: str
) -> None:
    with pytest.raises(SpecError) as exc:
        parse_request(body({"command": "set-cd", "options": options}))
    assert issue_locs(exc) == [loc]
    eject = parse_request(body({"command": "set-cd", "options": {"vm-id": "a", "image": None}}))
    assert eject.media() == (None, None)


def test_reply_envelopes() -> None:
    ok = success_reply({"status": "starting", "vm-id": "a"}, "h1")
    assert ok == {"execution-info": {"status": "success", "host": "h1"},
                  "response": {"status": "starting", "vm-id": "a"}}  # fmt: skip
    error = SpecError.single("options.image", "must be a non-empty string")
    bad = error_reply(error, "h1")
    info = bad["execution-info"]
    assert info["status"] == "error" and info["host"] == "h1" and "response" not in bad
    assert info["reason"] == "invalid VM document: options.image: must be a non-empty string"
    assert info["problem"] == error.to_problem()
    assert info["problem"]["errors"] == [{"loc": "options.image",
                                          "reason": "must be a non-empty string"}]  # fmt: skip
    json.dumps(bad)  # what goes on the wire


# --- commands on a real manager -----------------------------------------------------------


@pytest.fixture
async def manager(tmp_path: Path) -> AsyncIterator[Manager]:
    """A manager that keeps documents but never reconciles: no qemu is started."""
    images = tmp_path / "srv"
    images.mkdir()
    state = tmp_path / "state"
    m = Manager(ManagerConfig(state_dir=state),
                policy=HostPolicy(imagePaths=[str(images), str(state / "images")]))  # fmt: skip
    await m.open(reconcile=False)
    try:
        yield m
    finally:
        await m.close()


async def blank_image(manager: Manager, tmp_path: Path, name: str = "blank") -> None:
    raw = tmp_path / "srv" / f"{name}.raw"
    raw.write_bytes(b"\0" * 2**20)
    await manager.import_image(name, str(raw))


async def test_create_start_stop_delete_answer_in_aetherscales_fields(
    manager: Manager, tmp_path: Path
) -> None:
    await blank_image(manager, tmp_path)
    commands = Commands(manager)
    assert await commands.run(Request("list-vms")) == []
    created = await commands.run(Request("create-vm", {"image": "blank"}))
    assert created["status"] == "starting" and created["vm-id"].startswith("vm-")
    name = created["vm-id"]
    record = manager.get(name)
    assert record.desired == "Running"
    assert record.document.vm.disks[0].file is not None
    assert record.document.vm.disks[0].file.image == "blank"
    assert await commands.run(Request("list-vms")) == [
        {"vm-id": name, "ip-addresses": [], "state": "Stopped"}
    ]

    assert await commands.run(Request("stop-vm", {"vm-id": name})) == {
        "status": "stopped", "vm-id": name}  # fmt: skip
    assert manager.get(name).desired == "Stopped"
    again = await commands.run(Request("stop-vm", {"vm-id": name, "kill": True}))
    assert again == {"status": "killed", "vm-id": name, "hint": f'VM "{name}" was not running'}
    assert await commands.run(Request("start-vm", {"vm-id": name})) == {
        "status": "starting", "vm-id": name}  # fmt: skip
    assert manager.get(name).desired == "Running"

    data_dir = manager.config.vms / name
    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / "root.qcow2").write_bytes(b"overlay")
    assert await commands.run(Request("delete-vm", {"vm-id": name})) == {
        "status": "deleted", "vm-id": name}  # fmt: skip
    assert manager.list_vms() == [] and not data_dir.exists()  # the disks go, as aetherscale's
    assert manager.list_retained() == []


async def test_command_errors(manager: Manager) -> None:
    commands = Commands(manager)
    with pytest.raises(PolicyError) as refused:
        await commands.run(Request("create-vm", {"image": "nope"}))
    assert [i.loc for i in refused.value.issues] == ["spec.vm.disks[0].file.image"]
    assert manager.list_vms() == []  # a refusal changes nothing
    for image in ("/etc/shadow", "../x", ".."):
        with pytest.raises(SpecError) as bad:
            await commands.run(Request("create-vm", {"image": image}))
        assert [i.loc for i in bad.value.issues] == ["options.image"]
    for verb in ("start-vm", "stop-vm", "delete-vm"):
        with pytest.raises(NotFound, match="VM 'ghost' not found"):
            await commands.run(Request(verb, {"vm-id": "ghost"}))


async def test_a_create_with_an_id_names_its_vm_and_applies_once(
    manager: Manager, tmp_path: Path
) -> None:
    """The crash window between the store's write and the request log's: the same request
    delivered again finds its own VM (by name and annotation) and answers as the first did."""
    await blank_image(manager, tmp_path)
    commands = Commands(manager)
    key = request_key("msg-1", None, None)
    first = await commands.run(Request("create-vm", {"image": "blank"}), key)
    assert first["vm-id"] == vm_name_for(key) and vm_name_for(key) == vm_name_for(key)
    assert await commands.run(Request("create-vm", {"image": "blank"}), key) == first
    assert [r.name for r in manager.list_vms()] == [first["vm-id"]]
    annotations = manager.get(first["vm-id"]).document.metadata.annotations
    assert REQUEST_ANNOTATION in annotations

    other = await commands.run(Request("create-vm", {"image": "blank"}), "m:msg-2")
    assert other["vm-id"] != first["vm-id"] and len(manager.list_vms()) == 2
    plain = [await commands.run(Request("create-vm", {"image": "blank"})) for _ in range(2)]
    assert plain[0]["vm-id"] != plain[1]["vm-id"]  # no id: each delivery is a new VM

    # a VM of that name made some other way is not taken for the request's
    await manager.delete(first["vm-id"], delete_disks=True)
    doc = {"metadata": {"name": first["vm-id"]},
           "spec": {"vm": {"maximumRam": "256Mi", "state": "Stopped"}}}  # fmt: skip
    await manager.create(doc)
    with pytest.raises(Exception, match="already exists"):
        await commands.run(Request("create-vm", {"image": "blank"}), key)


async def test_set_cd_changes_the_cd_drive_as_rests_media_call(
    manager: Manager, tmp_path: Path
) -> None:
    iso = tmp_path / "srv" / "tools.iso"
    iso.write_bytes(b"\0" * 2048)
    disks = [{"name": "cd", "cdrom": {"image": "", "interface": "ide"}}]
    doc = {"metadata": {"name": "cdvm"},
           "spec": {"vm": {"maximumRam": "256Mi", "state": "Stopped", "disks": disks}}}  # fmt: skip
    await manager.create(doc)
    commands = Commands(manager)
    put = await commands.run(Request("set-cd", {"vm-id": "cdvm", "image": str(iso)}))
    assert (put["name"], put["drive"], put["image"]) == ("cdvm", "cd", str(iso))
    assert put["vm"]["spec"]["vm"]["disks"][0]["cdrom"]["image"] == str(iso)
    assert put["vm"]["metadata"]["generation"] == 2
    with pytest.raises(PolicyError):  # the host policy's imagePaths, as for REST
        await commands.run(Request("set-cd", {"vm-id": "cdvm", "image": "/etc/shadow"}))
    with pytest.raises(NotFound, match="no CD drive 'root'"):
        await commands.run(Request("set-cd", {"vm-id": "cdvm", "image": None, "drive": "root"}))
    ejected = await commands.run(Request("set-cd", {"vm-id": "cdvm", "image": None}))
    assert ejected["image"] is None
    assert manager.get("cdvm").document.vm.disks[0].cdrom.image == ""  # type: ignore[union-attr]


async def test_creates_claim_their_name_first_and_release_it_when_no_vm_is_left(
    manager: Manager, tmp_path: Path
) -> None:
    """The bus's record of which host owns a VM (the service binds its queue to
    ``vm.<name>``): claimed before the store's write, so a host that dies right after it
    still owns the name; released when the create fails or the VM is deleted."""
    await blank_image(manager, tmp_path)
    calls: list[tuple[str, str, bool]] = []

    async def claim(name: str) -> None:
        calls.append(("claim", name, manager.store.find(name) is not None))

    async def release(name: str) -> None:
        calls.append(("release", name, manager.store.find(name) is not None))

    commands = Commands(manager, claim=claim, release=release)
    key = request_key("claim-1", None, None)
    name = (await commands.run(Request("create-vm", {"image": "blank"}), key))["vm-id"]
    assert calls == [("claim", name, False)]  # before the VM was in the store
    with pytest.raises(PolicyError):
        await commands.run(Request("create-vm", {"image": "nope"}), "m:claim-2")
    failed = vm_name_for("m:claim-2")
    assert calls[1:] == [("claim", failed, False), ("release", failed, False)]
    with pytest.raises(Exception, match="already exists"):  # the name is this host's VM's
        await commands.run(Request("create", {"document": {
            "metadata": {"name": name}, "spec": {"vm": {"maximumRam": "256Mi"}}}}))  # fmt: skip
    assert calls[3:] == [("claim", name, True)]  # not released: the VM is still here
    await commands.run(Request("delete-vm", {"vm-id": name}))
    assert calls[4:] == [("release", name, False)]


async def test_corrals_own_commands_validate_like_rest(manager: Manager) -> None:
    commands = Commands(manager)
    vm = {"maximumRam": "256Mi", "state": "Stopped", "maximumCpus": 2}
    doc = {"metadata": {"name": "full"}, "spec": {"vm": vm}}
    created = await commands.run(Request("create", {"document": doc}), "m:full-1")
    assert created["metadata"]["name"] == "full" and created["metadata"]["generation"] == 1
    again = await commands.run(Request("create", {"document": doc}), "m:full-1")
    assert again["metadata"]["uid"] == created["metadata"]["uid"]  # delivered twice: one VM
    with pytest.raises(Exception, match="already exists"):
        await commands.run(Request("create", {"document": doc}), "m:another")
    got = await commands.run(Request("get", {"vm-id": "full"}))
    assert got["spec"]["vm"]["maximumCpus"] == 2
    patched = await commands.run(
        Request("patch", {"vm-id": "full", "patch": {"spec": {"vm": {"currentCpus": 2}}}})
    )
    assert patched["spec"]["vm"]["currentCpus"] == 2 and patched["metadata"]["generation"] == 2

    bad = {"metadata": {"name": "Bad_Name"}, "spec": {"vm": {"maximumCpus": 0}}}
    with pytest.raises(SpecError) as exc:
        await commands.run(Request("create", {"document": bad}))
    assert {"metadata.name", "spec.vm.maximumCpus"} <= set(issue_locs(exc))
    with pytest.raises(SpecError):
        parse_request(body({"command": "patch", "options": {"vm-id": "full", "patch": 3}}))
    with pytest.raises(SpecError) as renamed:
        await commands.run(
            Request("patch", {"vm-id": "full", "patch": {"metadata": {"name": "x"}}})
        )
    assert issue_locs(renamed) == ["metadata.name"]


# --- the request log ----------------------------------------------------------------------


def test_request_keys() -> None:
    assert request_key("m1", "c1", "q") == "m:m1"
    assert request_key(None, "c1", "amq.rabbitmq.reply-to.abc") == "c:amq.rabbitmq.reply-to.abc\0c1"
    assert request_key(None, "c1", "a") != request_key(None, "c1", "b")
    assert request_key(None, None, "amq.rabbitmq.reply-to.abc") is None  # aetherscale's client
    assert request_key("", "", None) is None


async def test_request_log_survives_reopening(tmp_path: Path) -> None:
    path = tmp_path / "state" / "amqp-requests.db"
    log = RequestLog(path)
    reply: dict[str, Any] = success_reply({"status": "deleted", "vm-id": "a"}, "h")
    assert await log.get("m:1") is None
    await log.put("m:1", "delete-vm", reply)
    log.close()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again = RequestLog(path)
    try:
        assert await again.get("m:1") == (reply, "")
        assert await again.get("m:2") is None
        assert await again.cursor("events") is None
        await again.set_cursor("events", 41)
        await again.set_cursor("events", 42)
        assert await again.cursor("events") == 42
    finally:
        again.close()


# --- the service's options ----------------------------------------------------------------


def test_options_from_config_flags_and_url_file(tmp_path: Path) -> None:
    url_file = tmp_path / "amqp-url"
    url_file.write_text("\namqps://corral:s3cret@mq.example:5671/vms\n")
    url_file.chmod(0o600)
    opts = parse_options({"urlFile": str(url_file), "host": "h1", "prefetch": 4})
    assert opts.url == "amqps://corral:s3cret@mq.example:5671/vms"
    assert opts.own_queue == "computing-host-h1" and opts.create_queue == "computing-competing"
    assert opts.exchange == "computing" and opts.prefetch == 4
    assert (opts.route_queue, opts.vms_exchange) == ("computing-vm-commands", "computing-vms")
    moved = parse_options({"url": "amqp://x/", "routeQueue": "r", "vmsExchange": "v"})
    assert (moved.route_queue, moved.vms_exchange) == ("r", "v")
    assert "s3cret" not in opts.safe_url() and "s3cret" not in repr(opts)

    cases: list[tuple[dict[str, object], str]] = [
        ({}, "amqp.url"),
        ({"url": "http://x/"}, "amqp.url"),
        ({"url": "amqp://x/", "urlFile": str(url_file)}, "amqp.url"),
        ({"urlFile": str(tmp_path / "missing")}, "amqp.urlFile"),
        ({"url": "amqp://x/", "queue": "q"}, "amqp.queue"),
        ({"url": "amqp://x/", "prefetch": 0}, "amqp.prefetch"),
        ({"url": "amqp://x/", "reconnectSeconds": -1}, "amqp.reconnectSeconds"),
        ({"url": "amqp://x/", "exchange": ""}, "amqp.exchange"),
        ({"url": "amqp://x/", "routeQueue": ""}, "amqp.routeQueue"),
        ({"url": "amqp://x/", "vmsExchange": 3}, "amqp.vmsExchange"),
    ]
    for options, loc in cases:
        with pytest.raises(SpecError) as exc:
            parse_options(options)
        assert issue_locs(exc) == [loc], options


def test_the_service_is_registered_and_reads_the_config_section(tmp_path: Path) -> None:
    assert SERVICES["amqp"] == "corral.amqp.service:service_from_config"
    section = {"url": "amqp://guest:guest@127.0.0.1:1/", "host": "h"}
    config = ManagerConfig(state_dir=tmp_path, services=("api", "amqp"), amqp=section)
    built = build_services(config.services, config, {"api": {"socket": None}})
    assert len(built) == 2
    with pytest.raises(SpecError) as exc:
        service_from_config(ManagerConfig(state_dir=tmp_path), {})
    assert issue_locs(exc) == ["amqp.url"]
    assert callable(service_from_config(ManagerConfig(state_dir=tmp_path), {"url": "amqp://h/"}))


async def test_a_daemon_whose_broker_is_away_keeps_trying_and_stops_cleanly(
    manager: Manager, tmp_path: Path
) -> None:
    """The other services never wait for the broker: the service is up at once, retries in
    the background, and stops without leaving a task behind (the leaked-task guard)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    options = parse_options({"url": f"amqp://guest:guest@127.0.0.1:{port}/",
                             "reconnectSeconds": 0.05})  # fmt: skip
    config = ManagerConfig(state_dir=tmp_path / "state")
    service = service_from_config(config, {"url": options.url, "reconnectSeconds": 0.05})
    async with asyncio.timeout(10):
        async with service(manager) as consumer:
            assert isinstance(consumer, Consumer)
            await asyncio.sleep(0.5)  # several attempts
            assert not consumer.consuming.is_set()
    assert (tmp_path / "state" / "amqp-requests.db").exists()


def test_serve_refuses_the_message_api_without_image_paths(tmp_path: Path) -> None:
    """Whoever may publish may create VMs: like ``--listen``, ``--amqp`` needs the policy's
    ``imagePaths`` or ``--open-policy``; a bad option stops ``serve`` before any service runs."""
    from click.testing import CliRunner

    from corral.cli.main import cli

    policy = tmp_path / "host.yaml"
    policy.write_text("{}\n")
    args = ["serve", "--state-dir", str(tmp_path / "s"), "--no-socket", "--policy", str(policy)]
    done = CliRunner().invoke(cli, [*args, "--amqp", "amqp://127.0.0.1:1/"])
    assert done.exit_code == 2 and "amqp: the host policy sets no imagePaths" in done.output
    done = CliRunner().invoke(cli, [*args, "--open-policy", "--amqp", "http://x/"])
    assert done.exit_code == 1 and "amqp.url: must be an amqp:// or amqps:// URL" in done.output
    # the services are built while the manager re-attaches (issue 15): none of them ran
    assert not (tmp_path / "s" / "amqp-requests.db").exists()
