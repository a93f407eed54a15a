"""Shell completion of VM names, asked of the daemon.

Enable it with ``eval "$(_CORRAL_COMPLETE=bash_source corral)"`` (``zsh_source``,
``fish_source``). A completion runs on every Tab, so it must be fast and silent: it asks the
daemon the ``--socket``/``--url`` on the command line (or ``$CORRAL_SOCKET``...) points at
with a short timeout, and offers nothing, printing nothing, when no daemon answers.
"""

from __future__ import annotations

import click
from click.shell_completion import CompletionItem

__all__ = ["TIMEOUT", "vm_names"]

TIMEOUT = 1.0
"""Seconds a completion waits for the daemon (a missing unix socket fails at once)."""


def vm_names(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[CompletionItem]:
    """click's ``shell_complete`` for a VM NAME argument (or ``--vm-id``)."""
    try:
        from corral.client import Client

        root = ctx.find_root().params
        with Client(socket=root.get("socket"), url=root.get("url"), token=root.get("token"),
                    timeout=TIMEOUT) as c:  # fmt: skip
            if c.socket is not None and not c.socket.is_socket():
                return []  # no daemon here: do not even try to connect
            names = sorted(str(vm["metadata"]["name"]) for vm in c.list_vms())
    except Exception:  # no daemon, no permission, a bad URL: no completions, no noise
        return []
    given = ctx.params.get(param.name or "")
    already = set(given) if isinstance(given, tuple | list) else set()
    return [CompletionItem(n) for n in names if n.startswith(incomplete) and n not in already]
