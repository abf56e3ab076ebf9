"""Whether a connection that has authenticated may start a session: the checks a session's
request itself can fail (dialect, model), answered the way the Realtime API answers them.
Calls (:mod:`relay.server.calls`) take the same model check."""

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
    return model_refusal(config, None if named is None else session_model(config, scope), identity)


def model_refusal(
    config: RelayConfig, model: str | None, identity: Identity
) -> tuple[str, str, str] | None:
    """Why a session or call may not run ``model`` (None: the default), if it may not."""
    if model is not None and not config.allows_model(model):
        allowed = ", ".join(config.allowed_models)
        return (
            "invalid_model",
            f"Model {model!r} is not available through this relay. Allowed: {allowed}.",
            "invalid_request_error.invalid_model",
        )
    if identity.model is not None and (model or config.model) != identity.model:
        return (
            "invalid_model",
            f"Your token allows only the model {identity.model!r}; connect with"
            f" ?model={identity.model}.",
            "invalid_request_error.invalid_model",
        )
    chosen = model or config.model
    if (identity.budget_usd or config.daily_budget_usd) and chosen not in config.prices:
        # Only reachable through a token's budget_usd claim: with RELAY_DAILY_BUDGET_USD, every
        # allowed model must have a price before the relay starts.
        priced = sorted(m for m in config.allowed_models if m in config.prices)
        return (
            "model_not_priced",
            f"Your token sets a spending budget, but the relay has no price for {chosen!r},"
            " so its cost could not be counted. "
            + (f"Use a priced model: {', '.join(priced)}." if priced else "Ask the operator."),
            "invalid_request_error.model_not_priced",
        )
    return None


def tightest(*limits: float | None) -> float:
    """The smallest of the limits that are set (0 or None: not set); 0 if none is."""
    return min((limit for limit in limits if limit), default=0.0)
