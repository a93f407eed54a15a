"""``corral serve``: the manager as a long-running service, and host shutdown.

One daemon per state dir: it holds an exclusive lock on ``<state>/daemon.lock`` (with its pid
inside) for as long as it runs, so two daemons never drive the same VMs.

Under systemd (``Type=notify``, deploy/corral.service) it sends ``READY=1`` once every VM is
re-attached and the API listens, ``STATUS=`` lines, and ``STOPPING=1`` when it begins to stop.
It logs through :mod:`logging` (``corral.daemon``); ``corral serve`` formats the log.

SIGTERM/SIGINT end the daemon and leave every VM running (an upgrade or restart of corral is
invisible to guests), unless ``stopVmsOnExit`` is set: then it is the host-shutdown hook and
stops every VM gracefully, in parallel, first (what libvirt-guests does).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import signal
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractAsyncContextManager
from pathlib import Path

from corral.errors import Conflict
from corral.host.atomic import ensure_private_dir
from corral.manager.config import ManagerConfig
from corral.manager.manager import Manager
from corral.manager.sdnotify import notify

__all__ = ["Service", "daemon_lock", "host_shutdown", "serve"]


@contextlib.contextmanager
def daemon_lock(state_dir: Path) -> Iterator[None]:
    """Hold ``<state>/daemon.lock``; Conflict naming the holder's pid if another has it."""
    ensure_private_dir(state_dir, tighten=True)
    path = state_dir / "daemon.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            raise Conflict(
                f"another corral daemon (pid {holder}) manages {state_dir}; stop it first"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)


_logger = logging.getLogger("corral.daemon")


def _log(event: str, **fields: object) -> None:
    _logger.info(event, extra={"fields": fields})


Service = Callable[[Manager], AbstractAsyncContextManager[object]]
"""Something that runs beside the manager for the daemon's lifetime (the REST API)."""


async def serve(
    config: ManagerConfig,
    *,
    services: Sequence[Service] = (),
    prepare: Callable[[], Sequence[Service]] | None = None,
) -> int:
    """Run until SIGTERM/SIGINT: re-attach, reconcile, run ``services``; then leave VMs
    running (or stop them all with ``stopVmsOnExit``).

    ``prepare`` builds more services in a thread *while* the manager re-attaches: importing
    the HTTP stack (fastapi, uvicorn) takes longer than re-attaching every VM, which must not
    wait for it. What it raises (a bad option) ends the daemon after re-attaching, VMs kept
    running, before any service starts."""
    with daemon_lock(config.state_dir):
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):  # before open: a stop while adopting waits
            loop.add_signal_handler(sig, stop.set)
        notify("STATUS=re-attaching running VMs")
        manager = Manager(config)
        preparing = asyncio.ensure_future(asyncio.to_thread(prepare)) if prepare else None
        try:
            adopted = await manager.open()
        except BaseException:
            if preparing is not None:
                preparing.cancel()
                await asyncio.gather(preparing, return_exceptions=True)
            raise
        reattached = sum(1 for ok in adopted.values() if ok)
        _log(
            "DaemonStarted",
            pid=os.getpid(),
            stateDir=str(config.state_dir),
            vms=len(adopted),
            reattached=sorted(n for n, ok in adopted.items() if ok),
        )
        try:
            async with contextlib.AsyncExitStack() as stack:
                prepared = await preparing if preparing is not None else ()
                for service in (*services, *prepared):
                    await stack.enter_async_context(service(manager))
                _log("DaemonReady", pid=os.getpid())
                notify("READY=1", f"STATUS=serving {len(adopted)} VM(s), {reattached} re-attached")
                await stop.wait()
        finally:
            leaving = "stopping every VM" if config.stop_vms_on_exit else "VMs keep running"
            notify("STOPPING=1", f"STATUS=stopping; {leaving}")
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
            result = await manager.close(stop_vms=config.stop_vms_on_exit)
            _log("DaemonStopped", stoppedVms=result)
    return 0


async def host_shutdown(config: ManagerConfig, timeout: float | None = None) -> dict[str, str]:
    """Stop every VM of a state dir gracefully, in parallel (no daemon may be running:
    with one, use ``stopVmsOnExit`` and stop the daemon). Returns {name: how it ended}."""
    with daemon_lock(config.state_dir):
        manager = Manager(config)
        await manager.open(reconcile=False)
        try:
            return await manager.stop_all(timeout)
        finally:
            await manager.close()
