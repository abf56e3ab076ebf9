"""ASGI plumbing the relay's routes share: message types, request fields and JSON answers.

Raw ASGI rather than a framework: the hot path is one ``receive``/``send`` pair per
message, and the handshake needs the denial-response extension and exact control of
subprotocol selection, both simpler without a layer between.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any
from urllib.parse import parse_qs

import orjson

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


def header(scope: Scope, name: bytes) -> bytes | None:
    """The first value of a request header (names are lower-case in ASGI)."""
    return next((value for key, value in scope["headers"] if key == name), None)


def offers_deflate(scope: Scope) -> bool:
    """Whether the client offered permessage-deflate (in any Sec-WebSocket-Extensions header)."""
    return any(
        key == b"sec-websocket-extensions" and b"permessage-deflate" in value.lower()
        for key, value in scope["headers"]
    )


def query_param(scope: Scope, name: str) -> str | None:
    values = parse_qs(scope.get("query_string", b"").decode("latin-1")).get(name)
    return values[0] if values else None


async def read_body(receive: Receive, limit: int) -> bytes | None:
    """A request's whole body, or None once it is over ``limit`` bytes (answer 413 then)."""
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if len(body) > limit:
            return None
        if not message.get("more_body"):
            return body


def json_response_start(status: int, body: bytes) -> dict[str, Any]:
    return {
        "status": status,
        "headers": [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
        ],
    }


async def respond(send: Send, status: int, payload: dict[str, Any]) -> None:
    """A whole JSON answer to a plain HTTP request."""
    body = orjson.dumps(payload) + b"\n"
    await send({"type": "http.response.start", **json_response_start(status, body)})
    await send({"type": "http.response.body", "body": body})


async def deny(send: Send, status: int, message: str, *, code: str | None = None) -> None:
    """Refuse a WebSocket handshake with an HTTP status and a JSON body."""
    body = orjson.dumps({"error": message, "code": code} if code else {"error": message}) + b"\n"
    start = json_response_start(status, body)
    if status == 401:
        start["headers"].append((b"www-authenticate", b'Bearer realm="relay"'))
    await send({"type": "websocket.http.response.start", **start})
    await send({"type": "websocket.http.response.body", "body": body})
