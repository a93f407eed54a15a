"""The one error tree of corral.

Every failure that corral means to report to a user is a :class:`CorralError`. The CLI turns
it into one line on stderr and an exit code; every other interface into the problem document
of :meth:`CorralError.to_problem` (RFC 9457: ``problem_type`` and ``status`` below, and the
field path of each issue): the REST API's ``application/problem+json`` body, a message reply.

::

    CorralError
     ├── SpecError            the VM document is invalid (field path + reason for each issue)
     ├── PolicyError          the document is valid but the host policy refuses it
     │    ├── Forbidden       an API client asked for a host resource the policy keeps
     │    └── CapacityError   the host has no room for it now (CPU/RAM overcommit limits)
     ├── NotFound             a named VM, image or file does not exist
     ├── Conflict             a duplicate name, a busy resource (a taken host port)
     │    └── VersionConflict a stale resourceVersion, or another writer in between: read
     │                        the VM again and retry
     ├── HostError            the host lacks something (qemu binary, OVMF, swtpm, a tool)
     ├── QemuError            qemu failed to start or answered a command with an error
     ├── Unauthorized         no bearer token, or a wrong one (TCP API)
     ├── Timeout              a wait (--wait, a powerdown) ran out
     ├── Unsupported          the VM's backend cannot do this (exec, reset...: its capabilities)
     └── StoreUnavailable     the manager's store cannot be written now (locked, disk full,
                              I/O error, read-only): nothing was changed; retry later
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "PROBLEM_TITLES",
    "CapacityError",
    "Conflict",
    "CorralError",
    "FieldIssue",
    "Forbidden",
    "HostError",
    "NotFound",
    "PolicyError",
    "QemuError",
    "SpecError",
    "StoreUnavailable",
    "Timeout",
    "Unauthorized",
    "Unsupported",
    "VersionConflict",
    "problem",
]

PROBLEM_TITLES = {
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
    501: "Not Implemented",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}


def problem(
    status: int,
    detail: str,
    *,
    type_: str = "about:blank",
    issues: Iterable[FieldIssue] = (),
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """An RFC 9457 problem document: ``type``, ``title``, ``status``, ``detail``, then
    ``extra``, and ``errors: [{loc, reason}]`` (the field paths) when there are issues. The
    one shape every interface answers errors in (a REST body, a message reply)."""
    body: dict[str, Any] = {
        "type": type_,
        "title": PROBLEM_TITLES.get(status, "Error"),
        "status": status,
        "detail": detail,
        **(extra or {}),
    }
    shown = [{"loc": i.loc, "reason": i.reason} for i in issues]
    if shown:
        body["errors"] = shown
    return body


@dataclass(frozen=True)
class FieldIssue:
    """One problem with one field: ``loc`` is the dotted path, e.g. ``spec.vm.disks[0].path``."""

    loc: str
    reason: str

    def __str__(self) -> str:
        return f"{self.loc}: {self.reason}" if self.loc else self.reason


class CorralError(Exception):
    """Root of the tree. ``status`` is the HTTP status the REST API maps it to;
    ``retry_after`` (seconds), when set, its ``Retry-After`` header."""

    status: int = 500
    problem_type: str = "about:blank"
    retry_after: int | None = None

    def __init__(self, message: str, issues: Iterable[FieldIssue] = ()) -> None:
        self.issues: tuple[FieldIssue, ...] = tuple(issues)
        super().__init__(message)

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else ""

    def __str__(self) -> str:
        if not self.issues:
            return self.message
        details = "; ".join(str(i) for i in self.issues)
        return f"{self.message}: {details}"

    def problem_extra(self) -> dict[str, Any]:
        """Members of this error's problem document beyond the standard ones."""
        return {}

    def to_problem(self) -> dict[str, Any]:
        """This error as a problem document (see :func:`problem`): what the REST API sends
        as ``application/problem+json``, and a message reply carries."""
        return problem(
            self.status, self.message, type_=self.problem_type, issues=self.issues,
            extra=self.problem_extra(),
        )  # fmt: skip


class SpecError(CorralError):
    """The VM document (or a host policy file) does not validate."""

    status = 422
    problem_type = "urn:corral:invalid-spec"

    @classmethod
    def single(cls, loc: str, reason: str) -> SpecError:
        return cls("invalid VM document", [FieldIssue(loc, reason)])


class PolicyError(CorralError):
    """The host policy refuses a valid document (image path, extra args, emulator, limits)."""

    status = 422
    problem_type = "urn:corral:policy-refused"

    @classmethod
    def of(cls, issues: Sequence[FieldIssue]) -> PolicyError:
        return cls("refused by host policy", issues)


class Forbidden(PolicyError):
    """The host policy does not let an API client reach this host resource (e.g. importing a
    host path outside ``imagePaths``): 403, and the reason says what the host would have to
    allow."""

    status = 403
    problem_type = "urn:corral:forbidden"


class CapacityError(PolicyError):
    """The host's CPU/RAM limits leave no room for this VM *now*: unlike the rest of the policy
    it passes once other VMs stop, so a start refused for it is retried, never ``Failed``."""

    @classmethod
    def of(cls, issues: Sequence[FieldIssue]) -> CapacityError:
        return cls("refused: no capacity on this host now", issues)


class NotFound(CorralError):
    status = 404
    problem_type = "urn:corral:not-found"


class Conflict(CorralError):
    status = 409
    problem_type = "urn:corral:conflict"


class VersionConflict(Conflict):
    """The VM changed since the resourceVersion the writer read (a stale version, or another
    writer in between): the one conflict a read-modify-write retries on. Any other
    :class:`Conflict` (a taken port, a duplicate name) would only repeat."""


class HostError(CorralError):
    """Something the host must provide is missing or broken; the message says what to install."""

    status = 503
    problem_type = "urn:corral:host"


class QemuError(CorralError):
    """qemu (or qemu-img, swtpm) failed, or a QMP command returned an error. ``stderr``: the
    last lines qemu itself wrote when it failed to start (bounded and printable), also at the
    end of the message; empty when there are none."""

    status = 502
    problem_type = "urn:corral:qemu"

    def __init__(
        self, message: str, issues: Iterable[FieldIssue] = (), *, stderr: str = ""
    ) -> None:
        super().__init__(message, issues)
        self.stderr = stderr


class Unauthorized(CorralError):
    status = 401
    problem_type = "urn:corral:unauthorized"


class Timeout(CorralError):
    status = 504
    problem_type = "urn:corral:timeout"


class Unsupported(CorralError):
    """The backend placing the VM does not declare the capability this needs."""

    status = 501
    problem_type = "urn:corral:unsupported"


class StoreUnavailable(CorralError):
    """The manager's store cannot be written now: another process holds its write lock, its
    filesystem is full, or it fails with an I/O error or is read-only. The request changed
    nothing and may be retried (``retry_after`` seconds); ``reason`` is one word for
    scripts: ``locked``, ``full``, ``io`` or ``read-only``."""

    status = 503
    problem_type = "urn:corral:store-unavailable"

    def __init__(
        self,
        message: str,
        issues: Iterable[FieldIssue] = (),
        *,
        reason: str = "io",
        retry_after: int = 1,
    ) -> None:
        super().__init__(message, issues)
        self.reason = reason
        self.retry_after = retry_after

    def problem_extra(self) -> dict[str, Any]:
        return {"reason": self.reason}
