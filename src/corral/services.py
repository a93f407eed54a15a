"""The daemon's services: what runs beside the manager for the daemon's lifetime (the REST API,
the message API, the web pages), by name.

``corral serve`` builds the services its config (``services:``) or flags (``--service``) name
through :data:`SERVICES`, a name → ``"module:attr"`` table read lazily (like uvicorn's
implementation tables): a daemon that serves no web pages never imports the web stack, and a
new service is one new module plus one line here. Each ``attr`` is a factory
``(config, options) -> Service``: ``config`` the daemon's :class:`ManagerConfig`, ``options``
the service's own settings (from flags), checked before anything starts (a
:class:`~corral.errors.SpecError` naming the option). ``web`` is built first and hands its
routes to ``api`` (option ``routes``): the pages share the API's origin, its listener and auth.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, cast

from corral.errors import FieldIssue, SpecError

if TYPE_CHECKING:
    from corral.manager import ManagerConfig
    from corral.manager.daemon import Service

__all__ = ["DEFAULT_SERVICES", "SERVICES", "ServiceFactory", "build_services", "service_factory"]

SERVICES: dict[str, str] = {
    "api": "corral.api.server:service_from_config",
    "amqp": "corral.amqp.service:service_from_config",
    "web": "corral.web.service:service_from_config",
}
DEFAULT_SERVICES = ("api",)

ServiceFactory = Callable[["ManagerConfig", Mapping[str, object]], "Service"]


def service_factory(name: str, where: str = "services") -> ServiceFactory:
    """The factory registered as ``name``; a SpecError at ``where`` for a name not in the
    registry."""
    target = SERVICES.get(name)
    if target is None:
        reason = f"{name!r} is not a daemon service; choose from {', '.join(SERVICES)}"
        raise SpecError("invalid daemon services", [FieldIssue(where, reason)])
    module, _, attr = target.partition(":")
    return cast(ServiceFactory, getattr(importlib.import_module(module), attr))


def build_services(
    names: Sequence[str],
    config: ManagerConfig,
    options: Mapping[str, Mapping[str, object]] | None = None,
) -> list[Service]:
    """The services ``names`` (each once, in order), each built with its own ``options``:
    every one is checked before any starts."""
    built: dict[str, Service] = {}
    opts = dict(options or {})
    unique = list(dict.fromkeys(names))
    if "web" in unique:
        # the pages live in the API's app (same origin: its session cookie and CSRF checks)
        if "api" not in unique:
            unique.insert(0, "api")
        if not opts.get("api", {}).get("listen"):
            reason = "the web pages need the API on TCP: give --listen HOST:PORT"
            raise SpecError("invalid daemon services", [FieldIssue("services.web", reason)])
        web = service_factory("web", f"services[{list(names).index('web')}]")
        built["web"] = web(config, opts.get("web", {}))
        routes = getattr(built["web"], "api_routes", None)
        opts["api"] = {**opts.get("api", {}), "routes": [routes]}
    for name in unique:
        if name not in built:
            index = list(names).index(name) if name in names else 0
            built[name] = service_factory(name, f"services[{index}]")(config, opts.get(name, {}))
    return [built[name] for name in unique]
