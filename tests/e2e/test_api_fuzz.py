"""Schemathesis against the OpenAPI the real daemon serves (TCP, with a token): whatever it
sends, the API answers without a 5xx, and every error is problem+json.

Left out of the fuzzing, and why: the SSE endpoints (``follow=true`` streams forever; they are
covered in test_api_cli.py), and ``POST /v1/images`` (a generated URL would make the daemon
fetch from arbitrary hosts: this workplace allows loopback traffic only). ``POST
/v1/host/shutdown`` stays in: the daemon has no running VM to stop.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

from tests.e2e.test_api_cli import _env, _free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]


class FuzzDaemon:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.token = ""

    def start(self) -> None:
        env = _env(self.root / "s.sock")
        tokens = self.root / "tokens"
        made = subprocess.run(
            [sys.executable, "-m", "corral.cli.main", "token", "create", "fuzz", "--file",
             str(tokens)], capture_output=True, text=True, env=env, check=True,
        )  # fmt: skip
        self.token = made.stdout.strip()
        (self.root / "host.yaml").write_text(f"imagePaths: [{self.root / 'images'}]\n")
        with (self.root / "daemon.log").open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "corral.cli.main", "serve", "--state-dir",
                 str(self.root / "state"), "--accel", "tcg", "--policy",
                 str(self.root / "host.yaml"), "--socket", str(self.root / "s.sock"),
                 "--open-policy", "--listen", f"127.0.0.1:{self.port}", "--tokens", str(tokens)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env,
                start_new_session=True,
            )  # fmt: skip
        deadline = time.monotonic() + 60
        while "DaemonReady" not in (self.root / "daemon.log").read_text(errors="replace"):
            assert self.proc.poll() is None, (self.root / "daemon.log").read_text()
            assert time.monotonic() < deadline, "daemon not ready"
            time.sleep(0.1)


@pytest.fixture(scope="module")
def fuzz_daemon() -> Iterator[FuzzDaemon]:
    root = Path(os.path.realpath("/tmp")) / f"cf-{os.getpid()}-{time.monotonic_ns() % 10**8}"
    root.mkdir()
    d = FuzzDaemon(root)
    try:
        d.start()
        yield d
    finally:
        if d.proc is not None and d.proc.poll() is None:
            d.proc.send_signal(signal.SIGTERM)
            d.proc.wait(timeout=60)
        log = (root / "daemon.log").read_text(errors="replace")
        shutil.rmtree(root, ignore_errors=True)
        assert "Traceback" not in log, log[-3000:]


def _fuzz(
    operation: Any, mode: GenerationMode, url: str, auth: dict[str, str], seen: dict[str, int]
) -> None:
    label = f"{mode.value} {operation.label}"

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck),
              derandomize=True, database=None)  # fmt: skip
    def fuzz(case: Any) -> None:
        response = case.call_and_validate(
            base_url=url, headers=auth, checks=[not_a_server_error], timeout=120
        )
        seen[label] = seen.get(label, 0) + 1
        if response.status_code >= 400:
            kind = (response.headers.get("content-type") or [""])[0]
            assert kind.startswith("application/problem+json"), (
                label, response.status_code, response.text[:300])  # fmt: skip

    try:
        fuzz()
    except Unsatisfiable:
        # an operation without inputs (GET /healthz) has no invalid request to make
        assert mode is GenerationMode.NEGATIVE, label


def test_no_server_errors(fuzz_daemon: FuzzDaemon) -> None:
    """Each operation of the served schema, fuzzed with hypothesis (schemathesis's strategies;
    driven here rather than by its pytest plugin, which does not support this pytest)."""
    auth = {"Authorization": f"Bearer {fuzz_daemon.token}"}
    schema = schemathesis.openapi.from_url(f"{fuzz_daemon.url}/openapi.json", headers=auth)
    schema = schema.exclude(path_regex=r"/events$").exclude(path="/v1/images", method="POST")
    seen: dict[str, int] = {}
    for result in schema.get_all_operations():
        for mode in GenerationMode:  # valid requests, and requests that break the schema
            _fuzz(result.ok(), mode, fuzz_daemon.url, auth, seen)
    assert len(seen) >= 25, seen
