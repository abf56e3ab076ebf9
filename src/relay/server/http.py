"""The relay's plain HTTP endpoints: health, readiness, metrics, key minting, the admin
usage table and the demo page's files.

* ``GET /healthz`` (alive), ``GET /readyz`` (taking sessions; ``?upstream=1`` also checks
  the upstream is reachable), ``GET /metrics`` (Prometheus);
* ``POST /v1/realtime/client_secrets`` mints a short-lived client key;
* ``POST /twilio/voice`` answers Twilio's voice webhook (:mod:`relay.server.phone`), when on;
* ``POST /v1/realtime/calls`` creates a WebRTC call (:mod:`relay.server.calls`), and
  ``POST /webhooks/openai`` takes SIP calls (:mod:`relay.server.sip`);
* ``GET /admin/usage`` is the usage table, for the admin token only;
* ``GET /`` and ``/static/…`` serve the demo page;
* a plain HTTP request on a WebSocket path gets 400, any other path 404.
"""

from __future__ import annotations

import hmac
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from ..usage.accounting import usage_json
from ..usage.auth import Refusal
from ..usage.mint import MAX_BODY_BYTES as MAX_MINT_BODY
from ..wire.upstream import probe
from .asgi import Receive, Scope, Send, header, query_param, read_body, respond
from .calls import CALLS_PATH, handle_calls
from .phone import TWILIO_WEBHOOK_PATH
from .sip import WEBHOOK_PATH, handle_webhook

if TYPE_CHECKING:
    from .app import RelayApp

#: Seconds ``/readyz?upstream=1`` gives the upstream to accept a TCP (and TLS) connection.
READY_UPSTREAM_TIMEOUT = 2.0

log = logging.getLogger("relay")


async def handle_http(app: RelayApp, scope: Scope, receive: Receive, send: Send) -> None:
    """Route one plain HTTP request."""
    path = scope["path"]
    if path == "/healthz":
        await respond(send, 200, {"status": "ok"})
    elif path == "/readyz":
        await _readyz(app, scope, send)
    elif path == "/metrics":
        body, content_type = app.metrics.render(header(scope, b"accept"))
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", content_type),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})
    elif path == "/v1/realtime/client_secrets" and scope["method"] == "POST":
        await _mint(app, scope, receive, send)
    elif path == CALLS_PATH:
        await handle_calls(app, scope, receive, send)
    elif path == WEBHOOK_PATH:
        await handle_webhook(app, scope, receive, send)
    elif path == TWILIO_WEBHOOK_PATH and app.phone is not None:
        await app.phone.webhook(scope, receive, send)
    elif path == "/admin/usage":
        await _admin_usage(app, scope, send)
    elif path == "/" or path.startswith("/static/"):
        await _static(send, "index.html" if path == "/" else path[len("/static/"):])
    elif path in app.websocket_paths:
        await respond(
            send,
            400,
            {
                "error": f"{path} is a WebSocket endpoint: connect with a WebSocket client"
                " (Upgrade: websocket), not a plain HTTP request."
            },
        )
    else:
        await respond(send, 404, {"error": f"no such endpoint: {path}"})


async def _mint(app: RelayApp, scope: Scope, receive: Receive, send: Send) -> None:
    """``POST /v1/realtime/client_secrets`` for an authenticated relay client."""
    try:
        identity = app.auth.authenticate(scope["headers"], ())
    except Refusal as refused:
        await respond(send, refused.status, {"error": {"code": refused.code, "message": refused.message}})
        return
    body = await read_body(receive, MAX_MINT_BODY)
    if body is None:
        await respond(send, 413, {"error": {"code": "too_large", "message": "body over 64 KiB"}})
        return
    status, answer = await app.minter.mint(identity, body, app.accounting)
    log.info("client key minted for %s: HTTP %d", identity.user, status)
    await respond(send, status, answer)


async def _readyz(app: RelayApp, scope: Scope, send: Send) -> None:
    """Ready means: started, not draining, and (with ``?upstream=1``) the upstream reachable."""
    if app.draining:
        await respond(send, 503, {"status": "draining", "sessions": len(app.pairs)})
        return
    if app.accounting is None:
        await respond(send, 503, {"status": "starting"})
        return
    if not app.guard.admitting:
        await respond(
            send,
            503,
            {"status": "overloaded", "cpu": round(app.guard.cpu, 2), "lag": round(app.guard.lag, 3)},
        )
        return
    problem = await app.accounting.store.check()
    if problem is not None:
        await respond(send, 503, {"status": "store unavailable", "detail": problem})
        return
    if query_param(scope, "upstream") in ("1", "true"):
        failure = await probe(app.dialer.target(app.config.model), READY_UPSTREAM_TIMEOUT)
        if failure is not None:
            timed_out = isinstance(failure, trio.TooSlowError)
            detail = "timed out" if timed_out else failure.__class__.__name__
            await respond(send, 503, {"status": "upstream unreachable", "detail": detail})
            return
    await respond(
        send, 200, {"status": "ready", "sessions": len(app.pairs), "calls": len(app.calls.live)}
    )


async def _admin_usage(app: RelayApp, scope: Scope, send: Send) -> None:
    """``GET /admin/usage?day=&user=``: the usage table as JSON, for the admin token only."""
    token = app.config.admin_token
    if not token:
        await respond(send, 404, {"error": "the admin endpoint is off; set RELAY_ADMIN_TOKEN"})
        return
    offered = header(scope, b"authorization") or b""
    if not hmac.compare_digest(offered, b"Bearer " + token.encode()):
        await respond(send, 401, {"error": "send Authorization: Bearer <RELAY_ADMIN_TOKEN>"})
        return
    if app.accounting is None:
        await respond(send, 503, {"error": "the relay is still starting"})
        return
    rows = await app.accounting.store.rows(
        day=query_param(scope, "day"), user=query_param(scope, "user")
    )
    await respond(send, 200, {"rows": [usage_json(row) for row in rows]})


# The demo page ships with the clients; it is read as files, never imported.
STATIC_DIR = Path(__file__).parents[1] / "clients" / "static"
CONTENT_TYPES = {
    ".html": b"text/html; charset=utf-8",
    ".js": b"text/javascript; charset=utf-8",
    ".css": b"text/css; charset=utf-8",
    ".svg": b"image/svg+xml",
    ".wav": b"audio/wav",
}


async def _static(send: Send, name: str) -> None:
    """Serve a file of the demo page from the package (no directory walking)."""
    path = STATIC_DIR / name
    if "/" in name or name.startswith(".") or path.suffix not in CONTENT_TYPES or not path.is_file():
        await respond(send, 404, {"error": f"no such file: {name}"})
        return
    body = path.read_bytes()
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [
                (b"content-type", CONTENT_TYPES[path.suffix]),
                (b"content-length", str(len(body)).encode()),
                (b"cache-control", b"no-cache"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
