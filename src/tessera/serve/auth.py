"""API keys, one check for the gateway and the three stage services: `Authorization: Bearer <key>`,
compared in constant time. Keys are never shown: usage is recorded under `key_id`, an HMAC of the key
with this server's secret (DATA_DIR/secret, 0600), so an id says nothing about the key to a holder of
another key, and stays the same across restarts."""
from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

STAGE_KEY_ENV = "TESSERA_STAGE_API_KEY"  # the key the gateway sends to remote stages (default: its first key)


def bearer_token(request: Request) -> str:
    auth = request.headers.get("authorization", "")
    return auth[7:].strip() if auth[:7].lower() == "bearer " else ""


def key_matches(token: str, keys: tuple[str, ...]) -> bool:
    """Constant time in the token: every key is compared, whatever matched first."""
    hits = [hmac.compare_digest(token.encode(), k.encode()) for k in keys]
    return bool(token) and any(hits)


def server_secret(data_dir: str | Path) -> bytes:
    """This server's random secret for key ids, created once (owner-only) in its data folder."""
    path = Path(data_dir) / "secret"
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_bytes()
    with os.fdopen(fd, "wb") as f:
        f.write(secrets.token_bytes(32))
    return path.read_bytes()


def key_id(token: str, secret: bytes) -> str:
    return "key-" + hmac.new(secret, token.encode(), hashlib.sha256).hexdigest()[:12]


def require_keys(app: FastAPI, keys: tuple[str, ...], unauthorized) -> None:
    """Every route of `app` answers `unauthorized()` (a 401 response) without one of `keys` (none: open)."""
    if not keys:
        return

    @app.middleware("http")
    async def guard(request: Request, call_next):
        if not key_matches(bearer_token(request), keys):
            return unauthorized()
        return await call_next(request)


def stage_unauthorized() -> JSONResponse:
    return JSONResponse({"detail": "a valid API key is required: Authorization: Bearer <key>"}, status_code=401)


def stage_key(keys: tuple[str, ...]) -> str | None:
    """The key a gateway sends to its remote stages: TESSERA_STAGE_API_KEY, else its own first key."""
    return os.environ.get(STAGE_KEY_ENV) or (keys[0] if keys else None)
