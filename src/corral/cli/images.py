"""``corral image import|list|delete``: the daemon's base-image store."""

from __future__ import annotations

import re
import threading
from typing import TYPE_CHECKING, Any

import click

from corral.cli.connection import client
from corral.cli.output import OUTPUT, Column, format_bytes, show_items

if TYPE_CHECKING:
    from corral.client import Client

__all__ = ["image"]

_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")


@click.group()
def image() -> None:
    """Base images that VM disks overlay (each VM writes only its own qcow2 overlay)."""


@image.command("import")
@click.argument("name")
@click.argument("source")
@click.option("--checksum", default=None, help="sha256:HEX, sha512:HEX or md5:HEX.")
@click.option("--replace", is_flag=True, help="Replace an image of that name (if unused).")
@click.option(
    "--host-path",
    is_flag=True,
    help="SOURCE is a path on the daemon's host, read by the daemon (allowed only "
    "inside the host policy's imagePaths) instead of a local file to upload.",
)
@click.option("--no-progress", is_flag=True)
@click.pass_context
def import_(
    ctx: click.Context, name: str, source: str, checksum: str | None, replace: bool,
    host_path: bool, no_progress: bool,
) -> None:  # fmt: skip
    """Import SOURCE as image NAME: an http(s) URL (the daemon downloads it) or a local file
    (its bytes are uploaded to the daemon, which never opens a path of yours).

    A failed transfer or a checksum mismatch leaves nothing behind.
    """
    c = client(ctx)
    if not host_path and _URL.match(source) is None:
        _report(name, _upload(c, name, source, checksum, replace, no_progress))
        return
    result: dict[str, Any] = {}
    failure: list[BaseException] = []

    def run() -> None:
        try:
            result.update(c.import_image(name, source, checksum=checksum, replace=replace))
        except BaseException as exc:  # handed to the main thread
            failure.append(exc)

    worker = threading.Thread(target=run, daemon=True)
    if no_progress:
        run()
    else:
        _with_progress(ctx, name, worker)
    if failure:
        raise failure[0]
    _report(name, result)


def _report(name: str, result: dict[str, Any]) -> None:
    click.echo(f"image/{name} imported: {result['format']}, "
               f"{format_bytes(result['virtualSize'])}, sha256:{result['sha256']}")  # fmt: skip


def _upload(
    c: Client, name: str, path: str, checksum: str | None, replace: bool, no_progress: bool
) -> dict[str, Any]:
    """Send a local file's bytes, with a progress bar of what has gone out."""
    if no_progress:
        return c.upload_image(name, path, checksum=checksum, replace=replace)
    from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

    with Progress("[progress.description]{task.description}", BarColumn(), DownloadColumn(),
                  TransferSpeedColumn(), transient=True) as progress:  # fmt: skip
        task = progress.add_task(f"upload {name}", total=None)
        return c.upload_image(
            name, path, checksum=checksum, replace=replace,
            progress=lambda sent, total: progress.update(task, completed=sent, total=total),
        )  # fmt: skip


def _with_progress(ctx: click.Context, name: str, worker: threading.Thread) -> None:
    """Follow the daemon's ImageImportProgress events while the import request runs."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

    from corral.client import Client

    root = ctx.find_root().obj or {}
    watcher = Client(socket=root.get("socket"), url=root.get("url"), token=root.get("token"))
    with Progress("[progress.description]{task.description}", BarColumn(), DownloadColumn(),
                  TransferSpeedColumn(), transient=True) as progress:  # fmt: skip
        task = progress.add_task(f"import {name}", total=None)

        def follow() -> None:
            try:
                for event in watcher.events(None, follow=True, after=2**62):
                    if event.get("event") == "ImageImportProgress" and event.get("image") == name:
                        progress.update(task, completed=event.get("bytes"),
                                        total=event.get("total"))  # fmt: skip
            except Exception:  # the progress bar is a nicety; the import's result counts
                return

        threading.Thread(target=follow, daemon=True).start()
        worker.start()
        worker.join()
    watcher.close()


@image.command("list")
@OUTPUT
@click.pass_context
def list_(ctx: click.Context, output: str) -> None:
    """Images with their format, sizes and the VMs that overlay them (-o wide: sha256,
    created, path)."""
    show_items(client(ctx).list_images(), output, columns=_COLUMNS, name=lambda i: i["name"])


_COLUMNS: list[Column[dict[str, Any]]] = [
    Column("NAME", lambda i: i["name"]),
    Column("FORMAT", lambda i: i["format"]),
    Column("VIRTUAL", lambda i: format_bytes(i["virtualSize"])),
    Column("ON DISK", lambda i: format_bytes(i["actualSize"])),
    Column("USED BY", lambda i: ",".join(i.get("users") or [])),
    Column("SOURCE", lambda i: i.get("source")),
    Column("SHA256", lambda i: i.get("sha256"), wide=True),
    Column("CREATED", lambda i: i.get("created"), wide=True),
    Column("PATH", lambda i: i.get("path"), wide=True),
]


@image.command("delete")
@click.argument("names", nargs=-1, required=True)
@click.pass_context
def delete(ctx: click.Context, names: tuple[str, ...]) -> None:
    """Delete images (refused while a VM overlays them)."""
    c = client(ctx)
    for name in names:
        c.delete_image(name)
        click.echo(f"image/{name} deleted")
