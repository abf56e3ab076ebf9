"""Whether a connection that has authenticated may start a session: the checks a session's
request itself can fail (dialect, model), answered the way the Realtime API answers them."""

from __future__ import annotations

from typing import Any

from ..config import RelayConfig
from ..core.beta import asks_for_beta
from ..usage.auth import Identity
from .asgi import Scope, query_param


def session_model(config: RelayConfig, scope: Scope) -> str:
    """The model a session runs: the one it names (a retired one by its alias), else
    RELAY_MODEL."""
    model = query_param(scope, "model") or config.model
    return config.aliases.get(model, model)


def refusal(
    config: RelayConfig, scope: Scope, offered: Any, identity: Identity
) -> tuple[str, str, str] | None:
    """Why this connection cannot start (error code, message, close reason), if so."""
    if config.beta == "refuse" and asks_for_beta(scope["headers"], offered):
        return (
            "beta_api_shape_disabled",
            "This relay speaks the GA Realtime API; the beta dialect (OpenAI-Beta:"
            " realtime=v1) has been retired and this relay does not translate it"
            " (RELAY_BETA=refuse). Drop the beta header/subprotocol and use GA event names.",
            "invalid_request_error.beta_api_shape_disabled",
        )
    named = query_param(scope, "model")
    model = session_model(config, scope)
    if named is not None and model not in config.allowed_models:
        allowed = ", ".join(sorted(config.allowed_models))
        return (
            "invalid_model",
            f"Model {named!r} is not available through this relay. Allowed: {allowed}.",
            "invalid_request_error.invalid_model",
        )
    if identity.model is not None and model != identity.model:
        return (
            "invalid_model",
            f"Your token allows only the model {identity.model!r}; connect with"
            f" ?model={identity.model}.",
            "invalid_request_error.invalid_model",
        )
    return None


def tightest(*limits: float | None) -> float:
    """The smallest of the limits that are set (0 or None: not set); 0 if none is."""
    return min((limit for limit in limits if limit), default=0.0)
