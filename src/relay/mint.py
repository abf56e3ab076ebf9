"""Minting short-lived client keys, so a browser can talk to the Realtime API directly.

``POST /v1/realtime/client_secrets`` has the OpenAI API's shape, so the official SDK's
``client.realtime.client_secrets.create()`` works against the relay. The caller is
authenticated as a relay client; the key is minted upstream with the relay's own
credential and the relay's session (server-authoritative: whatever session the caller
asks for is replaced), and the session in the answer is redacted like
``session.created`` is. Minting is rate limited per user (per relay instance).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import httpx
import orjson

from .auth import Identity
from .config import RelayConfig

MAX_BODY_BYTES = 64 * 1024
WINDOW_SECONDS = 60.0


class Minter:
    def __init__(self, config: RelayConfig, *, clock: Callable[[], float] = time.monotonic) -> None:
        url = urlsplit(config.upstream_url)
        scheme = "https" if url.scheme == "wss" else "http"
        self._url = f"{scheme}://{url.netloc}{url.path.rstrip('/')}/client_secrets"
        self._key = config.openai_api_key
        self._config = config
        self._per_minute = config.mint_per_minute
        self._recent: dict[str, deque[float]] = {}
        self._clock = clock

    async def mint(self, identity: Identity, body: bytes) -> tuple[int, dict[str, Any]]:
        """(HTTP status, JSON body) for one mint request."""
        now = self._clock()
        recent = self._recent.setdefault(identity.user, deque())
        while recent and recent[0] <= now - WINDOW_SECONDS:
            recent.popleft()
        if len(recent) >= self._per_minute:
            message = f"At most {self._per_minute} client keys a minute (RELAY_MINT_PER_MINUTE)."
            return 429, _error("rate_limited", message + " Try again shortly.")
        recent.append(now)
        try:
            request = orjson.loads(body) if body.strip() else {}
        except orjson.JSONDecodeError:
            return 400, _error("invalid_json", "The request body is not JSON.")
        payload: dict[str, Any] = {"session": self._session(identity)}
        expires = request.get("expires_after") if isinstance(request, dict) else None
        if expires is not None:
            payload["expires_after"] = expires
        try:
            async with httpx.AsyncClient(timeout=self._config.dial_timeout) as http:
                answer = await http.post(
                    self._url, json=payload, headers={"authorization": f"Bearer {self._key}"}
                )
        except httpx.HTTPError as exc:
            message = f"The relay could not reach the Realtime API ({exc.__class__.__name__})."
            return 502, _error("relay_upstream_unavailable", message)
        if answer.status_code in (401, 403):
            message = "The Realtime API refused the relay's own credential."
            return 502, _error("relay_upstream_auth_refused", message)
        if answer.status_code != 200:
            # The caller's own mistake (e.g. a bad expires_after) comes back as the API said it.
            return answer.status_code, _scrub(answer.json(), self._key)
        minted = answer.json()
        session = minted.get("session")
        if isinstance(session, dict):
            self._config.policy.redact_session(session)
        return 200, minted

    def _session(self, identity: Identity) -> dict[str, Any]:
        session = self._config.session_object()
        session["model"] = identity.model or self._config.model
        return session


def _error(code: str, message: str) -> dict[str, Any]:
    return {"error": {"type": "invalid_request_error", "code": code, "message": message, "param": None}}


def _scrub(data: Any, key: str) -> Any:
    text = orjson.dumps(data).decode()
    return orjson.loads(text.replace(key, "[redacted]")) if key and key in text else data
