"""The Realtime API's calls endpoints, as the relay uses them with its own key.

``POST /v1/realtime/calls`` creates a WebRTC call from a browser's SDP offer and the
session (multipart ``sdp`` and ``session``, as the official SDK sends it); ``/accept``,
``/reject`` and ``/hangup`` act on a call by id. The URLs sit next to
``RELAY_UPSTREAM_URL`` (``wss://host/v1/realtime`` → ``https://host/v1/realtime/calls``).

Every failure comes back as an :class:`ApiFailure` that a client of the relay may see: the
relay's own error for an unreachable API or a refused relay key (502), or the API's own
answer to the request, with the relay's key taken out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson

from ..config import RelayConfig

if TYPE_CHECKING:
    import httpx


@dataclass(frozen=True)
class ApiFailure:
    """A calls request that did not succeed: the status and error to answer with."""

    status: int
    code: str
    message: str

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "type": "invalid_request_error" if self.status < 500 else "server_error",
                "code": self.code,
                "message": self.message,
                "param": None,
            }
        }


@dataclass(frozen=True)
class CreatedCall:
    call_id: str
    answer: str  # the SDP answer


class CallsApi:
    """Requests to the calls endpoints with the relay's key (one client per app)."""

    def __init__(self, config: RelayConfig, transport: httpx.AsyncBaseTransport | None = None):
        self._base = config.rest_url("calls")
        self._key = config.openai_api_key
        self._timeout = config.dial_timeout
        self._transport = transport  # tests stand in for the upstream here

    async def create(self, sdp: str, session: dict[str, Any]) -> CreatedCall | ApiFailure:
        """A WebRTC call for the offer ``sdp``, running ``session``."""
        files = {
            "sdp": (None, sdp.encode(), "application/sdp"),
            "session": (None, orjson.dumps(session), "application/json"),
        }
        answer = await self._post("", files=files, accept="application/sdp")
        if isinstance(answer, ApiFailure):
            return answer
        status, headers, body = answer
        if status != 201:
            return self._failure(status, body)
        location = headers.get("location", "")
        if "/calls/" not in location:
            message = "The Realtime API created the call but named no call id (no Location)."
            return ApiFailure(502, "relay_upstream_error", message)
        call_id = location.rstrip("/").rsplit("/", 1)[-1]
        return CreatedCall(call_id, body.decode("utf-8", "replace"))

    async def accept(self, call_id: str, session: dict[str, Any]) -> ApiFailure | None:
        return await self._act(call_id, "accept", session)

    async def reject(self, call_id: str, status_code: int) -> ApiFailure | None:
        return await self._act(call_id, "reject", {"status_code": status_code})

    async def hangup(self, call_id: str) -> ApiFailure | None:
        return await self._act(call_id, "hangup", None)

    async def _act(self, call_id: str, action: str, payload: Any) -> ApiFailure | None:
        answer = await self._post(f"/{call_id}/{action}", json=payload)
        if isinstance(answer, ApiFailure):
            return answer
        status, _, body = answer
        return None if 200 <= status < 300 else self._failure(status, body)

    async def _post(
        self, path: str, *, accept: str = "application/json", **content: Any
    ) -> tuple[int, httpx.Headers, bytes] | ApiFailure:
        import httpx  # here: it takes a tenth of a second to import, and not every relay calls

        headers = {"authorization": f"Bearer {self._key}", "accept": accept}
        try:
            async with httpx.AsyncClient(timeout=self._timeout, transport=self._transport) as http:
                answer = await http.post(self._base + path, headers=headers, **content)
        except httpx.HTTPError as exc:
            return ApiFailure(
                502,
                "relay_upstream_unavailable",
                f"The relay could not reach the Realtime API ({exc.__class__.__name__}).",
            )
        return answer.status_code, answer.headers, answer.content

    def _failure(self, status: int, body: bytes) -> ApiFailure:
        if status in (401, 403):
            return ApiFailure(
                502,
                "relay_upstream_auth_refused",
                "The Realtime API refused the relay's own credential.",
            )
        try:
            error = orjson.loads(body).get("error") or {}
        except (orjson.JSONDecodeError, AttributeError):
            error = {}
        message = str(error.get("message") or f"The Realtime API answered HTTP {status}.")
        if self._key and self._key in message:
            message = message.replace(self._key, "[redacted]")
        if not 400 <= status < 500:
            return ApiFailure(502, "relay_upstream_error", message)
        return ApiFailure(status, str(error.get("code") or "upstream_refused"), message)
