"""The REST side of the fake server, sans-IO: minting ephemeral ``ek_`` client keys.

- GA ``POST /v1/realtime/client_secrets`` → ``{value, expires_at, session}``
- beta ``POST /v1/realtime/sessions`` → the session object plus ``client_secret``
- ``GET /healthz`` → ``{"status": "ok"}`` (mock-only, for readiness checks)

Minted keys are accepted by the WebSocket endpoint (Bearer header or
``openai-insecure-api-key.`` subprotocol) until they expire; a session opened
before expiry outlives its key and starts from the session config minted with it.
Everything else answers 404 in OpenAI's shape.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from typing import Any, Final
from urllib.parse import urlsplit

import orjson

from .handshake import mask_key
from .ids import IdFactory
from .models import is_realtime_model
from .sessionconfig import (
    SessionConfig,
    apply_beta_update,
    apply_ga_update,
    render_beta,
    render_ga,
)
from .validation import (
    ClientError,
    check_keys,
    expect_choice,
    expect_int,
    expect_object,
    expect_str,
)

GA_DEFAULT_TTL: Final = 600
BETA_DEFAULT_TTL: Final = 60
MIN_TTL: Final = 10
MAX_TTL: Final = 7200

Payload = dict[str, Any]


class RestStore:
    """Minted client secrets: their expiry (Unix seconds) and the session config they carry."""

    def __init__(self) -> None:
        self.secrets: dict[str, float] = {}
        self.presets: dict[str, SessionConfig] = {}

    def secret_is_valid(self, key: str, now: float) -> bool:
        expires = self.secrets.get(key)
        return expires is not None and now < expires

    def session_preset(self, key: str) -> SessionConfig | None:
        """The session config minted with ``key`` (a copy), or None for other keys.

        A session opened with a minted key starts from this config instead of the defaults.
        """
        preset = self.presets.get(key)
        return None if preset is None else preset.copy()


def _error(
    status: int, message: str, *, code: str | None = None, param: str | None = None
) -> tuple[int, Payload]:
    return status, {
        "error": {"message": message, "type": "invalid_request_error", "param": param, "code": code}
    }


def _auth(
    headers: Mapping[str, str], key_is_valid: Callable[[str], bool]
) -> tuple[int, Payload] | None:
    scheme, _, key = headers.get("authorization", "").partition(" ")
    key = key.strip()
    if scheme.lower() != "bearer" or not key:
        return _error(
            401,
            "You didn't provide an API key. You need to provide your API key in "
            "an Authorization header using Bearer auth (i.e. Authorization: Bearer "
            "YOUR_KEY).",
        )
    if key.startswith("ek_") or not key_is_valid(key):
        return _error(401, f"Incorrect API key provided: {mask_key(key)}.", code="invalid_api_key")
    return None


def _ttl(raw: Any, param: str, default: int) -> int:
    if raw is None:
        return default
    obj = expect_object(raw, param)
    check_keys(obj, {"anchor", "seconds"}, param)
    if "anchor" in obj:
        expect_choice(obj["anchor"], f"{param}.anchor", ("created_at",))
    if "seconds" not in obj:
        return default
    return expect_int(obj["seconds"], f"{param}.seconds", MIN_TTL, MAX_TTL)


def _mint(
    store: RestStore, rng: random.Random, now: float, ttl: int, cfg: SessionConfig
) -> tuple[str, int]:
    value = IdFactory(rng).new("ek", 32)
    expires_at = int(now) + ttl
    store.secrets[value] = float(expires_at)
    store.presets[value] = cfg.copy()
    return value, expires_at


def handle_rest(
    method: str,
    target: str,
    headers: Mapping[str, str],
    body: bytes,
    *,
    store: RestStore,
    key_is_valid: Callable[[str], bool],
    now: float,
    rng: random.Random,
) -> tuple[int, Payload]:
    """Answer one HTTP request: returns (status, JSON payload)."""
    path = urlsplit(target).path.rstrip("/")
    routes = {"/v1/realtime/client_secrets": _client_secrets, "/v1/realtime/sessions": _sessions}
    if path == "/healthz" and method == "GET":
        return 200, {"status": "ok"}  # mock-only, for orchestrators' readiness checks
    handler = routes.get(path)
    if handler is None:
        return _error(404, f"Invalid URL ({method} {path or '/'})")
    if method != "POST":
        return _error(405, f"Invalid method for URL ({method} {path}): use POST.")
    denied = _auth(headers, key_is_valid)
    if denied is not None:
        return denied
    try:
        data = orjson.loads(body) if body.strip() else {}
    except orjson.JSONDecodeError:
        return _error(
            400, "We could not parse the JSON body of your request. The body must be a JSON object."
        )
    try:
        request = expect_object(data, "body")
        return handler(request, store, now, rng)
    except ClientError as err:
        return _error(400, err.message, code=err.code, param=err.param)


def _client_secrets(
    request: Payload, store: RestStore, now: float, rng: random.Random
) -> tuple[int, Payload]:
    check_keys(request, {"expires_after", "session"}, "")
    ttl = _ttl(request.get("expires_after"), "expires_after", GA_DEFAULT_TTL)
    raw = request.get("session") or {"type": "realtime"}
    session = expect_object(raw, "session")
    kind = expect_choice(
        session.get("type", "realtime"), "session.type", ("realtime", "transcription")
    )
    model = session.get("model", "gpt-realtime" if kind == "realtime" else None)
    if model is not None and not is_realtime_model(expect_str(model, "session.model")):
        raise ClientError(
            "invalid_model", f'Model "{model}" is not supported in realtime mode.', "session.model"
        )
    base = SessionConfig(kind="realtime" if kind == "realtime" else "transcription")
    if kind == "transcription":
        base.turn_detection = None
    cfg = apply_ga_update(base, {**session, "type": kind})
    value, expires_at = _mint(store, rng, now, ttl, cfg)
    rendered = render_ga(cfg)
    head: Payload = {
        "type": rendered.pop("type"),
        "object": rendered.pop("object"),
        "id": IdFactory(rng).new("sess"),
    }
    if model is not None:
        head["model"] = model
    head["expires_at"] = 0
    return 200, {"value": value, "expires_at": expires_at, "session": {**head, **rendered}}


def _sessions(
    request: Payload, store: RestStore, now: float, rng: random.Random
) -> tuple[int, Payload]:
    if "model" not in request:
        raise ClientError(
            "missing_required_parameter", "Missing required parameter: 'model'.", "model"
        )
    model = expect_str(request["model"], "model")
    if not is_realtime_model(model):
        raise ClientError(
            "invalid_model", f'Model "{model}" is not supported in realtime mode.', "model"
        )
    secret = request.get("client_secret")
    ttl = BETA_DEFAULT_TTL
    if secret is not None:
        secret_obj = expect_object(secret, "client_secret")
        check_keys(secret_obj, {"expires_after"}, "client_secret")
        ttl = _ttl(secret_obj.get("expires_after"), "client_secret.expires_after", ttl)
    update = {k: v for k, v in request.items() if k not in ("model", "client_secret")}
    cfg = apply_beta_update(SessionConfig(), update)
    value, expires_at = _mint(store, rng, now, ttl, cfg)
    rendered = render_beta(cfg)
    rendered["client_secret"] = {"value": value, "expires_at": expires_at}
    return 200, {
        "id": IdFactory(rng).new("sess"),
        "object": rendered.pop("object"),
        "model": model,
        "expires_at": 0,
        **rendered,
    }
