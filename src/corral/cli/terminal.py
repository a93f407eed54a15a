"""``corral console``: the serial console in this terminal, over the API's websocket.

The terminal is put in raw mode (keys go to the guest as typed, Ctrl-C included); Ctrl-]
leaves, as in telnet and virsh console. Without a terminal (a pipe), lines are sent as read.
"""

from __future__ import annotations

import contextlib
import os
import select
import sys
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING

from corral.errors import CorralError, HostError

if TYPE_CHECKING:
    from websockets.sync.client import ClientConnection

    from corral.client import Client

__all__ = ["attach_console", "open_console"]

ESCAPE = b"\x1d"  # Ctrl-]


@contextlib.contextmanager
def open_console(client: Client, name: str) -> Iterator[ClientConnection]:
    """A websockets sync connection to the VM's console (bytes both ways)."""
    from websockets.exceptions import InvalidStatus, WebSocketException
    from websockets.sync.client import connect, unix_connect

    headers = {"Authorization": f"Bearer {client.token}"} if client.token else None
    url = client.console_url(name)
    with contextlib.ExitStack() as stack:
        try:
            if client.socket is not None:
                ws = stack.enter_context(
                    unix_connect(str(client.socket), url, additional_headers=headers,
                                 max_size=None)
                )  # fmt: skip
            else:
                ws = stack.enter_context(connect(url, additional_headers=headers, max_size=None))
        except InvalidStatus as exc:
            raise _refusal(name, exc.response.status_code, exc.response.body) from exc
        except (OSError, WebSocketException) as exc:
            raise HostError(f"console of {name}: {exc}") from exc
        yield ws


def _refusal(name: str, status: int, body: bytes | bytearray | None) -> CorralError:
    """The daemon's problem+json denial as the error it names (NotFound, Conflict...)."""
    import json

    from corral.errors import Conflict, NotFound

    detail = ""
    with contextlib.suppress(ValueError, AttributeError):
        detail = str(json.loads(body or b"{}").get("detail") or "")
    if status == 404:
        return NotFound(detail or f"VM {name!r} not found")
    if status == 409:
        return Conflict(detail or f"VM {name!r} is not running")
    return HostError(f"console of {name}: refused ({status}{': ' + detail if detail else ''})")


def attach_console(client: Client, name: str) -> None:
    with open_console(client, name) as ws:
        _attached(ws, name)


def _attached(ws: ClientConnection, name: str) -> None:
    from websockets.exceptions import ConnectionClosed

    stdin = sys.stdin.fileno()
    out = sys.stdout.buffer
    is_tty = os.isatty(stdin)
    done = threading.Event()
    if is_tty:
        sys.stderr.write(f"Connected to {name}'s console. Escape character is '^]'.\r\n")
        sys.stderr.flush()

    def pump_out() -> None:
        try:
            while not done.is_set():
                data = ws.recv()
                out.write(data if isinstance(data, bytes) else data.encode())
                out.flush()
        except (ConnectionClosed, OSError):
            pass
        finally:
            done.set()

    reader = threading.Thread(target=pump_out, daemon=True)
    reader.start()
    saved = None
    if is_tty:
        import termios
        import tty

        saved = termios.tcgetattr(stdin)
        tty.setraw(stdin)
    try:
        while not done.is_set():
            ready, _, _ = select.select([stdin], [], [], 0.2)
            if not ready:
                continue
            data = os.read(stdin, 4096)
            if not data:
                break
            if is_tty and ESCAPE in data:
                data = data.split(ESCAPE, 1)[0]
                if data:
                    ws.send(data)
                break
            ws.send(data)
    except (ConnectionClosed, OSError):
        pass
    finally:
        done.set()
        if saved is not None:
            import termios

            termios.tcsetattr(stdin, termios.TCSADRAIN, saved)
        with contextlib.suppress(Exception):
            ws.close()
        reader.join(timeout=2)
        if is_tty:
            sys.stderr.write("\r\nDisconnected.\r\n")
