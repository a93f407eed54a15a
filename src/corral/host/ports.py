"""The host ports a VM's qemu listens on, and whether they are free before it starts.

qemu binds them while it starts (user-network ``hostfwd``, ``-spice port=``, ``-vnc``) and
exits when one is taken ("Could not set up host forwarding rule", "Failed to bind socket"):
a start that would fail again the same way on every retry. So they are tried here first, the
way qemu binds them (``SO_REUSEADDR``, as libslirp, SPICE and qemu's VNC server set it: a TCP
port with only ``TIME_WAIT`` connections left is free, one with a listener is not), and a
taken one is reported with the field that asks for it.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass

from corral.errors import FieldIssue
from corral.spec import VmDocument

__all__ = ["HostPort", "busy_ports", "host_ports", "port_busy"]

_WILDCARDS = frozenset({"0.0.0.0", "::"})  # noqa: S104 - compared, never bound here


@dataclass(frozen=True)
class HostPort:
    """One port qemu will listen on: ``field`` is where the document asks for it."""

    field: str
    protocol: str  # tcp | udp
    address: str
    port: int

    def overlaps(self, other: HostPort) -> bool:
        """Whether two listeners would collide (a wildcard address takes every address)."""
        return (
            self.protocol == other.protocol
            and self.port == other.port
            and (
                self.address == other.address
                or self.address in _WILDCARDS
                or other.address in _WILDCARDS
            )
        )

    def __str__(self) -> str:
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"{self.protocol} {host}:{self.port}"


def host_ports(doc: VmDocument) -> list[HostPort]:
    """Every host port the document's qemu listens on, in document order."""
    ports: list[HostPort] = []
    for i, net in enumerate(doc.vm.networks):
        if net.user is None:
            continue
        for j, fwd in enumerate(net.user.port_forwards):
            field = f"spec.vm.networks[{i}].user.portForwards[{j}].hostPort"
            ports.append(HostPort(field, fwd.protocol, fwd.host_address, fwd.host_port))
    display = doc.vm.display
    if display is not None and display.spice is not None:
        spice = display.spice
        ports.append(HostPort("spec.vm.display.spice.port", "tcp", spice.address, spice.port))
    if display is not None and display.vnc is not None:
        vnc = display.vnc
        ports.append(HostPort("spec.vm.display.vnc.port", "tcp", vnc.address, vnc.port))
        if vnc.websocket_port is not None:
            ports.append(
                HostPort(
                    "spec.vm.display.vnc.websocketPort", "tcp", vnc.address, vnc.websocket_port
                )
            )
    return ports


def port_busy(port: HostPort) -> str | None:
    """Why qemu could not listen on ``port`` now (``Address already in use``), or None."""
    family = socket.AF_INET6 if ":" in port.address else socket.AF_INET
    kind = socket.SOCK_STREAM if port.protocol == "tcp" else socket.SOCK_DGRAM
    try:
        with socket.socket(family, kind) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((port.address, port.port))
    except OSError as exc:
        return exc.strerror or str(exc)
    return None


def busy_ports(doc: VmDocument) -> list[FieldIssue]:
    """One issue per port of the document that is taken on this host (by anything: another
    program, another VM's qemu, an earlier qemu of this VM that still runs)."""
    issues = []
    for port in host_ports(doc):
        why = port_busy(port)
        if why is not None:
            issues.append(FieldIssue(port.field, f"{port} is taken on this host ({why})"))
    return issues
