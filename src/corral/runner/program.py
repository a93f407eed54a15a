"""The runner program: one VM kept matching its document until it is told to stop.

This is ``corral run`` without its flags, built on the runner contract
(:mod:`corral.runner.contract`), so every placement runs the same loop: a file placement
(:func:`run_file_program`, the CLI and systemd units) and, later, a Kubernetes one (a
:class:`~corral.runner.contract.DocumentSource` over the VM object, a status sink patching
its status).

The loop: start the VM (or re-attach to its qemu if it is still alive), then apply each new
document live, refuse a bad one (the VM keeps running on the last good document), and apply
a changed display secret. SIGTERM/SIGINT, or a document whose state turns Stopped, stop the
VM gracefully; SIGHUP re-reads the document at once. Returns 0 after a clean stop, 1 if qemu
crashed or could not start.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from corral.errors import CorralError
from corral.runner.config import RunnerPaths
from corral.runner.contract import (
    DocumentSource,
    EventSink,
    FileDocumentSource,
    StatusSink,
    tree_stamp,
)
from corral.runner.status import VmState
from corral.spec import HostPolicy

__all__ = ["run_file_program", "run_program"]


async def run_program(
    source: DocumentSource,
    paths: RunnerPaths,
    policy: HostPolicy,
    *,
    accelerator: str | None = None,
    events: EventSink | None = None,
    status: StatusSink | None = None,
    status_sinks: Sequence[StatusSink] | None = None,
    boot_marker: str | None = None,
    poll: float = 0.5,
) -> int:
    """Run the VM of ``source`` until it stops; the exit code (0: stopped, 1: crashed or
    failed). ``poll``: how often the document and the display secret are checked.
    ``status_sinks``: where statuses go instead of the status file of ``paths``."""
    from corral.runner.supervisor import VmSupervisor

    doc = source.current()
    marker = boot_marker or (doc.runner.boot_marker if doc.runner else None)
    sup = VmSupervisor(
        doc,
        paths,
        policy,
        accelerator=accelerator,
        events=events,
        boot_marker=marker,
        on_status=status,
        status_sinks=status_sinks,
    )
    # handlers first: a SIGTERM while qemu starts or is re-attached is a stop request, never
    # the default death that would leave qemu unsupervised
    loop = asyncio.get_running_loop()
    stop_requested = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop_requested.set)
    loop.add_signal_handler(signal.SIGHUP, source.reload)
    try:
        if not await sup.attach():
            await sup.start()

        async def watch() -> None:
            last_state = doc.vm.state
            secret_stamp = tree_stamp(paths.display_secret_file)
            while True:
                try:
                    new = await source.wait_change(poll)
                except CorralError as exc:
                    sup.refuse_config(exc)  # the VM keeps running on the last good document
                    continue
                if new is not None:
                    if new.vm.state == "Stopped" and last_state != "Stopped":
                        stop_requested.set()
                    last_state = new.vm.state
                    with contextlib.suppress(CorralError):  # reported in status and events
                        await sup.apply(new)
                stamp = tree_stamp(paths.display_secret_file)
                if stamp != secret_stamp:
                    secret_stamp = stamp
                    with contextlib.suppress(CorralError):
                        await sup.display_secret_changed()

        watcher = asyncio.ensure_future(watch())
        finished = asyncio.ensure_future(sup.wait_finished())
        stopper = asyncio.ensure_future(stop_requested.wait())
        try:
            await asyncio.wait({finished, stopper}, return_when=asyncio.FIRST_COMPLETED)
            if stopper.done() and not finished.done():
                await sup.stop()
            state = await sup.wait_finished()
        finally:
            for task in (watcher, stopper, finished):
                task.cancel()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
    return 0 if state is VmState.STOPPED else 1


async def run_file_program(
    config: Path,
    *,
    data_dir: str | None = None,
    runtime_dir: str | None = None,
    status_file: str | None = None,
    display_secret_file: str | None = None,
    policy_file: str | None = None,
    accel: str | None = None,
    boot_marker: str | None = None,
    events_file: str | None = None,
    poll: float = 0.5,
) -> int:
    """The file placement (``corral run``): the document in ``config``, the status in its
    status file, events as JSON lines appended to ``events_file`` (else stderr). Explicit
    paths override the document's ``runner:`` section."""
    from corral.qemu.fingerprint import find_emulator, resolve_accelerator
    from corral.runner.config import resolve_paths
    from corral.runner.filechannel import JsonLinesSink
    from corral.spec import load_policy

    source = FileDocumentSource(config)
    doc = source.current()
    policy = load_policy(policy_file)
    paths = resolve_paths(
        doc,
        data_dir=data_dir,
        runtime_dir=runtime_dir,
        status_file=status_file,
        display_secret_file=display_secret_file,
    )
    resolved = resolve_accelerator(accel, find_emulator(paths.emulator)) if accel else None
    stream = open(events_file, "a", encoding="utf-8") if events_file else sys.stderr  # noqa: SIM115
    try:
        return await run_program(
            source,
            paths,
            policy,
            accelerator=resolved,
            events=JsonLinesSink(stream),
            boot_marker=boot_marker,
            poll=poll,
        )
    finally:
        if stream is not sys.stderr:
            stream.close()
