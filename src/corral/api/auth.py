"""Bearer tokens for the TCP listener.

The tokens file holds one ``NAME sha256:HEX`` line per token: only hashes, never a token, and
the file must be private (mode 0600 or stricter, like ssh's keys), else the daemon refuses to
start. ``corral token create NAME --file F`` makes a token, stores its hash and prints the
token once. The unix socket needs no token: its file mode and group are the access control.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path

from corral.errors import HostError, SpecError

__all__ = ["TokenFile", "create_token"]

_LINE = re.compile(r"^([A-Za-z0-9_.@-]{1,64})\s+sha256:([0-9a-f]{64})$")
_PREFIX = "crl_"


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class TokenFile:
    path: Path
    hashes: dict[str, str]  # hex digest -> name

    @classmethod
    def load(cls, path: Path) -> TokenFile:
        try:
            st = path.stat()
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise HostError(f"cannot read tokens file {path}: {exc}") from exc
        if stat.S_IMODE(st.st_mode) & 0o077:
            raise HostError(
                f"tokens file {path} is readable by others (mode "
                f"{stat.S_IMODE(st.st_mode):o}); chmod 600 it"
            )
        hashes: dict[str, str] = {}
        for number, raw in enumerate(text.splitlines(), 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            match = _LINE.match(line)
            if match is None:
                raise SpecError.single(
                    f"{path}:{number}", "expected 'NAME sha256:HEX' (64 hex digits)"
                )
            hashes[match.group(2)] = match.group(1)
        return cls(path, hashes)

    def check(self, token: str) -> str | None:
        """The token's name if it is valid (constant-time compare), else None."""
        digest = _digest(token)
        found = None
        for known, name in self.hashes.items():
            if hmac.compare_digest(known, digest):
                found = name
        return found


def create_token(path: Path, name: str) -> str:
    """Append a new token's hash to ``path`` (created 0600) and return the token."""
    if not re.fullmatch(r"[A-Za-z0-9_.@-]{1,64}", name):
        raise SpecError.single("name", "1-64 letters, digits or . _ @ -")
    if path.exists():
        TokenFile.load(path)  # refuse to append to a broken or public file
    token = _PREFIX + secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, f"{name} sha256:{_digest(token)}\n".encode())
    finally:
        os.close(fd)
    return token
