"""Errors as ``application/problem+json`` (RFC 9457), and reading a JSON body into one.

The document itself is :meth:`corral.errors.CorralError.to_problem` (or
:func:`corral.errors.problem`): one shape for REST bodies and message replies. Here: the HTTP
response around it (``Retry-After``), the handlers that turn every error a route or FastAPI's
own validation raises into one, and the body checks every route shares.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from corral.errors import CorralError, FieldIssue, SpecError, problem

__all__ = [
    "MAX_BODY",
    "PROBLEM",
    "ProblemError",
    "corral_problem",
    "install_handlers",
    "json_body",
    "problem_response",
    "vm_document",
]

PROBLEM = "application/problem+json"
MAX_BODY = 4 * 1024 * 1024


def problem_response(
    status: int,
    detail: str,
    *,
    type_: str = "about:blank",
    issues: tuple[FieldIssue, ...] | list[FieldIssue] = (),
    headers: dict[str, str] | None = None,
    extra: dict[str, Any] | None = None,
) -> JSONResponse:
    body = problem(status, detail, type_=type_, issues=issues, extra=extra)
    return JSONResponse(body, status_code=status, media_type=PROBLEM, headers=headers)


def corral_problem(exc: CorralError) -> JSONResponse:
    """``exc`` as a problem+json response, with ``Retry-After`` when it says when to retry."""
    retry = {"Retry-After": str(exc.retry_after)} if exc.retry_after is not None else None
    return JSONResponse(exc.to_problem(), status_code=exc.status, media_type=PROBLEM, headers=retry)


class ProblemError(Exception):
    """A refusal of the HTTP request itself (not of what it asks for): 400, 413, 415."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


async def json_body(request: Request) -> object:
    kind = request.headers.get("content-type", "application/json").split(";")[0].strip()
    if kind not in ("application/json", "application/merge-patch+json", ""):
        raise ProblemError(415, f"send application/json, not {kind}")
    raw = await request.body()
    if len(raw) > MAX_BODY:
        raise ProblemError(413, f"body larger than {MAX_BODY} bytes")
    try:
        return json.loads(raw or b"null")
    except (ValueError, UnicodeDecodeError) as exc:
        raise ProblemError(400, f"the body is not valid JSON: {exc}") from None
    except RecursionError:  # BodyLimits refuses deep bodies first; this is the backstop
        raise ProblemError(400, "the body nests too deep") from None


def vm_document(body: object, where: str = "") -> dict[str, Any]:
    if not isinstance(body, dict):
        raise SpecError.single(where, "the body must be a JSON object (a VM document)")
    return body


def install_handlers(app: FastAPI) -> None:
    """Every error becomes problem+json: corral's own (with field paths), request refusals,
    FastAPI's validation (422, the field path without ``body``) and Starlette's (404, 405)."""

    @app.exception_handler(CorralError)
    async def corral_error(_: Request, exc: CorralError) -> JSONResponse:
        return corral_problem(exc)

    @app.exception_handler(ProblemError)
    async def problem_error(_: Request, exc: ProblemError) -> JSONResponse:
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
