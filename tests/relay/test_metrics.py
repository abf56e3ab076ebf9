"""Metrics as a scraper sees them: the rendered exposition, parsed back."""

from __future__ import annotations

import itertools

import pytest
import trio
import trio.testing
from prometheus_client.parser import text_string_to_metric_families

from relay.core.bridge import Cause, Traffic
from relay.ops.metrics import PUBLISH_SECONDS, RelayMetrics, VoiceClock


def scrape(metrics: RelayMetrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a scrape, keyed by sample name and sorted labels."""
    body, content_type = metrics.render(None)
    assert content_type.startswith(b"text/plain")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
    }


def value(samples: dict, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def traffic_totals(samples: dict) -> tuple[float, float, float, float]:
    return (
        value(samples, "relay_messages_total", direction="client_to_upstream"),
        value(samples, "relay_bytes_total", direction="client_to_upstream"),
        value(samples, "relay_messages_total", direction="upstream_to_client"),
        value(samples, "relay_bytes_total", direction="upstream_to_client"),
    )


def test_traffic_is_the_sum_of_live_and_ended_sessions() -> None:
    metrics = RelayMetrics()
    first, second, third = Traffic(1, 10, 2, 20), Traffic(3, 30, 4, 40), Traffic(5, 50, 6, 60)
    for traffic in (first, second, third):
        metrics.session_started(traffic)
    metrics.session_ended(first, Cause.CLIENT_CLOSED, None)

    samples = scrape(metrics)
    assert traffic_totals(samples) == (9, 90, 12, 120)
    assert value(samples, "relay_sessions_active") == 2
    assert value(samples, "relay_sessions_started_total") == 3


def test_live_counters_are_read_at_scrape_time() -> None:
    metrics = RelayMetrics()
    traffic = Traffic()
    metrics.session_started(traffic)
    assert traffic_totals(scrape(metrics)) == (0, 0, 0, 0)
    traffic.client_messages += 7
    traffic.upstream_bytes += 700
    assert traffic_totals(scrape(metrics)) == (7, 0, 0, 700)


def test_a_session_ending_neither_double_counts_nor_drops_its_traffic() -> None:
    metrics = RelayMetrics()
    staying, leaving = Traffic(1, 100, 1, 100), Traffic(2, 200, 2, 200)
    metrics.session_started(staying)
    metrics.session_started(leaving)
    before = traffic_totals(scrape(metrics))
    metrics.session_ended(leaving, Cause.UPSTREAM_CLOSED, 1000)
    after = traffic_totals(scrape(metrics))
    assert after == before == (3, 300, 3, 300)
    assert value(scrape(metrics), "relay_sessions_active") == 1


def test_counters_never_go_down_over_many_sessions() -> None:
    metrics = RelayMetrics()
    live: list[Traffic] = []
    previous = (0.0, 0.0, 0.0, 0.0)
    for step in range(60):
        if step % 3 == 2 and live:
            metrics.session_ended(live.pop(0), Cause.CLIENT_CLOSED, None)
        else:
            traffic = Traffic()
            live.append(traffic)
            metrics.session_started(traffic)
        for traffic in live:
            traffic.client_messages += 1
            traffic.client_bytes += step
            traffic.upstream_messages += 2
            traffic.upstream_bytes += 2 * step
        now = traffic_totals(scrape(metrics))
        assert all(a <= b for a, b in zip(previous, now, strict=True)), (previous, now)
        assert now[0] > previous[0]
        previous = now


def test_endings_are_counted_by_cause_and_bounded_client_code() -> None:
    metrics = RelayMetrics()
    for cause, code in [
        (Cause.CLIENT_CLOSED, None),
        (Cause.CLIENT_CLOSED, None),
        (Cause.UPSTREAM_UNAVAILABLE, 1014),
        ("budget_exhausted", 4029),
        (Cause.UPSTREAM_CLOSED, 4321),  # an upstream's own code: not a label of its own
        ("something_new", 1000),
    ]:
        traffic = Traffic()
        metrics.session_started(traffic)
        metrics.session_ended(traffic, cause, code)

    samples = scrape(metrics)
    ended = {
        labels: v for (name, labels), v in samples.items() if name == "relay_sessions_ended_total"
    }
    assert ended == {
        (("cause", "client_closed"), ("client_code", "none")): 2,
        (("cause", "upstream_unavailable"), ("client_code", "1014")): 1,
        (("cause", "budget_exhausted"), ("client_code", "4029")): 1,
        (("cause", "upstream_closed"), ("client_code", "other")): 1,
        (("cause", "other"), ("client_code", "1000")): 1,
    }


def test_histograms_observe_queue_depth_dial_and_voice_latency() -> None:
    metrics = RelayMetrics()
    for queued, dial in ((0, 0.05), (3, 0.12), (300, 0.15)):
        metrics.upstream_opened(dial, queued)  # as each session's upstream opens
    never_opened = Traffic()
    metrics.session_started(never_opened)
    metrics.session_ended(never_opened, Cause.UPSTREAM_UNAVAILABLE, 1014)  # observes neither
    metrics.voice_latency(0.06)
    metrics.voice_latency(0.45)
    metrics.voice_latency(4.0)

    samples = scrape(metrics)
    assert value(samples, "relay_preopen_queue_messages_count") == 3
    assert value(samples, "relay_preopen_queue_messages_sum") == 303
    assert value(samples, "relay_preopen_queue_messages_bucket", le="0.0") == 1
    assert value(samples, "relay_preopen_queue_messages_bucket", le="4.0") == 2
    assert value(samples, "relay_upstream_dial_seconds_count") == 3
    assert value(samples, "relay_upstream_dial_seconds_bucket", le="0.1") == 1
    assert value(samples, "relay_upstream_dial_seconds_bucket", le="0.2") == 3
    assert value(samples, "relay_voice_latency_seconds_count") == 3
    assert value(samples, "relay_voice_latency_seconds_bucket", le="0.05") == 0
    assert value(samples, "relay_voice_latency_seconds_bucket", le="0.075") == 1
    assert value(samples, "relay_voice_latency_seconds_bucket", le="0.5") == 2
    assert value(samples, "relay_voice_latency_seconds_bucket", le="5.0") == 3
    assert value(samples, "relay_voice_latency_seconds_sum") == pytest.approx(4.51)


def test_refusals_are_counted_by_status() -> None:
    metrics = RelayMetrics()
    for status in (401, 401, 403, 503, 200):
        metrics.refused(status)
    samples = scrape(metrics)
    assert value(samples, "relay_handshake_refusals_total", status="401") == 2
    assert value(samples, "relay_handshake_refusals_total", status="403") == 1
    assert value(samples, "relay_handshake_refusals_total", status="503") == 1
    assert value(samples, "relay_handshake_refusals_total", status="other") == 1


def test_each_instance_has_its_own_registry() -> None:
    one, two = RelayMetrics(), RelayMetrics()
    one.refused(401)
    assert ("relay_handshake_refusals_total", (("status", "401"),)) not in scrape(two)


def test_openmetrics_is_served_to_a_scraper_that_asks_for_it() -> None:
    metrics = RelayMetrics()
    body, content_type = metrics.render(b"application/openmetrics-text; version=1.0.0")
    assert content_type.startswith(b"application/openmetrics-text")
    assert body.endswith(b"# EOF\n")


# -- VoiceClock ---------------------------------------------------------------------------------


def event(kind: str, rest: str = "") -> str:
    return '{"type":"' + kind + '"' + rest + "}"


def clock_from(times: list[float]) -> VoiceClock:
    ticks = iter(times)
    return VoiceClock(clock=lambda: next(ticks))


def test_voice_clock_times_speech_end_to_the_replys_first_audio() -> None:
    voice = clock_from([10.0, 10.35])
    stream = [
        event("input_audio_buffer.speech_started"),
        event("input_audio_buffer.speech_stopped", ',"audio_end_ms":900'),
        event("input_audio_buffer.committed"),
        event("response.created"),
        event("response.output_audio.delta", ',"delta":"AAAA"'),
        event("response.output_audio.delta", ',"delta":"BBBB"'),
        event("response.done"),
    ]
    assert [voice.upstream_event(text) for text in stream] == [
        None, None, None, None, pytest.approx(0.35), None, None,
    ]  # fmt: skip


def test_voice_clock_ignores_the_tail_of_an_earlier_reply() -> None:
    voice = clock_from([1.0, 1.8])
    stream = [
        event("input_audio_buffer.speech_stopped"),
        event("response.output_audio.delta"),  # the previous reply, still streaming
        event("response.done"),  # ... and ending
        event("response.created"),
        event("response.output_audio.delta"),
    ]
    assert [voice.upstream_event(text) for text in stream][-1] == pytest.approx(0.8)


def test_voice_clock_gives_up_on_a_reply_without_audio_and_text_turns() -> None:
    voice = clock_from([1.0])  # a second clock read would raise StopIteration
    stream = [
        event("input_audio_buffer.speech_stopped"),
        event("response.created"),
        event("response.output_text.delta"),
        event("response.done"),
        event("response.created"),  # a text turn: no speech before it
        event("response.output_audio.delta"),
    ]
    assert [voice.upstream_event(text) for text in stream] == [None] * len(stream)


def test_voice_clock_restarts_on_new_speech() -> None:
    voice = clock_from([1.0, 2.0, 2.5])
    stream = [
        event("input_audio_buffer.speech_stopped"),
        event("input_audio_buffer.speech_stopped"),
        event("response.created"),
        event("response.output_audio.delta"),
    ]
    results = [voice.upstream_event(text) for text in stream]
    assert results[-1] == pytest.approx(0.5)
    assert list(itertools.compress(results, results)) == [pytest.approx(0.5)]


# -- several workers ---------------------------------------------------------------------------


def published_messages(metrics: RelayMetrics) -> float | None:
    """What the counter holds now, without the publish a scrape would do first."""
    return metrics.registry.get_sample_value(
        "relay_messages_total", {"direction": "client_to_upstream"}
    )


def test_with_several_workers_live_traffic_is_published_every_second_without_a_scrape() -> None:
    """A scrape reaches one worker; the others' running sessions must reach the shared files
    on their own, and a worker's last traffic must not be lost when it exits."""
    metrics = RelayMetrics()
    metrics.multiprocess = True  # as under PROMETHEUS_MULTIPROC_DIR (not settable in-process)

    async def main() -> None:
        traffic = Traffic()
        metrics.session_started(traffic)
        traffic.client_messages += 5
        await trio.sleep(PUBLISH_SECONDS / 2)
        assert published_messages(metrics) == 0
        await trio.sleep(PUBLISH_SECONDS)
        assert published_messages(metrics) == 5
        traffic.client_messages += 2
        metrics.session_ended(traffic, Cause.CLIENT_CLOSED, None)

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert published_messages(metrics) == 7  # published once more as the process's run ended


def test_without_several_workers_nothing_publishes_in_the_background() -> None:
    metrics = RelayMetrics()

    async def main() -> None:
        traffic = Traffic()
        metrics.session_started(traffic)
        traffic.client_messages += 5
        await trio.sleep(10 * PUBLISH_SECONDS)
        assert published_messages(metrics) == 0
        assert traffic_totals(scrape(metrics))[0] == 5

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


async def test_dial_time_and_queue_depth_are_recorded_when_the_upstream_opens() -> None:
    """Not when the session ends: a scrape during a long call already shows them."""
    from .harness import connect, greet, running_relay, scripted_upstream

    with trio.fail_after(30):
        async with scripted_upstream(greet) as up, running_relay(upstream_url=up.url) as relay:
            async with connect(relay.url + "/voice") as ws:
                assert await ws.get_message() == '{"type":"session.created"}'
                samples = scrape(relay.app.metrics)
                assert value(samples, "relay_upstream_dial_seconds_count") == 1
                assert value(samples, "relay_preopen_queue_messages_count") == 1
                assert value(samples, "relay_sessions_active") == 1  # still live
