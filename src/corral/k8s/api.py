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
from pathlib import Path
from typing import Any

import httpx
import yaml

from corral.errors import Conflict, CorralError, NotFound

__all__ = ["SERVICE_ACCOUNT_DIR", "KubeApi"]

SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
_MERGE = "application/merge-patch+json"


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
        host = os.environ.get("KUBERNETES_SERVICE_HOST")
        if host and (SERVICE_ACCOUNT_DIR / "token").exists():
            port = os.environ.get("KUBERNETES_SERVICE_PORT", "443")
            ctx = ssl.create_default_context(cafile=str(SERVICE_ACCOUNT_DIR / "ca.crt"))
            if host in ("127.0.0.1", "localhost", "::1"):
                ctx.check_hostname = False  # the serving cert names the service IP, not loopback
            namespace = (SERVICE_ACCOUNT_DIR / "namespace").read_text().strip()
            bracket = f"[{host}]" if ":" in host else host
            return cls(
                f"https://{bracket}:{port}",
                verify=ctx,
                token_file=SERVICE_ACCOUNT_DIR / "token",
                namespace=namespace,
            )
        config = os.environ.get("KUBECONFIG", str(Path.home() / ".kube/config"))
        return cls.from_kubeconfig(Path(config.split(":")[0]))

    @classmethod
    def from_kubeconfig(cls, path: Path) -> KubeApi:
        try:
            config = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise CorralError(f"no Kubernetes credentials: cannot read {path}: {exc}") from exc
        current = config.get("current-context")
        ctx = next(c["context"] for c in config["contexts"] if c["name"] == current)
        cluster = next(c["cluster"] for c in config["clusters"] if c["name"] == ctx["cluster"])
        user = next(u["user"] for u in config["users"] if u["name"] == ctx["user"])
        base = path.parent
        ssl_ctx = ssl.create_default_context()
        if "certificate-authority-data" in cluster:
            ssl_ctx.load_verify_locations(
                cadata=base64.b64decode(cluster["certificate-authority-data"]).decode()
            )
        elif "certificate-authority" in cluster:
            ssl_ctx.load_verify_locations(cafile=str(base / cluster["certificate-authority"]))
        if "client-certificate-data" in user:
            with tempfile.TemporaryDirectory() as tmp:
                cert, key = Path(tmp, "c.pem"), Path(tmp, "k.pem")
                cert.write_bytes(base64.b64decode(user["client-certificate-data"]))
                key.write_bytes(base64.b64decode(user["client-key-data"]))
                ssl_ctx.load_cert_chain(str(cert), str(key))
        elif "client-certificate" in user:
            ssl_ctx.load_cert_chain(
                str(base / user["client-certificate"]), str(base / user["client-key"])
            )
        return cls(
            cluster["server"],
            verify=ssl_ctx,
            token=user.get("token"),
            namespace=ctx.get("namespace", "default"),
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
