"""What the operator hears of one session: the policy's drops and refusals (a log line and
the ``relay_policy_fields`` counter) and an upstream that refused the relay's own session.

An :class:`~relay.core.bridge.Observer` for the bridge. Field names are logged, never their
values (a client's instructions or tools are its own business), and of an MCP server only
its host (a URL's path or query may carry a credential). The bridge calls it from inside a
step (see the rules of a step in :mod:`relay.core.bridge`), so it never raises: a metric or a
log line that fails is itself logged, as safely as can be, and the session goes on.
"""

from __future__ import annotations

import logging

from ..core.policy import Screened
from ..ops.metrics import RelayMetrics
from ..wire.pump import log_safely

log = logging.getLogger("relay")


class SessionNotes:
    """Logs and counts what the bridge of session ``session`` reports."""

    __slots__ = ("_metrics", "_session")

    def __init__(self, metrics: RelayMetrics, session: str) -> None:
        self._metrics = metrics
        self._session = session

    def screened(self, screened: Screened) -> None:
        try:
            self._screened(screened)
        except Exception:
            log_safely("noting a policy decision failed; the session goes on")

    def _screened(self, screened: Screened) -> None:
        action = "dropped" if screened.text is not None else "refused"
        for field in screened.fields:
            self._metrics.policy_acted(field, action)
        fields = {
            "session": self._session,
            "event": screened.kind,
            "fields": ",".join(screened.fields),
        }
        if screened.detail:
            fields["mcp_servers"] = screened.detail
        log.info(f"policy {action} client fields", extra={"fields": fields})

    def setup_refused(self, code: str, message: str) -> None:
        try:
            self._setup_refused(code, message)
        except Exception:
            log_safely("noting a refused session.update failed; the session goes on")

    def _setup_refused(self, code: str, message: str) -> None:
        log.error(
            "the Realtime API refused the relay's own session.update: the relay is misconfigured"
            " (check [session] in RELAY_CONFIG, RELAY_INSTRUCTIONS and RELAY_VOICE); sessions"
            " run with the API's defaults",
            extra={"fields": {"session": self._session, "code": code, "message": message}},
        )

    def takeover(self, kind: str, outcome: str, detail: str) -> None:
        try:
            self._takeover(kind, outcome, detail)
        except Exception:
            log_safely("noting an upstream takeover failed; the session goes on")

    def _takeover(self, kind: str, outcome: str, detail: str) -> None:
        if outcome != "started":
            self._metrics.upstream_replaced(kind, outcome)
        says = {
            "started": "upstream replaced: opening a new one for the session",
            "moved": "upstream replaced: the new one runs the session",
            "failed": "upstream replaced: no new one took the session, which ends",
        }[outcome]
        level = logging.WARNING if kind == "failover" and outcome != "moved" else logging.INFO
        fields = {"session": self._session, "kind": kind, "detail": detail}
        log.log(level, says, extra={"fields": fields})
