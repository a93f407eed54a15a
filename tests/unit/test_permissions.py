"""Permissions: VM-Operator's ``spec.permissions`` rules, the route table that enforces them
(every route has a line), and the TCP listener's authentication in-process (httpx
``ASGITransport`` against a real Manager on a temp state dir; no VM is started): sessions,
CSRF, origins, and a user who tries what they were not granted."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from fastapi.routing import APIRoute, APIWebSocketRoute
from prometheus_client.parser import text_string_to_metric_families

from corral.api.app import create_app
from corral.api.auth import create_token
from corral.api.permissions import ROUTE_RULES, Action, may, visible
from corral.api.server import BearerAuth
from corral.api.session import Access
from corral.api.users import Principal, UsersFile, add_user, hash_password, remove_user
from corral.errors import HostError, NotFound
from corral.manager import Manager, ManagerConfig
from corral.spec import HostPolicy

PROBLEM = "application/problem+json"
BASE = "http://corral"


def vm(name: str, permissions: list[Any] | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {"vm": {"maximumRam": "256Mi", "state": "Stopped"}}
    if permissions is not None:
        spec["permissions"] = permissions
    return {"metadata": {"name": name}, "spec": spec}


@pytest.fixture
async def manager(tmp_path: Path) -> AsyncIterator[Manager]:
    async with Manager(ManagerConfig(state_dir=tmp_path / "state"), policy=HostPolicy()) as m:
        for doc in (
            vm("mine", [{"user": "bob", "may": ["stop", "accessConsole"]}]),
            vm("team", [{"role": "ops", "may": ["*"]}]),
            vm("odd", [{"user": "bob", "role": "ops", "may": ["*"]}, {"user": "bob"}]),
            vm("secret"),
            vm("taker", [{"user": "carol", "may": ["takeConsole"]}]),
        ):
            await m.create(doc)
        yield m


def principal(name: str, *roles: str) -> Principal:
    return Principal(name, roles, "session")


def test_grants_follow_vm_operator(manager: Manager) -> None:
    bob, carol, admin = principal("bob", "ops"), principal("carol"), principal("x", "admin")
    mine, team, odd, secret = (manager.get(n) for n in ("mine", "team", "odd", "secret"))
    assert may(bob, mine, Action.STOP) and may(bob, mine, Action.ACCESS_CONSOLE)
    assert not may(bob, mine, Action.START) and not may(bob, mine, Action.ALL)
    assert may(bob, team, Action.RESET) and may(bob, team, Action.ALL)  # via role ops
    assert not visible(carol, team) and not visible(carol, mine)
    assert not visible(bob, odd)  # user AND role, or no may: malformed, grants nothing
    assert not visible(bob, secret) and visible(admin, secret) and may(admin, secret, "*")
    taker = manager.get("taker")
    assert may(carol, taker, Action.ACCESS_CONSOLE) and not may(carol, taker, Action.STOP)


def _routes(routes: list[Any]) -> list[Any]:
    """Every route, through FastAPI's included routers."""
    found = []
    for route in routes:
        if hasattr(route, "original_router"):
            found += _routes(route.original_router.routes)
            prefix = route.include_context.prefix if hasattr(route, "include_context") else ""
            assert not prefix  # the routers below carry their prefix in their own paths
        else:
            found.append(route)
    return found


def test_every_route_has_a_rule(manager: Manager) -> None:
    """A route without a line would be admin-only: a new route must say what it needs (the
    web pages' routes too: they are served in the same app)."""
    from corral.web.service import service_from_config as web_service

    app = create_app(manager)
    app.include_router(web_service(manager.config, {}).api_routes(manager))
    missing = []
    for route in _routes(app.routes):
        if isinstance(route, APIWebSocketRoute):
            keys = [("WS", route.path)]
        elif isinstance(route, APIRoute):
            keys = [(m, route.path) for m in route.methods if m != "HEAD"]
        else:
            continue  # /openapi.json, /docs
        missing += [k for k in keys if k not in ROUTE_RULES]
    admin_only = {("POST", "/v1/vms"), ("POST", "/v1/host/shutdown"), ("POST", "/v1/images"),
                  ("PUT", "/v1/images/{name}"), ("DELETE", "/v1/images/{name}"),
                  ("GET", "/v1/disks"), ("DELETE", "/v1/disks/{id}")}  # fmt: skip
    assert set(missing) == admin_only


@pytest.fixture
def access(tmp_path: Path) -> Access:
    path = tmp_path / "users.yaml"
    path.write_text(yaml.safe_dump([
        {"name": "bob", "passwordHash": hash_password("bob-pw", 4), "roles": ["ops"]},
        {"name": "carol", "passwordHash": hash_password("carol-pw", 4), "roles": []},
        {"name": "prom", "passwordHash": hash_password("prom-pw", 4), "roles": ["metrics"]},
    ]))  # fmt: skip
    path.chmod(0o600)
    token = create_token(tmp_path / "tokens", "ci")
    from corral.api.auth import TokenFile

    found = Access(tokens=TokenFile.load(tmp_path / "tokens"), users=UsersFile.load(path))
    found.test_token = token  # type: ignore[attr-defined]
    return found


def client(manager: Manager, access: Access, **options: Any) -> httpx.AsyncClient:
    app = BearerAuth(create_app(manager, access), access, **options)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=BASE)


async def login(http: httpx.AsyncClient, user: str, password: str) -> str:
    r = await http.post("/v1/session", json={"username": user, "password": password})
    assert r.status_code == 200, r.text
    return str(r.json()["csrfToken"])


def problem(r: httpx.Response, status: int) -> str:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == PROBLEM
    return str(r.json()["detail"])


async def test_login_sets_a_strict_cookie_and_a_csrf_token(
    manager: Manager, access: Access
) -> None:
    async with client(manager, access) as http:
        problem(await http.get("/v1/session"), 401)
        r = await http.post("/v1/session", json={"username": "bob", "password": "bob-pw"})
        assert r.status_code == 200
        body = r.json()
        assert body["user"] == "bob" and body["roles"] == ["ops"] and len(body["csrfToken"]) > 30
        cookie = r.headers["set-cookie"]
        attributes = {a.strip().split("=")[0].lower() for a in cookie.split(";")[1:]}
        assert cookie.startswith("corral_session=") and body["csrfToken"] not in cookie
        assert {"httponly", "path", "samesite"} <= attributes and "secure" not in attributes
        assert "samesite=strict" in cookie.lower() and "path=/" in cookie.lower()
        assert (await http.get("/v1/session")).json() == body
        r = await http.delete("/v1/session", headers={"X-CSRF-Token": body["csrfToken"]})
        assert r.status_code == 204
        problem(await http.get("/v1/session"), 401)
        problem(await http.get("/v1/vms"), 401)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=BearerAuth(create_app(manager, access), access)),
        base_url="https://corral",
    ) as tls:
        r = await tls.post("/v1/session", json={"username": "bob", "password": "bob-pw"})
        assert "secure" in r.headers["set-cookie"].lower()


async def test_wrong_password_and_unknown_user_look_the_same_then_429(
    manager: Manager, access: Access
) -> None:
    async with client(manager, access) as http:
        wrong = await http.post("/v1/session", json={"username": "bob", "password": "nope"})
        unknown = await http.post("/v1/session", json={"username": "zed", "password": "nope"})
        assert problem(wrong, 401) == problem(unknown, 401) == "wrong username or password"
        assert "set-cookie" not in wrong.headers
        for _ in range(4):
            await http.post("/v1/session", json={"username": "bob", "password": "nope"})
        r = await http.post("/v1/session", json={"username": "bob", "password": "bob-pw"})
        problem(r, 429)  # even the right password, until the window passes
        assert int(r.headers["retry-after"]) >= 1
        await login(http, "carol", "carol-pw")  # another user is not locked out


async def test_parallel_guesses_cannot_outrun_the_login_limit(
    manager: Manager, access: Access
) -> None:
    """The limit counts a guess before its (slow) bcrypt check: guesses sent at once cannot
    all pass it before the first has failed."""
    async with client(manager, access) as http:
        guess = {"username": "bob", "password": "nope"}
        replies = await asyncio.gather(*(http.post("/v1/session", json=guess) for _ in range(12)))
        codes = sorted(r.status_code for r in replies)
        assert codes.count(401) == 5 and codes.count(429) == 7, codes
        for _ in range(3):  # a good login is not counted against the client
            await login(http, "carol", "carol-pw")


async def test_cloud_init_secrets_only_for_whom_may_author_the_vm(
    manager: Manager, access: Access
) -> None:
    """cloud-init data holds secrets (passwords, keys): a user who may only start or stop a VM
    reads its document without them; one with ``"*"`` (its author) reads them."""
    doc = vm("inited", [{"user": "carol", "may": ["start", "stop"]}, {"role": "ops", "may": ["*"]}])
    doc["spec"]["cloudInit"] = {"userData": {"chpasswd": {"list": "root:s3cret-pw"}}}
    await manager.create(doc)
    async with client(manager, access) as http:
        csrf = await login(http, "carol", "carol-pw")
        replies = [
            await http.get("/v1/vms/inited"),
            await http.get("/v1/vms"),
            await http.post("/v1/vms/inited/stop", headers={"X-CSRF-Token": csrf}),
            await http.get("/v1/vms/inited/wait", params={"for": "state=Stopped"}),
        ]
        for r in replies:
            assert r.status_code == 200, r.text
            assert "s3cret-pw" not in r.text and "cloudInit" not in r.text
    async with client(manager, access) as http:
        await login(http, "bob", "bob-pw")  # role ops: "*"
        assert "s3cret-pw" in (await http.get("/v1/vms/inited")).text


async def test_a_reused_name_shows_no_events_of_the_vm_deleted_before(
    manager: Manager, access: Access
) -> None:
    """A VM deleted and created again under its name is a new VM: a user granted the new one
    sees its events, not those of the one before (someone else's)."""
    await manager.create(vm("reused"))
    manager.store.add_event("reused", "Note", {"said": "the-old-owners-data"})
    await manager.delete("reused")
    await asyncio.sleep(0.01)  # timestamps are in milliseconds
    await manager.create(vm("reused", [{"user": "carol", "may": ["start"]}]))
    manager.store.add_event("reused", "Note", {"said": "the-new-vms-data"})
    async with client(manager, access) as http:
        await login(http, "carol", "carol-pw")
        for path in ("/v1/events", "/v1/vms/reused/events"):
            text = (await http.get(path)).text
            assert "the-new-vms-data" in text and "the-old-owners-data" not in text, path
    token = access.test_token  # type: ignore[attr-defined]
    async with client(manager, access) as http:  # an admin sees the whole history
        r = await http.get("/v1/vms/reused/events", headers={"Authorization": f"Bearer {token}"})
        assert "the-old-owners-data" in r.text and "the-new-vms-data" in r.text


async def test_a_user_sees_and_operates_only_what_is_granted(
    manager: Manager, access: Access
) -> None:
    async with client(manager, access) as http:
        csrf = await login(http, "bob", "bob-pw")
        h = {"X-CSRF-Token": csrf}
        names = [v["metadata"]["name"] for v in (await http.get("/v1/vms")).json()["items"]]
        assert sorted(names) == ["mine", "team"]
        assert (await http.get("/v1/vms/mine")).status_code == 200
        # a VM bob may not see is the same 404 as one that does not exist
        assert problem(await http.get("/v1/vms/secret"), 404) == "VM 'secret' not found"
        assert problem(await http.get("/v1/vms/nope"), 404) == "VM 'nope' not found"
        problem(await http.post("/v1/vms/secret/stop", headers=h), 404)
        problem(await http.post("/v1/vms/odd/console", headers=h), 404)
        detail = problem(await http.post("/v1/vms/mine/start", headers=h), 403)
        assert "'start'" in detail and "'mine'" in detail
        assert "'reset'" in problem(await http.post("/v1/vms/mine/reset", headers=h), 403)
        assert "'*'" in problem(await http.patch("/v1/vms/mine", json={}, headers=h), 403)
        assert "'*'" in problem(await http.delete("/v1/vms/mine", headers=h), 403)
        r = await http.post("/v1/vms/mine/exec", json={"command": ["id"]}, headers=h)
        problem(r, 403)
        assert (await http.post("/v1/vms/mine/stop", headers=h)).status_code == 200
        r = await http.patch("/v1/vms/team", json={"metadata": {"labels": {"a": "b"}}}, headers=h)
        assert r.status_code == 200  # "*" via role ops
        assert "admin" in problem(await http.post("/v1/vms", json=vm("new"), headers=h), 403)
        assert "admin" in problem(await http.post("/v1/apply", json=vm("new"), headers=h), 403)
        r = await http.post("/v1/apply", json=vm("mine", [{"user": "bob", "may": ["*"]}]),
                            headers=h)  # fmt: skip
        problem(r, 403)  # no "*" on mine: it cannot grant itself more
        r = await http.post("/v1/apply", json=vm("team", [{"role": "ops", "may": ["*"]}]),
                            headers=h)  # fmt: skip
        assert r.status_code == 200
        problem(await http.get("/v1/disks"), 403)
        problem(await http.post("/v1/host/shutdown", headers=h), 403)
        problem(await http.get("/metrics"), 403)
        assert (await http.get("/v1/images")).status_code == 200
        events = (await http.get("/v1/events")).text
        assert '"vm": "mine"' in events and '"vm": "secret"' not in events
        problem(await http.get("/v1/vms/secret/events"), 404)
        problem(await http.get("/v1/vms/mine/logs"), 409)  # accessConsole: allowed, never ran
        problem(await http.get("/v1/vms/team/logs"), 409)
    async with client(manager, access) as http:
        csrf = await login(http, "carol", "carol-pw")
        items = (await http.get("/v1/vms")).json()["items"]
        assert [v["metadata"]["name"] for v in items] == ["taker"]
        problem(await http.get("/v1/vms/mine/logs"), 404)
        problem(await http.get("/v1/vms/taker/logs"), 409)  # takeConsole implies access


async def test_csrf_and_origin_guard_cookie_requests_only(manager: Manager, access: Access) -> None:
    async with client(manager, access) as http:
        csrf = await login(http, "bob", "bob-pw")
        assert "X-CSRF-Token" in problem(await http.post("/v1/vms/mine/stop"), 403)
        r = await http.post("/v1/vms/mine/stop", headers={"X-CSRF-Token": csrf[:-1] + "x"})
        problem(r, 403)
        evil = {"X-CSRF-Token": csrf, "Origin": "https://evil.example"}
        r = await http.post("/v1/vms/mine/stop", headers=evil)
        assert "another origin" in problem(r, 403)
        r = await http.post("/v1/vms/mine/stop", headers={"X-CSRF-Token": csrf, "Origin": BASE})
        assert r.status_code == 200
        assert (await http.get("/v1/vms/mine")).status_code == 200  # reads need no token
        r = await http.post("/v1/session", json={"username": "bob", "password": "bob-pw"},
                            headers={"Origin": "https://evil.example"})  # fmt: skip
        problem(r, 403)  # no login CSRF either
        http.cookies.clear()
        http.cookies.set("corral_session", "forged")
        assert "ended" in problem(await http.get("/v1/vms"), 401)
    token = access.test_token  # type: ignore[attr-defined]
    async with client(manager, access) as http:  # a token: an admin, no CSRF, no cookie
        r = await http.post("/v1/vms/secret/stop", headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 200
        r = await http.get("/v1/session", headers={"Authorization": f"Bearer {token}"})
        assert r.json() == {"user": "ci", "roles": ["admin"], "csrfToken": None}
        r = await http.get("/v1/vms", headers={"Authorization": "Bearer crl_forged"})
        problem(r, 401)


async def test_metrics_need_admin_or_the_metrics_role_or_loopback(
    manager: Manager, access: Access
) -> None:
    token = access.test_token  # type: ignore[attr-defined]
    async with client(manager, access) as http:
        problem(await http.get("/metrics"), 401)
        r = await http.get("/metrics", headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
        families = {f.name: f for f in text_string_to_metric_families(r.text)}
        states = {(s.labels["vm"], s.labels["state"]): s.value
                  for s in families["corral_vm_state"].samples}  # fmt: skip
        assert states[("mine", "Stopped")] == 1 and states[("mine", "Running")] == 0
        assert families["corral_vms"].samples[0].value == 5
        await login(http, "prom", "prom-pw")
        assert (await http.get("/metrics")).status_code == 200
    async with client(manager, access, metrics_on_loopback=True) as http:  # from 127.0.0.1
        for host in ("127.0.0.1:8080", "[::1]:8080", "localhost", "LOCALHOST:1"):
            assert (await http.get("/metrics", headers={"Host": host})).status_code == 200
        problem(await http.get("/v1/vms", headers={"Host": "127.0.0.1:8080"}), 401)
        # a page of another site whose name now resolves to 127.0.0.1 (DNS rebinding)
        for host in ("corral", "evil.example:8080", "127.0.0.1.evil.example"):
            problem(await http.get("/metrics", headers={"Host": host}), 401)


async def test_login_on_a_daemon_without_users_is_a_401(manager: Manager) -> None:
    """Not a 5xx (the fuzzer's rule): there is simply no one to log in as."""
    async with client(manager, Access()) as http:
        r = await http.post("/v1/session", json={"username": "a", "password": "b"})
        assert "--users" in problem(r, 401)


async def test_a_changed_users_file_applies_without_a_restart(
    manager: Manager, access: Access
) -> None:
    """``corral user add``/``remove`` while the daemon runs: a new user logs in at once, a
    changed role applies to open sessions, a removed user's session ends."""
    assert access.users is not None
    path = access.users.path
    async with client(manager, access) as bob, client(manager, access) as dave:
        await login(bob, "bob", "bob-pw")
        assert len((await bob.get("/v1/vms")).json()["items"]) == 2  # mine, team (role ops)
        add_user(path, "dave", "dave-pw", ("ops",))
        await login(dave, "dave", "dave-pw")
        add_user(path, "bob", "bob-pw", ())  # bob loses role ops
        names = [v["metadata"]["name"] for v in (await bob.get("/v1/vms")).json()["items"]]
        assert names == ["mine"]
        assert (await bob.get("/v1/session")).json()["roles"] == []
        add_user(path, "dave", "new-pw", ("ops",))  # a new password ends dave's sessions
        assert "ended" in problem(await dave.get("/v1/vms"), 401)
        await login(dave, "dave", "new-pw")
        remove_user(path, "bob")
        with pytest.raises(NotFound):
            remove_user(path, "bob")
        assert "ended" in problem(await bob.get("/v1/vms"), 401)
        r = await bob.post("/v1/session", json={"username": "bob", "password": "bob-pw"})
        problem(r, 401)
        path.chmod(0o644)  # broken on purpose: the users read before stay
        path.write_text(path.read_text() + "\n")
        assert (await dave.get("/v1/vms")).status_code == 200
    with pytest.raises(HostError):
        remove_user(path, "dave")  # nor is a public file rewritten
