"""Minting short-lived client keys, so a browser can talk to the Realtime API directly.

``POST /v1/realtime/client_secrets`` has the OpenAI API's shape, so the official SDK's
``client.realtime.client_secrets.create()`` works against the relay. The caller is
authenticated as a relay client; the key is minted upstream with the relay's own
credential and the relay's session (server-authoritative: whatever session the caller
asks for is replaced), and the session in the answer is redacted like
``session.created`` is. Minting is rate limited per user (per relay instance) and
refused to a user whose daily token budget is used up.

A minted key opens a session directly with OpenAI: the relay sees none of it, so
it is neither capped nor accounted, and the policy holds only as far as the minted
session sets it (the client may send any event). Mint for clients you trust with that;
a browser on WebRTC can instead send its offer to the relay (``POST /v1/realtime/calls``,
:mod:`relay.server.calls`), which watches that call from its sideband.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import orjson
import trio

from ..config import RelayConfig
from .auth import Identity

if TYPE_CHECKING:
    import httpx

    from .accounting import Accounting

MAX_BODY_BYTES = 64 * 1024
WINDOW_SECONDS = 60.0
#: Seconds the usage store may take to look up the user's budget.
STORE_TIMEOUT = 5.0

log = logging.getLogger("relay")


class Minter:
    def __init__(
        self,
        config: RelayConfig,
        *,
        clock: Callable[[], float] = time.monotonic,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._url = config.rest_url("client_secrets")
        self._key = config.openai_api_key
        self._config = config
        self._per_minute = config.mint_per_minute
        self._recent: dict[str, deque[float]] = {}
        self._clock = clock
        self._transport = transport  # tests stand in for the upstream here

    async def mint(
        self, identity: Identity, body: bytes, accounting: Accounting | None = None
    ) -> tuple[int, dict[str, Any]]:
        """(HTTP status, JSON body) for one mint request; ``accounting`` checks the budget."""
        now = self._clock()
        recent = self._recent.setdefault(identity.user, deque())
        while recent and recent[0] <= now - WINDOW_SECONDS:
            recent.popleft()
        if len(recent) >= self._per_minute:
            message = f"At most {self._per_minute} client keys a minute (RELAY_MINT_PER_MINUTE)."
            return 429, _error("rate_limited", message + " Try again shortly.")
        recent.append(now)
        if accounting is not None:
            try:
                with trio.fail_after(STORE_TIMEOUT):
                    refusal = await accounting.budget_refusal(identity)
            except Exception as exc:  # any store failure: the budget cannot be checked
                log.warning(
                    "usage store failed while %s minted a client key (%s): refused with 503",
                    identity.user,
                    exc.__class__.__name__,
                )
                message = "The relay's usage store is not answering; try again shortly."
                return 503, _error("relay_store_unavailable", message)
            if refusal is not None:
                return 429, _error(refusal.code, refusal.message)
        try:
            request = orjson.loads(body) if body.strip() else {}
        except orjson.JSONDecodeError:
            return 400, _error("invalid_json", "The request body is not JSON.")
        payload: dict[str, Any] = {"session": self._session(identity)}
        expires = request.get("expires_after") if isinstance(request, dict) else None
        if expires is not None:
            payload["expires_after"] = expires
        import httpx  # here: it takes a tenth of a second to import, and few relays mint

        try:
            async with httpx.AsyncClient(
                timeout=self._config.dial_timeout, transport=self._transport
            ) as http:
                answer = await http.post(
                    self._url, json=payload, headers={"authorization": f"Bearer {self._key}"}
                )
        except httpx.HTTPError as exc:
            message = f"The relay could not reach the Realtime API ({exc.__class__.__name__})."
            return 502, _error("relay_upstream_unavailable", message)
        if answer.status_code in (401, 403):
            message = "The Realtime API refused the relay's own credential."
            return 502, _error("relay_upstream_auth_refused", message)
        try:
            data = answer.json()
        except ValueError:
            data = None
        if not isinstance(data, dict):
            message = f"The Realtime API answered HTTP {answer.status_code} without a JSON object."
            return 502, _error("relay_upstream_error", message + " Try again shortly.")
        if answer.status_code != 200:
            # The caller's own mistake (e.g. a bad expires_after) comes back as the API said it.
            return answer.status_code, _scrub(data, self._key)
        minted = data
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
