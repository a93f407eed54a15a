"""The root fixtures of tests/conftest.py, run on small test files in a separate pytest: a test
that leaves an asyncio task pending fails (and a test that awaits what it starts passes), and
a developer's ``CORRAL_*``/``XDG_*`` variables never reach a test."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

LEAKY = """
import asyncio

import pytest


async def forever() -> None:
    await asyncio.Event().wait()


async def test_leaks_a_task() -> None:
    asyncio.get_running_loop().create_task(forever(), name="left-behind")


@pytest.fixture
async def starts_a_task():
    asyncio.create_task(forever())
    yield


def test_sync_test_with_a_leaky_async_fixture(starts_a_task: None) -> None:
    pass


async def test_awaits_what_it_starts() -> None:
    task = asyncio.create_task(forever())
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


def test_environment() -> None:
    from corral.client import default_socket

    assert "CORRAL_SOCKET" not in os.environ
    assert "CORRAL_TOKEN" not in os.environ
    assert "XDG_RUNTIME_DIR" not in os.environ
    assert os.environ["CORRAL_CACHE_DIR"] == "/kept"
    assert str(default_socket()) == "/run/corral/corral.sock"
"""


def test_leaked_tasks_fail_and_the_environment_is_clean(tmp_path: Path) -> None:
    tests = tmp_path / "tests"
    (tests / "unit").mkdir(parents=True)
    (tests / "__init__.py").write_text("")
    (tests / "unit" / "__init__.py").write_text("")
    (tests / "conftest.py").write_text((REPO / "tests" / "conftest.py").read_text())
    (tests / "unit" / "test_leaky.py").write_text("import os\n" + LEAKY)
    (tmp_path / "pytest.ini").write_text("[pytest]\nasyncio_mode = auto\n")
    env = {
        **os.environ,
        "CORRAL_SOCKET": "/tmp/developer.sock",
        "CORRAL_TOKEN": "crl_developer",
        "XDG_RUNTIME_DIR": "/run/user/1000",
        "CORRAL_CACHE_DIR": "/kept",
        "PYTHONPATH": str(REPO / "src"),
    }
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rA", "tests"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    out = proc.stdout + proc.stderr
    assert "ERROR tests/unit/test_leaky.py::test_leaks_a_task" in out, out
    assert "left-behind forever" in out, out
    assert "ERROR tests/unit/test_leaky.py::test_sync_test_with_a_leaky_async_fixture" in out, out
    assert "PASSED tests/unit/test_leaky.py::test_awaits_what_it_starts" in out, out
    assert "PASSED tests/unit/test_leaky.py::test_environment" in out, out
    assert proc.returncode == 1, out
