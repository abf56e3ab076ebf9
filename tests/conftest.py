"""Test-wide set-up: Hypothesis profiles, a printed replay seed, and a wsproto fix for test clients."""

from __future__ import annotations

import logging
import os
import random
import struct
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from wsproto import frame_protocol

from .leaks import CLIENT_LEAKS, SecretScanner, check_client_sees_no_upstream_key, hold

# `ci` (the default) keeps the whole suite within a few minutes on 2 cores;
# `thorough` is for long runs: HYPOTHESIS_PROFILE=thorough uv run pytest tests/relay/test_properties.py
settings.register_profile(
    "ci",
    max_examples=100,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "thorough",
    max_examples=25_000,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


SCANNER = SecretScanner()


@pytest.fixture(autouse=True)
def no_secret_in_any_log_line() -> Iterator[None]:
    """Fail the test during which a log line carried a credential."""
    seen = len(SCANNER.leaks)
    yield
    assert SCANNER.leaks[seen:] == [], "a log line carried a secret"


@pytest.fixture(autouse=True)
def no_upstream_key_reaches_a_client() -> Iterator[None]:
    """Fail the test during which a client received the upstream key (even if the test
    swallowed the assertion the client helper raised on the spot)."""
    seen = len(CLIENT_LEAKS)
    yield
    assert CLIENT_LEAKS[seen:] == [], "a client received the upstream key"


def _record_upstream_keys() -> None:
    """Record every key a relay is given upstream: each relay builds a dialer, and each
    session (and each bridge test) a bridge with the key as its secret."""
    from relay.core.bridge import Bridge
    from relay.wire.upstream import UpstreamDialer

    dialer_init, bridge_init = UpstreamDialer.__init__, Bridge.__init__

    def dialer(self: UpstreamDialer, config: Any, *args: Any, **kwargs: Any) -> None:
        hold(config.openai_api_key)
        dialer_init(self, config, *args, **kwargs)

    def bridge(self: Bridge, *args: Any, secret: str = "", **kwargs: Any) -> None:
        hold(secret)
        bridge_init(self, *args, secret=secret, **kwargs)

    UpstreamDialer.__init__ = dialer  # type: ignore[method-assign]
    Bridge.__init__ = bridge  # type: ignore[method-assign]


def _check_the_twilio_side() -> None:
    """Scan everything a relay sends to the Twilio side of a phone call (messages and the close
    reason), whichever client is at the other end: every write goes through these two."""
    from relay.server.phone import TwilioLeg

    to_twilio, close_twilio = TwilioLeg._to_twilio, TwilioLeg._close_twilio

    async def checked_send(self: TwilioLeg, text: str) -> None:
        check_client_sees_no_upstream_key("a message to Twilio", text, fail_now=False)
        await to_twilio(self, text)

    async def checked_close(self: TwilioLeg, code: int, reason: str) -> None:
        check_client_sees_no_upstream_key("a close reason to Twilio", reason, fail_now=False)
        await close_twilio(self, code, reason)

    TwilioLeg._to_twilio = checked_send  # type: ignore[method-assign]
    TwilioLeg._close_twilio = checked_close  # type: ignore[method-assign]


def pytest_configure(config: pytest.Config) -> None:
    logging.getLogger().addHandler(SCANNER)
    _record_upstream_keys()
    _check_the_twilio_side()
    if logging.getLogger().level > logging.INFO or logging.getLogger().level == logging.NOTSET:
        logging.getLogger().setLevel(logging.INFO)
    """Pick the run's Hypothesis seed up front so a failure can be replayed exactly."""
    if getattr(config.option, "hypothesis_seed", None) is None:
        seed = os.environ.get("HYPOTHESIS_SEED") or str(random.randrange(2**32))
        config.option.hypothesis_seed = int(seed)


def pytest_report_header(config: pytest.Config) -> str:
    seed = config.option.hypothesis_seed
    profile = os.environ.get("HYPOTHESIS_PROFILE", "ci")
    return f"hypothesis: profile {profile}, seed {seed} (replay with HYPOTHESIS_SEED={seed})"


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    if terminalreporter.stats.get("failed"):
        seed = config.option.hypothesis_seed
        terminalreporter.write_line(f"hypothesis seed was {seed}: replay with HYPOTHESIS_SEED={seed}")

_process_close = frame_protocol.FrameProtocol._process_close


def _accept_1014(self: frame_protocol.FrameProtocol, frame: frame_protocol.Frame) -> frame_protocol.Frame:
    """Let the wsproto-based test clients read close code 1014 (Bad Gateway).

    1014 is registered with IANA and accepted by browsers, Node's ws and Python's
    websockets, but wsproto 1.3 treats it as an unknown reserved code and answers
    with a protocol error, which would hide the code the relay really sent.
    """
    data = frame.payload
    if isinstance(data, bytes | bytearray) and len(data) >= 2 and struct.unpack("!H", data[:2])[0] == 1014:
        return frame_protocol.Frame(
            frame.opcode, (1014, bytes(data[2:]).decode()), frame.frame_finished, frame.message_finished
        )
    return _process_close(self, frame)


frame_protocol.FrameProtocol._process_close = _accept_1014  # type: ignore[method-assign]
