"""``corral serve``: run the manager daemon with its services (like ``corral run`` is the
runner's entry point, this is the one place the CLI imports the manager; the services, the API
among them, are built by name through :data:`corral.services.SERVICES`), and ``corral token
create`` for the TCP listener's bearer tokens."""

from __future__ import annotations

import asyncio
import sys
import urllib.parse
from collections.abc import Callable
from pathlib import Path

import click

_STATE_HELP = "Everything the daemon keeps (store, images, VM disks, runtime files) lives here."


def manager_config(state_dir: str, config: str | None, **overrides: object) -> object:
    """The daemon config (a ManagerConfig, imported lazily for a fast ``corral --help``)."""
    from corral.manager import load_manager_config

    return load_manager_config(Path(config) if config else None, stateDir=state_dir, **overrides)


class _Registered(click.Choice[str]):
    """The backend registry's names (:data:`corral.manager.backends.BACKENDS`), read when
    click first needs them, not at import: ``corral --help`` stays fast."""

    def __init__(self) -> None:
        super().__init__(())

    @property
    def choices(self) -> tuple[str, ...]:
        from corral.manager.backends import BACKENDS

        return tuple(BACKENDS)

    @choices.setter
    def choices(self, _: object) -> None:
        pass


@click.command()
@click.option("--state-dir", required=True, type=click.Path(file_okay=False), help=_STATE_HELP)
@click.option(
    "--config",
    "config_file",
    default=None,
    type=click.Path(dir_okay=False),
    help="Daemon config (YAML): backend, limits, backoff, overcommit.",
)
@click.option(
    "--policy",
    "policy_file",
    default=None,
    type=click.Path(dir_okay=False),
    help="Host policy (default /etc/corral/host.yaml if present).",
)
@click.option(
    "--backend",
    type=_Registered(),
    default=None,
    help="Where VMs' runners are placed (a name in the backend registry; default embedded).",
)
@click.option(
    "--accel",
    type=click.Choice(["kvm", "tcg"]),
    default=None,
    help="Force an accelerator for every VM (default: per VM, auto-probed).",
)
@click.option("--resync", type=float, default=None, help="Seconds between full resyncs.")
@click.option(
    "--stop-vms-on-exit",
    is_flag=True,
    default=None,
    help="Host-shutdown mode: stop every VM gracefully on SIGTERM.",
)
@click.option(
    "--socket",
    "socket_path",
    default=None,
    type=click.Path(dir_okay=False),
    help="API unix socket (default $CORRAL_SOCKET or /run/corral/corral.sock).",
)
@click.option("--socket-group", default=None, help="Group owning the socket (mode 0660).")
@click.option("--no-socket", is_flag=True, help="Serve no unix socket.")
@click.option(
    "--listen",
    default=None,
    metavar="HOST:PORT",
    help="Also serve the API on TCP (bearer tokens required).",
)
@click.option(
    "--tokens",
    "tokens_file",
    default=None,
    type=click.Path(dir_okay=False),
    help="Hashed bearer tokens for TCP (corral token create).",
)
@click.option(
    "--users",
    "users_file",
    default=None,
    type=click.Path(dir_okay=False),
    help="Local users for the pages and the TCP API (corral user add; default: the config's "
    "users).",
)
@click.option(
    "--metrics-on-loopback",
    is_flag=True,
    help="Let anyone connecting from 127.0.0.1/::1 read /metrics without a token.",
)
@click.option("--tls-cert", default=None, type=click.Path(dir_okay=False))
@click.option("--tls-key", default=None, type=click.Path(dir_okay=False))
@click.option(
    "--open-policy",
    is_flag=True,
    help="Serve TCP or AMQP even though the host policy sets no imagePaths (every token "
    "holder, or publisher, may then give VMs any host file: root-equivalent, like libvirt's "
    "socket).",
)
@click.option(
    "--log-format",
    type=click.Choice(["auto", "json", "text"]),
    default="auto",
    show_default=True,
    help="json: one object per line (time, level, logger, message, fields); text: for people; "
    "auto: text on a terminal, else json.",
)
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"]),
    default="info",
    show_default=True,
    help="Least level logged (corral's and the API server's loggers).",
)
@click.option(
    "--amqp",
    "amqp_url",
    default=None,
    metavar="URL",
    help="Also serve aetherscale's message API from this RabbitMQ broker "
    "(amqp[s]://USER:PASS@HOST:PORT/VHOST; keep credentials in the config's amqp.urlFile "
    "instead: docs/amqp.md).",
)
@click.option(
    "--service",
    "services",
    multiple=True,
    metavar="NAME",
    help="A daemon service to run (repeat for several; default: the config's services, "
    "else api). Names: corral.services.SERVICES.",
)
@click.option(
    "--vv-validity",
    type=click.IntRange(1, 3600),
    default=None,
    metavar="SECONDS",
    help="web: how long the password in a SPICE .vv download stays valid (default 10).",
)
def serve(
    state_dir: str,
    config_file: str | None,
    policy_file: str | None,
    backend: str | None,
    accel: str | None,
    resync: float | None,
    stop_vms_on_exit: bool | None,
    socket_path: str | None,
    socket_group: str | None,
    no_socket: bool,
    listen: str | None,
    tokens_file: str | None,
    users_file: str | None,
    metrics_on_loopback: bool,
    tls_cert: str | None,
    tls_key: str | None,
    open_policy: bool,
    log_format: str,
    log_level: str,
    services: tuple[str, ...],
    amqp_url: str | None,
    vv_validity: int | None,
) -> None:
    """Run the manager: keep every VM in its desired state; SIGTERM leaves VMs running.

    Under systemd (Type=notify) it reports READY=1 once the API listens; deploy/corral.service.
    """
    from corral.client import default_socket
    from corral.manager import ManagerConfig
    from corral.manager.daemon import Service
    from corral.manager.daemon import serve as run_daemon
    from corral.services import build_services

    cfg = manager_config(
        state_dir, config_file, policyFile=policy_file, backend=backend, accelerator=accel,
        resyncSeconds=resync, stopVmsOnExit=stop_vms_on_exit, services=services or None,
    )  # fmt: skip
    assert isinstance(cfg, ManagerConfig)
    if listen and not open_policy:
        from corral.spec import load_policy

        if load_policy(cfg.policy_file).image_paths is None:
            raise click.UsageError(
                "--listen: the host policy sets no imagePaths, so every token holder could "
                "give a VM any host file or device; set imagePaths in the host policy "
                "(docs/policy.md), or pass --open-policy to accept that"
            )
    names = cfg.services
    if amqp_url is not None and "amqp" not in names:
        names = (*names, "amqp")
    if "amqp" in names and not open_policy:
        from corral.spec import load_policy

        if load_policy(cfg.policy_file).image_paths is None:
            raise click.UsageError(
                "amqp: the host policy sets no imagePaths, so whoever may publish to the "
                "broker could give a VM any host file or device; set imagePaths in the host "
                "policy (docs/policy.md), or pass --open-policy to accept that"
            )
    api = {
        "socket": None if no_socket else Path(socket_path) if socket_path else default_socket(),
        "socketGroup": socket_group, "listen": listen, "tokensFile": tokens_file,
        "tlsCert": tls_cert, "tlsKey": tls_key, "usersFile": users_file,
        "metricsOnLoopback": metrics_on_loopback,
    }  # fmt: skip
    amqp = {"url": amqp_url} if amqp_url is not None else {}
    if amqp_url is not None and urllib.parse.urlsplit(amqp_url).password:
        click.echo(
            "warning: --amqp carries a password, which every local user can read in the "
            "process list; put the URL in a file named by the config's amqp.urlFile instead "
            "(docs/amqp.md)",
            err=True,
        )
    web = {"vvValidity": vv_validity} if vv_validity is not None else {}

    def built() -> list[Service]:  # all checked before any starts; imported while re-attaching
        return build_services(names, cfg, {"api": api, "amqp": amqp, "web": web})

    sys.exit(_run_logged(lambda: asyncio.run(run_daemon(cfg, prepare=built)),
                         log_format, log_level))  # fmt: skip


def _run_logged(run: Callable[[], int], log_format: str, log_level: str) -> int:
    """``run`` with the daemon's log set up; what ends it early is logged in that format too
    (a JSON log stays JSON lines to its last line), with exit code 1."""
    import logging

    from corral.errors import CorralError
    from corral.manager.daemonlog import configure_logging

    configure_logging("json" if log_format == "json" else "text" if log_format == "text"
                      else "auto", log_level)  # fmt: skip
    log = logging.getLogger("corral.daemon")
    try:
        return run()
    except CorralError as exc:
        log.error(exc.message, extra={"fields": {"issues": [str(i) for i in exc.issues]}})
    except Exception:
        log.critical("the daemon failed", exc_info=True)
    return 1


@click.group()
def token() -> None:
    """Bearer tokens for the TCP API."""


@token.command("create")
@click.argument("name")
@click.option("--file", "tokens_file", required=True, type=click.Path(dir_okay=False),
              help="The tokens file (hashes only; created 0600).")  # fmt: skip
def token_create(name: str, tokens_file: str) -> None:
    """Make a token NAME, store its hash, print the token (shown only this once)."""
    from corral.api.auth import create_token

    click.echo(create_token(Path(tokens_file), name))


@click.group()
def user() -> None:
    """Local users (bcrypt hashes) for the pages and the TCP API."""


@user.command("add")
@click.argument("name")
@click.option("--role", "roles", multiple=True, metavar="ROLE",
              help="A role (repeat for several; admin may do everything).")  # fmt: skip
@click.option("--file", "users_file", required=True, type=click.Path(dir_okay=False),
              help="The users file (hashes only; created 0600).")  # fmt: skip
def user_add(name: str, roles: tuple[str, ...], users_file: str) -> None:
    """Add user NAME, or set its password and roles. The password is read from the terminal
    (asked twice), or as one line from stdin when it is not a terminal; never from argv."""
    from corral.api.users import add_user

    if sys.stdin.isatty():
        password = click.prompt("Password", hide_input=True, confirmation_prompt=True)
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    add_user(Path(users_file), name, password, roles)
    click.echo(f"user {name} saved in {users_file}", err=True)


@user.command("remove")
@click.argument("name")
@click.option("--file", "users_file", required=True, type=click.Path(dir_okay=False),
              help="The users file.")  # fmt: skip
def user_remove(name: str, users_file: str) -> None:
    """Remove user NAME (a running daemon ends their sessions at their next request)."""
    from corral.api.users import remove_user

    remove_user(Path(users_file), name)
    click.echo(f"user {name} removed from {users_file}", err=True)
