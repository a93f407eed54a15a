"""The REST API (FastAPI) over the manager's Python API.

Every error is ``application/problem+json`` (RFC 9457): ``type``, ``title``, ``status``,
``detail`` and, for validation and policy errors, ``errors: [{loc, reason}]`` with the field
path. Bad input is a 4xx, never a 500: bodies are read as JSON and validated by corral's own
models, so the field paths are the VM document's (``spec.vm.disks[0].file.image``). Before
any route runs, :class:`~corral.api.limits.BodyLimits` caps each body (413) and the nesting of
each JSON body (400); ``Last-Event-ID`` is checked before a stream starts (400).

The routes live in one module per noun (``vms``, ``guest``, ``events``, ``images``); errors
become problem+json in ``problems``. Routes (all under ``/v1`` but the probes)::

    GET  /healthz /readyz
    GET  /v1/host                       POST /v1/host/shutdown
    GET  /v1/vms?state=&label=          POST /v1/vms (?adoptDisks=ID)
    GET|PUT|PATCH|DELETE /v1/vms/{name} (?deleteDisks=true, ?force=true: kill, no grace)
    POST /v1/apply (?adoptDisks=ID)     POST /v1/vms/{name}/media {drive, image|null}
    POST /v1/vms/{name}/start|stop|restart|reset|kill (?wait=SECONDS; start|restart: &for=)
    GET  /v1/vms/{name}/wait?for=condition=Booted|state=Stopped&timeout=SECONDS
    GET  /v1/vms/{name}/events          GET /v1/events   (SSE; ?follow=true streams)
    WS   /v1/vms/{name}/console         POST /v1/vms/{name}/exec
    GET  /v1/vms/{name}/logs            (?source=console|qemu&tail=N&follow=true&raw=true)
    POST /v1/vms/{name}/display (?expiry=SECONDS)
    GET|POST /v1/images                 PUT|DELETE /v1/images/{name}   (PUT: upload the bytes)
    GET  /v1/disks                      DELETE /v1/disks/{id}   (retained by deleted VMs)
    POST|GET|DELETE /v1/session         (log in with a password: a cookie; who am I; log out)
    GET  /metrics                       (Prometheus text format)

Every route checks the request's principal against :data:`corral.api.permissions.ROUTE_RULES`
(one app-wide dependency); the TCP listener's :class:`~corral.api.auth.Authenticate` says who
it is, and an app no such layer wraps (the unix socket) serves an admin.
"""

from __future__ import annotations

import asyncio
import re
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Query
from fastapi.responses import JSONResponse, Response

from corral import __version__
from corral.api.events import event_routes
from corral.api.guest import ExecRequest, ExecResponse, guest_routes
from corral.api.images import ImageImportRequest, image_routes
from corral.api.limits import BodyLimits
from corral.api.metrics import metrics_routes
from corral.api.permissions import authorizer
from corral.api.problems import MAX_BODY, PROBLEM, install_handlers, problem_response
from corral.api.session import Access, session_routes
from corral.api.vms import VmList, vm_routes
from corral.manager import Manager, ManagerState

__all__ = [
    "PROBLEM",
    "ExecRequest",
    "ExecResponse",
    "ImageImportRequest",
    "VmList",
    "create_app",
    "problem_response",
]

_MAX_EXEC_BODY = 24 * 1024 * 1024  # ExecRequest.stdin takes up to 16 MiB of text
_MAX_DEPTH = 64
_BODY_LIMITS = [
    ("PUT", re.compile(r"/v1/images/[^/]+"), None),  # an upload, streamed into the store
    ("POST", re.compile(r"/v1/vms/[^/]+/exec"), _MAX_EXEC_BODY),
]


def create_app(manager: Manager, access: Access | None = None) -> FastAPI:
    """``access``: the listener's tokens, users and sessions (``/v1/session`` logs in with
    them); the same object its :class:`~corral.api.auth.Authenticate` layer holds."""
    access = access if access is not None else Access()
    app = FastAPI(
        title="corral",
        version=__version__,
        description="Run and manage QEMU virtual machines without libvirt.",
        dependencies=[Depends(authorizer(manager))],
    )
    app.add_middleware(
        BodyLimits, max_body=MAX_BODY, max_depth=_MAX_DEPTH, routes=_BODY_LIMITS,
        problem=problem_response,
    )  # fmt: skip
    install_handlers(app)

    @app.get("/healthz", tags=["probes"])
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", tags=["probes"], responses={503: {"description": "not ready"}})
    async def readyz() -> Response:
        """Ready: open, and able to write its store (the reason, when it cannot)."""
        if manager.state is not ManagerState.OPEN:
            return problem_response(503, f"manager is {manager.state.value}")
        unavailable = manager.store_unavailable
        if unavailable is not None:
            return problem_response(
                503, f"the daemon cannot write its own records: {unavailable.message}",
                type_=unavailable.problem_type, extra={"reason": unavailable.reason},
                headers={"Retry-After": str(unavailable.retry_after)},
            )  # fmt: skip
        return JSONResponse({"status": "ready"})

    @app.get("/v1/host", tags=["host"])
    async def host() -> dict[str, Any]:
        from corral.qemu.fingerprint import host_info

        facts = await asyncio.to_thread(host_info, "qemu-system-x86_64")
        data = facts.to_dict()
        data["backend"] = manager.backend.name
        data["vms"] = len(manager.store.names())
        data["reconciling"] = manager.reconciling
        data["capacity"] = manager.capacity()  # what admission counts: total, limit, used
        return data

    @app.post("/v1/host/shutdown", tags=["host"])
    async def host_shutdown(
        timeout: Annotated[float | None, Query(gt=0, le=86400)] = None,
    ) -> dict[str, str]:
        return await manager.stop_all(timeout)

    for routes in (vm_routes, guest_routes, event_routes, image_routes, metrics_routes):
        app.include_router(routes(manager))
    app.include_router(session_routes(access))
    return app
