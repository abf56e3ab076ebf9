"""The sans-IO half of the WebSocket handshake, decided as the real GA server does.

The upgrade itself always succeeds (101); what ``negotiate`` decides is the dialect,
the subprotocol to select, and whether the connection must be refused right after
the 101 with one ``error`` event and a close (bad key, missing or unknown model,
beta when beta is rejected).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from urllib.parse import parse_qs, urlsplit

from .models import is_realtime_model
from .sessionconfig import Dialect


@dataclass(frozen=True)
class Rejection:
    """A fatal problem found at handshake time: one ``error`` event, then a close."""

    code: str | None
    message: str
    close_code: int

    @property
    def close_reason(self) -> str:
        return "invalid_request_error" + (f".{self.code}" if self.code else "")


@dataclass(frozen=True)
class Handshake:
    """What the server decided about an upgrade request (it always answers 101)."""

    dialect: Dialect
    model: str
    subprotocol: str | None
    api_key: str | None
    intent: str | None
    rejection: Rejection | None
    call_id: str | None = None
    """``?call_id=``: a sideband of that call (which then needs no model)."""


def mask_key(key: str) -> str:
    """Mask a key for an error message the way the real server does: ``sk-…abcd``."""
    if len(key) < 8:
        return "…"
    return f"{key[:3]}…{key[-4:]}"


def negotiate(
    target: str,
    headers: Mapping[str, str],
    subprotocols: Sequence[str],
    *,
    key_is_valid: Callable[[str], bool],
    reject_beta: bool = False,
) -> Handshake:
    """Decide the outcome of a WebSocket upgrade from its target, headers and subprotocols.

    ``headers`` has lower-cased names. The key comes from ``Authorization: Bearer K``
    or the ``openai-insecure-api-key.K`` subprotocol; the key-bearing subprotocol is
    never selected: ``realtime`` is, when offered.
    """
    query = parse_qs(urlsplit(target).query)
    model = (query.get("model") or [""])[0]
    intents = query.get("intent")
    intent = intents[0] if intents else None
    call_id = (query.get("call_id") or [None])[0]
    beta = "realtime=v1" in headers.get("openai-beta", "").replace(" ", "") or (
        "openai-beta.realtime-v1" in subprotocols
    )
    selected = "realtime" if "realtime" in subprotocols else None
    key: str | None = None
    scheme, _, credential = headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and credential.strip():
        key = credential.strip()
    else:
        for proto in subprotocols:
            if proto.startswith("openai-insecure-api-key.") and len(proto) > 24:
                key = proto[len("openai-insecure-api-key.") :]
                break
    rejection: Rejection | None = None
    if key is None:
        rejection = Rejection(None, "Missing bearer or basic authentication in header", 3000)
    elif not key_is_valid(key):
        rejection = Rejection(
            "invalid_api_key",
            f"Incorrect API key provided: {mask_key(key)}. You can find your API key at "
            "https://platform.openai.com/account/api-keys.",
            3000,
        )
    elif beta and reject_beta:
        rejection = Rejection(
            "beta_api_shape_disabled",
            "The Realtime API beta shape has been disabled. Remove the 'OpenAI-Beta: "
            "realtime=v1' header (or the openai-beta.realtime-v1 subprotocol) and use the "
            "GA event and session shapes.",
            4000,
        )
    elif not model and intent != "transcription" and call_id is None:
        rejection = Rejection(
            "missing_model",
            "You must provide a model parameter, e.g. wss://api.openai.com/v1/realtime"
            "?model=gpt-realtime.",
            4000,
        )
    elif model and not is_realtime_model(model):
        rejection = Rejection(
            "invalid_model",
            f'Model "{model}" is not supported in realtime mode. Use a realtime model such '
            'as "gpt-realtime".',
            4000,
        )
    return Handshake(
        dialect="beta" if beta else "ga",
        model=model,
        subprotocol=selected,
        api_key=key,
        intent=intent,
        rejection=rejection,
        call_id=call_id,
    )
