"""Phones on SIP: the relay as the webhook of OpenAI's ``realtime.call.incoming``.

A SIP trunk (Twilio Elastic SIP, say) sends calls to OpenAI's SIP endpoint; OpenAI posts
``realtime.call.incoming`` to ``POST /webhooks/openai``. The relay takes a delivery only
if its Standard Webhooks signature matches ``RELAY_OPENAI_WEBHOOK_SECRET`` and it is fresh
(:mod:`relay.usage.webhooks`), and handles each delivery once. The caller's number
(:mod:`relay.usage.sip`) names the user; an unlisted caller, or one over the user's cap or
budget, is declined (``/reject``: 603, or 486 Busy Here over the cap). Otherwise the call
is accepted with the relay's session (``/accept``) and watched from its sideband like a
WebRTC call.

The webhook is answered 200 once the call is accepted or declined (the answer says which),
503 while the relay drains (OpenAI delivers again, to an instance that is not draining),
and 400/401 for a delivery that is not signed right.
"""

from __future__ import annotations

import logging
import secrets
import time
from typing import TYPE_CHECKING, Any

import orjson

from ..core.sideband import Sideband
from ..usage.auth import Identity, Refusal
from ..usage.sip import caller_number
from ..usage.webhooks import verify
from .asgi import Receive, Scope, Send
from .call import Call as Costs
from .calls import MAX_BODY_BYTES, admit, answer_json, call_session, read_body
from .sideband import WatchedCall

if TYPE_CHECKING:
    from .app import RelayApp

WEBHOOK_PATH = "/webhooks/openai"
#: SIP statuses a declined call gets.
DECLINE = 603
BUSY_HERE = 486
UNAVAILABLE = 503

log = logging.getLogger("relay")


async def handle_webhook(app: RelayApp, scope: Scope, receive: Receive, send: Send) -> None:
    """``POST /webhooks/openai``."""
    if app.webhook_key is None:
        await answer_json(
            send, 404, {"error": "the SIP webhook is off; set RELAY_OPENAI_WEBHOOK_SECRET"}
        )
        return
    if scope["method"] != "POST":
        await answer_json(send, 405, {"error": "OpenAI posts webhooks with POST"})
        return
    try:
        body = await read_body(receive, MAX_BODY_BYTES)
        webhook_id = verify(app.webhook_key, scope["headers"], body, time.time())
    except Refusal as refused:
        log.warning("webhook refused: %s", refused.code)
        await answer_json(send, refused.status, {"error": refused.message, "code": refused.code})
        return
    if app.draining:
        await answer_json(send, 503, {"error": "the relay is shutting down; deliver again"})
        return
    if not app.calls.first_delivery(webhook_id):
        await answer_json(send, 200, {"status": "duplicate"})
        return
    try:
        event = orjson.loads(body)
    except orjson.JSONDecodeError:
        await answer_json(send, 400, {"error": "the webhook's body is not JSON"})
        return
    data = event.get("data") if isinstance(event, dict) else None
    if event.get("type") != "realtime.call.incoming" or not isinstance(data, dict):
        await answer_json(send, 200, {"status": "ignored"})  # other events are not ours
        return
    call_id = data.get("call_id")
    if not isinstance(call_id, str) or not call_id:
        await answer_json(send, 400, {"error": "realtime.call.incoming without data.call_id"})
        return
    await answer_json(send, 200, await _incoming(app, call_id, data.get("sip_headers") or []))


async def _incoming(app: RelayApp, call_id: str, sip_headers: list[Any]) -> dict[str, Any]:
    """Accept or decline one ringing call; what the webhook's answer says about it."""
    headers = [h for h in sip_headers if isinstance(h, dict)]
    user = app.callers.user_for(caller_number(headers))
    if user is None and app.config.allow_anonymous:
        user = "anonymous"
    if user is None:
        return await _decline(app, call_id, DECLINE, "unknown_caller")
    identity = Identity(user=user, method="sip")
    lease = secrets.token_hex(8)
    try:
        await admit(app, identity, lease)
    except Refusal as refused:
        status = (
            BUSY_HERE
            if refused.code == "too_many_sessions"
            else UNAVAILABLE
            if refused.status == 503
            else DECLINE
        )
        return await _decline(app, call_id, status, refused.code, user)
    model = app.config.model
    session = call_session(app.config, model)
    failure = await app.calls.api.accept(call_id, session)
    if failure is not None:
        await app.accounting.abandon(identity, lease)  # type: ignore[union-attr]
        log.error("accepting a SIP call failed: %s (%s)", failure.code, failure.message)
        return {"call_id": call_id, "accepted": False, "reason": failure.code}
    app.calls.watch(
        WatchedCall(
            call_id,
            "sip",
            identity,
            lease,
            model,
            Sideband(app.config.policy.for_session(model), session, model),
            Costs(app, identity, lease, model, traced=False),
            max_seconds=app.calls.max_seconds(identity),
        )
    )
    return {"call_id": call_id, "accepted": True}


async def _decline(
    app: RelayApp, call_id: str, status: int, reason: str, user: str | None = None
) -> dict[str, Any]:
    log.info(
        "SIP call declined (%s, SIP %d)",
        reason,
        status,
        extra={"fields": {"call": call_id, "user": user}},
    )
    app.metrics.call_refused("sip", reason)
    failure = await app.calls.api.reject(call_id, status)
    if failure is not None:
        log.warning("declining a SIP call failed: %s (%s)", failure.code, failure.message)
    return {"call_id": call_id, "accepted": False, "reason": reason}
