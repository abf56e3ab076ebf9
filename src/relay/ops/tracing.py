"""OpenTelemetry traces of calls: a span per session, and a child span per turn.

Imported only when tracing is on (``OTEL_EXPORTER_OTLP_ENDPOINT``), so a relay without it
never loads OpenTelemetry. Spans are made from times the call's log already took (the
turn's span is created, with its real start time, when its ``response.done`` arrives), so
tracing adds nothing to the path of a message; the SDK's batch processor exports them from
its own thread over OTLP/HTTP.

A turn's span runs from the end of the caller's speech (or ``response.created`` for a text
turn) to ``response.done``, with an event at the first audio. Attributes: the model, the
user as a hash (the first 16 hex digits of SHA-256: pseudonymous, not anonymous), tokens
and cost; the session's span also carries the upstream dial time, whether the pump (the
fast path) relayed it, and how it ended.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Sequence
from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import Span, Status, StatusCode

from ..core.calllog import Turn
from ..core.pricing import Tokens, dollars

#: Seconds the exporter may take to send what is left when the relay stops.
SHUTDOWN_TIMEOUT = 5.0


def hashed_user(user: str) -> str:
    return hashlib.sha256(user.encode()).hexdigest()[:16]


def _token_attributes(prefix: str, tokens: Tokens) -> dict[str, int]:
    return {
        f"{prefix}.input_text": tokens.input_text,
        f"{prefix}.input_audio": tokens.input_audio,
        f"{prefix}.input_cached": tokens.input_cached,
        f"{prefix}.output_text": tokens.output_text,
        f"{prefix}.output_audio": tokens.output_audio,
    }


class Tracer:
    """Makes the relay's spans on ``provider`` (the OTLP one, or a test's in-memory one)."""

    def __init__(self, provider: TracerProvider) -> None:
        self.provider = provider
        self._tracer = provider.get_tracer("relay")

    @classmethod
    def to_endpoint(cls, endpoint: str) -> Tracer:
        """Export over OTLP/HTTP to ``endpoint`` (``/v1/traces`` is added), as ``relay`` unless
        ``OTEL_SERVICE_NAME`` says otherwise."""
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        name = os.environ.get("OTEL_SERVICE_NAME") or "relay"
        provider = TracerProvider(resource=Resource.create({"service.name": name}))
        exporter = OTLPSpanExporter(endpoint=endpoint.rstrip("/") + "/v1/traces")
        provider.add_span_processor(BatchSpanProcessor(exporter))
        return cls(provider)

    def session_started(
        self, *, session_id: str, user: str, model: str, auth: str, start_ns: int
    ) -> Span:
        return self._tracer.start_span(
            "relay.session",
            kind=trace.SpanKind.SERVER,
            start_time=start_ns,
            attributes={
                "relay.session.id": session_id,
                "relay.user.hash": hashed_user(user),
                "relay.auth": auth,
                "gen_ai.system": "openai",
                "gen_ai.request.model": model,
            },
        )

    def turns(self, session: Span, turns: Sequence[Turn], clock_to_ns: Any, model: str) -> None:
        """Finished turns as children of the session's span (their times: ``clock_to_ns``)."""
        context = trace.set_span_in_context(session)
        for turn in turns:
            attributes: dict[str, Any] = {
                "gen_ai.request.model": model,
                "relay.turn.spoken": turn.spoken,
                **_token_attributes("gen_ai.usage", turn.tokens),
            }
            if turn.response_id:
                attributes["gen_ai.response.id"] = turn.response_id
            if turn.status:
                attributes["relay.response.status"] = turn.status
            if turn.cost is not None:
                attributes["relay.cost_usd"] = dollars(turn.cost)
            if turn.latency is not None:
                attributes["relay.voice_latency_ms"] = round(turn.latency * 1000, 1)
            span = self._tracer.start_span(
                "relay.turn",
                context=context,
                start_time=clock_to_ns(turn.started),
                attributes=attributes,
            )
            if turn.first_audio is not None:
                span.add_event("first_audio", timestamp=clock_to_ns(turn.first_audio))
            span.end(end_time=clock_to_ns(turn.done if turn.done is not None else turn.started))

    def session_ended(self, span: Span, attributes: dict[str, Any], *, failed: bool) -> None:
        span.set_attributes({k: v for k, v in attributes.items() if v is not None})
        if failed:
            span.set_status(Status(StatusCode.ERROR, str(attributes.get("relay.cause"))))
        span.end(end_time=time.time_ns())

    def shutdown(self) -> None:
        """Export what is left (blocking, bounded: call it from a thread)."""
        self.provider.force_flush(int(SHUTDOWN_TIMEOUT * 1000))
        self.provider.shutdown()
