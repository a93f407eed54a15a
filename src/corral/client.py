"""A typed client of corral's REST API (httpx), used by the CLI and usable from scripts.

Finds the daemon by an explicit ``socket``, else ``url`` (+ ``token``, for TCP), else
``$CORRAL_SOCKET``, else ``$CORRAL_URL`` (+ ``$CORRAL_TOKEN``), else the default socket.
VMs come back as :class:`~corral.spec.views.VmView` (typed, and ``.to_json()`` the JSON
as sent). Problem+json errors come back as the same :mod:`corral.errors` classes the daemon raised,
with their field paths, so a script handles a remote refusal like a local one.

Importing this module is cheap (the stdlib and :mod:`corral.errors`): httpx and pydantic load
on the first call that needs them. Over a unix socket a request with a JSON (or no) body needs
neither: a few lines of stdlib HTTP/1.1 send it, so a CLI call (``corral show``, ``start
--wait``) starts in a fraction of the time; streams (events, logs, uploads) and TCP use httpx.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket as _socket
import threading
from collections.abc import Callable, Iterator
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import quote, urlencode

from corral.errors import (
    Conflict,
    CorralError,
    FieldIssue,
    Forbidden,
    HostError,
    NotFound,
    PolicyError,
    QemuError,
    SpecError,
    StoreUnavailable,
    Timeout,
    Unauthorized,
    Unsupported,
)

if TYPE_CHECKING:
    import ssl

    import httpx

    from corral.spec.views import VmView

__all__ = ["NEW_EVENTS", "Client", "EventStream", "default_socket"]

NEW_EVENTS = 2**62
"""``after`` beyond every event id the daemon hands out: a follow that starts with what
happens next, without replaying the past."""

_BY_TYPE: dict[str, type[CorralError]] = {
    cls.problem_type: cls
    for cls in (
        SpecError,
        PolicyError,
        Forbidden,
        NotFound,
        Conflict,
        HostError,
        QemuError,
        Unauthorized,
        Timeout,
        StoreUnavailable,
        Unsupported,
    )
}
_BY_STATUS: dict[int, type[CorralError]] = {
    401: Unauthorized, 403: Forbidden, 404: NotFound, 409: Conflict, 422: SpecError,
    504: Timeout,
}  # fmt: skip


def default_socket() -> Path:
    """``$CORRAL_SOCKET``, else /run/corral/corral.sock for root, else
    ``$XDG_RUNTIME_DIR/corral/corral.sock``."""
    env = os.environ.get("CORRAL_SOCKET")
    if env:
        return Path(env)
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if os.geteuid() != 0 and runtime:
        return Path(runtime) / "corral" / "corral.sock"
    return Path("/run/corral/corral.sock")


def _vm(data: Any) -> VmView:
    """A VM the daemon answered with, as a view; one the client cannot read (a daemon of
    another version, a proxy's page) is a :class:`CorralError` that says so, not a crash."""
    from pydantic import ValidationError

    from corral.spec.views import VmView

    try:
        return VmView.model_validate(data)
    except ValidationError as exc:
        raise CorralError(f"the daemon answered with a VM this client cannot read: {exc}") from exc


def _error(response: httpx.Response) -> CorralError:
    return _problem_error(
        response.status_code, response.text, response.reason_phrase,
        response.headers.get("retry-after", ""),
    )  # fmt: skip


def _problem_error(status: int, text: str, reason: str, retry: str) -> CorralError:
    """The error a problem+json answer (``text``) stands for, by its ``type``, else by the
    HTTP ``status``; ``retry`` is the ``Retry-After`` header ("" if none)."""
    try:
        body = json.loads(text) if text else {}
    except ValueError:
        body = {}
    if not isinstance(body, dict):
        body = {}
    detail = str(body.get("detail") or text or reason)
    issues = [
        FieldIssue(str(e.get("loc", "")), str(e.get("reason", "")))
        for e in body.get("errors") or []
        if isinstance(e, dict)
    ]
    cls = _BY_TYPE.get(str(body.get("type"))) or _BY_STATUS.get(status, CorralError)
    if cls is StoreUnavailable:
        return StoreUnavailable(
            detail, issues, reason=str(body.get("reason") or "io"),
            retry_after=int(retry) if retry.isdigit() and len(retry) < 6 else 1,
        )  # fmt: skip
    return cls(detail, issues)


def _http_response(sock: _socket.socket) -> tuple[int, str, dict[str, str], bytes]:
    """Status, reason, header fields (names lower-cased) and body of the HTTP/1.1 answer on
    ``sock`` (asked with ``Connection: close``): the body by ``Content-Length``, chunks, or up
    to the end. Enough HTTP for the daemon's JSON; ``ValueError`` for anything else."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ValueError("the connection closed before an HTTP answer")
        data += chunk
    head, rest = data.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
        raise ValueError(f"not an HTTP answer: {lines[0][:80]!r}")
    fields = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        fields[name.strip().lower()] = value.strip()
    while chunk := sock.recv(65536):
        rest += chunk
    if fields.get("transfer-encoding", "").lower() == "chunked":
        body = b""
        while True:
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            if size == 0:
                break
            body, rest = body + rest[:size], rest[size + 2 :]
        return int(parts[1]), parts[2] if len(parts) > 2 else "", fields, body
    length = fields.get("content-length")
    return (
        int(parts[1]),
        parts[2] if len(parts) > 2 else "",
        fields,
        (rest[: int(length)] if length is not None else rest),
    )


class Client:
    def __init__(
        self,
        *,
        socket: Path | str | None = None,
        url: str | None = None,
        token: str | None = None,
        timeout: float = 30.0,
        verify: bool | ssl.SSLContext | None = None,
    ) -> None:
        if socket is None and url is None:
            if os.environ.get("CORRAL_SOCKET"):
                socket = os.environ["CORRAL_SOCKET"]
            elif os.environ.get("CORRAL_URL"):
                url = os.environ["CORRAL_URL"]
            else:
                socket = default_socket()
        if token is None:
            token = os.environ.get("CORRAL_TOKEN") or None
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._timeout = timeout
        self._verify = verify
        self.socket = Path(socket) if socket is not None else None
        self.token = token
        if self.socket is not None:
            self.base_url = "http://corral"
            self.where = f"unix socket {self.socket}"
        else:
            assert url is not None
            self.base_url = url.rstrip("/")
            self.where = self.base_url

    @cached_property
    def _http(self) -> httpx.Client:
        """The httpx client, made on first use (see the module's docstring)."""
        import httpx

        if self.socket is not None:
            transport = httpx.HTTPTransport(uds=str(self.socket))
        else:
            verify = self._verify
            if verify is None:  # $CORRAL_CA_CERT: trust a private CA (a self-signed daemon)
                import ssl

                ca = os.environ.get("CORRAL_CA_CERT")
                verify = ssl.create_default_context(cafile=ca) if ca else True
            transport = httpx.HTTPTransport(verify=verify)
        return httpx.Client(
            base_url=self.base_url, transport=transport, headers=self._headers,
            timeout=self._timeout,
        )  # fmt: skip

    def close(self) -> None:
        if "_http" in self.__dict__:
            self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _unreachable(self, exc: Exception) -> HostError:
        return HostError(
            f"cannot reach the corral daemon at {self.where} ({exc}); "
            "is `corral serve` running? (--socket / --url / CORRAL_SOCKET)"
        )

    def read(self, path: str, params: dict[str, Any] | None = None) -> Any:
        """A GET's JSON, as :meth:`request` gives it (over a unix socket without httpx)."""
        return self.request("GET", path, params=params)

    def _unix(
        self, method: str, target: str, content: bytes | None, headers: dict[str, str],
        timeout: float,
    ) -> Any:  # fmt: skip
        """One request on the unix socket in stdlib HTTP/1.1 (``Connection: close``)."""
        fields = {"Host": "corral", **self._headers, **headers, "Connection": "close"}
        if content is not None:
            fields["Content-Length"] = str(len(content))
        head = f"{method} {target} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in
                                                            fields.items())  # fmt: skip
        try:
            with _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM) as sock:
                sock.settimeout(timeout)
                sock.connect(str(self.socket))
                sock.sendall(head.encode() + b"\r\n" + (content or b""))
                status, reason, answer, body = _http_response(sock)
        except (OSError, ValueError) as exc:
            raise self._unreachable(exc) from exc
        text = body.decode("utf-8", "replace")
        if status >= 400:
            raise _problem_error(status, text, reason, answer.get("retry-after", ""))
        return json.loads(text) if text else None

    def request(
        self,
        method: str,
        path: str,
        *,
        json_body: object = None,
        params: dict[str, Any] | None = None,
        content_type: str = "application/json",
        timeout: float | None = None,
        content: bytes | Iterator[bytes] | None = None,
        headers: dict[str, str] | None = None,
    ) -> Any:
        """``json_body`` is sent as JSON; or ``content`` (bytes, or an iterator of chunks to
        stream) as ``content_type`` with ``headers``."""
        if content is None and json_body is not None:
            content = json.dumps(json_body).encode()
        headers = {**({"Content-Type": content_type} if content is not None else {}),
                   **(headers or {})}  # fmt: skip
        clean = {k: v for k, v in (params or {}).items() if v is not None}
        if (
            self.socket is not None
            and "_http" not in self.__dict__
            and (content is None or isinstance(content, bytes))
        ):  # no httpx client made yet: the stdlib speaks enough HTTP for this one
            target = quote(path, safe="/%") + (f"?{urlencode(clean)}" if clean else "")
            return self._unix(method, target, content, headers,
                              timeout if timeout is not None else self._timeout)  # fmt: skip
        import httpx

        try:
            response = self._http.request(
                method, path, content=content, headers=headers, params=clean,
                timeout=timeout if timeout is not None else httpx.USE_CLIENT_DEFAULT,
            )  # fmt: skip
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from exc
        if response.status_code >= 400:
            raise _error(response)
        return response.json() if response.content else None

    # --- VMs -------------------------------------------------------------------------------

    def list_vms(self, *, state: str | None = None, label: str | None = None) -> list[VmView]:
        data = self.read("/v1/vms", params={"state": state, "label": label})
        return [_vm(item) for item in data["items"]]

    def get_vm(self, name: str) -> VmView:
        return _vm(self.read(f"/v1/vms/{quote(name, safe='')}"))

    def create_vm(self, document: dict[str, Any], *, adopt_disks: str | None = None) -> VmView:
        """``adopt_disks``: a retained set (:meth:`list_disks`) becomes the VM's data dir."""
        return _vm(
            self.request("POST", "/v1/vms", json_body=document,
                         params={"adoptDisks": adopt_disks}),
        )  # fmt: skip

    def replace_vm(self, name: str, document: dict[str, Any]) -> VmView:
        return _vm(self.request("PUT", f"/v1/vms/{name}", json_body=document))

    def patch_vm(self, name: str, patch: dict[str, Any]) -> VmView:
        return _vm(
            self.request("PATCH", f"/v1/vms/{name}", json_body=patch,
                         content_type="application/merge-patch+json"),
        )  # fmt: skip

    def apply_vm(
        self, document: dict[str, Any], *, adopt_disks: str | None = None
    ) -> tuple[str, VmView]:
        """Create, or replace what is there (``kubectl apply``, ``POST /v1/apply``: the daemon
        decides, in one request); returns (``created``|``configured``, VM). ``adopt_disks``
        applies only when the VM is created."""
        meta = document.get("metadata")
        name = meta.get("name") if isinstance(meta, dict) else None
        if not isinstance(name, str) or not name:
            where = "metadata.name" if isinstance(meta, dict) else "metadata"
            raise SpecError.single(where, "is required: apply finds the VM by metadata.name")
        got = self.request("POST", "/v1/apply", json_body=document,
                           params={"adoptDisks": adopt_disks})  # fmt: skip
        return str(got["action"]), _vm(got["vm"])

    def set_media(
        self, name: str, image: str | None, *, drive: str | None = None
    ) -> tuple[str, VmView]:
        """Insert ``image`` (None: eject) into the VM's CD drive ``drive`` (None: its first);
        the daemon changes that one drive. Returns (the drive's name, VM)."""
        got = self.request("POST", f"/v1/vms/{quote(name, safe='')}/media",
                           json_body={"drive": drive, "image": image})  # fmt: skip
        return str(got["drive"]), _vm(got["vm"])

    def delete_vm(
        self, name: str, *, delete_disks: bool = False, force: bool = False
    ) -> dict[str, Any]:
        """Returns ``retainedDisks``: the id its data dir is kept under (None if it had none
        or ``delete_disks``). ``force`` kills the VM instead of a graceful stop."""
        params = {"deleteDisks": str(delete_disks).lower()}
        if force:
            params["force"] = "true"
        return cast(dict[str, Any], self.request("DELETE", f"/v1/vms/{name}", params=params))

    def action(
        self, name: str, verb: str, *, wait: float | None = None, until: str | None = None
    ) -> VmView:
        """``start``, ``stop``, ``restart``, ``reset``, ``kill``; with ``wait`` seconds, the VM
        once it is Running (stop: Stopped), or (start, restart) once ``until`` holds:
        ``condition=Booted``. The daemon raises :class:`Timeout` when ``wait`` runs out."""
        return _vm(self.act(name, verb, wait=wait, until=until))

    def act(
        self, name: str, verb: str, *, wait: float | None = None, until: str | None = None
    ) -> dict[str, Any]:
        """:meth:`action`, the VM as the JSON the daemon sent (no view: no pydantic)."""
        return cast(
            dict[str, Any],
            self.request("POST", f"/v1/vms/{name}/{verb}", params={"wait": wait, "for": until},
                         timeout=(wait + 30) if wait else None),
        )  # fmt: skip

    def wait(self, name: str, until: str, *, timeout: float = 30.0) -> VmView:
        """The VM once ``until`` holds (``state=Stopped``, ``condition=Booted``,
        ``condition=AgentConnected``; ``kubectl wait --for``); :class:`Timeout` after
        ``timeout`` seconds, with where the VM is in the message."""
        return _vm(
            self.request("GET", f"/v1/vms/{name}/wait", params={"for": until, "timeout": timeout},
                         timeout=timeout + 30),
        )  # fmt: skip

    def exec(
        self, name: str, command: list[str], *, stdin: str | None = None, timeout: float = 60.0
    ) -> dict[str, Any]:
        body = {"command": command, "stdin": stdin, "timeout": timeout}
        return cast(
            dict[str, Any],
            self.request("POST", f"/v1/vms/{name}/exec", json_body=body, timeout=timeout + 30),
        )

    def events(
        self, name: str | None = None, *, follow: bool = False, after: int = 0
    ) -> Iterator[dict[str, Any]]:
        """Server-sent events as dicts; with ``follow`` it blocks for new ones."""
        path = f"/v1/vms/{name}/events" if name else "/v1/events"
        params: dict[str, str | int] = {"follow": str(follow).lower(), "after": after}
        import httpx

        try:
            with self._http.stream("GET", path, params=params, timeout=None) as response:
                if response.status_code >= 400:
                    response.read()
                    raise _error(response)
                for line in response.iter_lines():
                    if line.startswith("data: "):
                        yield cast(dict[str, Any], json.loads(line[6:]))
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from exc

    def follow_events(self, name: str | None = None, *, after: int = NEW_EVENTS) -> EventStream:
        """Live events (by default only new ones) as an :class:`EventStream` that another
        thread can end: what a command shows progress from while its main thread waits."""
        path = f"/v1/vms/{name}/events" if name else "/v1/events"
        return EventStream(self, path, {"follow": "true", "after": after})

    def logs(
        self, name: str, *, source: str = "console", tail: int | None = None,
        follow: bool = False, raw: bool = False,
    ) -> Iterator[bytes]:  # fmt: skip
        """A VM's console log (``source="console"``: what the guest printed) or qemu's log
        (``"qemu"``), in chunks as they arrive: the last ``tail`` lines (all: None), then with
        ``follow`` what is appended, until the caller stops iterating. The daemon sends
        printable UTF-8 text (every control character but newline and tab shown as ``^[``
        and the like); ``raw``: the bytes as written, escape sequences included."""
        params: dict[str, str | int] = {"source": source, "follow": str(follow).lower(),
                                        "raw": str(raw).lower()}  # fmt: skip
        if tail is not None:
            params["tail"] = tail
        import httpx

        try:
            with self._http.stream(
                "GET", f"/v1/vms/{quote(name, safe='')}/logs", params=params,
                timeout=None if follow else httpx.USE_CLIENT_DEFAULT,
            ) as response:  # fmt: skip
                if response.status_code >= 400:
                    response.read()
                    raise _error(response)
                yield from response.iter_bytes()
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from exc

    # --- images and host -------------------------------------------------------------------

    def list_images(self) -> list[dict[str, Any]]:
        return cast(list[dict[str, Any]], self.request("GET", "/v1/images")["items"])

    def import_image(
        self, name: str, source: str, *, checksum: str | None = None, replace: bool = False
    ) -> dict[str, Any]:
        body = {"name": name, "source": source, "checksum": checksum, "replace": replace}
        return cast(
            dict[str, Any], self.request("POST", "/v1/images", json_body=body, timeout=24 * 3600)
        )

    def upload_image(
        self,
        name: str,
        path: Path | str,
        *,
        checksum: str | None = None,
        replace: bool = False,
        progress: Callable[[int, int], None] | None = None,
    ) -> dict[str, Any]:
        """Import a local file by sending its bytes (``PUT /v1/images/NAME``): the daemon
        never opens a path of ours. ``progress(sent, total)`` is called as chunks go out."""
        source = Path(path)
        try:
            stream = source.open("rb")
        except OSError as exc:
            raise SpecError("invalid image import", [FieldIssue("source", str(exc))]) from exc
        with stream:
            total = os.fstat(stream.fileno()).st_size

            def chunks() -> Iterator[bytes]:
                sent = 0
                while chunk := stream.read(1024 * 1024):
                    sent += len(chunk)
                    if progress is not None:
                        progress(sent, total)
                    yield chunk

            shown = "".join(c for c in source.name if c.isprintable())[:255] or None
            params = {"checksum": checksum, "replace": str(replace).lower(), "filename": shown}
            return cast(
                dict[str, Any],
                self.request("PUT", f"/v1/images/{quote(name, safe='')}", content=chunks(),
                             content_type="application/octet-stream", params=params,
                             headers={"Content-Length": str(total)}, timeout=24 * 3600),
            )  # fmt: skip

    def delete_image(self, name: str) -> None:
        self.request("DELETE", f"/v1/images/{name}")

    def list_disks(self) -> list[dict[str, Any]]:
        """Retained disk sets: the data dirs of deleted VMs."""
        return cast(list[dict[str, Any]], self.request("GET", "/v1/disks")["items"])

    def delete_disks(self, disk_id: str) -> None:
        """Delete a retained disk set (by id, or by the VM name that left only one)."""
        self.request("DELETE", f"/v1/disks/{quote(disk_id, safe='')}")

    def host(self) -> dict[str, Any]:
        return cast(dict[str, Any], self.request("GET", "/v1/host", timeout=300))

    def host_shutdown(self, timeout: float | None = None) -> dict[str, str]:
        return cast(
            dict[str, str],
            self.request("POST", "/v1/host/shutdown", params={"timeout": timeout}, timeout=None),
        )

    def display(self, name: str, *, expiry: int = 30) -> dict[str, Any]:
        """A fresh display password (valid ``expiry`` seconds) and the display URLs."""
        return cast(
            dict[str, Any],
            self.request("POST", f"/v1/vms/{name}/display", params={"expiry": expiry}),
        )

    # --- console ---------------------------------------------------------------------------

    def console_url(self, name: str) -> str:
        if self.socket is not None:
            return f"ws://corral/v1/vms/{name}/console"
        scheme = "wss" if self.base_url.startswith("https") else "ws"
        return f"{scheme}://{self.base_url.split('://', 1)[1]}/v1/vms/{name}/console"


class EventStream:
    """A followed event stream (``?follow=true``) that another thread can end at once.

    Iterate it (in one thread) for the events as dicts; :meth:`close` (from any thread) shuts
    the connection's socket down, which wakes a reader blocked on it (closing the client would
    not), and the iteration then just ends. ``opened`` is set once the daemon has answered."""

    def __init__(self, client: Client, path: str, params: dict[str, str | int]) -> None:
        self.opened = threading.Event()
        self._client = client
        self._path = path
        self._params = params
        self._lock = threading.Lock()
        self._closed = False
        self._socket: _socket.socket | None = None

    def __iter__(self) -> Iterator[dict[str, Any]]:
        import httpx

        try:
            with self._client._http.stream(
                "GET", self._path, params=self._params, timeout=None
            ) as response:
                if response.status_code >= 400:
                    response.read()
                    raise _error(response)
                stream = response.extensions.get("network_stream")
                with self._lock:
                    if self._closed:
                        return
                    self._socket = stream.get_extra_info("socket") if stream else None
                self.opened.set()
                for line in response.iter_lines():
                    if line.startswith("data: "):
                        yield cast(dict[str, Any], json.loads(line[6:]))
        except httpx.TransportError as exc:
            if not self._closed:
                raise self._client._unreachable(exc) from exc
        finally:
            self.opened.set()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            sock, self._socket = self._socket, None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(_socket.SHUT_RDWR)
