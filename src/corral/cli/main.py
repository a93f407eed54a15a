"""``corral``: entry point, error handling and exit codes.

Exit codes: 0 ok, 1 a corral error (one clear line per problem on stderr), 2 usage error.
``--debug`` (or ``CORRAL_DEBUG=1``) shows the traceback instead.
"""

from __future__ import annotations

import os
from typing import Any

import click

from corral import __version__


class _Group(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        from corral.errors import CorralError
        from corral.printable import printable

        try:
            return super().invoke(ctx)
        except CorralError as exc:
            if ctx.params.get("debug") or os.environ.get("CORRAL_DEBUG") == "1":
                raise
            # an error may quote qemu, a guest or a document: shown, never obeyed
            click.echo(f"error: {printable(exc.message)}", err=True)
            for issue in exc.issues:
                click.echo(f"  {printable(str(issue))}", err=True)
            ctx.exit(1)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
@click.option("--socket", default=None, envvar="CORRAL_SOCKET",
              help="The daemon's unix socket (default /run/corral/corral.sock).")  # fmt: skip
@click.option("--url", default=None, envvar="CORRAL_URL", help="The daemon's TCP URL.")
@click.option("--token", default=None, envvar="CORRAL_TOKEN", help="Bearer token for --url.")
@click.version_option(__version__, prog_name="corral")
@click.pass_context
def cli(
    ctx: click.Context, debug: bool, socket: str | None, url: str | None, token: str | None
) -> None:
    """Run and manage QEMU virtual machines without libvirt.

    Shell completion: eval "$(_CORRAL_COMPLETE=bash_source corral)" (or zsh_source,
    fish_source).
    """
    ctx.obj = {"socket": socket, "url": url, "token": token}


def _register() -> None:
    from corral.cli import disks, host, images, logs, operator, render, run, serve, vms

    cli.add_command(render.render)
    cli.add_command(render.validate)
    cli.add_command(render.schema)
    cli.add_command(host.host)
    cli.add_command(run.run)
    cli.add_command(serve.serve)
    cli.add_command(serve.token)
    cli.add_command(images.image)
    cli.add_command(disks.disk)
    cli.add_command(logs.logs)
    cli.add_command(operator.operator)
    vms.register(cli)


_register()


def main() -> None:
    cli(prog_name="corral")


if __name__ == "__main__":  # pragma: no cover
    main()
