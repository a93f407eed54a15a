"""The systemd notification protocol (``sd_notify(3)``), client side, without libsystemd.

A ``Type=notify`` service tells systemd it is ready by sending the datagram ``READY=1`` to the
AF_UNIX socket named in ``$NOTIFY_SOCKET``: a path, or, starting with ``@``, a name in the
abstract namespace (the ``@`` stands for the leading NUL byte). Later ``STATUS=...`` lines
show in ``systemctl status``; ``STOPPING=1`` says shutdown has begun. Outside systemd (no
``$NOTIFY_SOCKET``) every call is a no-op, and a notification that cannot be sent never
stops the daemon: it returns False.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping

__all__ = ["notify"]


def _address(value: str) -> str | bytes | None:
    if value.startswith("@"):
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    return None  # vsock (vsock:CID:PORT) and relative paths: not for a local daemon


def notify(*lines: str, env: Mapping[str, str] | None = None) -> bool:
    """Send ``lines`` (``"READY=1"``, ``"STATUS=serving 3 VMs"``...) as one datagram to
    ``$NOTIFY_SOCKET``. True if sent; False if there is no socket or sending failed."""
    target = (env if env is not None else os.environ).get("NOTIFY_SOCKET", "")
    address = _address(target) if target else None
    if address is None or not lines:
        return False
    message = "\n".join(line.replace("\n", " ") for line in lines).encode()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(address)
            s.sendall(message)
    except OSError:
        return False
    return True
