"""Tap devices on a bridge, made by the host's bridge helper and handed to qemu as an fd.

qemu's own ``-netdev bridge,helper=`` makes qemu run the helper: through ``/bin/sh -c`` when
its path has a space, and only without seccomp's ``spawn=deny`` and ``no_new_privs`` (a setuid
helper gains nothing under them). As libvirt does, corral runs the helper itself, with an
argv list, and passes the tap to qemu (``-netdev tap,fd=N``), so qemu keeps its sandbox.

The helper (Debian's ``qemu-bridge-helper``; its ACL in ``/etc/qemu/bridge.conf`` says which
bridges are allowed) creates a tap, attaches it to the bridge and sends its fd over the unix
socket named by ``--fd``.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import os
import re
import socket

from corral.errors import HostError

__all__ = ["open_bridge_tap"]

_BRIDGE = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")
_TIMEOUT = 15.0


async def open_bridge_tap(helper: str, bridge: str, *, vnet_hdr: bool = True) -> int:
    """A new tap on ``bridge`` (an open fd the caller owns), made by ``helper``."""
    if not _BRIDGE.fullmatch(bridge):
        raise HostError(f"bridge {bridge!r} is not an interface name")
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        argv = [helper, *(["--use-vnet"] if vnet_hdr else []), f"--br={bridge}"]
        argv.append(f"--fd={theirs.fileno()}")
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE,
                pass_fds=(theirs.fileno(),),
            )
        except OSError as exc:
            raise HostError(f"cannot run the bridge helper {helper}: {exc.strerror}") from exc
        theirs.close()
        try:
            _, stderr = await asyncio.wait_for(proc.communicate(), _TIMEOUT)
        except TimeoutError as exc:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            raise HostError(f"bridge helper {helper} did not answer in {_TIMEOUT:g}s") from exc
        if proc.returncode != 0:
            text = stderr.decode(errors="replace").strip()[-500:]
            raise HostError(
                f"bridge helper {helper} could not attach a tap to {bridge} "
                f"(exit {proc.returncode}): {text or 'no message'}"
            )
        return _receive_fd(ours)
    finally:
        theirs.close()
        ours.close()


def _receive_fd(sock: socket.socket) -> int:
    sock.setblocking(False)
    fds = array.array("i")
    try:
        _, ancillary, _, _ = sock.recvmsg(1, socket.CMSG_SPACE(fds.itemsize))
    except BlockingIOError as exc:
        raise HostError("the bridge helper exited without sending a tap") from exc
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[: len(data) - (len(data) % fds.itemsize)])
    if not fds:
        raise HostError("the bridge helper sent no tap file descriptor")
    for extra in fds[1:]:
        os.close(extra)
    return fds[0]
