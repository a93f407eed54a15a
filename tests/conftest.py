"""Hygiene for every test (unit, integration, e2e): no test may leave an asyncio task running
behind it, and no developer's ``CORRAL_*``/``XDG_*`` environment may change a result.

Leaked tasks: after a test that used pytest-asyncio's function-scoped event loop (an ``async
def`` test, or a test with an async fixture), every task of that loop other than the checking
one must be done once all the test's fixtures are torn down; otherwise the test fails in its
teardown with each task's coroutine and where it is suspended. A leaked task hides a missing
``cancel``/``await`` in the code (a watcher that outlives its VM, a reply nobody reads) that
in a long-running daemon piles up. The loop's own cleanup would cancel such a task silently,
which is why the check runs before it. Learned from kopf's ``tests/conftest.py``.

A known leak whose fix belongs to someone else's code may be named in :data:`KNOWN_LEAKS`
(the coroutine's qualified name and the reason); nothing else is tolerated.

Environment: each test starts without ``CORRAL_*`` (but for the test-only switches in
:data:`KEPT_ENV`) and without the XDG base directories corral derives default paths from;
a test that needs one sets it (``monkeypatch.setenv`` or a subprocess ``env=``).
"""

from __future__ import annotations

import asyncio
import inspect
import os
from collections.abc import AsyncIterator

import pytest

# Coroutine qualified name -> why it may still be pending after a test. Keep it short and
# name the file that owns the fix.
KNOWN_LEAKS: dict[str, str] = {}

# Variables of the test set-up, not of corral: where guests/build.py caches the test guests,
# where kube/build.py and image/build.py cache the cluster binaries and the runner image,
# keeping the test cluster's state dir, and the switch that rewrites golden files. Every
# other CORRAL_* is removed.
KEPT_ENV = frozenset(
    {
        "CORRAL_CACHE_DIR",
        "CORRAL_DOCS_SCREENSHOTS",
        "CORRAL_UPDATE_GOLDEN",
        "CORRAL_KUBE_CACHE",
        "CORRAL_IMAGE_CACHE",
        "CORRAL_KUBE_KEEP",
    }
)

# Read by corral for default paths: runner data/runtime dirs, the client's socket, systemd
# user units.
XDG_ENV = ("XDG_RUNTIME_DIR", "XDG_DATA_HOME", "XDG_CONFIG_HOME")


@pytest.fixture(autouse=True)
def _isolated_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):  # what an earlier test or fixture set, too
        if _isolated(name):
            monkeypatch.delenv(name)


def _isolated(name: str) -> bool:
    return (name.startswith("CORRAL_") and name not in KEPT_ENV) or name in XDG_ENV


def pytest_configure(config: pytest.Config) -> None:
    """The same isolation for the whole session, before any fixture: module- and
    session-scoped fixtures (a daemon started once per file) copy ``os.environ`` too."""
    for name in [n for n in os.environ if _isolated(n)]:
        del os.environ[name]


def _uses_function_loop(request: pytest.FixtureRequest) -> bool:
    """Whether the test runs in pytest-asyncio's function-scoped loop: a coroutine test, or
    one of its fixtures is async (pytest-asyncio runs those in that loop)."""
    if inspect.iscoroutinefunction(getattr(request.node, "function", None)):
        return True
    defs = getattr(request.node, "_fixtureinfo", None)
    if defs is None:
        return False
    return any(
        inspect.iscoroutinefunction(d.func) or inspect.isasyncgenfunction(d.func)
        for chain in defs.name2fixturedefs.values()
        for d in chain
    )


@pytest.fixture(autouse=True)
def _no_leaked_asyncio_tasks(request: pytest.FixtureRequest) -> None:
    """Set up first (a root autouse fixture), so the async guard it brings in is torn down
    after every other fixture of the test and before the loop closes."""
    if _uses_function_loop(request):
        request.getfixturevalue("_leaked_task_guard")


def _describe(task: asyncio.Task[object]) -> str:
    coro = task.get_coro()
    name = getattr(coro, "__qualname__", repr(coro))
    frames = task.get_stack(limit=1)
    where = f" at {frames[0].f_code.co_filename}:{frames[0].f_lineno}" if frames else ""
    return f"{task.get_name()} {name}{where}"


def _coro_name(task: asyncio.Task[object]) -> str:
    return str(getattr(task.get_coro(), "__qualname__", ""))


@pytest.fixture
async def _leaked_task_guard() -> AsyncIterator[None]:
    yield
    current = asyncio.current_task()
    leaked = [
        t for t in asyncio.all_tasks() if t is not current and _coro_name(t) not in KNOWN_LEAKS
    ]
    if leaked:
        lines = "\n  ".join(sorted(_describe(t) for t in leaked))
        pytest.fail(f"{len(leaked)} asyncio task(s) still pending after the test:\n  {lines}")


def pytest_report_header() -> list[str]:
    return [f"tolerated asyncio leaks: {', '.join(sorted(KNOWN_LEAKS))}"] if KNOWN_LEAKS else []
