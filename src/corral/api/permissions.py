"""Who may do what: role ``admin`` everything; anyone else what a VM's ``spec.permissions``
grant them, as VM-Operator defines it::

    spec:
      permissions:
        - user: alice
          may: [start, stop, accessConsole]
        - role: operators
          may: ["*"]

A grant names a ``user`` or a ``role`` and lists what it ``may``: ``start``, ``stop``,
``reset``, ``accessConsole`` (``takeConsole`` implies it), or ``"*"`` (everything on that VM,
its document too). What each route needs is :data:`ROUTE_RULES`, one line per route, checked by
one app-wide dependency (:func:`authorizer`) before the route runs, over REST and websockets
alike; a route missing from the table is admin-only (fail closed):

* a VM a principal may do nothing on is, for them, a VM that does not exist (the same 404);
* start, stop (and kill), restart (start and stop), reset: that action;
* the serial console, the console/qemu logs, a display password: ``accessConsole``;
* the document (replace, patch, delete, CD media) and exec in the guest: ``"*"``;
* creating a VM, and the host's writes (images, retained disks, shutdown): admin only;
* reading the host overview and the image list: any signed-in principal;
* ``/metrics``: admin, or role ``metrics`` (:mod:`corral.api.metrics`);
* listing VMs and events: any principal, filtered to the VMs they may see.

A malformed grant grants nothing. A principal is :class:`~corral.api.users.Principal`: bearer
tokens and the unix socket are admins.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Mapping
from enum import StrEnum
from typing import Any, Final

from starlette.requests import HTTPConnection

from corral.api.metrics import METRICS_ROLE
from corral.api.session import principal_of
from corral.api.users import Principal
from corral.errors import Forbidden, NotFound
from corral.manager import Manager, VmRecord

__all__ = [
    "ADMIN", "ANYONE", "FILTERED", "ROUTE_RULES", "VIEW", "Action", "authorizer", "may",
    "may_apply", "require", "visible", "visible_name",
]  # fmt: skip


class Action(StrEnum):
    START = "start"
    STOP = "stop"
    RESET = "reset"
    ACCESS_CONSOLE = "accessConsole"
    TAKE_CONSOLE = "takeConsole"
    ALL = "*"


ADMIN: Final = "admin"
ANYONE: Final = "anyone"  # any principal the listener let in
FILTERED: Final = "filtered"  # any principal; the route shows only what they may see
VIEW: Final = "view"  # the VM {name} must be visible to them

_IMPLIED: dict[str, set[str]] = {Action.ACCESS_CONSOLE: {Action.TAKE_CONSOLE}}

Rule = tuple[str, ...]
_VM = "/v1/vms/{name}"
ROUTE_RULES: dict[tuple[str, str], Rule] = {
    ("GET", "/healthz"): (ANYONE,),
    ("GET", "/readyz"): (ANYONE,),
    ("POST", "/v1/session"): (ANYONE,),
    ("GET", "/v1/session"): (ANYONE,),
    ("DELETE", "/v1/session"): (ANYONE,),
    ("GET", "/v1/host"): (ANYONE,),
    ("GET", "/v1/images"): (ANYONE,),
    ("GET", "/v1/vms"): (FILTERED,),
    ("GET", "/v1/events"): (FILTERED,),
    ("POST", "/v1/apply"): (FILTERED,),  # "*" on the VM it replaces; creating one: admin
    ("GET", _VM): (VIEW,),
    ("GET", f"{_VM}/wait"): (VIEW,),
    ("GET", f"{_VM}/events"): (VIEW,),
    ("PUT", _VM): (Action.ALL,),
    ("PATCH", _VM): (Action.ALL,),
    ("DELETE", _VM): (Action.ALL,),
    ("POST", f"{_VM}/media"): (Action.ALL,),
    ("POST", f"{_VM}/exec"): (Action.ALL,),
    ("POST", f"{_VM}/start"): (Action.START,),
    ("POST", f"{_VM}/stop"): (Action.STOP,),
    ("POST", f"{_VM}/kill"): (Action.STOP,),
    ("POST", f"{_VM}/restart"): (Action.START, Action.STOP),
    ("POST", f"{_VM}/reset"): (Action.RESET,),
    ("POST", f"{_VM}/display"): (Action.ACCESS_CONSOLE,),
    ("GET", f"{_VM}/logs"): (Action.ACCESS_CONSOLE,),
    ("WS", f"{_VM}/console"): (Action.ACCESS_CONSOLE,),
    ("GET", "/metrics"): (f"role:{METRICS_ROLE}",),
    # the pages (corral.web): their code holds no data; what they show comes from the API
    ("GET", "/"): (ANYONE,),
    ("GET", "/ui"): (ANYONE,),
    ("GET", "/ui/static/{path:path}"): (ANYONE,),
    ("GET", "/ui/vendor/{path:path}"): (ANYONE,),
    ("GET", "/ui/vms/{name}"): (ANYONE,),
    ("GET", "/ui/{page}"): (ANYONE,),
    ("GET", "/v1/host/history"): (ANYONE,),
    ("WS", f"{_VM}/vnc"): (Action.ACCESS_CONSOLE,),
    ("WS", f"{_VM}/spice"): (Action.ACCESS_CONSOLE,),
    ("POST", f"{_VM}/display.vv"): (Action.ACCESS_CONSOLE,),
}
"""(method, route path) → what it needs; ``WS`` for a websocket route. Anything else needs
admin. A new route adds its line here (tests/unit/test_permissions.py checks every route of the
app has one, so none is admin-only by accident)."""


def _granted(principal: Principal, record: VmRecord) -> set[str]:
    """Everything ``spec.permissions`` grants ``principal`` on ``record``."""
    found: set[str] = set()
    for grant in record.document.spec.permissions or ():
        if not isinstance(grant, dict):
            continue
        user, role, what = grant.get("user"), grant.get("role"), grant.get("may")
        if not isinstance(what, list) or (user is None) == (role is None):
            continue  # VM-Operator: exactly one of user and role
        if user == principal.name or (isinstance(role, str) and role in principal.roles):
            found.update(w for w in what if isinstance(w, str))
    return found


def may(principal: Principal, record: VmRecord, action: Action | str) -> bool:
    if principal.admin:
        return True
    granted = _granted(principal, record)
    implied = _IMPLIED.get(action, set())
    return Action.ALL in granted or action in granted or bool(implied & granted)


def visible(principal: Principal, record: VmRecord) -> bool:
    """Whether ``principal`` may do anything at all on ``record`` (and so see it)."""
    if principal.admin:
        return True
    return bool(_granted(principal, record) & {a.value for a in Action})


def visible_name(principal: Principal, manager: Manager, name: str) -> bool:
    """Whether the VM ``name`` exists and ``principal`` may see it (an event's VM)."""
    if principal.admin:
        return True
    record = manager.store.find(name)
    return record is not None and visible(principal, record)


def require(principal: Principal, manager: Manager, name: str, needs: Iterable[str]) -> VmRecord:
    """The VM ``name`` if ``principal`` may do all of ``needs`` on it; a VM they may not see
    is the same :class:`NotFound` as a missing one, an action they may not do a 403 naming
    it."""
    record = manager.get(name)
    if not visible(principal, record):
        raise NotFound(f"VM {name!r} not found")
    for need in needs:
        if need != VIEW and not may(principal, record, need):
            raise Forbidden(
                f"{principal.name!r} may not {need!r} on VM {name!r} "
                "(its spec.permissions grant no such 'may')"
            )
    return record


def may_apply(principal: Principal, manager: Manager, document: Mapping[str, Any]) -> None:
    """``POST /v1/apply``: replacing a VM needs ``"*"`` on it, creating one role admin."""
    if principal.admin:
        return
    meta = document.get("metadata")
    name = meta.get("name") if isinstance(meta, dict) else None
    if isinstance(name, str) and name in manager.store.names():
        require(principal, manager, name, (Action.ALL,))
        return
    raise Forbidden(f"{principal.name!r} may not create VMs: it needs role 'admin'")


def _rule(conn: HTTPConnection) -> Rule:
    route = conn.scope.get("route")
    path = getattr(route, "path", None)
    method = "WS" if conn.scope["type"] == "websocket" else conn.scope.get("method", "")
    return ROUTE_RULES.get((("GET" if method == "HEAD" else method), str(path)), (ADMIN,))


def authorizer(manager: Manager) -> Callable[[HTTPConnection], Awaitable[None]]:
    """The app-wide dependency that enforces :data:`ROUTE_RULES` (the 403/404 is the usual
    problem+json; on a websocket, the handshake's denial response)."""

    async def authorize(conn: HTTPConnection) -> None:
        principal = principal_of(conn)
        if principal.admin:
            return
        rule = _rule(conn)
        if rule[0] in (ANYONE, FILTERED):
            return
        if rule[0].startswith("role:"):
            if rule[0][5:] in principal.roles:
                return
            raise Forbidden(f"{principal.name!r} may not do this: it needs role {rule[0][5:]!r}")
        if rule[0] == ADMIN:
            raise Forbidden(f"{principal.name!r} may not do this: it needs role 'admin'")
        require(principal, manager, str(conn.path_params.get("name", "")), rule)

    return authorize
