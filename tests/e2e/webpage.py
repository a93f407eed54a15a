"""The web pages' test harness: a real ``corral serve`` with the pages on TCP (local users,
sessions) and a real Chromium (Debian's ``chromium``) driven by Playwright for Python, pointed
at that executable (Playwright downloads no browser).

A browser or daemon that cannot start fails the test with what to install.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.e2e.broker import free_port
from tests.integration.test_manager import qemu_pids

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = Path(os.environ.get("CORRAL_CHROMIUM", "/usr/bin/chromium"))
INSTALL = "apt-get install --no-install-recommends chromium (make deps), pip install playwright"
VENDOR = REPO / "src/corral/web/vendor/.vendored"
CHROMIUM_FLAGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage",
]  # fmt: skip
ADMIN = ("admin", "admin-pass-1234")
# Screenshots go to a scratch dir; CORRAL_DOCS_SCREENSHOTS=1 writes docs/img/ (the README's
# pictures) instead, so a test run does not leave the checkout modified.
IMG = (
    REPO / "docs" / "img"
    if os.environ.get("CORRAL_DOCS_SCREENSHOTS") == "1"
    else Path(tempfile.gettempdir()) / "corral-web-screenshots"
)


def corral(*args: str) -> list[str]:
    return [sys.executable, "-m", "corral.cli.main", *args]


def env(socket: Path | None = None) -> dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO / "src"), e.get("PYTHONPATH")) if p)
    if socket is not None:
        e["CORRAL_SOCKET"] = str(socket)
    return e


class WebDaemon:
    """``corral serve --service web`` in its own state dir, with the pages on 127.0.0.1."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.socket = root / "api.sock"
        self.users = root / "users"
        self.proc: subprocess.Popen[bytes] | None = None
        self.vms: list[str] = []
        (root / "corral.yaml").write_text(f"runDir: {root}/run\ncpuOvercommit: 64\n"
                                          "ramOvercommit: 8\n")  # fmt: skip
        self.add_user(*ADMIN, "admin")

    def add_user(self, name: str, password: str, *roles: str) -> None:
        role_args = [a for r in roles for a in ("--role", r)]
        subprocess.run(corral("user", "add", name, "--file", str(self.users), *role_args),
                       input=password + "\n", text=True, env=env(), check=True,
                       capture_output=True, timeout=60)  # fmt: skip

    def start(self, *extra: str) -> None:
        with (self.root / "daemon.log").open("ab") as log:
            self.proc = subprocess.Popen(
                corral("serve", "--state-dir", str(self.root), "--accel", "tcg",
                       "--config", str(self.root / "corral.yaml"), "--socket", str(self.socket),
                       "--listen", f"127.0.0.1:{self.port}", "--users", str(self.users),
                       "--open-policy", "--service", "api", "--service", "web", *extra),
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env(),
                start_new_session=True,
            )  # fmt: skip
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(self.url + "/readyz", timeout=2) as r:  # noqa: S310
                    if r.status == 200:
                        return
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"corral serve with the web pages did not come up:\n"
                                     f"{self.log()}")  # fmt: skip
            time.sleep(0.2)

    def log(self) -> str:
        return (self.root / "daemon.log").read_text(errors="replace")[-4000:]

    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(corral(*args), capture_output=True, text=True,
                              env=env(self.socket), timeout=timeout, check=False)  # fmt: skip
        assert done.returncode == 0, f"corral {' '.join(args)}: {done.stderr}\n{self.log()}"
        return done

    def vm(self, name: str) -> dict[str, Any]:
        return dict(json.loads(self.cli("show", name, "-o", "json").stdout))

    def apply(self, doc: dict[str, Any]) -> None:
        path = self.root / f"{doc['metadata']['name']}.yaml"
        path.write_text(yaml.safe_dump(doc))
        self.vms.append(doc["metadata"]["name"])
        self.cli("apply", "-f", str(path))

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for name in self.vms:
            for pid in qemu_pids(name):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture
def web_daemon() -> Iterator[WebDaemon]:
    if not VENDOR.exists():
        pytest.fail("the pages' front-end packages are not vendored: run `make web` "
                    "(scripts/vendor-web.sh)")  # fmt: skip
    root = Path(tempfile.mkdtemp(prefix="cw-", dir="/tmp"))
    daemon = WebDaemon(root)
    try:
        yield daemon
    finally:
        daemon.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def browser() -> Iterator[Any]:
    """A Playwright browser context on Debian's chromium, headless, in a fresh profile."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail(f"Playwright for Python is missing: {INSTALL}")
    if not CHROMIUM.exists():
        pytest.fail(f"no {CHROMIUM}: {INSTALL}")
    profile = tempfile.mkdtemp(prefix="cw-chromium-")
    with sync_playwright() as pw:
        try:
            context = pw.chromium.launch_persistent_context(
                profile, executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_FLAGS,
                viewport={"width": 1280, "height": 860}, accept_downloads=True,
            )  # fmt: skip
        except Exception as exc:  # whatever stops the browser: say what it is
            pytest.fail(f"chromium did not start under Playwright: {exc}\n{INSTALL}")
        try:
            yield context
        finally:
            context.close()
            shutil.rmtree(profile, ignore_errors=True)


def login(page: Any, daemon: WebDaemon, user: tuple[str, str] = ADMIN) -> None:
    page.goto(daemon.url + "/ui/login")
    page.fill("#username", user[0])
    page.fill("#password", user[1])
    page.click("#submit")
    page.wait_for_url(daemon.url + "/ui/vms")
    page.wait_for_selector("body[data-ready=true]")


def screenshot(page: Any, name: str, *, full_page: bool = False) -> Path:
    IMG.mkdir(parents=True, exist_ok=True)
    path = IMG / f"web-{name}.png"
    page.screenshot(path=str(path), full_page=full_page)
    return path
