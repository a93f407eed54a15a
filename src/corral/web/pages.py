"""The routes the web pages add to the API's app: the pages and their files under ``/ui``
(open: they hold no data, only code), and under ``/v1`` (behind the API's authentication and
permissions) the host's last hour, the VNC websocket proxy and the SPICE ``.vv`` download.

Every ``/ui`` response carries a strict Content-Security-Policy: scripts only from this origin
(no inline script, no eval), connections only to it, no framing. The pages never put a string
a user or a guest wrote into markup: they set ``textContent``.
"""

from __future__ import annotations

import mimetypes
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Query, WebSocket
from fastapi.responses import FileResponse, RedirectResponse, Response

from corral.errors import Conflict, CorralError, NotFound
from corral.manager import Manager
from corral.web.proxy import display_address, proxy_display, vv_file
from corral.web.sampler import HostSampler

__all__ = ["CSP", "STATIC", "VENDOR", "WebSettings", "web_routes"]

STATIC = Path(__file__).resolve().parent / "static"
VENDOR = Path(__file__).resolve().parent / "vendor"  # filled by scripts/vendor-web.sh

CSP = (
    "default-src 'self'; script-src 'self'; object-src 'none'; base-uri 'none'; "
    "frame-ancestors 'none'; form-action 'self'; connect-src 'self'; "
    "img-src 'self' data: blob:; style-src 'self' 'unsafe-inline'; font-src 'self'"
)
"""``style-src 'unsafe-inline'``: xterm.js and uPlot set element styles from script; scripts
stay strict (``'self'`` only)."""

SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}
_TYPES = {".js": "text/javascript", ".mjs": "text/javascript", ".css": "text/css",
          ".html": "text/html; charset=utf-8", ".svg": "image/svg+xml"}  # fmt: skip
_PAGES = {"vms": "index.html", "login": "login.html", "host": "host.html"}


@dataclass(frozen=True)
class WebSettings:
    vv_validity: int = 10  # seconds a .vv file's SPICE password stays valid
    static: Path = STATIC
    vendor: Path = VENDOR


def _file(root: Path, relative: str) -> Response:
    try:
        path = (root / relative).resolve()
        path.relative_to(root.resolve())
    except (OSError, ValueError):
        raise NotFound(f"no page file {relative!r}") from None
    if not path.is_file():
        hint = " (run scripts/vendor-web.sh: `make web`)" if root.name == "vendor" else ""
        raise NotFound(f"no page file {relative!r}{hint}")
    media = _TYPES.get(path.suffix) or mimetypes.guess_type(path.name)[0]
    return FileResponse(path, media_type=media or "application/octet-stream",
                        headers=SECURITY_HEADERS)  # fmt: skip


def web_routes(manager: Manager, sampler: HostSampler, settings: WebSettings) -> APIRouter:
    """The routes; who may use each is the API's business (its app-wide permission check
    covers these routes too: ``corral.api.permissions.ROUTE_RULES``)."""
    router = APIRouter(tags=["web"])

    @router.get("/", include_in_schema=False)
    async def root() -> RedirectResponse:
        return RedirectResponse("/ui/vms", status_code=303)

    @router.get("/ui", include_in_schema=False)
    async def ui_root() -> RedirectResponse:
        return RedirectResponse("/ui/vms", status_code=303)

    @router.api_route("/ui/static/{path:path}", methods=["GET", "HEAD"], include_in_schema=False)
    async def static(path: str) -> Response:
        return _file(settings.static, path)

    @router.api_route("/ui/vendor/{path:path}", methods=["GET", "HEAD"], include_in_schema=False)
    async def vendor(path: str) -> Response:
        return _file(settings.vendor, path)

    @router.api_route("/ui/vms/{name}", methods=["GET", "HEAD"], include_in_schema=False)
    async def vm_page(name: str) -> Response:
        return _file(settings.static, "vm.html")  # the page reads the name from its URL

    @router.api_route("/ui/{page}", methods=["GET", "HEAD"], include_in_schema=False)
    async def page(page: str) -> Response:
        if page not in _PAGES:
            raise NotFound(f"no page {page!r}")
        return _file(settings.static, _PAGES[page])

    @router.get("/v1/host/history")
    async def host_history() -> dict[str, Any]:
        """The host's CPU and RAM in use over the last hour, oldest first."""
        return {
            "intervalSeconds": sampler.interval,
            "samples": [s.to_json() for s in sampler.samples],
        }

    async def display(websocket: WebSocket, name: str, protocol: str) -> None:
        try:
            address = display_address(manager, name, protocol)
        except CorralError as exc:
            await websocket.close(code=1011, reason=exc.message[:120])
            return
        await proxy_display(websocket, address)

    @router.websocket("/v1/vms/{name}/vnc")
    async def vnc(websocket: WebSocket, name: str) -> None:
        """RFB over a binary websocket to the VM's VNC server (noVNC's transport)."""
        await display(websocket, name, "vnc")

    @router.websocket("/v1/vms/{name}/spice")
    async def spice(websocket: WebSocket, name: str) -> None:
        """SPICE over a binary websocket to the VM's SPICE server (spice-html5's transport;
        each SPICE channel is one websocket)."""
        await display(websocket, name, "spice")

    @router.post("/v1/vms/{name}/display.vv", response_class=Response)
    async def display_vv(
        name: str,
        expiry: Annotated[int | None, Query(ge=1, le=3600)] = None,
    ) -> Response:
        """A remote-viewer file for the VM's SPICE display with a fresh password valid
        ``expiry`` seconds (default: the daemon's ``vvValidity``, 10)."""
        record = manager.get(name)
        display = record.document.vm.display
        if display is None or display.spice is None:
            raise Conflict(f"VM {name!r} has no SPICE display (spec.vm.display.spice)")
        issued = await manager.display(name, expiry or settings.vv_validity)
        spice = display.spice
        host = spice.address if spice.address not in ("0.0.0.0", "::") else "127.0.0.1"  # noqa: S104
        body = vv_file(name, host, spice.port, str(issued["password"]))
        return Response(
            body, media_type="application/x-virt-viewer",
            headers={"Content-Disposition": f'attachment; filename="{name}.vv"',
                     "Cache-Control": "no-store"},
        )  # fmt: skip

    return router
