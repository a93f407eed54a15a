"""``corral logs``: what a VM's guest printed on its serial console, or qemu's own log, like
``kubectl logs`` (``--tail``, ``-f``) and ``incus console --show-log``.

The guest writes its console, so what it printed is shown, never obeyed: escape sequences and
other control characters arrive as ``^[`` and the like (:mod:`corral.printable`, applied by the
daemon and again here); ``--raw`` passes the bytes as written, for a file or a pipe.
"""

from __future__ import annotations

import sys

import click

from corral.cli.completion import vm_names
from corral.cli.connection import client

__all__ = ["logs"]


@click.command()
@click.argument("name", shell_complete=vm_names)
@click.option("--console", "source", flag_value="console", default=True,
              help="What the guest printed on its serial console (the default).")  # fmt: skip
@click.option("--qemu", "source", flag_value="qemu",
              help="qemu's own log: its stderr (errors, warnings).")  # fmt: skip
@click.option("--tail", type=click.IntRange(0, 1_000_000), default=None, metavar="N",
              help="Only the last N lines (default: all that is kept).")  # fmt: skip
@click.option("-f", "--follow", is_flag=True,
              help="Keep printing what is appended, across restarts (Ctrl-C stops).")  # fmt: skip
@click.option("--raw", is_flag=True,
              help="The bytes as written: escape sequences reach your terminal.")  # fmt: skip
@click.pass_context
def logs(
    ctx: click.Context, name: str, source: str, tail: int | None, follow: bool, raw: bool
) -> None:
    """Print a VM's console log (or --qemu: qemu's log); -f follows it.

    corral logs web1 --tail 50 -f
    """
    from corral.printable import PrintableDecoder

    out = sys.stdout.buffer
    decoder = None if raw else PrintableDecoder()
    try:
        for chunk in client(ctx).logs(name, source=source, tail=tail, follow=follow, raw=raw):
            data = chunk if decoder is None else decoder.feed(chunk).encode()
            if data:
                out.write(data)
                out.flush()
        if decoder is not None:
            out.write(decoder.feed(b"", final=True).encode())
            out.flush()
    except KeyboardInterrupt:
        ctx.exit(130)
    except BrokenPipeError:  # `corral logs web1 | head`
        ctx.exit(0)
