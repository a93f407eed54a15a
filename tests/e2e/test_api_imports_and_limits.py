"""Issue 9 (host files through image import) and issue 12 (oversized input) against the REST
API, with a real manager that runs no VM: in-process (httpx's ``ASGITransport`` over
``create_app``), and served by the daemon's own listeners (``api_service``: uvicorn on a unix
socket and on TCP with a bearer token), with the ``corral`` CLI as a subprocess.

Every refusal is a 4xx ``application/problem+json``; after each, ``/healthz`` still answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import http.server
import json
import os
import shutil
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from corral.api.app import create_app
from corral.api.auth import create_token
from corral.api.server import ApiOptions, api_service
from corral.host import run_tool
from corral.manager import Manager, ManagerConfig
from corral.spec import HostPolicy
from tests.e2e.test_api_cli import _env, _free_port

MiB = 1024**2
CAP = 4 * MiB
EXEC_CAP = 24 * MiB
JSON = {"content-type": "application/json"}
OCTETS = {"content-type": "application/octet-stream"}
DOC = {"metadata": {"name": "vm1"}, "spec": {"vm": {"maximumRam": "256Mi", "state": "Stopped"}}}


def assert_problem(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, (response.status_code, response.text[:500])
    assert response.headers["content-type"].startswith("application/problem+json")
    body = response.json()
    assert body["status"] == status and body["detail"]
    return dict(body)


async def assert_healthy(client: httpx.AsyncClient) -> None:
    response = await client.get("/healthz")
    assert response.status_code == 200 and response.json() == {"status": "ok"}


@contextlib.asynccontextmanager
async def running_manager(root: Path, policy: HostPolicy) -> AsyncIterator[Manager]:
    manager = Manager(ManagerConfig(state_dir=root / "state", accelerator="tcg"), policy=policy)
    await manager.open()
    try:
        yield manager
    finally:
        await manager.close()


@contextlib.asynccontextmanager
async def in_process(
    root: Path, policy: HostPolicy | None = None
) -> AsyncIterator[tuple[Manager, httpx.AsyncClient]]:
    async with running_manager(root, policy or HostPolicy()) as manager:
        transport = httpx.ASGITransport(app=create_app(manager), raise_app_exceptions=False)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://corral", timeout=120
        ) as client:
            yield manager, client


def stored_files(manager: Manager) -> list[str]:
    root = manager.images.root
    return sorted(os.listdir(root)) if root.exists() else []


def payload(size: int) -> bytes:
    """Bytes that look like a raw disk: data, a run of zeros, data."""
    data = bytearray()
    counter = 0
    while len(data) < size:
        data += hashlib.sha512(counter.to_bytes(8, "little")).digest()
        counter += 1
    third = size // 3
    return bytes(data[:third]) + bytes(third) + bytes(data[2 * third : size])


async def chunked(data: bytes, piece: int, sent: list[int] | None = None) -> AsyncIterator[bytes]:
    """``data`` as a stream with no length (Transfer-Encoding: chunked over HTTP)."""
    for start in range(0, len(data), piece):
        chunk = data[start : start + piece]
        if sent is not None:
            sent.append(len(chunk))
        yield chunk


# --- issue 9: host files through image import ---------------------------------------------


@pytest.mark.parametrize(
    "source", ["/etc/passwd", "etc/passwd", "/tmp/x://../../etc/passwd", "/root/../etc/shadow"]
)
async def test_host_path_import_is_forbidden_without_image_paths(
    tmp_path: Path, source: str
) -> None:
    """With no imagePaths the daemon reads no host file named by a client: 403, field
    ``source``, and the reason says how a host allows it."""
    async with in_process(tmp_path) as (manager, client):
        response = await client.post("/v1/images", json={"name": "pw", "source": source})
        body = assert_problem(response, 403)
        assert body["type"] == "urn:corral:forbidden"
        [issue] = body["errors"]
        assert issue["loc"] == "source"
        assert "imagePaths" in issue["reason"] and "/etc/corral/host.yaml" in issue["reason"]
        assert (await client.get("/v1/images")).json() == {"items": []}
        assert stored_files(manager) == []
        await assert_healthy(client)


async def test_host_path_import_only_inside_image_paths(tmp_path: Path) -> None:
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    image = payload(512 * 1024)
    (allowed / "ok.img").write_bytes(image)
    (allowed / "passwd.img").symlink_to("/etc/passwd")
    policy = HostPolicy(image_paths=[str(allowed)])
    async with in_process(tmp_path, policy) as (manager, client):
        response = await client.post(
            "/v1/images", json={"name": "ok", "source": str(allowed / "ok.img")}
        )
        assert response.status_code == 201, response.text
        assert response.json()["source"] == str(allowed / "ok.img")
        assert manager.images.path("ok").read_bytes() == image
        escapes = [
            "/etc/passwd",
            str(allowed / "passwd.img"),
            f"{allowed}/x://{'../' * 30}etc/passwd",  # "://" in it does not make it a URL
            str(allowed / ".." / ".." / "etc" / "passwd"),
        ]
        for source in escapes:
            response = await client.post("/v1/images", json={"name": "pw", "source": source})
            body = assert_problem(response, 403)
            assert body["errors"][0]["loc"] == "source"
            assert "outside" in body["errors"][0]["reason"], body
        response = await client.post("/v1/images", json={"name": "rel", "source": "ok.img"})
        assert assert_problem(response, 422)["errors"][0]["loc"] == "source"
        assert stored_files(manager) == [".ok.json", "ok"]
        await assert_healthy(client)


async def test_upload_is_verified_and_published_like_an_import(tmp_path: Path) -> None:
    """``PUT /v1/images/NAME``: the client's bytes, streamed (no body cap), through the same
    checksum, qemu-img probe, no-backing-file rule and atomic publish; nothing left on a
    failure. Works with no imagePaths at all."""
    image = payload(6 * MiB + 4096)  # over the JSON body cap: uploads are not capped
    digest = f"sha256:{hashlib.sha256(image).hexdigest()}"
    async with in_process(tmp_path) as (manager, client):
        response = await client.put(
            "/v1/images/up", params={"checksum": digest, "filename": "disk.img"},
            content=image, headers=OCTETS,
        )  # fmt: skip
        assert response.status_code == 201, response.text
        record = response.json()
        assert record["source"] == "upload:disk.img" and record["format"] == "raw"
        assert record["sha256"] == digest.split(":")[1]
        assert manager.images.path("up").read_bytes() == image
        response = await client.put(
            "/v1/images/streamed", content=chunked(image, 300_000), headers=OCTETS
        )
        assert response.status_code == 201, response.text
        assert manager.images.path("streamed").read_bytes() == image

        wrong = f"sha256:{hashlib.sha256(b'other').hexdigest()}"
        response = await client.put(
            "/v1/images/bad", params={"checksum": wrong}, content=image, headers=OCTETS
        )
        assert assert_problem(response, 422)["errors"][0]["loc"] == "checksum"
        base = tmp_path / "base.raw"
        evil = tmp_path / "evil.qcow2"
        await run_tool(["qemu-img", "create", "-q", "-f", "raw", str(base), "1M"], what="raw")
        await run_tool(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "raw",
                        str(evil)], what="a qcow2 with a backing file")  # fmt: skip
        response = await client.put("/v1/images/evil", content=evil.read_bytes(), headers=OCTETS)
        [issue] = assert_problem(response, 422)["errors"]
        assert issue["loc"] == "source" and "backing file" in issue["reason"]
        response = await client.put("/v1/images/json", json={"a": 1})
        assert_problem(response, 415)
        response = await client.put("/v1/images/up", content=b"x", headers=OCTETS)
        assert_problem(response, 409)
        response = await client.put("/v1/images/.hidden", content=b"x", headers=OCTETS)
        assert assert_problem(response, 422)["errors"][0]["loc"] == "name"

        names = [i["name"] for i in (await client.get("/v1/images")).json()["items"]]
        assert names == ["streamed", "up"]
        assert stored_files(manager) == [".streamed.json", ".up.json", "streamed", "up"]
        await assert_healthy(client)


class _Redirect(http.server.BaseHTTPRequestHandler):
    target = ""

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        self.send_response(302)
        self.send_header("Location", self.target)
        self.send_header("Content-Length", "0")
        self.end_headers()


class _Internal(http.server.BaseHTTPRequestHandler):
    seen: list[str] = []

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        self.seen.append(self.path)
        body = b"\0" * 65536
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@contextlib.contextmanager
def serving(handler: type[http.server.BaseHTTPRequestHandler]) -> Iterator[str]:
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=10)


async def test_import_redirect_to_another_loopback_port_is_refused(tmp_path: Path) -> None:
    """Two real servers on 127.0.0.1: the import URL on one redirects to the other's port.
    The daemon does not follow it (422 naming the target); the other server sees nothing."""
    _Internal.seen = []
    with serving(_Internal) as internal, serving(_Redirect) as public:
        _Redirect.target = f"{internal}/latest/meta-data"
        async with in_process(tmp_path) as (manager, client):
            response = await client.post(
                "/v1/images", json={"name": "ssrf", "source": f"{public}/debian.qcow2"}
            )
            body = assert_problem(response, 422)
            assert body["errors"][0]["loc"] == "source"
            assert f"{internal}/latest/meta-data" in body["errors"][0]["reason"]
            assert _Internal.seen == []
            assert stored_files(manager) == []
            await assert_healthy(client)


# --- issue 12: oversized input ------------------------------------------------------------

ROUTES = [
    ("POST", "/v1/vms", JSON),
    ("PUT", "/v1/vms/vm1", JSON),
    ("PATCH", "/v1/vms/vm1", {"content-type": "application/merge-patch+json"}),
    ("POST", "/v1/vms/vm1/exec", JSON),
    ("POST", "/v1/images", JSON),
]
BIG = b'{"metadata": {"name": "' + b"x" * (64 * MiB) + b'"}}'


@pytest.mark.parametrize(("method", "path", "headers"), ROUTES, ids=[r[1] + r[0] for r in ROUTES])
async def test_a_64_mib_body_is_refused_before_it_is_read(
    tmp_path: Path, method: str, path: str, headers: dict[str, str]
) -> None:
    async with in_process(tmp_path) as (_, client):
        response = await client.request(method, path, content=BIG, headers=headers)
        assert "this route takes" in assert_problem(response, 413)["detail"]
        sent: list[int] = []
        response = await client.request(
            method, path, content=chunked(BIG, MiB, sent), headers=headers
        )
        assert "larger than" in assert_problem(response, 413)["detail"]
        cap = EXEC_CAP if path.endswith("/exec") else CAP
        assert sum(sent) <= cap + MiB, "the body was read past the cap"
        await assert_healthy(client)


async def test_deeply_nested_json_is_a_400_for_every_body(tmp_path: Path) -> None:
    deep_object = b'{"a":' * 100_000 + b"1" + b"}" * 100_000
    deep_array = b"[" * 100_000 + b"]" * 100_000
    unbalanced = b"[" * 100_000
    async with in_process(tmp_path) as (_, client):
        assert (await client.post("/v1/vms", json=DOC)).status_code == 201
        for method, path, headers in ROUTES:
            for body in (deep_object, deep_array, unbalanced):
                response = await client.request(method, path, content=body, headers=headers)
                assert_problem(response, 400)
        response = await client.patch(
            "/v1/vms/vm1", content=deep_object,
            headers={"content-type": "application/merge-patch+json"},
        )  # fmt: skip
        assert "64 levels" in assert_problem(response, 400)["detail"]
        # 64 levels is fine, and brackets inside strings do not count
        nested: Any = {"name": "[[[[{{{{" * 1000}
        for _ in range(60):
            nested = {"x": nested}
        response = await client.patch("/v1/vms/vm1", json={"metadata": {"annotations": nested}})
        assert response.status_code != 400 or "levels" not in response.text, response.text
        await assert_healthy(client)


BAD_EVENT_IDS = ["1" * 4301, str(2**63), str(2**64), str(2**62 + 1), "-1", "0x10", "²", "1 2"]


@pytest.mark.parametrize("follow", ["false", "true"])
async def test_bad_last_event_id_and_after_are_4xx_before_the_stream(
    tmp_path: Path, follow: str
) -> None:
    async with in_process(tmp_path) as (manager, client):
        assert (await client.post("/v1/vms", json=DOC)).status_code == 201
        for path in ("/v1/events", "/v1/vms/vm1/events"):
            for value in BAD_EVENT_IDS:
                response = await client.get(
                    path, params={"follow": follow},
                    headers={"Last-Event-ID": value.encode("latin-1")},
                )  # fmt: skip
                assert "Last-Event-ID" in assert_problem(response, 400)["detail"]
            for after in (str(2**63), "9" * 4301, "-1"):
                response = await client.get(path, params={"follow": follow, "after": after})
                assert assert_problem(response, 422)["errors"][0]["loc"] == "query.after"
        if follow == "false":
            response = await client.get("/v1/events", headers={"Last-Event-ID": "0"})
            assert response.status_code == 200 and "event: Created" in response.text
            response = await client.get("/v1/events", headers={"Last-Event-ID": str(2**62)})
            assert response.status_code == 200 and response.text == ""
        assert manager.events(None, 2**63) == [] and manager.events(None, 2**80) == []
        await assert_healthy(client)


# --- the daemon's own listeners and the CLI ---------------------------------------------


@dataclass
class Served:
    manager: Manager
    socket: Path
    url: str
    token: str
    root: Path


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[Served]:
    root = Path(os.path.realpath("/tmp")) / f"cl-{os.getpid()}-{time.monotonic_ns() % 10**8}"
    root.mkdir()
    try:
        token = create_token(root / "tokens", "test")
        port = _free_port()
        options = ApiOptions(
            socket=root / "s.sock", listen=f"127.0.0.1:{port}", tokens_file=root / "tokens"
        )
        async with (
            running_manager(tmp_path, HostPolicy()) as manager,
            api_service(options)(manager),
        ):
            yield Served(manager, root / "s.sock", f"http://127.0.0.1:{port}", token, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


async def test_over_tcp_every_bad_input_is_a_4xx_and_the_daemon_stays_up(served: Served) -> None:
    auth = {"Authorization": f"Bearer {served.token}"}
    async with httpx.AsyncClient(base_url=served.url, headers=auth, timeout=120) as client:
        response = await client.post("/v1/images", json={"name": "pw", "source": "/etc/passwd"})
        assert assert_problem(response, 403)["errors"][0]["loc"] == "source"
        response = await client.post("/v1/vms", content=BIG, headers=JSON)
        assert_problem(response, 413)
        await assert_healthy(client)
        response = await client.post("/v1/vms", content=chunked(BIG, MiB), headers=JSON)
        assert_problem(response, 413)
        await assert_healthy(client)
        response = await client.patch(
            "/v1/vms/vm1", content=b'{"a":' * 100_000 + b"1" + b"}" * 100_000,
            headers={"content-type": "application/merge-patch+json"},
        )  # fmt: skip
        assert_problem(response, 400)
        for value in ("1" * 4301, str(2**63)):
            response = await client.get(
                "/v1/events", params={"follow": "true"}, headers={"Last-Event-ID": value}
            )
            assert_problem(response, 400)
        response = await client.get("/v1/events", params={"follow": "true", "after": 2**63})
        assert_problem(response, 422)
        async with client.stream(
            "GET", "/v1/events", params={"follow": "true"}, headers={"Last-Event-ID": "0"}
        ) as stream:
            assert stream.status_code == 200
            lines = stream.aiter_lines()
            assert await asyncio.wait_for(anext(lines), 10) == ": streaming"
        response = await client.put("/v1/images/up", content=payload(MiB), headers=OCTETS)
        assert response.status_code == 201, response.text
        await assert_healthy(client)


async def corral(served: Served, *args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "corral.cli.main", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env=_env(served.socket),
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_cli_uploads_local_files_and_host_paths_need_image_paths(served: Served) -> None:
    image = payload(3 * MiB)
    local = served.root / "local.img"
    local.write_bytes(image)
    code, out, err = await corral(served, "image", "import", "local", str(local), "--no-progress")
    assert code == 0, err
    assert out.startswith("image/local imported: raw")
    code, out, err = await corral(served, "image", "import", "barred", str(local))
    assert code == 0, err  # with the progress bar
    assert served.manager.images.path("local").read_bytes() == image
    code, out, err = await corral(
        served, "image", "import", "pw", str(local), "--host-path", "--no-progress"
    )
    assert code == 1 and "imagePaths" in err and "/etc/corral/host.yaml" in err, err
    code, out, err = await corral(served, "image", "list", "-o", "json")
    items = json.loads(out)["items"]
    assert [(i["name"], i["source"]) for i in items] == [
        ("barred", "upload:local.img"), ("local", "upload:local.img"),
    ]  # fmt: skip
