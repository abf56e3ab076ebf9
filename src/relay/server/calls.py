"""WebRTC through the relay's front door: ``POST /v1/realtime/calls``.

A browser (or the SDK's ``client.realtime.calls.create``) sends its SDP offer, raw
(``application/sdp``) or multipart (``sdp`` and ``session``), with the relay's own client
auth (``Authorization: Bearer``: an API key or a JWT). The relay admits it as it admits a
WebSocket session (401/403, then the user's concurrency cap and daily budget: 429), creates
the call upstream with its own key and its own session (the ``[session]`` table, the model
asked for within ``RELAY_MODELS``; a session in the request is otherwise ignored, as for
minted keys), and answers ``201`` with OpenAI's SDP answer and ``Location:
/v1/realtime/calls/{call_id}``. The browser never holds an OpenAI key, not even a minted
one; the audio then flows between the browser and OpenAI, and the relay watches the call
from its sideband (:mod:`relay.server.sideband`).

Pages on another origin (allowed by ``RELAY_ALLOWED_ORIGINS``, or any when it is empty)
get the CORS headers they need, ``Location`` included.
"""

from __future__ import annotations

import email.parser
import email.policy
import logging
import secrets
from typing import TYPE_CHECKING, Any

import orjson
import trio

from ..config import RelayConfig
from ..core.sideband import Sideband
from ..usage.auth import Identity, Refusal
from ..wire.callsapi import ApiFailure
from . import admission
from .asgi import Receive, Scope, Send, header, query_param
from .call import Call as Costs
from .sideband import WatchedCall

if TYPE_CHECKING:
    from .app import RelayApp

CALLS_PATH = "/v1/realtime/calls"
#: The largest offer (SDP, and the session part) the relay reads: offers are a few KB.
MAX_BODY_BYTES = 64 * 1024
#: Seconds the usage store may take to admit a call.
STORE_TIMEOUT = 5.0

log = logging.getLogger("relay")

Headers = list[tuple[bytes, bytes]]


async def handle_calls(app: RelayApp, scope: Scope, receive: Receive, send: Send) -> None:
    """``/v1/realtime/calls``: POST creates a call, OPTIONS is a browser's CORS preflight."""
    cors = _cors(app.config, scope)
    if scope["method"] == "OPTIONS":
        if cors is None:
            await answer_json(
                send, 403, _error("origin_not_allowed", "This origin may not use the relay.")
            )
        else:
            await answer(
                send,
                204,
                b"",
                cors
                + [
                    (b"access-control-allow-methods", b"POST"),
                    (b"access-control-allow-headers", b"authorization, content-type"),
                    (b"access-control-max-age", b"600"),
                ],
            )
        return
    if scope["method"] != "POST":
        await answer_json(send, 405, _error("method_not_allowed", "Create a call with POST."), cors)
        return
    try:
        status, body, headers = await _create(app, scope, receive)
    except Refusal as refused:
        log.info("call refused: %s (HTTP %d)", refused.code, refused.status)
        app.metrics.call_refused("webrtc", refused.code)
        extra = [(b"www-authenticate", b'Bearer realm="relay"')] if refused.status == 401 else []
        await answer_json(
            send, refused.status, _error(refused.code, refused.message), (cors or []) + extra
        )
        return
    await answer(send, status, body, headers + (cors or []))


async def _create(app: RelayApp, scope: Scope, receive: Receive) -> tuple[int, bytes, Headers]:
    if app.draining:
        raise Refusal(503, "relay_draining", "The relay is shutting down; try again in a moment.")
    identity = app.auth.authenticate(scope["headers"], ())
    body = await read_body(receive, MAX_BODY_BYTES)
    sdp, requested = parse_offer(header(scope, b"content-type") or b"", body)
    model = requested.get("model") if isinstance(requested.get("model"), str) else None
    model = model or query_param(scope, "model") or identity.model
    refused = admission.model_refusal(app.config, model, identity)
    if refused is not None:
        raise Refusal(400, refused[0], refused[1])
    model = model or app.config.model
    lease = secrets.token_hex(8)
    await admit(app, identity, lease)
    session = call_session(app.config, model)
    created = await app.calls.api.create(sdp, session)
    if isinstance(created, ApiFailure):
        await app.accounting.abandon(identity, lease)  # type: ignore[union-attr]
        log.warning("call not created upstream: %s (HTTP %d)", created.code, created.status)
        raise Refusal(created.status, created.code, created.message)
    app.calls.watch(
        WatchedCall(
            created.call_id,
            "webrtc",
            identity,
            lease,
            model,
            Sideband(app.config.policy.for_session(model, identity.model), session, model),
            Costs(app, identity, lease, model, traced=False),
            max_seconds=app.calls.max_seconds(identity),
        )
    )
    headers = [
        (b"content-type", b"application/sdp"),
        (b"location", f"{CALLS_PATH}/{created.call_id}".encode()),
    ]
    return 201, created.answer.encode(), headers


async def admit(app: RelayApp, identity: Identity, lease: str) -> None:
    """Take one of the user's concurrency slots for a call, or raise :class:`Refusal`
    (429 over the cap or budget, 503 while the store is not answering)."""
    accounting = app.accounting
    if accounting is None:
        raise Refusal(503, "relay_starting", "The relay is still starting; try again in a moment.")
    try:
        with trio.fail_after(STORE_TIMEOUT):
            await accounting.admit(identity, lease)
    except (trio.TooSlowError, OSError) as exc:
        log.error("usage store unavailable at a call's admission: %r", exc)
        raise Refusal(
            503,
            "relay_store_unavailable",
            "The relay's usage store is not answering; try again shortly.",
        ) from None


def call_session(config: RelayConfig, model: str) -> dict[str, Any]:
    """The session a call is created (or accepted) with: the relay's, on ``model``, with
    the policy's output clamp already applied."""
    session = config.session_object()
    session["model"] = model
    if config.policy.max_output_tokens is not None:
        session["max_output_tokens"] = config.policy.max_output_tokens
    return session


def parse_offer(content_type: bytes, body: bytes) -> tuple[str, dict[str, Any]]:
    """The SDP offer and the requested session (empty if none) of a create request."""
    kind = content_type.split(b";", 1)[0].strip().lower()
    if kind == b"application/sdp":
        if not body.strip():
            raise Refusal(400, "missing_sdp", "The request body must be the SDP offer.")
        return body.decode("utf-8", "replace"), {}
    if kind != b"multipart/form-data":
        raise Refusal(
            415,
            "unsupported_content_type",
            "Send the SDP offer as application/sdp, or as multipart/form-data with an 'sdp'"
            " part (and optionally a 'session' part).",
        )
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"content-type: " + content_type + b"\r\n\r\n" + body
    )
    parts: dict[str, bytes] = {}
    if message.is_multipart():
        for part in message.iter_parts():
            name = part.get_param("name", header="content-disposition")
            payload = part.get_payload(decode=True)
            if isinstance(name, str) and isinstance(payload, bytes):
                parts[name] = payload
    if not parts.get("sdp", b"").strip():
        raise Refusal(400, "missing_sdp", "The multipart request has no 'sdp' part.")
    session: object = {}
    if parts.get("session"):
        try:
            session = orjson.loads(parts["session"])
        except orjson.JSONDecodeError:
            raise Refusal(400, "invalid_session", "The 'session' part is not JSON.") from None
    if not isinstance(session, dict):
        raise Refusal(400, "invalid_session", "The 'session' part must be a JSON object.")
    return parts["sdp"].decode("utf-8", "replace"), session


async def read_body(receive: Receive, limit: int) -> bytes:
    """The request body, or :class:`Refusal` 413 past ``limit`` bytes."""
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if len(body) > limit:
            raise Refusal(413, "too_large", f"The request body is over {limit // 1024} KiB.")
        if not message.get("more_body"):
            return body


def _cors(config: RelayConfig, scope: Scope) -> Headers | None:
    """The CORS headers for the page's origin ([] without one), None if it is not allowed."""
    origin = header(scope, b"origin")
    if origin is None:
        return []
    allowed = {o.rstrip("/") for o in config.allowed_origins}
    if allowed and origin.decode("latin-1").rstrip("/") not in allowed:
        return None
    return [
        (b"access-control-allow-origin", origin),
        (b"access-control-expose-headers", b"location"),
        (b"vary", b"origin"),
    ]


def _error(code: str, message: str) -> dict[str, Any]:
    return {
        "error": {"type": "invalid_request_error", "code": code, "message": message, "param": None}
    }


async def answer_json(
    send: Send, status: int, payload: dict[str, Any], headers: Headers | None = None
) -> None:
    body = orjson.dumps(payload) + b"\n"
    await answer(send, status, body, [(b"content-type", b"application/json"), *(headers or [])])


async def answer(send: Send, status: int, body: bytes, headers: Headers) -> None:
    """A whole answer to a plain HTTP request, with these headers and content-length."""
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [*headers, (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})
