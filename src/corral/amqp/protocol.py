"""aetherscale's message protocol, read and answered without a broker: a request body becomes a
:class:`Request` (or a :class:`~corral.errors.SpecError` naming the field), and a result or an
error becomes aetherscale's reply envelope.

A request is a JSON object ``{"command": NAME, "options": {...}}`` published to the ``computing``
exchange with the command as its routing key. A reply goes to the request's ``reply_to`` with
its ``correlation_id``::

    {"execution-info": {"status": "success"}, "response": ...}
    {"execution-info": {"status": "error", "reason": "...", "problem": {...}}}

``reason`` is the one line aetherscale's clients print; ``problem`` the same problem document
as the REST API's ``application/problem+json`` (:meth:`CorralError.to_problem`), with the field
path of each issue (``options.vm-id``). corral adds ``host`` (which daemon answered) to
``execution-info``; aetherscale's clients ignore members they do not know.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from corral.errors import CorralError, FieldIssue, SpecError

__all__ = [
    "COMMANDS",
    "MAX_BODY_BYTES",
    "PayloadTooLarge",
    "Request",
    "error_reply",
    "parse_request",
    "success_reply",
]

MAX_BODY_BYTES = 1 << 20
MAX_TEXT = 253  # a string option (a VM name, an image name): a DNS name's length
MAX_PATH = 4096  # set-cd's image, a host path as REST's media request takes it
"""A request body larger than this is refused unread (aetherscale's are a few hundred bytes;
corral's full VM documents a few KiB)."""

COMMANDS: dict[str, tuple[str, ...]] = {
    "list-vms": (),
    "create-vm": ("image",),
    "start-vm": ("vm-id",),
    "stop-vm": ("vm-id",),
    "delete-vm": ("vm-id",),
    # corral's own, on the same channel: a whole VM document, a merge patch, a VM's JSON
    "create": ("document",),
    "get": ("vm-id",),
    "patch": ("vm-id", "patch"),
    "set-cd": ("vm-id",),  # and ``image``: a name or host path, or null to eject
}
"""The commands and the options each requires: aetherscale's, then corral's."""

_OBJECT_OPTIONS = frozenset({"document", "patch"})


class PayloadTooLarge(SpecError):
    """A request body over the size limit: refused before it is parsed."""

    status = 413


@dataclass(frozen=True)
class Request:
    """One parsed request: its ``command`` and ``options`` (a JSON object)."""

    command: str
    options: dict[str, Any] = field(default_factory=dict)

    def text(self, name: str) -> str:
        """Option ``name``, which must be a non-empty string."""
        value = self.options.get(name)
        if not isinstance(value, str) or not value:
            raise SpecError(
                f"invalid {self.command} request",
                [FieldIssue(f"options.{name}", "must be a non-empty string")],
            )
        if len(value) > MAX_TEXT:  # a name or an image: never a megabyte echoed and logged
            raise SpecError(
                f"invalid {self.command} request",
                [FieldIssue(f"options.{name}", f"at most {MAX_TEXT} characters")],
            )
        return value

    def object(self, name: str) -> dict[str, Any]:
        """Option ``name``, which must be a JSON object."""
        value = self.options.get(name)
        if not isinstance(value, dict):
            raise SpecError(
                f"invalid {self.command} request",
                [FieldIssue(f"options.{name}", "must be a JSON object")],
            )
        return value

    def flag(self, name: str) -> bool:
        """Option ``name`` as aetherscale reads it: the JSON value's Python truthiness
        (``bool(options.get(name, False))``: ``"yes"`` and ``1`` are true, ``0``, ``""``,
        ``null``, ``[]`` false), false when absent."""
        return bool(self.options.get(name, False))

    def media(self) -> tuple[str | None, str | None]:
        """``set-cd``'s ``image`` (a string, or null or "" to eject: the key is required, so
        a forgotten image never ejects) and ``drive`` (a CD drive's disk name, or absent for
        the first), with REST's ``POST /v1/vms/{name}/media`` bounds."""
        if "image" not in self.options:
            raise SpecError(
                f"invalid {self.command} request",
                [FieldIssue("options.image", "required: an image, or null to eject")],
            )
        image, drive = self.options["image"], self.options.get("drive")
        if image is not None and (not isinstance(image, str) or len(image) > MAX_PATH):
            raise SpecError(
                f"invalid {self.command} request",
                [FieldIssue("options.image", f"must be null or a string of at most {MAX_PATH}")],
            )
        if drive is not None and (not isinstance(drive, str) or not 1 <= len(drive) <= 63):
            raise SpecError(
                f"invalid {self.command} request",
                [FieldIssue("options.drive", "must be a disk name of 1 to 63 characters")],
            )
        return image or None, drive


def parse_request(body: bytes, limit: int = MAX_BODY_BYTES) -> Request:
    """The request in ``body``; a :class:`SpecError` at the offending field for anything else
    (not UTF-8 JSON, not an object, no or an unknown ``command``, options not an object, a
    required option missing), a :class:`PayloadTooLarge` for a body over ``limit`` bytes."""
    if len(body) > limit:
        raise PayloadTooLarge(
            "request too large", [FieldIssue("", f"{len(body)} bytes; the limit is {limit}")]
        )
    try:
        data = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # deep nesting: the last
        reason = f"not a JSON document: {str(exc)[:120]}"
        raise SpecError("invalid request", [FieldIssue("", reason)]) from None
    if not isinstance(data, dict):
        raise SpecError("invalid request", [FieldIssue("", "must be a JSON object")])
    command = data.get("command")
    if not isinstance(command, str) or not command:
        raise SpecError("invalid request", [FieldIssue("command", "must be a command name")])
    if command not in COMMANDS:
        reason = f"{command[:64]!r} is not a command; one of {', '.join(COMMANDS)}"
        raise SpecError("invalid request", [FieldIssue("command", reason)])
    options = data.get("options", {})
    if options is None:
        options = {}
    if not isinstance(options, dict):
        raise SpecError(f"invalid {command} request",
                        [FieldIssue("options", "must be a JSON object")])  # fmt: skip
    request = Request(command, options)
    for name in COMMANDS[command]:
        if name in _OBJECT_OPTIONS:
            request.object(name)
        else:
            request.text(name)
    if command == "set-cd":
        request.media()
    return request


def success_reply(response: object, host: str) -> dict[str, Any]:
    return {"execution-info": {"status": "success", "host": host}, "response": response}


def error_reply(error: CorralError, host: str) -> dict[str, Any]:
    return {
        "execution-info": {
            "status": "error", "reason": str(error), "host": host, "problem": error.to_problem(),
        },
    }  # fmt: skip
