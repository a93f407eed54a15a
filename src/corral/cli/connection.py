"""The one :class:`~corral.client.Client` of a CLI invocation, made on first use from the
root options (``--socket``, ``--url``, ``--token``) and closed when the command ends."""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

if TYPE_CHECKING:
    from corral.client import Client

__all__ = ["client"]


def client(ctx: click.Context) -> Client:
    from corral.client import Client

    obj = ctx.find_root().obj or {}
    found = obj.get("client")
    if found is None:
        found = Client(socket=obj.get("socket"), url=obj.get("url"), token=obj.get("token"))
        ctx.find_root().obj = {**obj, "client": found}
        ctx.find_root().call_on_close(found.close)
    return found
