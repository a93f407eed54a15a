"""``/v1/events`` and ``/v1/vms/{name}/events``: server-sent events, the past ones or
(``?follow=true``) a live feed, resumed after ``Last-Event-ID`` or ``?after=``."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import StreamingResponse

from corral.api.permissions import visible
from corral.api.problems import ProblemError
from corral.api.session import principal_of
from corral.api.users import Principal
from corral.manager import Manager, StoredEvent, VmRecord

__all__ = ["event_routes"]

_MAX_EVENT_ID = 2**62
_EVENT_ID = re.compile(r"[0-9]{1,19}")
Follow = Annotated[bool, Query(description="keep the stream open for new events")]
After = Annotated[int, Query(ge=0, le=_MAX_EVENT_ID, description="events after this id")]


def _after(request: Request, after: int) -> int:
    """The event id to resume after: ``Last-Event-ID`` (what an EventSource sends back on
    reconnect) wins over ``?after=``. A header that is not an event id is a 400, before the
    stream starts: no int parse of 4301 digits, no id past SQLite's 64-bit integers."""
    last = request.headers.get("last-event-id", "").strip()
    if not last:
        return after
    if _EVENT_ID.fullmatch(last) is None or int(last) > _MAX_EVENT_ID:
        shown = last if len(last) <= 40 else f"{last[:40]}… ({len(last)} characters)"
        raise ProblemError(
            400, f"Last-Event-ID {shown!r} is not an event id (an integer 0..{_MAX_EVENT_ID})"
        )
    return int(last)


def _sse(event: StoredEvent) -> bytes:
    data = json.dumps(event.to_json(), default=str)
    head = f"id: {event.id}\n" if event.id else ""
    return f"{head}event: {event.kind}\ndata: {data}\n\n".encode()


def event_routes(manager: Manager) -> APIRouter:
    router = APIRouter(tags=["events"])

    def _stream(name: str | None, after: int, follow: bool, who: Principal) -> StreamingResponse:
        seen: dict[str, VmRecord | None] = {}

        def shown(event: StoredEvent) -> bool:
            """Admins see every event; anyone else those of the VMs they may see, since the VM
            they see was created (a deleted VM of the same name was someone else's)."""
            if who.admin:
                return True
            if follow or event.vm not in seen:  # a live feed asks each time: grants change
                record = manager.store.find(event.vm)
                seen[event.vm] = record if record is not None and visible(who, record) else None
            record = seen[event.vm]
            return record is not None and event.ts >= record.created

        async def body() -> AsyncIterator[bytes]:
            if not follow:
                for event in manager.events(name, after):
                    if shown(event):
                        yield _sse(event)
                return
            yield b": streaming\n\n"
            async for event in manager.follow(name, after):
                if shown(event):
                    yield _sse(event)

        if name is not None:
            manager.get(name)  # 404 before the stream starts
        return StreamingResponse(
            body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )

    @router.get("/v1/vms/{name}/events", response_class=StreamingResponse)
    async def vm_events(
        name: str, request: Request, follow: Follow = False, after: After = 0
    ) -> StreamingResponse:
        return _stream(name, _after(request, after), follow, principal_of(request))

    @router.get("/v1/events", response_class=StreamingResponse)
    async def all_events(request: Request, follow: Follow = False, after: After = 0) -> Any:
        return _stream(None, _after(request, after), follow, principal_of(request))

    return router
