"""Costs in dollars: the price table, exact sums, dollar budgets on both stores, metrics."""

from __future__ import annotations

from pathlib import Path

import httpx
import orjson
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families
from trio_websocket import ConnectionRejected

from relay.config import ConfigError, load_config
from relay.core.pricing import DEFAULT_PRICES, PriceTable, Tokens, tokens_of
from relay.usage.store import UsageDelta, open_store, usage_of

from .harness import connect
from .test_accounting import BEARER, TEXT_TURN, cut_by_budget, relays, relays_and_mock
from .test_relay_loopback import error_codes, receive_until_closed

TIMEOUT = 15
DAY = "2026-12-07"


def done(usage: dict) -> dict:
    return {
        "type": "response.done",
        "response": {"id": "resp_1", "status": "completed", "usage": usage},
    }


#: Three responses of a voice call, as the Realtime API reports them.
USAGES = [
    {  # the first turn: instructions and speech in, speech out
        "input_tokens": 1_210, "output_tokens": 260,
        "input_token_details": {"text_tokens": 1_150, "audio_tokens": 60, "cached_tokens": 0},
        "output_token_details": {"text_tokens": 40, "audio_tokens": 220},
    },
    {  # the second: most of the input was cached
        "input_tokens": 1_530, "output_tokens": 180,
        "input_token_details": {
            "text_tokens": 1_190, "audio_tokens": 340, "cached_tokens": 1_408,
            "cached_tokens_details": {"text_tokens": 1_152, "audio_tokens": 256},
        },
        "output_token_details": {"text_tokens": 30, "audio_tokens": 150},
    },
    {  # a cancelled one with cached tokens but no split: no discount is assumed
        "input_tokens": 700, "output_tokens": 0,
        "input_token_details": {"text_tokens": 600, "audio_tokens": 100, "cached_tokens": 512},
        "output_token_details": {"text_tokens": 0, "audio_tokens": 0},
    },
]  # fmt: skip


def test_a_known_sequence_of_usages_costs_exactly_the_published_prices() -> None:
    prices = PriceTable()
    costs = [prices.cost("gpt-realtime-2", tokens_of(done(u))) for u in USAGES]
    # gpt-realtime-2, $ per 1M tokens: text in 4, audio in 32, cached 0.4/0.4, out 24/64.
    # In nanodollars per token: 4000, 32000, 400, 400, 24000, 64000.
    assert costs == [
        1_150 * 4000 + 60 * 32000 + 40 * 24000 + 220 * 64000,
        (1_190 - 1_152) * 4000 + 1_152 * 400 + (340 - 256) * 32000 + 256 * 400
        + 30 * 24000 + 150 * 64000,
        600 * 4000 + 100 * 32000,
    ]  # fmt: skip
    assert costs == [21_560_000, 13_723_200, 5_600_000]  # $0.02156, $0.0137232, $0.0056
    assert prices.cost("gpt-realtime-2.1-mini", tokens_of(done(USAGES[0]))) == (
        1_150 * 600 + 60 * 10_000 + 40 * 2_400 + 220 * 20_000
    )
    assert prices.cost("gpt-realtime", tokens_of(done(USAGES[0]))) is None  # no published price


def test_cached_tokens_never_exceed_the_tokens_they_are_part_of() -> None:
    usage = {
        "input_token_details": {
            "text_tokens": 10, "audio_tokens": 0, "cached_tokens": 99,
            "cached_tokens_details": {"text_tokens": 99, "audio_tokens": 5},
        },
    }  # fmt: skip
    assert tokens_of(done(usage)) == Tokens(input_text=10, input_cached=99, cached_text=10)


async def test_costs_add_up_exactly_in_the_store(store_url: str) -> None:
    prices = PriceTable()
    deltas = [
        usage_of(t, prices.cost("gpt-realtime-2", t) or 0)
        for t in map(tokens_of, map(done, USAGES))
    ]
    with trio.fail_after(TIMEOUT):
        store = await open_store(store_url)
        try:
            async with trio.open_nursery() as nursery:  # concurrently, 100 calls of three turns
                for _ in range(100):
                    for delta in deltas:
                        nursery.start_soon(store.add, "alice", DAY, delta)
            assert await store.cost("alice", DAY) == 100 * 40_883_200
            assert await store.cost("bob", DAY) == 0
            (row,) = await store.rows(user="alice")
        finally:
            await store.aclose()
    assert row.cost_nanodollars == 4_088_320_000 and row.cost_usd == 4.08832


async def test_an_old_sqlite_file_gains_the_cost_counter(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "old.db"
    with sqlite3.connect(path) as db:  # the schema before costs were counted
        db.execute(
            "CREATE TABLE usage (day TEXT NOT NULL, user TEXT NOT NULL, sessions INTEGER NOT NULL"
            " DEFAULT 0, PRIMARY KEY (day, user)) WITHOUT ROWID"
        )
        db.execute("INSERT INTO usage (day, user, sessions) VALUES (?, 'alice', 3)", (DAY,))
    store = await open_store(f"sqlite:///{path}")
    try:
        await store.add("alice", DAY, UsageDelta(sessions=1, cost_nanodollars=7))
        (row,) = await store.rows()
    finally:
        await store.aclose()
    assert (row.sessions, row.cost_nanodollars) == (4, 7)


def test_a_prices_table_overrides_and_adds_models(tmp_path: Path) -> None:
    path = tmp_path / "relay.toml"
    path.write_text(
        "[prices.gpt-realtime-2]\noutput_audio = 60\n"
        "[prices.gpt-realtime]\ninput_text = 4\ninput_audio = 32\ncached_text = 0.4\n"
        "cached_audio = 0.4\noutput_text = 16\noutput_audio = 64.001\n"
    )
    config = load_config({"RELAY_CONFIG": str(path)})
    assert config.prices["gpt-realtime-2"].output_audio == 60_000
    assert (
        config.prices["gpt-realtime-2"].input_audio == DEFAULT_PRICES["gpt-realtime-2"].input_audio
    )
    assert config.prices["gpt-realtime"].output_audio == 64_001
    assert config.prices["gpt-realtime"].per_million()["cached_text"] == 0.4


@pytest.mark.parametrize(
    ("table", "complaint"),
    [
        ("[prices.new-model]\ninput_text = 1\n", "needs all of"),
        ("[prices.gpt-realtime-2]\ninput_txt = 1\n", "unknown keys ['input_txt']"),
        ("[prices.gpt-realtime-2]\ninput_text = 0.0001\n", "at most three decimals"),
        ("[prices.gpt-realtime-2]\ninput_text = -1\n", "must be >= 0"),
        ("[prices.gpt-realtime-2]\ninput_text = true\n", "must be a number"),
        ("[prices]\ngpt-realtime-2 = 3\n", "must be a table"),
    ],
)
def test_a_bad_price_stops_start_up_saying_why(tmp_path: Path, table: str, complaint: str) -> None:
    path = tmp_path / "relay.toml"
    path.write_text(table)
    with pytest.raises(ConfigError, match="RELAY_CONFIG") as caught:
        load_config({"RELAY_CONFIG": str(path)})
    assert complaint in str(caught.value)


def test_a_dollar_budget_needs_a_price_for_every_model_a_client_may_use() -> None:
    with pytest.raises(ConfigError) as caught:
        load_config({"RELAY_DAILY_BUDGET_USD": "5", "RELAY_MODELS": "gpt-realtime-2,gpt-realtime"})
    message = str(caught.value)
    assert "and gpt-realtime has none. Add [prices.gpt-realtime] to RELAY_CONFIG" in message
    config = load_config(
        {
            "RELAY_DAILY_BUDGET_USD": "5",
            "RELAY_MODEL": "gpt-realtime-2",
            "RELAY_MODELS": "gpt-realtime-2.1",
        }
    )
    assert config.daily_budget_usd == 5.0


PRICED = {"model": "gpt-realtime-2", "models": ("gpt-realtime-2",)}


async def test_a_dollar_budget_cuts_a_session_mid_call_and_then_refuses_new_ones(
    store_url: str,
) -> None:
    with trio.fail_after(TIMEOUT):
        async with relays_and_mock(store_url, daily_budget_usd=0.000001, **PRICED) as (
            (relay,),
            mock,
        ):
            messages, reason = await cut_by_budget(relay, mock)
            assert reason == "daily spending budget used up"
            assert (
                "daily spending budget is used up" in orjson.loads(messages[-1])["error"]["message"]
            )
            with pytest.raises(ConnectionRejected) as refused:
                async with connect(relay.url + "/voice", extra_headers=BEARER):
                    pass
            assert refused.value.status_code == 429
            body = orjson.loads(refused.value.body)
            assert body["code"] == "daily_budget_exhausted"
            assert "daily spending budget of $1e-06 is used up" in body["error"]
            assert relay.app.accounting is not None
            (row,) = await relay.app.accounting.store.rows(user="alice")
            (last,) = [e for e in map(orjson.loads, messages) if e["type"] == "response.done"]
            assert row.cost_nanodollars == PriceTable().cost("gpt-realtime-2", tokens_of(last)) > 0


async def test_a_budget_usd_claim_cuts_its_user_and_needs_a_priced_model() -> None:
    from .test_auth_loopback import SECRET, signed

    bearer = [(b"authorization", f"Bearer {signed({'budget_usd': 0.000001})}".encode())]
    settings = {
        "jwt_secret": SECRET,
        "model": "gpt-realtime-2",
        "models": ("gpt-realtime-2", "gpt-realtime"),
    }
    with trio.fail_after(TIMEOUT):
        async with relays("sqlite:///:memory:", **settings) as (relay,):
            async with connect(relay.url + "/voice?model=gpt-realtime", extra_headers=bearer) as ws:
                messages, code, reason = await receive_until_closed(ws)
            assert error_codes(messages) == ["model_not_priced"] and code == 4000
            assert "no price for 'gpt-realtime'" in orjson.loads(messages[0])["error"]["message"]
            async with connect(relay.url + "/voice", extra_headers=bearer) as ws:
                for message in TEXT_TURN:
                    await ws.send_message(message)
                messages, code, _ = await receive_until_closed(ws)
            assert error_codes(messages)[-1] == "relay_budget_exhausted" and code == 4029
            # A user without the claim has no spending budget on this relay.
            assert (await _text_turn(relay))[-1]["type"] == "response.done"


async def _text_turn(relay: object) -> list[dict]:
    from .test_accounting import text_turn

    return await text_turn(relay)  # type: ignore[arg-type]


async def test_metrics_show_what_responses_cost_without_a_user_label() -> None:
    with trio.fail_after(TIMEOUT):
        async with relays("sqlite:///:memory:", **PRICED) as (relay,):
            turns = [await _text_turn(relay), await _text_turn(relay)]
            async with httpx.AsyncClient(base_url=relay.http_url) as http:
                body = (await http.get("/metrics")).text
            assert relay.app.accounting is not None
            (row,) = await relay.app.accounting.store.rows(user="alice")
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(body)
        for s in family.samples
    }
    cost = samples[("relay_cost_dollars_total", (("model", "gpt-realtime-2"),))]
    assert cost == pytest.approx(row.cost_usd) and cost > 0
    out_audio = samples[("relay_tokens_total", (("direction", "output"), ("kind", "audio")))]
    assert out_audio == sum(
        t[-1]["response"]["usage"]["output_token_details"]["audio_tokens"] for t in turns
    )
    assert not any("user" in dict(labels) for _, labels in samples)
    assert samples[("relay_pump_active", ())] == 1
