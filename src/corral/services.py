"""The daemon's services: what runs beside the manager for the daemon's lifetime (the REST API
today; the message API, the web pages next), by name.

``corral serve`` builds the services its config (``services:``) or flags (``--service``) name
through :data:`SERVICES`, a name → ``"module:attr"`` table read lazily (like uvicorn's
implementation tables): a daemon that serves no web pages never imports the web stack, and a
new service is one new module plus one line here. Each ``attr`` is a factory
``(config, options) -> Service``: ``config`` the daemon's :class:`ManagerConfig`, ``options``
the service's own settings (from flags), checked before anything starts (a
:class:`~corral.errors.SpecError` naming the option).
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
    built: list[Service] = []
    seen: set[str] = set()
    for i, name in enumerate(names):
        if name in seen:
            continue
        seen.add(name)
        factory = service_factory(name, f"services[{i}]")
        built.append(factory(config, (options or {}).get(name, {})))
    return built
