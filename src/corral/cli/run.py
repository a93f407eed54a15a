"""``corral run -c vm.yaml``: one VM in the foreground, like VM-Operator's runner.

Starts the VM (or re-attaches to it if its qemu is still alive), then watches the document
and the display secret file and applies changes in place. SIGTERM/SIGINT stop the VM
gracefully; SIGHUP re-reads the document at once. Exit code 0 after a clean stop, 1 if
qemu crashed or could not start. Events are JSON lines on stderr (or ``--events FILE``).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from pathlib import Path

import click


def _stamp(path: Path | None) -> tuple[int, int, int] | None:
    if path is None:
        return None
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


def _dir_stamp(path: Path | None) -> object:
    if path is not None and path.is_dir():
        return tuple(_stamp(p) for p in sorted(path.iterdir()))
    return _stamp(path)


@click.command()
@click.option("-c", "--config", "config", required=True, type=click.Path(dir_okay=False))
@click.option("--data-dir", default=None, help="Persistent files (overrides runner.dataDir).")
@click.option("--runtime-dir", default=None, help="Sockets, pidfile (overrides runner.runtimeDir).")
@click.option("--status-file", default=None, help="Status JSON (overrides runner.statusFile).")
@click.option(
    "--display-secret-file",
    default=None,
    help="Display password file, or a dir with display-password and password-expiry.",
)
@click.option("--policy", "policy_file", default=None, type=click.Path(dir_okay=False))
@click.option("--accel", type=click.Choice(["auto", "kvm", "tcg"]), default=None)
@click.option("--boot-marker", default=None, help="Serial console text that means 'booted'.")
@click.option("--events", "events_file", default=None, help="Append JSON-line events here.")
@click.option("--poll", default=0.5, show_default=True, help="Config watch interval (s).")
def run(
    config: str,
    data_dir: str | None,
    runtime_dir: str | None,
    status_file: str | None,
    display_secret_file: str | None,
    policy_file: str | None,
    accel: str | None,
    boot_marker: str | None,
    events_file: str | None,
    poll: float,
) -> None:
    """Run one VM in the foreground and keep it matching its document."""
    code = asyncio.run(
        _run(
            Path(config),
            dict(
                data_dir=data_dir,
                runtime_dir=runtime_dir,
                status_file=status_file,
                display_secret_file=display_secret_file,
            ),
            policy_file,
            accel,
            boot_marker,
            events_file,
            poll,
        )
    )
    sys.exit(code)


async def _run(
    config: Path,
    overrides: dict[str, str | None],
    policy_file: str | None,
    accel: str | None,
    boot_marker: str | None,
    events_file: str | None,
    poll: float,
) -> int:
    from corral.errors import CorralError
    from corral.qemu.fingerprint import find_emulator, resolve_accelerator
    from corral.runner.config import resolve_paths
    from corral.runner.status import JsonLinesSink, VmState
    from corral.runner.supervisor import VmSupervisor
    from corral.spec import load_document_file, load_policy

    doc = load_document_file(config)
    policy = load_policy(policy_file)
    paths = resolve_paths(doc, **overrides)
    resolved = resolve_accelerator(accel, find_emulator(paths.emulator)) if accel else None
    stream = open(events_file, "a", encoding="utf-8") if events_file else sys.stderr  # noqa: SIM115
    marker = boot_marker or (doc.runner.boot_marker if doc.runner else None)
    sup = VmSupervisor(
        doc, paths, policy, accelerator=resolved, events=JsonLinesSink(stream), boot_marker=marker
    )
    # handlers first: a SIGTERM while qemu starts or is re-attached is a stop request, never
    # the default death that would leave qemu unsupervised
    loop = asyncio.get_running_loop()
    stop_requested = asyncio.Event()
    reload_now = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop_requested.set)
    loop.add_signal_handler(signal.SIGHUP, reload_now.set)
    if not await sup.attach():
        await sup.start()

    async def watch() -> None:
        config_stamp = _stamp(config)
        last_state = doc.vm.state
        secret_stamp = _dir_stamp(paths.display_secret_file)
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(reload_now.wait(), poll)
            forced = reload_now.is_set()
            reload_now.clear()
            stamp = _stamp(config)
            if forced or stamp != config_stamp:
                config_stamp = stamp
                try:
                    new = load_document_file(config)
                except CorralError as exc:
                    sup.refuse_config(exc)  # the VM keeps running on the last good document
                    continue
                if new.vm.state == "Stopped" and last_state != "Stopped":
                    stop_requested.set()
                last_state = new.vm.state
                with contextlib.suppress(CorralError):  # reported in status and events
                    await sup.apply(new)
            stamp2 = _dir_stamp(paths.display_secret_file)
            if stamp2 != secret_stamp:
                secret_stamp = stamp2
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
        if stream is not sys.stderr:
            stream.close()
    return 0 if state is VmState.STOPPED else 1
