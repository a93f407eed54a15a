"""How the client commands print, in one place: ``-o table|wide|json|yaml|name``.

A command says what its rows (a list: :func:`show_items`, :func:`show_stream`) or its object
(:func:`show_object`) are; this module decides how they look:

* ``table`` (the default) and ``wide`` (more columns): a rich table on a terminal; on a pipe
  a plain one like kubectl's (a header line, columns padded with spaces, no rules, box or
  colour, never wrapped; an empty cell is ``-``), which ``awk``/``cut`` can parse;
* ``json``/``yaml``: the API's own document (a list as ``{"items": [...]}``; a stream as one
  JSON object per line, or YAML documents separated by ``---``);
* ``name``: one bare name per line (``corral list -o name | xargs corral stop``).

What the daemon sends may quote a guest or qemu (an error, a console's last lines), so nothing
reaches the terminal as a control character: table cells, names and ``show`` lines are made
printable (:mod:`corral.printable`), rich reads no markup in them, JSON escapes every
non-ASCII character and YAML escapes what is not printable (a bidi override or ``U+0085``,
which YAML counts as printable, makes the whole document ASCII).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import IO, Any, Generic, TypeVar

import click

from corral.printable import printable

__all__ = [
    "FORMATS",
    "OUTPUT",
    "VM_COLUMNS",
    "Column",
    "age",
    "details",
    "emit",
    "format_bytes",
    "show_items",
    "show_object",
    "show_stream",
    "table",
    "vm_name",
    "vm_row",
]

T = TypeVar("T")

FORMATS = ("table", "wide", "json", "yaml", "name")

OUTPUT = click.option(
    "-o",
    "--output",
    type=click.Choice(FORMATS),
    default="table",
    show_default=True,
    help="table, wide (more columns), json, yaml, or name (one name per line).",
)

_GAP = "   "  # between plain columns, as kubectl


@dataclass(frozen=True)
class Column(Generic[T]):
    """A table column: its header, the cell of an item, whether only ``-o wide`` shows it,
    and (for a stream, whose rows print before the next is known) a fixed width."""

    header: str
    value: Callable[[T], object]
    wide: bool = False
    width: int = 0


def _stdout(file: IO[str] | None) -> IO[str]:
    return file if file is not None else sys.stdout  # sys.stdout as it is now (CliRunner)


def _is_tty(file: IO[str]) -> bool:
    try:
        return file.isatty()
    except (AttributeError, ValueError):
        return False


def _cell(value: object) -> str:
    text = "" if value is None else printable(str(value))
    return text if text else "-"


def _yaml(data: object, **options: Any) -> str:
    """YAML with non-ASCII text as written, unless some of it would drive a terminal: YAML
    writes U+0085 and the bidi overrides raw (its "printable"), so then all is escaped."""
    import yaml

    text = str(yaml.safe_dump(data, sort_keys=False, allow_unicode=True, **options))
    if printable(text) != text:
        text = str(yaml.safe_dump(data, sort_keys=False, allow_unicode=False, **options))
    return text


def emit(data: object, output: str, *, file: IO[str] | None = None) -> None:
    """``data`` as indented JSON, else YAML."""
    out = _stdout(file)
    if output == "json":
        click.echo(json.dumps(data, indent=2, sort_keys=False, default=str), file=out)
    else:
        click.echo(_yaml(data, default_flow_style=False).rstrip(), file=out)


def table(
    headers: Sequence[str], rows: Sequence[Sequence[object]], *, file: IO[str] | None = None
) -> None:
    """Rows under headers: rich on a terminal, plain (kubectl-like) otherwise."""
    out = _stdout(file)
    cells = [[_cell(v) for v in row] for row in rows]
    if _is_tty(out):
        from rich import box
        from rich.console import Console
        from rich.table import Table
        from rich.text import Text

        t = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
        for h in headers:
            t.add_column(h, overflow="fold")
        for row in cells:
            t.add_row(*(Text(c) for c in row))  # a cell's "[link=...]" is text, not markup
        Console(file=out, soft_wrap=True).print(t)
        return
    widths = [max([len(h), *(len(r[i]) for r in cells)]) for i, h in enumerate(headers)]
    for row in [list(headers), *cells]:
        click.echo(_plain_row(row, widths), file=out)


def _plain_row(row: Sequence[str], widths: Sequence[int]) -> str:
    return _GAP.join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()


def _columns(columns: Sequence[Column[T]], output: str) -> list[Column[T]]:
    return [c for c in columns if output == "wide" or not c.wide]


def show_items(
    items: Sequence[T],
    output: str,
    *,
    columns: Sequence[Column[T]],
    name: Callable[[T], object],
    document: object = None,
    file: IO[str] | None = None,
) -> None:
    """A list of items. ``document`` is what json/yaml print (default ``{"items": items}``)."""
    out = _stdout(file)
    if output in ("json", "yaml"):
        emit({"items": list(items)} if document is None else document, output, file=out)
    elif output == "name":
        for item in items:
            click.echo(printable(str(name(item))), file=out)
    else:
        shown = _columns(columns, output)
        table([c.header for c in shown], [[c.value(i) for c in shown] for i in items], file=out)


def show_stream(
    items: Iterable[T],
    output: str,
    *,
    columns: Sequence[Column[T]],
    name: Callable[[T], object],
    file: IO[str] | None = None,
) -> None:
    """Items printed as they come (``--follow``): a header, then fixed-width rows; JSON lines;
    YAML documents; or names."""
    out = _stdout(file)
    shown = _columns(columns, output)
    widths = [max(c.width, len(c.header)) for c in shown]
    if output in ("table", "wide"):
        click.echo(_plain_row([c.header for c in shown], widths), file=out)
    first = True
    for item in items:
        if output == "json":
            click.echo(json.dumps(item, default=str), file=out)
        elif output == "yaml":
            click.echo(("" if first else "---\n") + _yaml(item).rstrip(), file=out)
        elif output == "name":
            click.echo(printable(str(name(item))), file=out)
        else:
            click.echo(_plain_row([_cell(c.value(item)) for c in shown], widths), file=out)
        first = False


def show_object(
    obj: object,
    output: str,
    *,
    name: object,
    text: Callable[[bool], Iterable[str]],
    file: IO[str] | None = None,
) -> None:
    """One object: json/yaml print ``obj``; name prints ``name`` (a name, or a list of them);
    table/wide print the lines ``text(wide)`` makes."""
    out = _stdout(file)
    if output in ("json", "yaml"):
        emit(obj, output, file=out)
    elif output == "name":
        for one in name if isinstance(name, list | tuple) else [name]:
            click.echo(printable(str(one)), file=out)
    else:
        for line in text(output == "wide"):
            click.echo(printable(line), file=out)


def details(pairs: Iterable[tuple[str, object]]) -> list[str]:
    """``Key:   value`` lines, the values aligned (``corral show``, ``corral host info``); a
    value of several lines goes on indented under its first. Values are made printable
    (:mod:`corral.printable`): some repeat what qemu or a guest wrote."""
    listed = list(pairs)
    width = max((len(k) for k, _ in listed), default=0) + 2
    return [
        f"{k + ':':<{width}}" + printable(_cell(v)).rstrip("\n").replace("\n", "\n" + " " * width)
        for k, v in listed
    ]


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
    """NAME STATE CPUS RAM IPS UPTIME of a VM (lists joined by commas, no spaces)."""
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
        ",".join(status.get("ips") or []) or "-",
        age(status.get("startedAt")) if running else "-",
    ]


def _labels(vm: dict[str, Any]) -> str:
    labels = (vm.get("metadata") or {}).get("labels") or {}
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items())) or "-"


def _status(vm: dict[str, Any]) -> dict[str, Any]:
    return vm.get("status") or {}


def _vm_cell(index: int) -> Callable[[dict[str, Any]], object]:
    return lambda vm: vm_row(vm)[index]


VM_COLUMNS: list[Column[dict[str, Any]]] = [
    *(Column(h, _vm_cell(i))
      for i, h in enumerate(["NAME", "STATE", "CPUS", "RAM", "IPS", "UPTIME"])),
    Column("PID", lambda vm: _status(vm).get("pid"), wide=True),
    Column("ACCEL", lambda vm: _status(vm).get("accelerator"), wide=True),
    Column("RESTARTS", lambda vm: _status(vm).get("restarts", 0), wide=True),
    Column("AGE", lambda vm: age((vm.get("metadata") or {}).get("creationTimestamp")), wide=True),
    Column("LABELS", _labels, wide=True),
]  # fmt: skip
"""``corral list``: the VM columns (``-o wide`` adds PID, ACCEL, RESTARTS, AGE, LABELS)."""


def vm_name(vm: dict[str, Any]) -> str:
    return str((vm.get("metadata") or {}).get("name"))
