"""The small Kubernetes API client of runner pods (and the operator's own requests): httpx,
JSON, merge patches and watches, nothing else.

A runner pod must stay light (no kubernetes client, no kopf): it needs to read and watch one
object, patch its status and post events. Credentials are the pod's service account (token and
CA under ``/var/run/secrets/kubernetes.io/serviceaccount``) at ``KUBERNETES_SERVICE_HOST``/
``PORT`` — which the operator points at 127.0.0.1:6443 on clusters where host-network pods
cannot reach the service IP (no kube-proxy) — or a kubeconfig (``KUBECONFIG``) for a runner or
operator started outside the cluster.

Errors: 404 is :class:`~corral.errors.NotFound`, 409 :class:`~corral.errors.Conflict`, every
other failure a :class:`~corral.errors.CorralError` naming the request.
"""

from __future__ import annotations

import base64
import json
import os
import ssl
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml

from corral.errors import Conflict, CorralError, NotFound

__all__ = ["SERVICE_ACCOUNT_DIR", "Credentials", "KubeApi", "load_credentials"]

SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
_MERGE = "application/merge-patch+json"


@dataclass(frozen=True)
class Credentials:
    """Where the API server is and who we are (also handed to kopf by the operator)."""

    server: str
    namespace: str = "default"
    ca_path: str | None = None
    ca_data: str | None = None
    token: str | None = None
    token_file: Path | None = None
    cert_path: str | None = None
    key_path: str | None = None
    cert_data: str | None = None
    key_data: str | None = None

    def server_is_loopback(self) -> bool:
        host = httpx.URL(self.server).host
        return host in ("127.0.0.1", "localhost", "::1")

    def current_token(self) -> str | None:
        if self.token_file is not None:  # projected tokens rotate: read it every time
            return self.token_file.read_text().strip()
        return self.token


def load_credentials() -> Credentials:
    """The pod's service account when in a pod (at ``KUBERNETES_SERVICE_HOST``/``PORT``),
    else the current context of ``$KUBECONFIG`` (or ~/.kube/config)."""
    host = os.environ.get("KUBERNETES_SERVICE_HOST")
    if host and (SERVICE_ACCOUNT_DIR / "token").exists():
        port = os.environ.get("KUBERNETES_SERVICE_PORT", "443")
        bracket = f"[{host}]" if ":" in host else host
        return Credentials(
            server=f"https://{bracket}:{port}",
            namespace=(SERVICE_ACCOUNT_DIR / "namespace").read_text().strip(),
            ca_path=str(SERVICE_ACCOUNT_DIR / "ca.crt"),
            token_file=SERVICE_ACCOUNT_DIR / "token",
        )
    path = Path(os.environ.get("KUBECONFIG", str(Path.home() / ".kube/config")).split(":")[0])
    try:
        config = yaml.safe_load(path.read_text())
        current = config.get("current-context")
        ctx = next(c["context"] for c in config["contexts"] if c["name"] == current)
        cluster = next(c["cluster"] for c in config["clusters"] if c["name"] == ctx["cluster"])
        user = next(u["user"] for u in config["users"] if u["name"] == ctx["user"])
    except (OSError, yaml.YAMLError, KeyError, StopIteration, TypeError) as exc:
        raise CorralError(f"no Kubernetes credentials: cannot use {path}: {exc}") from exc
    base = path.parent

    def data(entry: dict[str, Any], key: str) -> str | None:
        value = entry.get(f"{key}-data")
        return base64.b64decode(value).decode() if value else None

    def file(entry: dict[str, Any], key: str) -> str | None:
        value = entry.get(key)
        return str(base / value) if value else None

    return Credentials(
        server=cluster["server"],
        namespace=ctx.get("namespace", "default"),
        ca_path=file(cluster, "certificate-authority"),
        ca_data=data(cluster, "certificate-authority"),
        token=user.get("token"),
        cert_path=file(user, "client-certificate"),
        key_path=file(user, "client-key"),
        cert_data=data(user, "client-certificate"),
        key_data=data(user, "client-key"),
    )


class KubeApi:
    """One API server, one identity."""

    def __init__(
        self,
        server: str,
        *,
        verify: ssl.SSLContext | bool = True,
        token: str | None = None,
        token_file: Path | None = None,
        namespace: str = "default",
    ) -> None:
        self.server = server.rstrip("/")
        self.namespace = namespace
        self._token = token
        self._token_file = token_file
        self._client = httpx.AsyncClient(base_url=self.server, verify=verify, timeout=30.0)

    @classmethod
    def from_environment(cls) -> KubeApi:
        """In a pod: the service account; elsewhere: ``$KUBECONFIG`` (or ~/.kube/config)."""
        return cls.from_credentials(load_credentials())

    @classmethod
    def from_credentials(cls, creds: Credentials) -> KubeApi:
        ctx = ssl.create_default_context(cafile=creds.ca_path, cadata=creds.ca_data)
        if creds.server_is_loopback():
            ctx.check_hostname = False  # a serving cert may name the service IP only
        if creds.cert_path and creds.key_path:
            ctx.load_cert_chain(creds.cert_path, creds.key_path)
        elif creds.cert_data and creds.key_data:
            with tempfile.TemporaryDirectory() as tmp:
                cert, key = Path(tmp, "c.pem"), Path(tmp, "k.pem")
                cert.write_text(creds.cert_data)
                key.write_text(creds.key_data)
                ctx.load_cert_chain(str(cert), str(key))
        return cls(
            creds.server,
            verify=ctx,
            token=creds.token,
            token_file=creds.token_file,
            namespace=creds.namespace,
        )

    def _headers(self, content_type: str | None = None) -> dict[str, str]:
        headers = {"Accept": "application/json"}
        token = self._token
        if self._token_file is not None:  # projected tokens rotate: read it every time
            token = self._token_file.read_text().strip()
        if token:
            headers["Authorization"] = f"Bearer {token}"
        if content_type:
            headers["Content-Type"] = content_type
        return headers

    async def request(
        self,
        method: str,
        path: str,
        body: object = None,
        *,
        content_type: str = "application/json",
        params: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        data = None if body is None else json.dumps(body)
        try:
            reply = await self._client.request(
                method,
                path,
                content=data,
                params=params,
                headers=self._headers(content_type if data is not None else None),
            )
        except httpx.HTTPError as exc:
            raise CorralError(f"{method} {path}: the API server did not answer: {exc}") from exc
        if reply.status_code >= 400:
            _raise(method, path, reply)
        result: dict[str, Any] = reply.json() if reply.content else {}
        return result

    async def get(self, path: str) -> dict[str, Any]:
        return await self.request("GET", path)

    async def create(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        return await self.request("POST", path, body)

    async def merge_patch(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        return await self.request("PATCH", path, body, content_type=_MERGE)

    async def delete(self, path: str) -> dict[str, Any]:
        return await self.request("DELETE", path)

    async def watch(
        self, path: str, resource_version: str, *, field_selector: str | None = None,
        timeout: int = 300,
    ) -> AsyncIterator[dict[str, Any]]:  # fmt: skip
        """The watch events (``type``, ``object``) after ``resource_version`` until the
        server ends the watch (at most ``timeout`` seconds)."""
        params = {
            "watch": "1",
            "resourceVersion": resource_version,
            "timeoutSeconds": str(timeout),
            "allowWatchBookmarks": "true",
        }
        if field_selector:
            params["fieldSelector"] = field_selector
        try:
            async with self._client.stream(
                "GET", path, params=params, headers=self._headers(), timeout=timeout + 30
            ) as reply:
                if reply.status_code >= 400:
                    await reply.aread()
                    _raise("WATCH", path, reply)
                async for line in reply.aiter_lines():
                    if line.strip():
                        yield json.loads(line)
        except httpx.HTTPError as exc:
            raise CorralError(f"WATCH {path}: {exc}") from exc

    async def aclose(self) -> None:
        await self._client.aclose()


def _raise(method: str, path: str, reply: httpx.Response) -> None:
    try:
        message = str(reply.json().get("message", ""))
    except ValueError:
        message = reply.text[:200]
    text = f"{method} {path}: {reply.status_code} {message}".strip()
    if reply.status_code == 404:
        raise NotFound(text)
    if reply.status_code == 409:
        raise Conflict(text)
    raise CorralError(text)
