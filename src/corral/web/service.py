"""The ``web`` entry of :data:`corral.services.SERVICES`.

The pages need the API on the same origin (its session cookie, its CSRF checks), so the web
service does not listen on its own: it hands its routes to the API service, which serves them
on its TCP listener (``corral serve --listen``), and runs the host sampler for the overview's
graph for the daemon's lifetime.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass

from fastapi import APIRouter

from corral.errors import FieldIssue, SpecError
from corral.manager import Manager, ManagerConfig
from corral.web.pages import WebSettings, web_routes
from corral.web.sampler import HostSampler

__all__ = ["WebService", "service_from_config"]


def _vm_usage(manager: Manager) -> Callable[[], tuple[int, int, int]]:
    def usage() -> tuple[int, int, int]:
        cpus = ram = count = 0
        for record in manager.store.all():
            if record.status.get("state") == "Running":
                vm = record.document.vm
                cpus += int(record.status.get("cpus") or vm.cur_cpus)
                ram += int(record.status.get("ram") or vm.cur_ram)
                count += 1
        return cpus, ram, count

    return usage


@dataclass
class WebService:
    """A daemon service (the sampler) that also gives the API service its routes."""

    settings: WebSettings
    sample_seconds: float = 10.0
    sampler: HostSampler | None = None

    def api_routes(self, manager: Manager) -> APIRouter:
        """The routes to include in the API's app (called by the API service)."""
        return web_routes(manager, self._sampler(manager), self.settings)

    def _sampler(self, manager: Manager) -> HostSampler:
        if self.sampler is None:
            self.sampler = HostSampler(_vm_usage(manager), interval=self.sample_seconds)
        return self.sampler

    @contextlib.asynccontextmanager
    async def __call__(self, manager: Manager) -> AsyncIterator[object]:
        async with self._sampler(manager).running() as sampler:
            yield sampler


def _number(options: Mapping[str, object], key: str, default: float, low: float,
            high: float) -> float:  # fmt: skip
    value = options.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise SpecError.single(f"web.{key}", "must be a number")
    try:
        number = float(value)
    except ValueError:
        raise SpecError.single(f"web.{key}", f"{value!r} is not a number") from None
    if not low <= number <= high:
        raise SpecError.single(f"web.{key}", f"must be between {low:g} and {high:g}")
    return number


def service_from_config(config: ManagerConfig, options: Mapping[str, object]) -> WebService:
    """``options``: ``vvValidity`` (seconds a SPICE ``.vv`` password stays valid, 1-3600,
    default 10) and ``sampleSeconds`` (the host graph's sample interval, 1-600, default 10)."""
    known = {"vvValidity", "sampleSeconds"}
    for key in options:
        if key not in known:
            reason = f"is not an option; one of {', '.join(sorted(known))}"
            raise SpecError("invalid web service options", [FieldIssue(f"web.{key}", reason)])
    validity = int(_number(options, "vvValidity", 10, 1, 3600))
    interval = _number(options, "sampleSeconds", 10, 1, 600)
    return WebService(WebSettings(vv_validity=validity), sample_seconds=interval)
