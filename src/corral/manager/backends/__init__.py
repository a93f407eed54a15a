"""Backends as plug-ins: where a VM's runner is placed, chosen by name.

Every backend is one module with a ``from_config(config, policy, on_event, on_status)``
factory (:class:`~corral.manager.backends.base.BackendFactory`) and one line in
:data:`BACKENDS`, resolved lazily (uvicorn's ``"module:attr"`` way), so a daemon loads only
the backend it runs. Adding a backend = one module + one registry line; ``corral serve
--backend`` and ``ManagerConfig.backend`` take their choices from here.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, cast

from corral.errors import SpecError
from corral.manager.backends.base import (
    Backend,
    BackendFactory,
    Capability,
    Capacity,
    ConsoleStream,
    EventCallback,
    Observed,
    StatusCallback,
    require_capability,
)

if TYPE_CHECKING:
    from corral.manager.config import ManagerConfig
    from corral.spec import HostPolicy

__all__ = [
    "BACKENDS",
    "Backend",
    "BackendFactory",
    "Capability",
    "Capacity",
    "ConsoleStream",
    "EventCallback",
    "Observed",
    "StatusCallback",
    "backend_factory",
    "create_backend",
    "require_capability",
]

BACKENDS: dict[str, str] = {
    "embedded": "corral.manager.backends.embedded:EmbeddedBackend.from_config",
    "systemd": "corral.manager.backends.systemd:SystemdBackend.from_config",
}
"""Backend name -> ``"module:attr.path"`` of its factory."""


def backend_factory(name: str) -> BackendFactory:
    """The factory registered as ``name`` (imported now, not before)."""
    try:
        target = BACKENDS[name]
    except KeyError:
        raise SpecError.single(
            "backend", f"{name!r} is not a backend; choose one of {', '.join(sorted(BACKENDS))}"
        ) from None
    module_name, _, attrs = target.partition(":")
    obj: object = importlib.import_module(module_name)
    for attr in attrs.split("."):
        obj = getattr(obj, attr)
    return cast(BackendFactory, obj)


def create_backend(
    config: ManagerConfig,
    policy: HostPolicy,
    on_event: EventCallback,
    on_status: StatusCallback,
) -> Backend:
    """The backend ``config.backend`` names, built by its registered factory."""
    return backend_factory(config.backend)(config, policy, on_event, on_status)
