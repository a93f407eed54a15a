"""The REST API (FastAPI) over the manager's Python API.

Every error is ``application/problem+json`` (RFC 9457): ``type``, ``title``, ``status``,
``detail`` and, for validation and policy errors, ``errors: [{loc, reason}]`` with the field
path. Bad input is a 4xx, never a 500: bodies are read as JSON and validated by corral's own
models, so the field paths are the VM document's (``spec.vm.disks[0].file.image``). Before
any route runs, :class:`~corral.api.limits.BodyLimits` caps each body (413) and the nesting of
each JSON body (400); ``Last-Event-ID`` is checked before a stream starts (400).

Routes (all under ``/v1`` but the probes)::

    GET  /healthz /readyz
    GET  /v1/host                       POST /v1/host/shutdown
    GET  /v1/vms?state=&label=          POST /v1/vms (?adoptDisks=ID)
    GET|PUT|PATCH|DELETE /v1/vms/{name} (?deleteDisks=true, ?force=true: kill, no grace)
    POST /v1/vms/{name}/start|stop|restart|reset|kill (?wait=SECONDS; start|restart: &for=)
    GET  /v1/vms/{name}/wait?for=condition=Booted|state=Stopped&timeout=SECONDS
    GET  /v1/vms/{name}/events          GET /v1/events   (SSE; ?follow=true streams)
    WS   /v1/vms/{name}/console         POST /v1/vms/{name}/exec
    GET  /v1/vms/{name}/logs            (?source=console|qemu&tail=N&follow=true&raw=true)
    POST /v1/vms/{name}/display (?expiry=SECONDS)
    GET|POST /v1/images                 PUT|DELETE /v1/images/{name}   (PUT: upload the bytes)
    GET  /v1/disks                      DELETE /v1/disks/{id}   (retained by deleted VMs)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

from fastapi import Body, FastAPI, Query, Request, WebSocket
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from corral import __version__
from corral.api.console import proxy_console
from corral.api.limits import BodyLimits
from corral.errors import CorralError, FieldIssue, SpecError, StoreUnavailable
from corral.manager import Manager, ManagerState, StoredEvent, VmRecord, WaitTarget
from corral.printable import PrintableDecoder

__all__ = ["PROBLEM", "create_app", "problem_response"]

PROBLEM = "application/problem+json"
_TITLES = {
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    409: "Conflict",
    413: "Payload Too Large",
    415: "Unsupported Media Type",
    422: "Unprocessable Content",
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}
_MAX_BODY = 4 * 1024 * 1024
_MAX_EXEC_BODY = 24 * 1024 * 1024  # ExecRequest.stdin takes up to 16 MiB of text
_MAX_DEPTH = 64
_BODY_LIMITS = [
    ("PUT", re.compile(r"/v1/images/[^/]+"), None),  # an upload, streamed into the store
    ("POST", re.compile(r"/v1/vms/[^/]+/exec"), _MAX_EXEC_BODY),
]
_MAX_EVENT_ID = 2**62
_MAX_TAIL = 1_000_000
_EVENT_ID = re.compile(r"[0-9]{1,19}")
VmDoc = dict[str, Any]
Wait = Annotated[float | None, Query(gt=0, le=86400, description="seconds to wait")]
Follow = Annotated[bool, Query(description="keep the stream open for new events")]
_FOR = "what to wait for: state=STATE or condition=CONDITION[=false]"
Until = Annotated[str | None, Query(alias="for", max_length=64, description=_FOR)]
WaitTimeout = Annotated[float, Query(gt=0, le=86400, description="seconds to wait")]
After = Annotated[int, Query(ge=0, le=_MAX_EVENT_ID, description="events after this id")]
LogSourceQuery = Annotated[
    Literal["console", "qemu"],
    Query(description="console: what the guest printed on its serial console; qemu: its stderr"),
]
Tail = Annotated[int | None, Query(ge=0, le=_MAX_TAIL, description="only the last N lines")]


def problem_response(
    status: int,
    detail: str,
    *,
    type_: str = "about:blank",
    issues: tuple[FieldIssue, ...] | list[FieldIssue] = (),
    headers: dict[str, str] | None = None,
    extra: dict[str, Any] | None = None,
) -> JSONResponse:
    body: dict[str, Any] = {
        "type": type_,
        "title": _TITLES.get(status, "Error"),
        "status": status,
        "detail": detail,
        **(extra or {}),
    }
    if issues:
        body["errors"] = [{"loc": i.loc, "reason": i.reason} for i in issues]
    return JSONResponse(body, status_code=status, media_type=PROBLEM, headers=headers)


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", alias_generator=to_camel, populate_by_name=True)


class ExecRequest(_Model):
    command: list[Annotated[str, Field(max_length=65536)]] = Field(min_length=1, max_length=4096)
    stdin: str | None = Field(default=None, max_length=16 * 1024 * 1024)
    timeout: float = Field(default=60.0, gt=0, le=3600)


class ExecResponse(_Model):
    exit_code: int | None
    signal: int | None
    stdout: str
    stderr: str
    truncated: bool


class ImageImportRequest(_Model):
    name: str = Field(min_length=1, max_length=128)
    source: str = Field(min_length=1, max_length=8192)
    checksum: str | None = Field(default=None, max_length=200)
    replace: bool = False


class VmList(BaseModel):
    items: list[VmDoc]


def _vm(record: VmRecord) -> VmDoc:
    return record.to_json()


async def _json_body(request: Request) -> object:
    kind = request.headers.get("content-type", "application/json").split(";")[0].strip()
    if kind not in ("application/json", "application/merge-patch+json", ""):
        raise _ProblemError(415, f"send application/json, not {kind}")
    raw = await request.body()
    if len(raw) > _MAX_BODY:
        raise _ProblemError(413, f"body larger than {_MAX_BODY} bytes")
    try:
        return json.loads(raw or b"null")
    except (ValueError, UnicodeDecodeError) as exc:
        raise _ProblemError(400, f"the body is not valid JSON: {exc}") from None
    except RecursionError:  # BodyLimits refuses deep bodies first; this is the backstop
        raise _ProblemError(400, "the body nests too deep") from None


def _after(request: Request, after: int) -> int:
    """The event id to resume after: ``Last-Event-ID`` (what an EventSource sends back on
    reconnect) wins over ``?after=``. A header that is not an event id is a 400, before the
    stream starts: no int parse of 4301 digits, no id past SQLite's 64-bit integers."""
    last = request.headers.get("last-event-id", "").strip()
    if not last:
        return after
    if _EVENT_ID.fullmatch(last) is None or int(last) > _MAX_EVENT_ID:
        shown = last if len(last) <= 40 else f"{last[:40]}… ({len(last)} characters)"
        raise _ProblemError(
            400, f"Last-Event-ID {shown!r} is not an event id (an integer 0..{_MAX_EVENT_ID})"
        )
    return int(last)


class _ProblemError(Exception):
    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


def _document(body: object, where: str = "") -> dict[str, Any]:
    if not isinstance(body, dict):
        raise SpecError.single(where, "the body must be a JSON object (a VM document)")
    return body


def _sse(event: StoredEvent) -> bytes:
    data = json.dumps(event.to_json(), default=str)
    head = f"id: {event.id}\n" if event.id else ""
    return f"{head}event: {event.kind}\ndata: {data}\n\n".encode()


def create_app(manager: Manager) -> FastAPI:
    app = FastAPI(
        title="corral",
        version=__version__,
        description="Run and manage QEMU virtual machines without libvirt.",
    )
    app.add_middleware(
        BodyLimits, max_body=_MAX_BODY, max_depth=_MAX_DEPTH, routes=_BODY_LIMITS,
        problem=problem_response,
    )  # fmt: skip

    @app.exception_handler(CorralError)
    async def corral_error(_: Request, exc: CorralError) -> JSONResponse:
        retry = {"Retry-After": str(exc.retry_after)} if exc.retry_after is not None else None
        extra = {"reason": exc.reason} if isinstance(exc, StoreUnavailable) else None
        return problem_response(
            exc.status, exc.message, type_=exc.problem_type, issues=list(exc.issues),
            headers=retry, extra=extra,
        )  # fmt: skip

    @app.exception_handler(_ProblemError)
    async def problem_error(_: Request, exc: _ProblemError) -> JSONResponse:
        return problem_response(exc.status, exc.detail)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        issues = [
            FieldIssue(".".join(str(p) for p in err.get("loc", ()) if p != "body"),
                       str(err.get("msg")))
            for err in exc.errors()
        ]  # fmt: skip
        return problem_response(
            422, "invalid request", type_="urn:corral:invalid-request", issues=issues
        )

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        headers = dict(exc.headers) if exc.headers else None
        return problem_response(exc.status_code, str(exc.detail), headers=headers)

    # --- probes and host -------------------------------------------------------------------

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
        return data

    @app.post("/v1/host/shutdown", tags=["host"])
    async def host_shutdown(
        timeout: Annotated[float | None, Query(gt=0, le=86400)] = None,
    ) -> dict[str, str]:
        return await manager.stop_all(timeout)

    # --- VMs -------------------------------------------------------------------------------

    @app.get("/v1/vms", tags=["vms"])
    async def list_vms(
        state: Annotated[str | None, Query(max_length=32)] = None,
        label: Annotated[str | None, Query(max_length=317)] = None,
    ) -> VmList:
        return VmList(items=[_vm(r) for r in manager.list_vms(state=state, label=label)])

    @app.post("/v1/vms", status_code=201, tags=["vms"])
    async def create_vm(
        document: Annotated[VmDoc, Body()],
        adopt_disks: Annotated[str | None, Query(alias="adoptDisks", max_length=80)] = None,
    ) -> VmDoc:
        """``adoptDisks``: a retained set (``GET /v1/disks``) becomes the new VM's data dir."""
        return _vm(await manager.create(_document(document), adopt_disks=adopt_disks))

    @app.get("/v1/vms/{name}", tags=["vms"])
    async def get_vm(name: str) -> VmDoc:
        return _vm(manager.get(name))

    @app.put("/v1/vms/{name}", tags=["vms"])
    async def replace_vm(name: str, document: Annotated[VmDoc, Body()]) -> VmDoc:
        doc = _document(document)
        meta = doc.get("metadata")
        if not isinstance(meta, dict):
            raise SpecError.single("metadata", f"is required (a mapping with name: {name})")
        if meta.get("name", name) != name:
            raise SpecError.single("metadata.name", f"must be {name!r} (the URL's name)")
        doc = {**doc, "metadata": {**meta, "name": name}}
        version = doc["metadata"].pop("resourceVersion", None)
        for key in ("uid", "generation", "creationTimestamp"):
            doc["metadata"].pop(key, None)
        doc.pop("status", None)
        return _vm(await manager.replace(doc, str(version) if version is not None else None))

    @app.patch(
        "/v1/vms/{name}",
        tags=["vms"],
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "application/merge-patch+json": {"schema": {"type": "object"}},
                    "application/json": {"schema": {"type": "object"}},
                },
            }
        },
    )
    async def patch_vm(name: str, request: Request) -> VmDoc:
        """A JSON merge patch (RFC 7386); ``metadata.resourceVersion`` makes it conditional."""
        patch = _document(await _json_body(request))
        meta = patch.get("metadata")
        version = None
        if isinstance(meta, dict):
            meta = dict(meta)
            version = meta.pop("resourceVersion", None)
            patch = {**patch, "metadata": meta}
        return _vm(await manager.patch(name, patch, None if version is None else str(version)))

    @app.delete("/v1/vms/{name}", tags=["vms"])
    async def delete_vm(
        name: str,
        delete_disks: Annotated[bool, Query(alias="deleteDisks")] = False,
        force: bool = False,
    ) -> dict[str, Any]:
        retained = await manager.delete(name, delete_disks=delete_disks, force=force)
        return {
            "name": name,
            "deleted": True,
            "disksDeleted": delete_disks,
            "retainedDisks": retained.id if retained is not None else None,
        }

    def _until(until: str | None, wait: float | None) -> WaitTarget | None:
        """``?for=`` of start/restart, checked before anything is done."""
        if until is None:
            return None
        if wait is None:
            raise SpecError("invalid wait", [FieldIssue("for", "needs wait=SECONDS")])
        return WaitTarget.parse(until)

    @app.post("/v1/vms/{name}/start", tags=["lifecycle"])
    async def start_vm(name: str, wait: Wait = None, until: Until = None) -> VmDoc:
        """``?wait=SECONDS`` waits until Running, or until ``for`` holds
        (``for=condition=Booted``)."""
        target = _until(until, wait)
        await manager.start(name, wait=None if target else wait)
        if target is not None and wait is not None:
            return _vm(await manager.wait(name, target, wait))
        return _vm(manager.get(name))

    @app.get("/v1/vms/{name}/wait", tags=["lifecycle"])
    async def wait_vm(name: str, until: Until, timeout: WaitTimeout = 30) -> VmDoc:
        """The VM once ``for`` holds (``kubectl wait``): event-driven, answered as soon as the
        status that meets it is written; 504 saying where the VM is after ``timeout``."""
        if until is None:
            raise SpecError("invalid wait", [FieldIssue("for", "is required")])
        return _vm(await manager.wait(name, WaitTarget.parse(until), timeout))

    @app.post("/v1/vms/{name}/stop", tags=["lifecycle"])
    async def stop_vm(name: str, wait: Wait = None) -> VmDoc:
        await manager.stop(name, wait=wait)
        return _vm(manager.get(name))

    @app.post("/v1/vms/{name}/restart", tags=["lifecycle"])
    async def restart_vm(name: str, wait: Wait = None, until: Until = None) -> VmDoc:
        target = _until(until, wait)
        await manager.restart(name, wait=None if target else wait)
        if target is not None and wait is not None:
            return _vm(await manager.wait(name, target, wait))
        return _vm(manager.get(name))

    @app.post("/v1/vms/{name}/reset", tags=["lifecycle"])
    async def reset_vm(name: str) -> VmDoc:
        await manager.reset(name)
        return _vm(manager.get(name))

    @app.post("/v1/vms/{name}/kill", tags=["lifecycle"])
    async def kill_vm(name: str) -> VmDoc:
        await manager.kill(name)
        return _vm(manager.get(name))

    @app.post("/v1/vms/{name}/exec", tags=["guest"])
    async def exec_vm(name: str, body: ExecRequest) -> ExecResponse:
        result = await manager.exec(
            name,
            body.command,
            stdin=body.stdin.encode() if body.stdin is not None else None,
            timeout=body.timeout,
        )
        return ExecResponse(
            exit_code=result.exit_code,
            signal=result.signal,
            stdout=result.stdout.decode(errors="replace"),
            stderr=result.stderr.decode(errors="replace"),
            truncated=result.truncated,
        )

    @app.post("/v1/vms/{name}/display", tags=["guest"])
    async def display_vm(
        name: str, expiry: Annotated[int, Query(ge=1, le=86400)] = 30
    ) -> dict[str, Any]:
        """A fresh display password valid ``expiry`` seconds, with the URLs to use it."""
        return await manager.display(name, expiry)

    @app.websocket("/v1/vms/{name}/console")
    async def console(websocket: WebSocket, name: str) -> None:
        """A missing VM is a 404 and one that is not running a 409, as a problem+json
        denial of the handshake (the client reads why), not a bare 403."""
        try:
            path = manager.console_socket(name)
        except CorralError as exc:
            problem = problem_response(exc.status, exc.message, type_=exc.problem_type)
            try:
                await websocket.send_denial_response(problem)
            except RuntimeError:  # a server without the denial-response extension
                await websocket.close(code=4404 if exc.status == 404 else 4409,
                                      reason=exc.message[:120])  # fmt: skip
            return
        await proxy_console(websocket, path)

    @app.get(
        "/v1/vms/{name}/logs",
        tags=["guest"],
        response_class=StreamingResponse,
        responses={200: {"content": {"text/plain": {}, "application/octet-stream": {}}}},
    )
    async def vm_logs(
        name: str,
        source: LogSourceQuery = "console",
        tail: Tail = None,
        follow: Follow = False,
        raw: Annotated[bool, Query(description="the bytes as written, not printable")] = False,
    ) -> StreamingResponse:
        """A VM's log: text with every control character but newline and tab shown, not
        obeyed (``^[`` for ESC), so no guest drives a reader's terminal; ``raw=true``: the
        bytes as written. 404 for an unknown VM, 409 for one without such a log yet."""
        chunks = manager.logs(name, source, tail=tail, follow=follow)

        async def body() -> AsyncIterator[bytes]:
            decoder = None if raw else PrintableDecoder()
            async with contextlib.aclosing(chunks):
                async for chunk in chunks:
                    text = chunk if decoder is None else decoder.feed(chunk).encode()
                    if text:
                        yield text
            if decoder is not None and (rest := decoder.feed(b"", final=True)):
                yield rest.encode()

        return StreamingResponse(
            body(),
            media_type="application/octet-stream" if raw else "text/plain; charset=utf-8",
            headers={"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"},
        )

    # --- events ----------------------------------------------------------------------------

    def _stream(name: str | None, after: int, follow: bool) -> StreamingResponse:
        async def body() -> AsyncIterator[bytes]:
            if not follow:
                for event in manager.events(name, after):
                    yield _sse(event)
                return
            yield b": streaming\n\n"
            async for event in manager.follow(name, after):
                yield _sse(event)

        if name is not None:
            manager.get(name)  # 404 before the stream starts
        return StreamingResponse(
            body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )

    @app.get("/v1/vms/{name}/events", tags=["events"], response_class=StreamingResponse)
    async def vm_events(
        name: str, request: Request, follow: Follow = False, after: After = 0
    ) -> StreamingResponse:
        return _stream(name, _after(request, after), follow)

    @app.get("/v1/events", tags=["events"], response_class=StreamingResponse)
    async def all_events(request: Request, follow: Follow = False, after: After = 0) -> Any:
        return _stream(None, _after(request, after), follow)

    # --- images ----------------------------------------------------------------------------

    @app.get("/v1/images", tags=["images"])
    async def list_images() -> dict[str, list[dict[str, Any]]]:
        return {
            "items": [{**img.to_json(), "users": users} for img, users in manager.list_images()]
        }

    @app.post("/v1/images", status_code=201, tags=["images"])
    async def import_image(body: ImageImportRequest) -> dict[str, Any]:
        """Import (download, or copy a host path inside the policy's ``imagePaths``: 403
        otherwise) and verify an image; progress is published as ``ImageImportProgress``
        events on ``/v1/events?follow=true``."""
        record = await manager.import_image(
            body.name, body.source, checksum=body.checksum, replace=body.replace
        )
        return record.to_json()

    @app.put(
        "/v1/images/{name}",
        status_code=201,
        tags=["images"],
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}
                },
            }
        },
    )
    async def upload_image(
        name: str,
        request: Request,
        checksum: Annotated[str | None, Query(max_length=200)] = None,
        replace: bool = False,
        filename: Annotated[
            str | None, Query(max_length=255, pattern=r"^[^\x00-\x1f\x7f/]+$")
        ] = None,
    ) -> dict[str, Any]:
        """Upload an image's bytes (``application/octet-stream``, streamed to the store, no
        size cap): verified and published like an import; the client's own file, never a
        path the daemon opens."""
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind != "application/octet-stream":
            raise _ProblemError(415, f"send application/octet-stream, not {kind or 'nothing'}")
        length = request.headers.get("content-length", "").strip()
        total = int(length) if length.isdigit() and len(length) <= 18 else None
        try:
            record = await manager.upload_image(
                name, request.stream(), total=total, filename=filename, checksum=checksum,
                replace=replace,
            )  # fmt: skip
        except ClientDisconnect:
            raise _ProblemError(400, "the client left before the upload was complete") from None
        return record.to_json()

    @app.delete("/v1/images/{name}", tags=["images"])
    async def delete_image(name: str) -> dict[str, Any]:
        await manager.delete_image(name)
        return {"name": name, "deleted": True}

    # --- retained disks --------------------------------------------------------------------

    @app.get("/v1/disks", tags=["disks"])
    async def list_disks() -> dict[str, list[dict[str, object]]]:
        """Data dirs of deleted VMs (disks, UUID, TPM, firmware vars), kept until deleted or
        adopted (``POST /v1/vms?adoptDisks=ID``)."""
        return {"items": [r.to_json() for r in manager.list_retained()]}

    @app.delete("/v1/disks/{id}", tags=["disks"])
    async def delete_disks(id: str) -> dict[str, Any]:
        removed = await manager.delete_retained(id)
        return {"id": removed.id, "deleted": True}

    return app
