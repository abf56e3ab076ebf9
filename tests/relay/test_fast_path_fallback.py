"""The fast paths turn themselves off where they cannot run, and the relay serves on.

RELAY_PUMP=auto (the default): before a worker reports ready, the pump relays one message over
a loopback pair; each way a Trio change could break it (a name it relies on gone, Trio
refusing the driver in its I/O manager's place, Trio no longer waiting through the attribute
the driver replaces, no epoll) ends in sessions relayed by their own tasks, one warning saying
why, and ``relay_pump_active 0`` in /metrics: never a hang, never a 503 "still starting".
RELAY_PUMP=on fails start-up instead. The take-over of Hypercorn's sockets does the same for
a Hypercorn name gone (in a process of its own: the changes are made once per process), and
the relay imports and serves where the platform has no epoll at all.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import trio
import trio.lowlevel

from relay.config import load_config
from relay.server.serve import serve
from relay.wire import internals
from relay.wire import pump as pump_module

from .harness import (
    TEST_KEY,
    UpstreamConnection,
    connect,
    open_session,
    running_relay,
    scripted_upstream,
)
from .test_metrics import value
from .test_ops import samples as scrape_text

TIMEOUT = 20
ROOT = Path(__file__).parents[2]


async def echo(conn: UpstreamConnection) -> None:
    """session.created, then every message but the relay's session.update echoed."""
    ws = await open_session(conn)  # (it reads the relay's session.update)
    while True:
        await ws.send_message(await conn.receive())


@pytest.fixture(autouse=True)
def fresh_name_checks() -> Iterator[None]:
    internals.problems.cache_clear()
    yield
    internals.problems.cache_clear()


def _a_trio_name_gone(monkeypatch: pytest.MonkeyPatch) -> None:
    moved = internals.Internal(
        internals.PUMP, "trio._core._run:Runner.moved_in_a_new_trio", instance=True
    )
    monkeypatch.setattr(internals, "INTERNALS", (*internals.INTERNALS, moved))


def _the_swap_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(runner: object, io: object) -> None:
        raise AttributeError("'Runner' object attribute 'io_manager' is read-only")

    monkeypatch.setattr(pump_module, "_set_io_manager", refuse)


def _the_driver_is_never_called(monkeypatch: pytest.MonkeyPatch) -> None:
    """As if Trio's loop called its I/O manager some other way than through the attribute."""
    monkeypatch.setattr(pump_module, "_set_io_manager", lambda runner, io: None)
    monkeypatch.setattr(pump_module, "PROOF_SECONDS", 0.3)


def _no_epoll(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pump_module, "HAVE_EPOLL", False)


SIMULATED: dict[str, tuple[Callable[[pytest.MonkeyPatch], None], str]] = {
    "name-gone": (_a_trio_name_gone, "Runner.moved_in_a_new_trio"),
    "swap-raises": (_the_swap_raises, "could not take Trio's wait"),
    "driver-never-called": (_the_driver_is_never_called, "no message crossed the pump"),
    "no-epoll": (_no_epoll, "no epoll"),
}


async def _one_exchange(url: str) -> None:
    async with connect(url + "/voice") as ws:
        assert await ws.get_message() == '{"type":"session.created"}'
        await ws.send_message('{"type":"input_audio_buffer.clear"}')
        assert await ws.get_message() == '{"type":"input_audio_buffer.clear"}'


@pytest.mark.parametrize("simulated", SIMULATED)
async def test_a_trio_the_pump_cannot_share_ends_in_the_fallback_with_one_warning(
    simulated: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    simulate, why = SIMULATED[simulated]
    simulate(monkeypatch)
    with trio.fail_after(TIMEOUT):
        async with (
            scripted_upstream(echo) as up,
            running_relay(upstream_url=up.url, pump="auto") as relay,
        ):
            assert relay.app.pump is None
            warnings = [m for r in caplog.records if "the pump is off" in (m := r.getMessage())]
            assert len(warnings) == 1 and why in warnings[0], warnings
            async with httpx.AsyncClient(base_url=relay.http_url) as http:
                assert (await http.get("/readyz")).status_code == 200
                samples = scrape_text((await http.get("/metrics")).text)
            assert value(samples, "relay_pump_active") == 0
            assert value(samples, "relay_takeover_active") == 1
            await _one_exchange(relay.url)


@pytest.mark.parametrize("simulated", SIMULATED)
async def test_relay_pump_on_fails_start_up_instead_of_falling_back(
    simulated: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from hypercorn.utils import LifespanFailureError

    simulate, why = SIMULATED[simulated]
    simulate(monkeypatch)
    config = load_config(
        {}, {"openai_api_key": TEST_KEY, "port": 0, "allow_anonymous": True, "pump": "on",
             "store": "sqlite:///:memory:"},
    )  # fmt: skip
    with trio.fail_after(TIMEOUT), pytest.raises(BaseExceptionGroup) as failed:
        await serve(config, shutdown_trigger=trio.sleep_forever)  # returns only by failing
    said = "RELAY_PUMP=on, but the pump cannot run here"
    assert failed.group_contains(LifespanFailureError, match=said, depth=None)
    assert failed.group_contains(LifespanFailureError, match=why, depth=None)


@pytest.mark.parametrize("mode", ["auto", "off"])
async def test_a_pump_that_works_runs_unless_turned_off_and_metrics_say_which(
    mode: str, caplog: pytest.LogCaptureFixture
) -> None:
    with trio.fail_after(TIMEOUT):
        async with (
            scripted_upstream(echo) as up,
            running_relay(upstream_url=up.url, pump=mode) as relay,
        ):
            assert (relay.app.pump is not None) == (mode == "auto")
            async with httpx.AsyncClient(base_url=relay.http_url) as http:
                samples = scrape_text((await http.get("/metrics")).text)
            assert value(samples, "relay_pump_active") == (mode == "auto")
            await _one_exchange(relay.url)
    assert "the pump is off" not in caplog.text  # off as asked: nothing to warn about


async def test_a_pump_that_fails_while_serving_shows_in_the_metrics(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with trio.fail_after(TIMEOUT):
        async with scripted_upstream(echo) as up, running_relay(upstream_url=up.url) as relay:
            pump = relay.app.pump
            assert pump is not None and pump.running

            def broken(self: object, timeout: float) -> None:
                raise OSError("the pump's epoll went away")

            monkeypatch.setattr(pump_module._Driver, "_serve_until", broken)
            await trio.lowlevel.checkpoint()
            assert not pump.running
            async with httpx.AsyncClient(base_url=relay.http_url) as http:
                samples = scrape_text((await http.get("/metrics")).text)
            assert value(samples, "relay_pump_active") == 0
            await _one_exchange(relay.url)


# -- in a process of its own ----------------------------------------------------------------

SERVE_ONE_SESSION = """
import trio
from tests.relay.harness import running_relay, scripted_upstream
from tests.relay.test_fast_path_fallback import _one_exchange, echo

async def main() -> None:
    async with scripted_upstream(echo) as up, running_relay(upstream_url=up.url) as relay:
        await _one_exchange(relay.url)
        print("pump", relay.app.pump is not None, "takeover", relay.app.taking_over)
        body, _ = relay.app.metrics.render()
        print(body.decode())

trio.run(main)
"""


def _run(prelude: str) -> subprocess.CompletedProcess[str]:
    script = textwrap.dedent(prelude) + SERVE_ONE_SESSION
    env = {k: v for k, v in os.environ.items() if k != "RELAY_PUMP"}
    return subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=60, check=False,
    )  # fmt: skip


def test_the_relay_imports_and_serves_where_the_platform_has_no_epoll() -> None:
    """Before, ``import relay.server.app`` raised AttributeError (select.EPOLLIN at import)."""
    ran = _run(
        """
        import select
        hidden = {n: getattr(select, n) for n in dir(select) if n.lower().startswith("epoll")}
        for name in hidden:
            delattr(select, name)
        import relay.server.app  # noqa: F401  (as on a platform without epoll)
        for name, value in hidden.items():
            setattr(select, name, value)  # (Trio's own I/O manager on this machine needs it)
        """
    )
    assert ran.returncode == 0, ran.stderr
    assert "pump False takeover True" in ran.stdout
    assert "relay_pump_active 0.0" in ran.stdout
    assert "the pump is off (this platform has no epoll)" in ran.stderr


def test_a_hypercorn_name_gone_serves_through_plain_asgi_with_a_warning() -> None:
    ran = _run(
        """
        import hypercorn.events
        import hypercorn.trio.run  # noqa: F401  (Hypercorn loaded: its modules hold their own)
        del hypercorn.events.RawData  # a name the relay relies on, gone
        """
    )
    assert ran.returncode == 0, ran.stderr
    assert "takeover False" in ran.stdout
    assert "relay_takeover_active 0.0" in ran.stdout
    assert "Hypercorn's insides moved (hypercorn.events:RawData: no RawData)" in ran.stderr
    assert ran.stderr.count("Hypercorn's insides moved") == 1
