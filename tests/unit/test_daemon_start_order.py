"""The daemon re-attaches its VMs before its services (the HTTP stack) are ready: the services
are built in a thread while the manager opens, and start only once both are done."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from collections.abc import AsyncIterator
from pathlib import Path

from corral.manager import Manager, ManagerConfig
from corral.manager.daemon import Service, serve


class _Seen(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []
        self.reattached = threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())
        if record.getMessage() == "DaemonStarted":
            self.reattached.set()


async def test_services_are_built_while_the_manager_reattaches(tmp_path: Path) -> None:
    seen = _Seen()
    logger = logging.getLogger("corral.daemon")
    level = logger.level
    logger.addHandler(seen)
    logger.setLevel(logging.INFO)
    ran: list[str] = []

    @contextlib.asynccontextmanager
    async def service(manager: Manager) -> AsyncIterator[object]:
        ran.append(manager.state.value)
        os.kill(os.getpid(), signal.SIGTERM)  # the daemon's own handler: stop
        yield None

    def prepare() -> list[Service]:
        # blocks the daemon for good if it waited for its services before re-attaching
        ran.append(f"built after re-attach: {seen.reattached.wait(timeout=60)}")
        return [service]

    try:
        code = await serve(ManagerConfig(state_dir=tmp_path / "state"), prepare=prepare)
    finally:
        logger.removeHandler(seen)
        logger.setLevel(level)
    assert code == 0
    assert ran == ["built after re-attach: True", "Open"], ran
    assert seen.messages == ["DaemonStarted", "DaemonReady", "DaemonStopped"], seen.messages
