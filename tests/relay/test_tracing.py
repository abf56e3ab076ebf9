"""OpenTelemetry traces: a session span with its turn spans, seen by an in-memory exporter."""

from __future__ import annotations

import subprocess
import sys

import orjson
import trio
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from relay.ops.tracing import Tracer, hashed_user

from .harness import connect
from .test_accounting import BEARER, TEXT_TURN, relays

TIMEOUT = 15


async def test_a_session_span_holds_its_turn_spans_with_model_user_tokens_and_cost() -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    dones = []
    with trio.fail_after(TIMEOUT):
        async with relays(
            "sqlite:///:memory:", model="gpt-realtime-2", models=("gpt-realtime-2",)
        ) as (relay,):
            relay.app.tracer = Tracer(provider)
            async with connect(relay.url + "/voice", extra_headers=BEARER) as ws:
                for _turn in range(2):
                    for message in TEXT_TURN:
                        await ws.send_message(message)
                    while (event := orjson.loads(await ws.get_message()))[
                        "type"
                    ] != "response.done":
                        pass
                    dones.append(event)
    spans = exporter.get_finished_spans()  # the relay has stopped: every session has ended
    (session,) = [s for s in spans if s.name == "relay.session"]
    turns = [s for s in spans if s.name == "relay.turn"]
    assert len(turns) == 2
    assert all(t.parent is not None and t.parent.span_id == session.context.span_id for t in turns)
    assert all(t.context.trace_id == session.context.trace_id for t in turns)
    attributes = dict(session.attributes or {})
    assert attributes["gen_ai.request.model"] == "gpt-realtime-2"
    assert attributes["relay.user.hash"] == hashed_user("alice") != "alice"
    assert "alice" not in str(attributes)
    assert attributes["relay.turns"] == 2 and attributes["relay.cause"] == "client_closed"
    assert attributes["relay.upstream.dial_ms"] > 0
    assert attributes["relay.cost_usd"] > 0
    for turn, done in zip(sorted(turns, key=lambda s: s.start_time), dones, strict=True):
        t = dict(turn.attributes or {})
        usage = done["response"]["usage"]
        assert t["gen_ai.response.id"] == done["response"]["id"]
        assert t["gen_ai.usage.output_audio"] == usage["output_token_details"]["audio_tokens"]
        assert t["gen_ai.usage.input_text"] == usage["input_token_details"]["text_tokens"]
        assert t["relay.cost_usd"] > 0 and not t["relay.turn.spoken"]
        assert [e.name for e in turn.events] == ["first_audio"]
        assert session.start_time <= turn.start_time <= turn.events[0].timestamp <= turn.end_time
        assert turn.end_time <= session.end_time


def test_without_an_otlp_endpoint_the_relay_never_loads_opentelemetry() -> None:
    code = (
        "import sys, trio\n"
        "from relay.config import load_config\n"
        "from relay.server.app import create_app\n"
        "app = create_app(load_config({}, {'allow_anonymous': True, 'store': 'sqlite:///:memory:',"
        " 'records': ''}))\n"
        "print(sorted(m for m in sys.modules if m.startswith('opentelemetry')))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.strip() == "[]"


def test_an_otlp_endpoint_gets_the_traces_path_and_the_service_name(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.delenv("OTEL_SERVICE_NAME", raising=False)
    tracer = Tracer.to_endpoint("http://127.0.0.1:4318/")
    try:
        assert tracer.provider.resource.attributes["service.name"] == "relay"
        (processor,) = tracer.provider._active_span_processor._span_processors  # noqa: SLF001
        assert processor.span_exporter._endpoint == "http://127.0.0.1:4318/v1/traces"  # noqa: SLF001
    finally:
        tracer.shutdown()  # no span was made: nothing is sent
