"""How the client commands print: ``-o table|json|yaml``, tables with rich, and the
columns a VM list shows (state, CPUs, RAM, IPs, uptime)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import click

__all__ = ["OUTPUT", "age", "emit", "format_bytes", "table", "vm_row"]

OUTPUT = click.option(
    "-o",
    "--output",
    type=click.Choice(["table", "json", "yaml"]),
    default="table",
    show_default=True,
    help="Output format.",
)


def emit(data: object, output: str) -> None:
    if output == "json":
        click.echo(json.dumps(data, indent=2, sort_keys=False, default=str))
    else:
        import yaml

        click.echo(yaml.safe_dump(data, sort_keys=False, default_flow_style=False).rstrip())


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    from rich import box
    from rich.console import Console
    from rich.table import Table

    t = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    for h in headers:
        t.add_column(h, overflow="fold")
    for row in rows:
        t.add_row(*("" if v is None else str(v) for v in row))
    Console(soft_wrap=True).print(t)


def format_bytes(value: object) -> str:
    if not isinstance(value, int):
        return "-"
    for unit, size in (("Gi", 2**30), ("Mi", 2**20), ("Ki", 2**10)):
        if value >= size:
            return f"{value / size:.4g}{unit}"
    return str(value)


def age(iso: object) -> str:
    if not isinstance(iso, str):
        return "-"
    try:
        then = datetime.fromisoformat(iso.replace("Z", "+00:00"))
    except ValueError:
        return "-"
    seconds = int((datetime.now(UTC) - then).total_seconds())
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    if seconds < 172800:
        return f"{seconds // 3600}h{(seconds % 3600) // 60}m"
    return f"{seconds // 86400}d"


def vm_row(vm: dict[str, Any]) -> list[object]:
    status = vm.get("status") or {}
    spec_vm = (vm.get("spec") or {}).get("vm") or {}
    state = str(status.get("state", "Stopped"))
    desired = status.get("desiredState") or spec_vm.get("state")
    if desired and state != desired and state in ("Running", "Stopped"):
        state = f"{state}→{desired}"
    running = status.get("state") == "Running"
    return [
        (vm.get("metadata") or {}).get("name"),
        state,
        status.get("cpus") if running else spec_vm.get("currentCpus", "-"),
        format_bytes(status.get("ram")) if running else spec_vm.get("maximumRam", "-"),
        ", ".join(status.get("ips") or []) or "-",
        age(status.get("startedAt")) if running else "-",
    ]
