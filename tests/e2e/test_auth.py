"""Users, sessions and permissions against a real daemon (``corral serve --users``) on TCP, a
real tiny guest, and clients that try what they were not granted: a token-less client, a user
whose session forges another VM's action or skips the CSRF header, a page on a foreign origin,
a user without ``accessConsole`` on the console websocket and the display endpoint. The
daemon's log must hold no password and no display secret."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Sequence
from typing import Any

import httpx
import pytest
import yaml
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from tests.e2e.test_api_cli import Stack, running_stack
from tests.e2e.test_explain import _free_vnc_port
from tests.integration.test_manager import tiny

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PASSWORDS = {"bob": "Bob-pass-81723", "carol": "Carol-pass-55190", "root": "Root-pass-90412"}


def _users(stack: Stack) -> Sequence[str]:
    users = stack.root / "users.yaml"
    for name, roles in (("bob", ["ops"]), ("carol", []), ("root", ["admin"])):
        args = [a for r in roles for a in ("--role", r)]
        stack.ok("user", "add", name, *args, "--file", str(users), stdin=PASSWORDS[name] + "\n")
    return ("--users", str(users))


@pytest.fixture(scope="module")
def stack(tiny_guest: Any) -> Iterator[Stack]:
    yield from running_stack("au", ("au-run", "au-other"), before=_users)


@pytest.fixture(scope="module")
def vms(stack: Stack, tiny_guest: Any) -> dict[str, Any]:
    """``au-run``: running, with a VNC display; bob may start and stop it, carol may use its
    console. ``au-other``: defined, granted to no one."""
    grants = [
        {"user": "bob", "may": ["start", "stop"]},
        {"user": "carol", "may": ["accessConsole"]},
    ]
    run = tiny(tiny_guest, "au-run", display={"vnc": {"port": _free_vnc_port()}})
    run["spec"]["permissions"] = grants
    other = tiny(tiny_guest, "au-other", state="Stopped")
    for doc in (run, other):
        path = stack.root / f"{doc['metadata']['name']}.yaml"
        path.write_text(yaml.safe_dump(doc))
        stack.ok("apply", "-f", str(path))
    stack.ok("wait", "au-run", "--for=condition=Booted", "--timeout", "240")
    return {"run": run, "other": other}


def base(stack: Stack) -> str:
    return f"http://127.0.0.1:{stack.port}"


def session(stack: Stack, name: str) -> tuple[httpx.Client, str]:
    http = httpx.Client(base_url=base(stack), timeout=60)
    r = http.post("/v1/session", json={"username": name, "password": PASSWORDS[name]})
    assert r.status_code == 200, r.text
    return http, str(r.json()["csrfToken"])


def problem(r: httpx.Response, status: int) -> str:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/problem+json"
    return str(r.json()["detail"])


def test_login_sets_a_strict_http_only_cookie(stack: Stack, vms: dict[str, Any]) -> None:
    with httpx.Client(base_url=base(stack), timeout=60) as http:
        r = http.post("/v1/session", json={"username": "bob", "password": PASSWORDS["bob"]})
        assert r.status_code == 200
        assert r.json()["user"] == "bob" and r.json()["roles"] == ["ops"]
        cookie = r.headers["set-cookie"]
        parts = [p.strip().lower() for p in cookie.split(";")]
        assert parts[0].startswith("corral_session=") and len(parts[0]) > 50
        assert "httponly" in parts and "samesite=strict" in parts and "path=/" in parts
        assert "secure" not in parts  # plain http here; https sets it (unit test)
        assert http.get("/v1/session").json()["user"] == "bob"
        csrf = r.json()["csrfToken"]
        assert http.delete("/v1/session", headers={"X-CSRF-Token": csrf}).status_code == 204
        problem(http.get("/v1/session"), 401)


def test_wrong_password_and_unknown_user_get_the_same_answer(stack: Stack) -> None:
    with httpx.Client(base_url=base(stack), timeout=60) as http:
        wrong = http.post("/v1/session", json={"username": "carol", "password": "Wrong-1"})
        unknown = http.post("/v1/session", json={"username": "mallory", "password": "Wrong-2"})
    assert problem(wrong, 401) == problem(unknown, 401) == "wrong username or password"
    assert wrong.json() == unknown.json()
    assert "set-cookie" not in wrong.headers and "set-cookie" not in unknown.headers


def test_a_token_less_client_gets_nothing(stack: Stack, vms: dict[str, Any]) -> None:
    with httpx.Client(base_url=base(stack), timeout=60) as http:
        for method, path in (
            ("GET", "/v1/vms"), ("GET", "/v1/vms/au-run"), ("POST", "/v1/vms/au-run/stop"),
            ("GET", "/metrics"), ("POST", "/v1/vms/au-run/display"), ("GET", "/v1/events"),
        ):  # fmt: skip
            problem(http.request(method, path), 401)
        http.cookies.set("corral_session", "guessed-session-id")
        problem(http.get("/v1/vms"), 401)
    with pytest.raises(InvalidStatus) as refused:
        connect(f"ws://127.0.0.1:{stack.port}/v1/vms/au-run/console", open_timeout=30)
    assert refused.value.response.status_code == 401


def test_a_user_sees_and_operates_only_what_is_granted(stack: Stack, vms: dict[str, Any]) -> None:
    http, csrf = session(stack, "bob")
    with contextlib.closing(http):
        h = {"X-CSRF-Token": csrf}
        assert [v["metadata"]["name"] for v in http.get("/v1/vms").json()["items"]] == ["au-run"]
        # another VM's actions, forged with a valid session: as if it did not exist
        assert problem(http.get("/v1/vms/au-other"), 404) == "VM 'au-other' not found"
        problem(http.post("/v1/vms/au-other/start", headers=h), 404)
        problem(http.delete("/v1/vms/au-other", headers=h), 404)
        assert "'reset'" in problem(http.post("/v1/vms/au-run/reset", headers=h), 403)
        r = http.patch("/v1/vms/au-run", json={"spec": {"vm": {"currentCpus": 2}}}, headers=h)
        assert "'*'" in problem(r, 403)
        r = http.post("/v1/vms/au-run/exec", json={"command": ["/bin/true"]}, headers=h)
        problem(r, 403)
        assert "admin" in problem(http.post("/v1/vms", json=vms["other"], headers=h), 403)
        events = http.get("/v1/events").text
        assert '"vm": "au-run"' in events and "au-other" not in events
        # the cookie alone is not enough to change anything: CSRF
        assert "X-CSRF-Token" in problem(http.post("/v1/vms/au-run/start"), 403)
        # a page on another origin riding bob's cookie, even with the token
        r = http.post("/v1/vms/au-run/start",
                      headers={**h, "Origin": "http://evil.example:8080"})  # fmt: skip
        assert "another origin" in problem(r, 403)
        assert http.get("/v1/vms/au-run").json()["status"]["state"] == "Running"
        r = http.post("/v1/vms/au-run/start", headers=h)  # granted: an idempotent start
        assert r.status_code == 200, r.text


def test_console_and_display_need_access_console(stack: Stack, vms: dict[str, Any]) -> None:
    url = f"ws://127.0.0.1:{stack.port}/v1/vms/au-run/console"
    origin = base(stack)
    bob, bob_csrf = session(stack, "bob")
    with contextlib.closing(bob):
        sid = bob.cookies["corral_session"]
        with pytest.raises(InvalidStatus) as refused:
            connect(url, additional_headers={"Cookie": f"corral_session={sid}", "Origin": origin},
                    open_timeout=30)  # fmt: skip
        assert refused.value.response.status_code == 403
        assert b"accessConsole" in refused.value.response.body
        r = bob.post("/v1/vms/au-run/display", headers={"X-CSRF-Token": bob_csrf})
        assert "'accessConsole'" in problem(r, 403)
        problem(bob.get("/v1/vms/au-run/logs"), 403)
    carol, carol_csrf = session(stack, "carol")
    with contextlib.closing(carol):
        sid = carol.cookies["corral_session"]
        cookie = {"Cookie": f"corral_session={sid}"}
        for headers in (cookie, {**cookie, "Origin": "http://evil.example"}):
            with pytest.raises(InvalidStatus) as refused:  # cross-site websocket hijacking
                connect(url, additional_headers=headers, open_timeout=30)
            assert refused.value.response.status_code == 403
        with connect(url, additional_headers={**cookie, "Origin": origin}, open_timeout=30) as ws:
            ws.send(b"\necho granted-$((6*7))\n")
            seen = b""
            while b"granted-42" not in seen:
                got = ws.recv(timeout=60)
                seen += got if isinstance(got, bytes) else got.encode()
        issued = carol.post("/v1/vms/au-run/display", headers={"X-CSRF-Token": carol_csrf})
        assert issued.status_code == 200, issued.text
        secret = issued.json()["password"]
        assert len(secret) >= 8
        problem(carol.post("/v1/vms/au-run/stop", headers={"X-CSRF-Token": carol_csrf}), 403)
    log = (stack.root / "daemon.log").read_text(errors="replace")
    assert secret not in log
    for password in PASSWORDS.values():
        assert password not in log
    for line in log.splitlines():  # the log is still JSON lines, and mentions the refusals
        json.loads(line)
    assert "/v1/vms/au-run/display" in log


def test_tokens_are_admins_and_unaffected_by_csrf(stack: Stack, vms: dict[str, Any]) -> None:
    auth = {"Authorization": f"Bearer {stack.token}"}
    with httpx.Client(base_url=base(stack), timeout=60, headers=auth) as http:
        names = sorted(v["metadata"]["name"] for v in http.get("/v1/vms").json()["items"])
        assert names == ["au-other", "au-run"]
        r = http.post("/v1/vms/au-other/stop", headers={"Origin": "http://elsewhere"})
        assert r.status_code == 200  # no cookie: no CSRF question
        assert http.get("/v1/session").json() == {"user": "ci", "roles": ["admin"],
                                                   "csrfToken": None}  # fmt: skip
    root, _ = session(stack, "root")  # an admin user sees everything too
    with contextlib.closing(root):
        assert len(root.get("/v1/vms").json()["items"]) == 2


def test_the_live_event_feed_shows_only_permitted_vms(stack: Stack, vms: dict[str, Any]) -> None:
    bob, _ = session(stack, "bob")
    auth = {"Authorization": f"Bearer {stack.token}"}
    lines: list[str] = []
    with contextlib.closing(bob), bob.stream("GET", "/v1/events?follow=true") as r:
        assert r.status_code == 200
        with httpx.Client(base_url=base(stack), timeout=60, headers=auth) as admin:
            for name in ("au-other", "au-run"):  # the admin touches both; bob may see one
                patch = {"metadata": {"labels": {"touched": "yes"}}}
                assert admin.patch(f"/v1/vms/{name}", json=patch).status_code == 200
        for line in r.iter_lines():
            lines.append(line)
            if line.startswith("data:") and '"au-run"' in line:
                break
    assert not [line for line in lines if "au-other" in line]
