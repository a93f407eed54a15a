"""The browser's way to a VM's graphical display: a websocket ↔ TCP proxy to qemu's VNC or
SPICE server (noVNC and spice-html5 speak their protocol over a binary websocket), and a SPICE
``.vv`` file for remote-viewer.

qemu's displays listen on the host (``spec.vm.display``, 127.0.0.1 by default): the proxy lets
a browser reach them through the daemon's one TCP listener, behind the API's authentication, so
the display ports never need to be exposed. qemu still asks for the display password (the page
gets a fresh one that expires in seconds from ``POST /v1/vms/{name}/display``).
"""

from __future__ import annotations

import asyncio
import itertools
from contextlib import AbstractAsyncContextManager
from pathlib import Path

from starlette.websockets import WebSocket

from corral.api.console import proxy_console
from corral.errors import Conflict, HostError
from corral.manager import Manager
from corral.manager.backends.base import ConsoleStream, open_stream

__all__ = ["display_address", "display_stream", "proxy_display", "vv_file"]

_CONNECT_TIMEOUT = 5.0


def display_address(manager: Manager, name: str, protocol: str) -> tuple[str, int]:
    """Where the running VM ``name``'s ``protocol`` (``vnc``, ``spice``) display listens;
    Conflict if it has none or does not run."""
    record = manager.get(name)
    display = record.document.vm.display
    cfg = None if display is None else display.vnc if protocol == "vnc" else display.spice
    if cfg is None:
        raise Conflict(
            f"VM {name!r} has no {protocol.upper()} display (spec.vm.display.{protocol})"
        )
    if record.status.get("state") != "Running":
        raise Conflict(f"VM {name!r} is not running")
    host = cfg.address
    if not _started_with(record.status.get("pid"), protocol, host, cfg.port):
        raise Conflict(
            f"VM {name!r}'s {protocol.upper()} display is not where its qemu listens (a changed "
            "spec.vm.display waits for a restart)"
        )
    return ("127.0.0.1" if host in ("0.0.0.0", "::") else host), cfg.port  # noqa: S104


def _started_with(pid: object, protocol: str, host: str, port: int) -> bool:
    """Whether the VM's running qemu (``pid``) was started listening on ``host:port``: the
    document may have changed since (a display change waits for a restart, and a running VM's
    ports are not checked again), and the proxy must reach the VM's own display, never another
    VM's or any host:port a document names."""
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return False
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    flag = b"-vnc" if protocol == "vnc" else b"-spice"
    listen = f"[{host}]:{port - 5900}" if ":" in host else f"{host}:{port - 5900}"
    for arg, value in itertools.pairwise(argv):
        if arg != flag:
            continue
        parts = value.decode(errors="replace").split(",")
        if protocol == "vnc" and parts[0] == listen:
            return True
        if protocol != "vnc" and f"port={port}" in parts and f"addr={host}" in parts:
            return True
    return False


def display_stream(address: tuple[str, int]) -> AbstractAsyncContextManager[ConsoleStream]:
    """A TCP connection to a display server (VNC, SPICE), as the API's console proxy takes a
    stream."""
    return open_stream(
        lambda: asyncio.open_connection(*address),
        lambda exc: HostError(f"cannot reach the display server: {exc}"),
        _CONNECT_TIMEOUT,
    )


async def proxy_display(websocket: WebSocket, address: tuple[str, int]) -> None:
    """Pipe the websocket's binary messages to the display server and back until either
    ends (the serial console's proxy, on a TCP stream)."""
    await proxy_console(websocket, display_stream(address))


def _vv_value(value: object) -> str:
    """A value for one line of the .vv (INI) file: no line breaks can get in."""
    text = str(value)
    if any(c in text for c in "\r\n\0"):
        raise ValueError("a .vv value has a line break")
    return text


def vv_file(name: str, host: str, port: int, password: str, *, title: str | None = None) -> str:
    """remote-viewer's connection file for a SPICE display (virt-viewer's ``[virt-viewer]``
    section), with the fresh password and ``delete-this-file`` so it does not linger."""
    lines = [
        "[virt-viewer]",
        "type=spice",
        f"host={_vv_value(host)}",
        f"port={int(port)}",
        f"password={_vv_value(password)}",
        f"title={_vv_value(title or name)}",
        "delete-this-file=1",
        "toggle-fullscreen=shift+f11",
        "release-cursor=shift+f12",
    ]
    return "\n".join(lines) + "\n"
